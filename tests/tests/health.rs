//! Health checks end to end: three real lbnode processes probe two test
//! servers through check gates (`health_check.port`) that the test opens,
//! closes or closes for one node's source address, and the test watches the
//! committed view, every node's routing and where traffic goes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use raftlb_tests::backend::{http_server, CheckGate, GateMode, TestServer};
use raftlb_tests::client::get;
use raftlb_tests::{apply_spec, free_port, lbctl, wait_for, Cluster};
use serde_json::Value;

/// The check interval of these tests, and rise and fall.
const INTERVAL: Duration = Duration::from_millis(200);
const RISE_FALL: u32 = 2;

/// Server `a` on 127.0.1.1 and `b` on 127.0.1.2, on the same ports, so one
/// `health_check.port` reaches each server's own gate.
struct Servers {
    a: TestServer,
    b: TestServer,
    gate_a: CheckGate,
    gate_b: CheckGate,
    bind: SocketAddr,
}

impl Servers {
    fn start() -> Servers {
        let a = http_server("a", "127.0.1.1:0");
        let b = http_server("b", &format!("127.0.1.2:{}", a.addr.port()));
        let gate_a = CheckGate::start("127.0.1.1:0");
        let gate_b = CheckGate::start(&format!("127.0.1.2:{}", gate_a.addr.port()));
        Servers { a, b, gate_a, gate_b, bind: SocketAddr::from(([127, 0, 0, 1], free_port())) }
    }

    fn spec(&self, policy: &str, backend_extra: &str, check: &str) -> String {
        format!(
            "defaults:\n  timeouts: {{ connect: 500ms, server: 2s, check: 300ms }}\nhealth: {{ policy: {policy} }}\nfrontends:\n  - name: web\n    bind: [\"{bind}\"]\n    mode: http\n    default_backend: app\nbackends:\n  - name: app\n    balance: roundrobin\n{backend_extra}    health_check: {{ type: http, path: /health, port: {gate}, interval: {interval}ms, rise: {rf}, fall: {rf}{check} }}\n    servers:\n      - {{ name: a, address: \"{a}\" }}\n      - {{ name: b, address: \"{b}\" }}\n",
            bind = self.bind,
            gate = self.gate_a.addr.port(),
            interval = INTERVAL.as_millis(),
            rf = RISE_FALL,
            a = self.a.addr,
            b = self.b.addr,
        )
    }
}

fn node_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, id as u8))
}

/// `lbctl health app --json` through node `via`.
fn health(c: &Cluster, via: u64) -> Value {
    lbctl(&c.endpoint(via), &["health", "app", "--json"]).json()
}

fn server<'a>(h: &'a Value, name: &str) -> &'a Value {
    h["servers"].as_array().unwrap().iter().find(|s| s["server"] == name).unwrap_or_else(|| panic!("no server {name} in {h}"))
}

/// Per node (in id order): does it send the server new sessions?
fn routes(h: &Value, name: &str) -> Vec<bool> {
    server(h, name)["nodes"].as_array().unwrap().iter().map(|n| n["routes"].as_bool().unwrap_or(false)).collect()
}

fn node_view<'a>(h: &'a Value, name: &str, node: u64) -> &'a Value {
    server(h, name)["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).unwrap()
}

/// Which servers `n` requests through node `id`'s frontend reach.
fn spread(c: &Cluster, id: u64, bind: SocketAddr, n: usize) -> HashMap<String, usize> {
    let at = c.nodes[id as usize - 1].frontend(bind);
    let mut seen = HashMap::new();
    for _ in 0..n {
        let reply = get(at, "/", &[]).unwrap_or_else(|e| panic!("a request through node {id}: {e}"));
        assert_eq!(reply.status, 200, "through node {id}: {}", reply.body);
        *seen.entry(reply.server()).or_insert(0) += 1;
    }
    seen
}

/// A formed 3-node cluster serving the spec, every node checking both servers.
fn cluster_with(servers: &Servers, spec: &str) -> Cluster {
    let c = Cluster::formed(3);
    apply_spec(&c, 1, "spec.yaml", spec);
    wait_for(Duration::from_secs(10), "every node to check and route both servers", || {
        let h = health(&c, 1);
        let ready = ["a", "b"]
            .iter()
            .all(|s| routes(&h, s) == [true; 3] && server(&h, s)["nodes"].as_array().unwrap().iter().all(|n| n["last_ok"] == true));
        ready.then_some(())
    });
    wait_for(Duration::from_secs(5), "every node's frontend to serve", || {
        (1..=3).all(|id| get(c.nodes[id - 1].frontend(servers.bind), "/", &[]).is_ok_and(|r| r.status == 200)).then_some(())
    });
    c
}

