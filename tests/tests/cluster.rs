//! The cluster foundation end to end: real lbnode processes on loopback,
//! driven by the real lbctl, with real Raft between them.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use raftlb_tests::{lbctl, loopback_spec, spec_file, wait_for, Cluster};

fn apply(endpoint: &str, file: &str) -> u64 {
    let out = lbctl(endpoint, &["config", "apply", "-f", file, "--json"]).json();
    assert_eq!(out["changed"], true, "{out}");
    out["version"].as_u64().expect("a version")
}

#[test]
fn three_nodes_report_the_same_config_version_within_a_second() {
    let c = Cluster::formed(3);
    let status = lbctl(&c.endpoint(1), &["cluster", "status", "--json"]).json();
    assert_eq!(status["leader"], 1, "{status}");
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{status}");
    let roles: Vec<&str> = members.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["leader", "follower", "follower"], "{status}");
    for m in members {
        let id = m["id"].as_u64().unwrap();
        assert_eq!(m["addr"], c.endpoint(id), "{status}");
    }
    wait_for(Duration::from_secs(5), "every member to report its software version", || {
        let s = lbctl(&c.endpoint(1), &["cluster", "status", "--json"]).json();
        s["members"].as_array()?.iter().all(|m| m["version"] == env!("CARGO_PKG_VERSION")).then_some(())
    });

    // Applied through a follower: the write is forwarded to the leader.
    let file = spec_file(&c, "v1.yaml", &loopback_spec(1));
    let version = apply(&c.endpoint(2), &file);
    let applied = Instant::now();
    wait_for(Duration::from_secs(1), "all three nodes to report the new config version", || {
        c.config_versions().iter().all(|v| *v == Some(version)).then_some(())
    });
    assert!(applied.elapsed() < Duration::from_secs(1), "took {:?}", applied.elapsed());
    eprintln!("config version {version} on all three nodes {:?} after apply returned", applied.elapsed());
    let spec = lbctl(&c.endpoint(3), &["config", "get", "--json"]).json();
    assert_eq!(spec["version"], version);
    assert_eq!(spec["spec"]["backends"][0]["servers"][0]["address"], "127.0.0.1:19001");
}

#[test]
fn a_new_leader_follows_a_killed_leader_within_two_seconds_and_any_survivor_takes_writes() {
    let mut c = Cluster::formed(3);
    let v1 = apply(&c.endpoint(1), &spec_file(&c, "v1.yaml", &loopback_spec(1)));
    let old = c.agreed_leader(Duration::from_secs(2));

    c.node(old).kill();
    let killed = Instant::now();
    let new = c.agreed_leader(Duration::from_secs(2));
    let elected = killed.elapsed();
    assert_ne!(new, old);
    assert!(elected < Duration::from_secs(2), "a new leader took {elected:?}");
    eprintln!("node {new} leads {elected:?} after node {old} was killed");

    let survivors: Vec<u64> = c.nodes.iter().filter(|n| n.is_running()).map(|n| n.id).collect();
    let mut version = v1;
    for (i, id) in survivors.iter().enumerate() {
        let file = spec_file(&c, &format!("s{id}.yaml"), &loopback_spec(10 + i as u16));
        let v = apply(&c.endpoint(*id), &file);
        assert_eq!(v, version + 1, "each write through node {id} makes the next version");
        version = v;
    }
    wait_for(Duration::from_secs(1), "both survivors to report the last version", || {
        c.config_versions().iter().all(|v| *v == Some(version)).then_some(())
    });
}