/// How long until b is `state` in the committed view and every node routes
/// it (or not) accordingly.
fn time_until_b_is(c: &Cluster, state: &str, routed: bool) -> Duration {
    let start = Instant::now();
    wait_for(Duration::from_secs(10), &format!("b {state} in the committed view and on every node"), || {
        let h = health(c, 2);
        (server(&h, "b")["state"] == state && routes(&h, "b") == [routed; 3]).then_some(())
    });
    start.elapsed()
}

#[test]
fn a_server_down_for_every_node_leaves_rotation_everywhere_within_the_bound_and_comes_back() {
    let s = Servers::start();
    let c = cluster_with(&s, &s.spec("majority", "", ""));
    for id in 1..=3 {
        assert!(s.gate_a.checks_from(node_ip(id)) > 0, "node {id} checks from its source address 127.0.0.{id}");
        let seen = spread(&c, id, s.bind, 20);
        assert_eq!((seen.get("a"), seen.get("b")), (Some(&10), Some(&10)), "node {id} balances over both");
    }

    s.gate_b.set(GateMode::Fail);
    let out = time_until_b_is(&c, "down", false);
    let bound = INTERVAL * RISE_FALL + Duration::from_secs(1);
    eprintln!("b out of rotation on all nodes {} ms after its checks began failing", out.as_millis());
    assert!(out <= bound, "out of rotation after {out:?}; the bound is fall x interval + 1 s = {bound:?}");
    let b_hits = s.b.hits();
    for id in 1..=3 {
        assert_eq!(spread(&c, id, s.bind, 10).get("a"), Some(&10), "node {id} sends everything to a");
    }
    assert_eq!(s.b.hits(), b_hits, "no request reached b while it was down");
    // A majority took b out; the last node's own checks follow shortly.
    wait_for(Duration::from_secs(5), "every node to report b down", || {
        let h = health(&c, 1);
        (1..=3).all(|id| node_view(&h, "b", id)["reported_up"] == false).then_some(())
    });

    s.gate_b.set(GateMode::Pass);
    let back = time_until_b_is(&c, "up", true);
    eprintln!("b back in rotation on all nodes {} ms after its checks passed again", back.as_millis());
    assert!(back <= bound, "back after {back:?}; the bound is rise x interval + 1 s = {bound:?}");
    for id in 1..=3 {
        assert!(spread(&c, id, s.bind, 10).get("b").is_some_and(|n| *n > 0), "node {id} sends b traffic again");
    }

    // Many checks run on every node; the cluster hears only the two changes.
    std::thread::sleep(INTERVAL * 10);
    let h = health(&c, 1);
    assert_eq!(server(&h, "b")["transitions"], 2, "down and up: {h}");
    for id in 1..=3 {
        let checks = s.gate_b.checks_from(node_ip(id));
        let proposals = node_view(&h, "b", id)["proposals"].as_u64().unwrap();
        assert!(checks >= 10, "node {id} checked b {checks} times");
        assert_eq!(proposals, 2, "node {id} proposed b's two changes, not one per check ({checks} checks): {}", server(&h, "b"));
        assert_eq!(node_view(&h, "a", id)["proposals"], 0, "a never changed");
    }
}

#[test]
fn a_server_unreachable_from_one_node_stays_up_under_majority_and_splits_the_nodes_under_local() {
    let s = Servers::start();
    let c = cluster_with(&s, &s.spec("majority", "", ""));
    s.gate_b.block(node_ip(1));
    wait_for(Duration::from_secs(10), "node 1's dissent to be committed", || {
        let h = health(&c, 2);
        (node_view(&h, "b", 1)["reported_up"] == false).then_some(())
    });
    // Several more intervals: the view must not follow the one dissenter.
    std::thread::sleep(INTERVAL * 5);
    let h = health(&c, 2);
    let b = server(&h, "b");
    assert_eq!(b["state"], "up", "one node of three is no majority: {b}");
    assert_eq!(b["transitions"], 0);
    for (id, up) in [(1, false), (2, true), (3, true)] {
        assert_eq!(node_view(&h, "b", id)["checked_up"], up, "node {id}'s own checks: {b}");
    }
    assert_eq!(routes(&h, "b"), [true; 3], "every node routes by the committed view");
    for id in 1..=3 {
        assert_eq!(spread(&c, id, s.bind, 10).get("b"), Some(&5), "node {id} keeps sending b its share");
    }
    let text = lbctl(&c.endpoint(1), &["health", "app"]);
    assert!(text.ok, "{}", text.stderr);
    let dissent = text.stdout.lines().filter(|l| l.contains("node 1") && l.contains("down for")).count();
    assert_eq!(dissent, 1, "the table shows node 1's dissent on b:\n{}", text.stdout);

    // The Keepalived + HAProxy behaviour: each node alone.
    apply_spec(&c, 1, "local.yaml", &s.spec("local", "", ""));
    wait_for(Duration::from_secs(5), "the nodes to disagree on b", || {
        let h = health(&c, 3);
        (routes(&h, "b") == [false, true, true]).then_some(())
    });
    assert_eq!(spread(&c, 1, s.bind, 10).get("a"), Some(&10), "node 1 alone avoids b");
    assert_eq!(spread(&c, 2, s.bind, 10).get("b"), Some(&5), "node 2 still uses b");
    let status = c.local_status(1).unwrap();
    assert_eq!(status["health_view"], "local (health.policy: local)");
}