#[test]
fn the_committed_spec_and_its_history_survive_a_restart_of_every_node() {
    let mut c = Cluster::formed(3);
    for n in 1..=3 {
        apply(&c.endpoint(1), &spec_file(&c, &format!("v{n}.yaml"), &loopback_spec(n)));
    }
    // A write returns once the leader applied it; node 2 follows a moment later.
    wait_for(Duration::from_secs(3), "every node to be at version 3", || c.config_versions().iter().all(|v| *v == Some(3)).then_some(()));
    let before = lbctl(&c.endpoint(2), &["config", "history", "--json"]).json();
    let spec_before = lbctl(&c.endpoint(2), &["config", "get", "--json"]).json();

    // SIGKILL: nothing gets a chance to flush on the way out.
    for id in 1..=3 {
        c.node(id).kill();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for id in 1..=3 {
        c.wait_until_answers(id);
    }
    c.agreed_leader(Duration::from_secs(5));
    wait_for(Duration::from_secs(3), "every node to be back at version 3", || {
        c.config_versions().iter().all(|v| *v == Some(3)).then_some(())
    });
    for id in 1..=3 {
        let history = lbctl(&c.endpoint(id), &["config", "history", "--json"]).json();
        assert_eq!(history, before, "node {id}'s history");
        assert_eq!(history["versions"].as_array().unwrap().len(), 3);
        assert_eq!(lbctl(&c.endpoint(id), &["config", "get", "--json"]).json(), spec_before, "node {id}'s spec");
    }
    let status = lbctl(&c.endpoint(3), &["cluster", "status", "--json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "the registry survives too: {status}");
}

#[test]
fn five_nodes_take_writes_with_two_down_and_refuse_them_with_three_down() {
    let mut c = Cluster::formed(5);
    apply(&c.endpoint(1), &spec_file(&c, "v1.yaml", &loopback_spec(1)));
    let leader = c.agreed_leader(Duration::from_secs(2));
    let follower = c.nodes.iter().map(|n| n.id).find(|id| *id != leader).unwrap();

    // The leader and one follower down: three of five remain, a quorum.
    c.node(leader).kill();
    c.node(follower).kill();
    let survivors: Vec<u64> = c.nodes.iter().filter(|n| n.is_running()).map(|n| n.id).collect();
    let v2 = apply(&c.endpoint(survivors[0]), &spec_file(&c, "v2.yaml", &loopback_spec(2)));
    assert_eq!(v2, 2);

    // A third node down: two of five, no quorum. The write fails, in bounded time.
    c.node(survivors[2]).kill();
    let file = spec_file(&c, "v3.yaml", &loopback_spec(3));
    for id in &survivors[..2] {
        let started = Instant::now();
        let out = lbctl(&c.endpoint(*id), &["config", "apply", "-f", &file]);
        let took = started.elapsed();
        assert!(!out.ok, "a write without quorum must fail, got: {}", out.stdout);
        assert!(out.stderr.contains("quorum"), "the error says why: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
        assert!(took < Duration::from_secs(10), "the refusal took {took:?}");
        eprintln!("node {id} refused the write without quorum after {took:?}");
    }
    assert!(c.config_versions().iter().all(|v| *v == Some(2)), "{:?}", c.config_versions());
}

#[test]
fn malformed_and_invalid_specs_are_refused_and_the_version_does_not_move() {
    let c = Cluster::formed(3);
    let v1 = apply(&c.endpoint(1), &spec_file(&c, "v1.yaml", &loopback_spec(1)));
    let good = loopback_spec(2);
    let cases = [
        ("malformed.yaml", "frontends: [\n  - name: web\n".to_owned(), "line"),
        ("bad-address.yaml", good.replace("127.0.0.1:19002", "127.0.0.300:19002"), "backends[0].servers[0].address: \"127.0.0.300:19002\""),
        (
            "unknown-backend.yaml",
            good.replace("default_backend: app", "default_backend: nope"),
            "frontends[0].default_backend: \"nope\" is not a backend",
        ),
        ("duplicate.yaml", good.replace("name: s2", "name: s1"), "backends[0].servers[1].name: \"s1\" is already the name"),
    ];
    for (name, text, want) in cases {
        let file = spec_file(&c, name, &text);
        for args in [vec!["config", "apply", "-f", &file], vec!["config", "apply", "-f", &file, "--dry-run"]] {
            let out = lbctl(&c.endpoint(2), &args);
            assert!(!out.ok, "{name} must be refused");
            assert!(out.stderr.contains(want), "{name}: wanted {want:?} in: {}", out.stderr);
            assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        }
    }
    // A rule naming an unknown backend, sent straight to the admin API: the node
    // validates too, whatever client sends it.
    let rule = good.replace(
        "    default_backend: app",
        "    rules:\n      - when: { host: a.example }\n        use_backend: ghost\n    default_backend: app",
    );
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut admin = raftlb_proto::admin::connect(&c.endpoint(3), Duration::from_secs(2)).await.unwrap();
        admin.config_apply(raftlb_proto::admin::ConfigApplyRequest { spec_yaml: rule, dry_run: false }).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("frontends[0].rules[0].use_backend: \"ghost\" is not a backend"), "{}", refused.message());

    std::thread::sleep(Duration::from_millis(200));
    assert!(c.config_versions().iter().all(|v| *v == Some(v1)), "{:?}", c.config_versions());
    let history = lbctl(&c.endpoint(1), &["config", "history", "--json"]).json();
    assert_eq!(history["versions"].as_array().unwrap().len(), 1, "{history}");
}

#[test]
fn rollback_restores_an_earlier_version_as_a_new_version() {
    let c = Cluster::formed(3);
    let a = spec_file(&c, "a.yaml", &loopback_spec(1));
    apply(&c.endpoint(1), &a);
    apply(&c.endpoint(1), &spec_file(&c, "b.yaml", &loopback_spec(2)));
    let v1 = lbctl(&c.endpoint(1), &["config", "get", "--version", "1", "--json"]).json();

    let out = lbctl(&c.endpoint(2), &["config", "rollback", "1", "--json"]).json();
    assert_eq!((out["version"].as_u64(), out["changed"].as_bool()), (Some(3), Some(true)), "{out}");
    wait_for(Duration::from_secs(1), "every node at version 3", || c.config_versions().iter().all(|v| *v == Some(3)).then_some(()));
    for id in 1..=3 {
        let now = lbctl(&c.endpoint(id), &["config", "get", "--json"]).json();
        assert_eq!(now["version"], 3);
        assert_eq!(now["spec"], v1["spec"], "node {id} serves version 1's spec");
    }
    let history = lbctl(&c.endpoint(3), &["config", "history", "--json"]).json();
    let last = &history["versions"][2];
    assert_eq!(
        (last["version"].as_u64(), last["origin"].as_str(), last["current"].as_bool()),
        (Some(3), Some("rollback to 1"), Some(true))
    );
    let diff = lbctl(&c.endpoint(1), &["config", "diff", "-f", &a, "--json"]).json();
    assert_eq!(diff["changed"], false, "version 3 equals a.yaml: {diff}");

    let bad = lbctl(&c.endpoint(1), &["config", "rollback", "99"]);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("config version 99 is not in the history"), "{}", bad.stderr);
    assert!(c.config_versions().iter().all(|v| *v == Some(3)));
}

#[test]
fn a_malformed_command_line_gets_one_line_with_the_value_and_the_usage() {
    let cases: [(&[&str], &str); 5] = [
        (&["--timeout", "0s", "cluster", "status"], "lbctl: invalid value '0s' for '--timeout <DURATION>': \"0s\" would give up before any answer: give a duration above zero, like \"15s\""),
        (&["config", "get", "--version", "0"], "lbctl: invalid value '0' for '--version <VERSION>': \"0\" is not a config version: versions are numbered from 1"),
        (&["config", "rollback", "x"], "lbctl: invalid value 'x' for '<VERSION>': \"x\" is not a config version"),
        (&["node", "add", "2"], "lbctl: the following required arguments were not provided: <ADDR> (usage: lbctl node add <ID> <ADDR>)"),
        (&["cluster", "bogus"], "lbctl: unrecognized subcommand 'bogus' (usage: lbctl cluster [OPTIONS] <COMMAND>)"),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(raftlb_tests::binary("lbctl")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with(want), "{args:?}: wanted {want:?} in: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line, got: {stderr}");
    }
}

#[test]
fn bad_cluster_commands_get_one_clear_line_and_a_failure_exit() {
    let c = Cluster::formed(3);
    let (second, third) = (c.endpoint(2), c.endpoint(3));
    let cases = [
        (c.endpoint(2), vec!["cluster", "init"], "already initialized"),
        (c.endpoint(2), vec!["node", "remove", "9"], "node 9 is not a member: the members are 1, 2, 3"),
        (c.endpoint(2), vec!["node", "drain", "9"], "node 9 is not a member"),
        (format!("127.0.0.1:{}", raftlb_tests::free_port()), vec!["cluster", "status"], "cannot reach lbnode at 127.0.0.1:"),
        (c.endpoint(1), vec!["node", "add", "4", "127.0.0.1:1"], "cannot reach a node at 127.0.0.1:1"),
        (c.endpoint(1), vec!["node", "add", "4", "lb4:x"], "\"lb4:x\" is not an address: write it as HOST:PORT"),
        (c.endpoint(1), vec!["node", "add", "2", &second], "node 2 is already a voter"),
        (c.endpoint(1), vec!["node", "add", "7", &third], "the node at"),
        (c.endpoint(1), vec!["config", "apply", "-f", "/nonexistent/spec.yaml"], "cannot read /nonexistent/spec.yaml"),
    ];
    for (endpoint, args, want) in cases {
        let out = lbctl(&endpoint, &args);
        assert!(!out.ok, "{args:?} must fail");
        assert!(out.stderr.contains(want), "{args:?}: wanted {want:?} in: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{args:?}: one line, got: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
    }
    let status = lbctl(&c.endpoint(1), &["cluster", "status", "--json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "nothing changed: {status}");
}

#[test]
fn a_removed_node_leaves_the_registry_and_a_restarted_node_rejoins_by_itself() {
    let mut c = Cluster::formed(3);
    apply(&c.endpoint(1), &spec_file(&c, "v1.yaml", &loopback_spec(1)));

    // SIGTERM is a clean stop.
    let status = c.node(2).terminate();
    assert!(status.success(), "lbnode exits 0 on SIGTERM, got {status}");
    assert!(c.node(2).log().contains("lbnode stopped"));
    apply(&c.endpoint(1), &spec_file(&c, "v2.yaml", &loopback_spec(2)));
    c.node(2).start();
    wait_for(Duration::from_secs(3), "the restarted node to catch up to version 2", || {
        (c.local_status(2)?["config_version"].as_u64() == Some(2)).then_some(())
    });

    let out = lbctl(&c.endpoint(2), &["node", "remove", "3", "--json"]).json();
    assert_eq!(out["voters"], serde_json::json!([1, 2]), "{out}");
    wait_for(Duration::from_secs(1), "node 3 to leave every registry", || {
        [1, 2].iter().all(|id| c.local_status(*id).is_some_and(|s| s["members"].as_array().unwrap().len() == 2)).then_some(())
    });
    apply(&c.endpoint(2), &spec_file(&c, "v3.yaml", &loopback_spec(3)));
}

#[test]
fn the_monitor_answers_healthz() {
    let c = Cluster::formed(1);
    let mut conn = std::net::TcpStream::connect(c.nodes[0].monitor).expect("the monitor listens");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap();
    let health: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!((health["status"].as_str(), health["node"].as_u64(), health["leader"].as_u64()), (Some("ok"), Some(1), Some(1)), "{health}");
}

#[test]
fn a_node_that_joins_late_is_sent_a_snapshot() {
    // Snapshot every 3 entries and keep no log behind it: a new node cannot
    // be sent the log from the start and must install the snapshot.
    let c = Cluster::start_with_config(3, Some("raft:\n  snapshot_after: 3\n  logs_kept_after_snapshot: 0\n"));
    c.init();
    c.add(2);
    for n in 1..=6 {
        apply(&c.endpoint(1), &spec_file(&c, &format!("v{n}.yaml"), &loopback_spec(n)));
    }
    c.add(3);
    wait_for(Duration::from_secs(2), "node 3 to report version 6", || {
        (c.local_status(3)?["config_version"].as_u64() == Some(6)).then_some(())
    });
    assert!(c.nodes[2].log().contains("installed a snapshot sent by the leader"), "{}", c.nodes[2].log());
    let history = lbctl(&c.endpoint(3), &["config", "history", "--json"]).json();
    assert_eq!(history, lbctl(&c.endpoint(1), &["config", "history", "--json"]).json());
}

#[test]
fn an_unreachable_peer_is_logged_once_not_per_rpc() {
    let mut c = Cluster::formed(3);
    let leader = c.agreed_leader(Duration::from_secs(2));
    let peer = c.nodes.iter().map(|n| n.id).find(|id| *id != leader).unwrap();
    c.node(peer).kill();
    // Heartbeats go out every 50 ms: two seconds are forty failed RPCs.
    std::thread::sleep(Duration::from_secs(2));
    let log = c.node(leader).log();
    let about_peer: Vec<&str> = log.lines().filter(|l| l.contains(&format!("peer={peer}"))).collect();
    assert_eq!(about_peer.len(), 1, "one line about the lost peer, got:\n{}", about_peer.join("\n"));
    assert!(about_peer[0].contains("peer is unreachable"), "{}", about_peer[0]);

    c.node(peer).start();
    wait_for(Duration::from_secs(3), "the leader to log the peer back", || {
        c.node(leader).log().lines().any(|l| l.contains(&format!("peer={peer}")) && l.contains("reachable again")).then_some(())
    });
}

#[test]
fn leader_transfer_hands_leadership_to_the_chosen_voter_and_writes_go_on() {
    let c = Cluster::formed(3);
    let old = c.agreed_leader(Duration::from_secs(2));
    let target = if old == 3 { 2 } else { 3 };
    // Asked through a follower: the request is forwarded to the leader.
    let via = [1, 2, 3].into_iter().find(|id| *id != old && *id != target).unwrap();
    let started = Instant::now();
    let out = lbctl(&c.endpoint(via), &["leader", "transfer", &target.to_string(), "--json"]).json();
    let took = started.elapsed();
    eprintln!("leadership moved from node {old} to node {target} in {} ms ({took:?} with lbctl)", out["took_ms"]);
    assert_eq!(out["leader"], target, "{out}");
    assert_eq!(c.agreed_leader(Duration::from_secs(2)), target);
    // A handoff waits the voters' lease (150 ms) and one election round;
    // the bound leaves room for a loaded machine.
    assert!(out["took_ms"].as_u64().unwrap() < 1500, "{out}");
    let v = apply(&c.endpoint(old), &spec_file(&c, "after.yaml", &loopback_spec(5)));
    assert_eq!(v, 1, "the old leader forwards writes to the new one");

    // Without a target: the voter furthest along takes over.
    let out = lbctl(&c.endpoint(target), &["leader", "transfer", "--json"]).json();
    assert_ne!(out["leader"], target, "{out}");
    assert_eq!(c.agreed_leader(Duration::from_secs(2)), out["leader"].as_u64().unwrap());

    let leader = out["leader"].as_u64().unwrap();
    let bad = lbctl(&c.endpoint(1), &["leader", "transfer", &leader.to_string()]);
    assert!(!bad.ok && bad.stderr.contains(&format!("node {leader} already leads")), "{}", bad.stderr);
    let bad = lbctl(&c.endpoint(1), &["leader", "transfer", "9"]);
    assert!(!bad.ok && bad.stderr.contains("node 9 is not a voter: the voters are 1, 2, 3"), "{}", bad.stderr);
    assert_eq!(c.agreed_leader(Duration::from_secs(2)), leader, "a refused transfer moves nothing");
}