#[test]
fn a_flapping_server_is_damped_by_rise_and_fall() {
    let s = Servers::start();
    // Three in a row to change state; the gate alternates for every node.
    let c = cluster_with(&s, &s.spec("majority", "", "").replace("rise: 2, fall: 2", "rise: 3, fall: 3"));
    s.gate_b.set(GateMode::Flap);
    let before: Vec<u64> = (1..=3).map(|id| s.gate_b.checks_from(node_ip(id))).collect();
    std::thread::sleep(INTERVAL * 15);
    let h = health(&c, 1);
    for id in 1..=3 {
        let checks = s.gate_b.checks_from(node_ip(id)) - before[id as usize - 1];
        assert!(checks >= 8, "node {id} checked the flapping b {checks} times");
        assert_eq!(node_view(&h, "b", id)["proposals"], 0, "node {id} proposed nothing: no result held three times");
    }
    assert_eq!(server(&h, "b")["transitions"], 0, "the committed view never moved: {h}");
    assert_eq!(routes(&h, "b"), [true; 3]);

    // The same server failing for good does go down, once.
    s.gate_b.set(GateMode::Fail);
    wait_for(Duration::from_secs(10), "b to go down", || (server(&health(&c, 1), "b")["state"] == "down").then_some(()));
    std::thread::sleep(INTERVAL * 5);
    assert_eq!(server(&health(&c, 1), "b")["transitions"], 1);
}

#[test]
fn disable_enable_and_drain_take_effect_on_every_node_and_survive_a_restart() {
    let s = Servers::start();
    let cookie = "    cookie: { name: SRV, mode: insert }\n";
    let mut c = cluster_with(&s, &s.spec("majority", cookie, ""));
    let front = |c: &Cluster, id: u64| c.nodes[id as usize - 1].frontend(s.bind);
    let with_cookie = |c: &Cluster, id: u64| get(front(c, id), "/", &[("Cookie", "SRV=b")]).unwrap().server();

    let out = lbctl(&c.endpoint(2), &["server", "drain", "app/b", "--json"]).json();
    assert_eq!(out["state"], "drain");
    wait_for(Duration::from_secs(5), "every node to drain b", || (routes(&health(&c, 1), "b") == [false; 3]).then_some(()));
    for id in 1..=3 {
        assert_eq!(spread(&c, id, s.bind, 6).get("a"), Some(&6), "node {id}: no new sessions on b");
        assert_eq!(with_cookie(&c, id), "b", "node {id}: a client that persists on b stays");
    }

    assert!(lbctl(&c.endpoint(3), &["server", "disable", "app/b"]).ok);
    wait_for(Duration::from_secs(5), "maintenance on every node", || (server(&health(&c, 1), "b")["admin"] == "maint").then_some(()));
    std::thread::sleep(Duration::from_millis(300));
    for id in 1..=3 {
        assert_eq!(with_cookie(&c, id), "a", "node {id}: not even persistent clients reach b in maintenance");
    }

    // The operator's state is committed: it outlives every node.
    for id in 1..=3 {
        assert!(c.node(id).terminate().success());
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    c.agreed_leader(Duration::from_secs(10));
    wait_for(Duration::from_secs(10), "the restarted nodes to serve", || {
        (1..=3).all(|id| get(front(&c, id), "/", &[]).is_ok_and(|r| r.status == 200)).then_some(())
    });
    let h = health(&c, 2);
    assert_eq!(server(&h, "b")["admin"], "maint", "after a restart: {h}");
    for id in 1..=3 {
        assert_eq!(spread(&c, id, s.bind, 6).get("a"), Some(&6), "node {id} after its restart");
    }

    assert!(lbctl(&c.endpoint(1), &["server", "enable", "app/b"]).ok);
    wait_for(Duration::from_secs(5), "b back on every node", || (routes(&health(&c, 1), "b") == [true; 3]).then_some(()));
    for id in 1..=3 {
        assert!(spread(&c, id, s.bind, 6).get("b").is_some_and(|n| *n > 0), "node {id} uses b again");
    }

    // Bad names change nothing and say what exists.
    let bad = lbctl(&c.endpoint(1), &["server", "disable", "app/zz"]);
    assert!(!bad.ok && bad.stderr.contains("backend `app` has no server `zz`: its servers are a, b"), "{}", bad.stderr);
    let bad = lbctl(&c.endpoint(1), &["server", "drain", "nope/a"]);
    assert!(!bad.ok && bad.stderr.contains("there is no backend `nope`"), "{}", bad.stderr);
    let bad = lbctl(&c.endpoint(1), &["health", "nope"]);
    assert!(!bad.ok && bad.stderr.contains("there is no backend `nope`: the backends are app"), "{}", bad.stderr);
    let bad = lbctl(&c.endpoint(1), &["server", "drain", "app"]);
    assert!(!bad.ok && bad.stderr.contains("write BACKEND/SERVER"), "{}", bad.stderr);
    assert_eq!(server(&health(&c, 1), "b")["admin"], "ready");
}

#[test]
fn without_quorum_a_node_routes_by_its_own_checks_and_says_so() {
    let s = Servers::start();
    let mut c = cluster_with(&s, &s.spec("majority", "", ""));
    c.node(2).kill();
    c.node(3).kill();
    wait_for(Duration::from_secs(5), "node 1 to notice it has no quorum", || {
        (c.local_status(1)?["health_view"] == "local (no quorum)").then_some(())
    });
    // Nothing can commit now; node 1's own checks still take b out.
    s.gate_b.set(GateMode::Fail);
    wait_for(Duration::from_secs(5), "node 1 to stop routing b", || (!routes(&health(&c, 1), "b")[0]).then_some(()));
    assert_eq!(spread(&c, 1, s.bind, 6).get("a"), Some(&6));
    assert!(c.nodes[0].log().contains("no quorum: routing by this node's own health checks"), "the log says so");

    c.node(2).start();
    c.node(3).start();
    wait_for(Duration::from_secs(10), "the committed view again", || (c.local_status(1)?["health_view"] == "committed").then_some(()));
    wait_for(Duration::from_secs(10), "b down in the committed view once a quorum is back", || {
        (server(&health(&c, 1), "b")["state"] == "down").then_some(())
    });
}

#[test]
fn a_node_whose_listener_is_broken_gives_up_leadership_and_stays_a_follower_while_it_fails() {
    let s = Servers::start();
    let c = Cluster::formed(3);
    let leader = c.agreed_leader(Duration::from_secs(5));
    // Something else holds the leader's frontend address: its listener cannot come up.
    let squatter = std::net::TcpListener::bind(c.nodes[leader as usize - 1].frontend(s.bind)).expect("the squatter binds");
    let via = if leader == 1 { 2 } else { 1 };
    apply_spec(&c, via, "spec.yaml", &s.spec("majority", "", ""));
    let applied = Instant::now();
    let next = wait_for(Duration::from_secs(8), "another node to lead", || {
        let l = c.agreed_leader(Duration::from_secs(5));
        (l != leader).then_some(l)
    });
    let handed = applied.elapsed();
    eprintln!("node {leader} gave up leadership {} ms after its listener failed to come up", handed.as_millis());
    assert!(handed < Duration::from_secs(5), "a few seconds at most: {handed:?}");
    let status = c.local_status(next).unwrap();
    let me = status["members"].as_array().unwrap().iter().find(|m| m["id"] == leader).unwrap();
    assert_eq!(me["serving"], false, "the registry shows node {leader} failing: {status}");
    let own = c.local_status(leader).unwrap();
    assert!(own["self_check"].as_str().unwrap().contains("not listening on frontend address"), "{own}");
    // While it fails it does not take leadership back, even through elections.
    let stay = Instant::now();
    while stay.elapsed() < Duration::from_secs(3) {
        assert_ne!(c.local_status(next).unwrap()["leader"], leader, "the failing node led again");
        std::thread::sleep(Duration::from_millis(100));
    }

    drop(squatter);
    wait_for(Duration::from_secs(10), "the node to listen and serve again", || {
        let status = c.local_status(next)?;
        let me = status["members"].as_array()?.iter().find(|m| m["id"] == leader)?.clone();
        (me["serving"] == true).then_some(())
    });
    assert!(get(c.nodes[leader as usize - 1].frontend(s.bind), "/", &[]).is_ok_and(|r| r.status == 200));
}
