//! The data plane end to end: real lbnode processes serving the committed
//! spec to real sockets, in front of test servers on loopback.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftlb_tests::backend::{http_server, raw_http_server, tcp_server, TestServer, CACHE_CASES, ERROR_FORM};
use raftlb_tests::client::{self, connect, get, get_from, KeepAlive};
use raftlb_tests::{apply_spec, free_port, wait_for, Cluster};

fn front() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn servers_yaml(servers: &[(&TestServer, &str)]) -> String {
    servers.iter().map(|(s, extra)| format!("      - {{ name: {}, address: \"{}\"{extra} }}\n", s.name, s.addr)).collect()
}

/// Waits until the frontend answers through node 1.
fn wait_serving(c: &Cluster, bind: SocketAddr) {
    let at = c.nodes[0].frontend(bind);
    wait_for(Duration::from_secs(5), "the frontend to serve", || get(at, "/", &[]).ok().filter(|r| r.status == 200).map(|_| ()));
}

/// One HTTP server, `a`, behind a frontend of [`http_spec`] applied to node 1
/// as `file`; returns once node 1 serves it.
fn serve_one(c: &Cluster, file: &str) -> (TestServer, SocketAddr) {
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    apply_spec(c, 1, file, &http_spec(bind, "", &servers_yaml(&[(&a, "")])));
    wait_serving(c, bind);
    (a, bind)
}

/// One node serving one `raw_http_server` through a frontend; `backend_extra`
/// goes into its backend. The server, and where this node serves the frontend.
fn serve_raw(c: &Cluster, backend_extra: &str) -> (TestServer, SocketAddr) {
    let raw = raw_http_server("raw", "127.0.0.1:0");
    let bind = front();
    apply_spec(c, 1, "raw.yaml", &http_spec(bind, backend_extra, &servers_yaml(&[(&raw, "")])));
    (raw, c.nodes[0].frontend(bind))
}

fn http_spec(bind: SocketAddr, backend_extra: &str, servers: &str) -> String {
    format!(
        "defaults:\n  timeouts: {{ connect: 500ms, server: 1s, http_request: 1s, queue: 1s }}\n  retries: 2\nfrontends:\n  - name: web\n    bind: [\"{bind}\"]\n    mode: http\n    default_backend: app\nbackends:\n  - name: app\n{backend_extra}    servers:\n{servers}"
    )
}

#[test]
fn weights_are_honoured_and_a_drained_server_gets_no_new_sessions() {
    let c = Cluster::formed(1);
    let (a, b, z) = (http_server("a", "127.0.0.1:0"), http_server("b", "127.0.0.1:0"), http_server("z", "127.0.0.1:0"));
    let bind = front();
    apply_spec(
        &c,
        1,
        "w.yaml",
        &http_spec(bind, "    balance: roundrobin\n", &servers_yaml(&[(&a, ", weight: 2"), (&b, ""), (&z, ", weight: 0")])),
    );
    wait_serving(&c, bind);
    let before = (a.hits(), b.hits());
    for _ in 0..300 {
        assert_eq!(get(bind, "/", &[]).unwrap().status, 200);
    }
    assert_eq!((a.hits() - before.0, b.hits() - before.1, z.hits()), (200, 100, 0));
}

#[test]
fn leastconn_sends_new_sessions_to_the_server_with_fewest_held_connections() {
    let c = Cluster::formed(1);
    let (a, b) = (tcp_server("a", "127.0.0.1:0"), tcp_server("b", "127.0.0.1:0"));
    let bind = front();
    let spec = format!(
        "frontends:\n  - {{ name: db, bind: [\"{bind}\"], mode: tcp, default_backend: db }}\nbackends:\n  - name: db\n    balance: leastconn\n    servers:\n{}",
        servers_yaml(&[(&a, ""), (&b, "")])
    );
    apply_spec(&c, 1, "lc.yaml", &spec);
    let open = |n: usize| -> Vec<(String, BufReader<std::net::TcpStream>)> {
        (0..n)
            .map(|_| {
                let mut r = BufReader::new(wait_for(Duration::from_secs(5), "a tcp connection", || connect(bind, None).ok()));
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                (line.trim().trim_start_matches("hello from ").to_owned(), r)
            })
            .collect()
    };
    let mut held = open(4);
    let count = |held: &[(String, _)], name: &str| held.iter().filter(|(s, _)| s == name).count();
    assert_eq!((count(&held, "a"), count(&held, "b")), (2, 2), "held connections spread evenly");
    held.retain(|(s, _)| s != "a");
    wait_for(Duration::from_secs(2), "a's connections to close", || (a.open.load(Relaxed) == 0).then_some(()));
    let more = open(2);
    assert!(
        more.iter().all(|(s, _)| s == "a"),
        "new sessions go to the idle server: {:?}",
        more.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
}

#[test]
fn source_hashing_keeps_each_client_on_its_server_and_moves_only_a_removed_servers_share() {
    let c = Cluster::formed(1);
    let servers: Vec<TestServer> = (0..4).map(|i| http_server(&format!("s{i}"), "127.0.0.1:0")).collect();
    let bind = front();
    let all: Vec<(&TestServer, &str)> = servers.iter().map(|s| (s, "")).collect();
    apply_spec(&c, 1, "src4.yaml", &http_spec(bind, "    balance: source\n", &servers_yaml(&all)));
    wait_serving(&c, bind);
    let clients: Vec<IpAddr> = (10..70).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let pick = |ip: IpAddr| get_from(Some(ip), bind, "/", &[]).unwrap().server();
    let first: HashMap<IpAddr, String> = clients.iter().map(|ip| (*ip, pick(*ip))).collect();
    for ip in &clients {
        assert_eq!(pick(*ip), first[ip], "client {ip} stays on its server");
    }
    assert!(first.values().collect::<std::collections::HashSet<_>>().len() >= 3, "clients spread: {first:?}");

    apply_spec(&c, 1, "src3.yaml", &http_spec(bind, "    balance: source\n", &servers_yaml(&all[..3])));
    wait_for(Duration::from_secs(2), "the new spec to serve", || clients.iter().all(|ip| pick(*ip) != "s3").then_some(()));
    for ip in &clients {
        if first[ip] != "s3" {
            assert_eq!(pick(*ip), first[ip], "client {ip} was not on the removed server and must not move");
        }
    }
}

#[test]
fn cookie_insert_sticks_a_client_to_its_server_and_survives_a_config_change() {
    let c = Cluster::formed(1);
    let (a, b) = (http_server("a", "127.0.0.1:0"), http_server("b", "127.0.0.1:0"));
    let bind = front();
    let cookie = "    cookie: { name: SRV, mode: insert, indirect: true, nocache: true }\n";
    apply_spec(&c, 1, "c1.yaml", &http_spec(bind, cookie, &servers_yaml(&[(&a, ""), (&b, "")])));
    wait_serving(&c, bind);
    let first = get(bind, "/", &[]).unwrap();
    let set = first.header("set-cookie").expect("a persistence cookie is inserted").to_owned();
    // Nothing a cache would keep: `nocache` adds nothing (HAProxy's way; see
    // the test of the server's cache directives).
    assert_eq!(first.header("cache-control"), None, "nocache");
    let value = set.split(';').next().unwrap().to_owned();
    let server = first.server();
    assert_eq!(value, format!("SRV={server}"));
    for _ in 0..10 {
        let r = get(bind, "/", &[("Cookie", &format!("{value}; other=1"))]).unwrap();
        assert_eq!(r.server(), server, "the cookie sticks");
        assert!(r.header("set-cookie").is_none(), "no new cookie for a stuck client");
        assert_eq!(r.json()["headers"]["cookie"], "other=1", "indirect: the server does not see the cookie");
    }
    let third = http_server("c", "127.0.0.1:0");
    apply_spec(&c, 1, "c2.yaml", &http_spec(bind, cookie, &servers_yaml(&[(&third, ""), (&a, ""), (&b, "")])));
    wait_for(Duration::from_secs(2), "the new server to take traffic", || (get(bind, "/", &[]).unwrap().server() == "c").then_some(()));
    for _ in 0..10 {
        assert_eq!(get(bind, "/", &[("Cookie", &value)]).unwrap().server(), server, "the cookie still sticks after the change");
    }
}

#[test]
fn backend_connections_are_reused_as_http_reuse_says() {
    let c = Cluster::formed(1);
    for (reuse, most) in [("always", 2), ("never", 1)] {
        let a = http_server("a", "127.0.0.1:0");
        let bind = front();
        apply_spec(&c, 1, &format!("{reuse}.yaml"), &http_spec(bind, &format!("    http_reuse: {reuse}\n"), &servers_yaml(&[(&a, "")])));
        wait_serving(&c, bind);
        let before = a.accepted.load(Relaxed);
        let mut conn = KeepAlive::open(bind).unwrap();
        for i in 0..50 {
            // Every other answer has no body: its connection is reused all the same.
            let (path, status) = if i % 2 == 0 { ("/", 200) } else { ("/empty", 204) };
            assert_eq!(conn.get(path, &[]).unwrap().status, status);
        }
        let used = a.accepted.load(Relaxed) - before;
        assert!(used <= most, "http_reuse: {reuse} used {used} connections for 50 requests of one client");
        if reuse == "never" {
            // A second client gets a connection of its own, even with the first one's idle.
            // (With `always` it may reuse that one, or not: pools are per worker thread.)
            let mut other = KeepAlive::open(bind).unwrap();
            assert_eq!(other.get("/", &[]).unwrap().status, 200);
            assert_eq!(a.accepted.load(Relaxed) - before - used, 1, "http_reuse: never, a second client");
        }
    }
}

#[test]
fn http_1_0_clients_reuse_server_connections_too() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    apply_spec(&c, 1, "ten.yaml", &http_spec(bind, "    http_reuse: always\n", &servers_yaml(&[(&a, "")])));
    wait_serving(&c, bind);
    let at = c.nodes[0].frontend(bind);
    let before = a.accepted.load(Relaxed);
    for _ in 0..20 {
        // Each on a connection of its own, which ends with its response.
        let mut stream = connect(at, None).unwrap();
        stream.write_all(b"GET / HTTP/1.0\r\nHost: lb.test\r\n\r\n").unwrap();
        let reply = client::read_reply(&mut BufReader::new(stream)).unwrap();
        assert_eq!((reply.status, reply.server()), (200, "a".to_owned()), "{reply:?}");
    }
    // Pools are per worker thread: one connection each at most.
    let used = a.accepted.load(Relaxed) - before;
    assert!(used <= 2, "20 HTTP/1.0 requests used {used} server connections");
}

/// A backend of [`http_spec`] with `backend_extra`: `dead` (nothing listens
/// on its address), then `good`; returns once node 1 serves it.
fn dead_then_good(c: &Cluster, backend_extra: &str) -> (TestServer, SocketAddr) {
    let good = http_server("good", "127.0.0.1:0");
    let dead = format!("127.0.0.1:{}", free_port());
    let bind = front();
    let servers = format!("      - {{ name: dead, address: \"{dead}\" }}\n{}", servers_yaml(&[(&good, "")]));
    apply_spec(c, 1, "dead-then-good.yaml", &http_spec(bind, backend_extra, &servers));
    wait_serving(c, bind);
    (good, bind)
}

#[test]
fn a_refused_connect_is_retried_and_redispatched_to_another_server() {
    let c = Cluster::formed(1);
    let (_good, bind) = dead_then_good(&c, "");
    let started = Instant::now();
    for _ in 0..20 {
        let r = get(bind, "/", &[]).unwrap();
        assert_eq!((r.status, r.server()), (200, "good".to_owned()));
    }
    // Round robin over two servers: the retry goes to the other one at once
    // (a pause of timeouts.connect, 500ms, before each would take 5 s or more).
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "20 requests took {took:?}");
    let stats = c.nodes[0].stats();
    let app = &stats["backends"]["app"];
    assert_eq!(app["retries"], 0, "a retry on another server counts as a redispatch, as HAProxy counts it: {app}");
    assert!(app["redispatches"].as_u64().unwrap() >= 10, "{app}");
    assert!(app["servers"]["dead"]["redispatches"].as_u64().unwrap() >= 10, "{app}");
    assert!(app["servers"]["dead"]["errors"].as_u64().unwrap() >= 10, "{app}");
}

#[test]
fn a_single_server_that_refuses_is_tried_again_after_a_pause_so_a_restart_loses_no_request() {
    let c = Cluster::formed(1);
    let port = free_port();
    let bind = front();
    let spec = format!(
        "defaults:\n  timeouts: {{ connect: 500ms }}\n  retries: 3\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n      - {{ name: only, address: \"127.0.0.1:{port}\" }}\n"
    );
    apply_spec(&c, 1, "single.yaml", &spec);
    wait_for(Duration::from_secs(5), "the frontend to listen", || connect(c.nodes[0].frontend(bind), None).ok());
    // Nothing listens: four attempts, each retry after min(timeouts.connect, 1 s).
    let started = Instant::now();
    let r = get(bind, "/", &[]).unwrap();
    let took = started.elapsed();
    let app = c.nodes[0].stats()["backends"]["app"].clone();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "three pauses of 500ms took {took:?}: {app}");
    assert_eq!((app["retries"].as_u64(), app["redispatches"].as_u64()), (Some(3), Some(0)), "{app}");
    // The server comes back while a request waits out its pauses (attempts
    // at about 0, 0.5, 1 and 1.5 s): it is served.
    let waiting = std::thread::spawn(move || get(bind, "/", &[]));
    std::thread::sleep(Duration::from_millis(200));
    let _only = http_server("only", &format!("127.0.0.1:{port}"));
    let r = waiting.join().unwrap().unwrap();
    assert_eq!((r.status, r.server()), (200, "only".to_owned()), "{r:?}");
}

#[test]
fn a_persistent_client_is_retried_on_its_server_and_redispatched_on_the_last_retry() {
    let c = Cluster::formed(1);
    let (_good, bind) = dead_then_good(&c, "    cookie: { name: SRV, mode: insert }\n");
    let before = c.nodes[0].stats()["backends"]["app"].clone();
    // retries 2, timeouts.connect 500ms: the first retry stays on `dead` after
    // a pause, the second (the last) goes to `good` at once.
    let started = Instant::now();
    let r = get(bind, "/", &[("Cookie", "SRV=dead")]).unwrap();
    let took = started.elapsed();
    let app = c.nodes[0].stats()["backends"]["app"].clone();
    assert_eq!((r.status, r.server()), (200, "good".to_owned()), "{r:?}");
    assert_eq!(r.header("set-cookie"), Some("SRV=good; path=/"), "{r:?}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(3), "one pause of 500ms, then another server: {took:?}");
    let grew = |name: &str| app[name].as_u64().unwrap() - before[name].as_u64().unwrap();
    assert_eq!((grew("retries"), grew("redispatches")), (1, 1), "{app}");
}

#[test]
fn an_invalid_server_response_gives_502_and_no_server_gives_503() {
    let c = Cluster::formed(1);
    // Not an HTTP server: it greets with a line of text.
    let garbage = tcp_server("garbage", "127.0.0.1:0");
    let (bad, none) = (front(), front());
    let dead = format!("127.0.0.1:{}", free_port());
    let spec = format!(
        "defaults:\n  retries: 1\nfrontends:\n  - {{ name: bad, bind: [\"{bad}\"], mode: http, default_backend: bad }}\n  - {{ name: none, bind: [\"{none}\"], mode: http, default_backend: none }}\nbackends:\n  - name: bad\n    servers:\n{}  - name: none\n    servers:\n      - {{ name: dead, address: \"{dead}\" }}\n",
        servers_yaml(&[(&garbage, "")])
    );
    apply_spec(&c, 1, "bad.yaml", &spec);
    let reply = wait_for(Duration::from_secs(5), "the frontend to answer", || get(bad, "/", &[]).ok());
    assert_eq!(reply.status, 502, "{reply:?}");
    let reply = get(none, "/", &[]).unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    let stats = c.nodes[0].stats();
    assert_eq!(stats["frontends"]["bad"]["responses"]["5xx"], 1, "{stats}");
    assert_eq!(stats["backends"]["none"]["retries"], 1, "one retry, then 503: {stats}");
}

#[test]
fn server_responses_that_do_not_parse_get_502_and_a_repeated_length_goes_on_as_one() {
    let c = Cluster::formed(1);
    let (_raw, at) = serve_raw(&c, "");
    let reply = wait_for(Duration::from_secs(5), "the frontend to answer", || get(at, "/good", &[]).ok());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("5\r\nhello\r\n0\r\n"), "the first chunk, read with the head, goes on: {reply:?}");
    let reply = get(at, "/late", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("5\r\nhello\r\n0\r\n"), "a chunk after the head goes on: {reply:?}");
    // Nothing went to the client yet: the chunk that does not parse is a 502.
    let reply = get(at, "/bad-chunk", &[]).unwrap();
    assert_eq!(reply.status, 502, "{reply:?}");
    let reply = get(at, "/space-before-colon", &[]).unwrap();
    assert_eq!(reply.status, 502, "{reply:?}");
    // An obsolete folded value is refused too (RFC 9112 lets a proxy refuse or unfold it).
    let reply = get(at, "/folded", &[]).unwrap();
    assert_eq!(reply.status, 502, "{reply:?}");
    // A repeated length goes on as one.
    let reply = get(at, "/lengths", &[]).unwrap();
    assert_eq!((reply.status, reply.header("content-length"), reply.body.as_str()), (200, Some("5"), "hello"), "{reply:?}");
    let stats = c.nodes[0].stats();
    assert_eq!(stats["backends"]["app"]["servers"]["raw"]["errors"], 3, "{stats}");
}

#[test]
fn a_server_body_that_reads_as_an_error_answer_reaches_the_client_unchanged() {
    let c = Cluster::formed(1);
    let (_raw, at) = serve_raw(&c, "");
    // Its last part, written on its own, has the form of the HTTP library's
    // own answer to a malformed request, which the proxy replaces by a page:
    // a response's own bytes are never taken for one.
    let reply = wait_for(Duration::from_secs(5), "the frontend to answer", || get(at, "/error-form", &[]).ok());
    assert_eq!((reply.status, reply.body.as_str()), (200, format!("abc{ERROR_FORM}").as_str()), "{reply:?}");
    let stats = c.nodes[0].stats();
    assert_eq!(stats["frontends"]["web"]["responses"]["4xx"], 0, "{stats}");
}

#[test]
fn the_stick_table_is_shared_so_a_client_keeps_its_server_on_every_node() {
    let mut c = Cluster::formed(3);
    let (a, b) = (http_server("a", "127.0.0.1:0"), http_server("b", "127.0.0.1:0"));
    let bind = front();
    let stick = "    balance: roundrobin\n    stick: { on: src, expire: 30s }\n";
    let spec = |b_extra: &str| http_spec(bind, stick, &servers_yaml(&[(&a, ""), (&b, b_extra)]));
    apply_spec(&c, 1, "stick.yaml", &spec(""));
    // Node 3 is down while the entries are made: it gets them when it is back.
    c.node(3).kill();
    let ask = |c: &Cluster, node: usize, client: &str| {
        get_from(Some(client.parse().unwrap()), c.nodes[node].frontend(bind), "/", &[]).map(|r| r.server())
    };
    wait_for(Duration::from_secs(5), "node 1 to serve", || ask(&c, 0, "127.0.0.10").ok());
    let (first, second) = (ask(&c, 0, "127.0.0.11").unwrap(), ask(&c, 0, "127.0.0.12").unwrap());
    assert_ne!(first, second, "round robin gives the two clients a server each");
    let on_b = if first == "b" { "127.0.0.11" } else { "127.0.0.12" };
    let entries = |c: &Cluster, node: usize| c.nodes[node].stats()["backends"]["app"]["stick_entries"].as_u64();
    // Nodes send their new entries every 100 ms.
    wait_for(Duration::from_secs(5), "node 2 to learn node 1's three entries", || (entries(&c, 1) == Some(3)).then_some(()));
    // Server b takes no new sessions from now on: only a stick entry leads a client to it.
    let drained = apply_spec(&c, 1, "stick-drained.yaml", &spec(", weight: 0"));
    wait_for(Duration::from_secs(5), "node 2 to have the new spec", || {
        (c.nodes[1].stats()["config_version"].as_u64() == Some(drained)).then_some(())
    });
    assert_eq!(ask(&c, 1, "127.0.0.13").unwrap(), "a", "a new client goes to a");
    assert_eq!(ask(&c, 1, on_b).unwrap(), "b", "node 2 knows node 1's entry");
    assert_eq!(entries(&c, 1), Some(4), "three learned, one its own");
    // Node 3 back: it exchanges whole tables with the others as it starts.
    c.node(3).start();
    wait_for(Duration::from_secs(10), "node 3 to serve the new spec", || {
        // Its monitor answers once it serves.
        (ask(&c, 2, "127.0.0.14").is_ok() && c.nodes[2].stats()["config_version"].as_u64() == Some(drained)).then_some(())
    });
    wait_for(Duration::from_secs(5), "node 3 to learn the others' four entries", || (entries(&c, 2) == Some(5)).then_some(()));
    assert_eq!(ask(&c, 2, on_b).unwrap(), "b", "node 3 learned the entry when it came back");
}

#[test]
fn cookie_insert_replaces_the_servers_own_cookie_and_keeps_its_cache_directives() {
    let c = Cluster::formed(1);
    let (_raw, at) = serve_raw(&c, "    cookie: { name: SRV, mode: insert, nocache: true }\n");
    let all = |reply: &client::Reply, name: &str| -> Vec<String> {
        reply.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    };
    let reply = wait_for(Duration::from_secs(5), "the frontend to answer", || get(at, "/own-cookie-no-store", &[]).ok());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(all(&reply, "set-cookie"), ["SRVX=1", "SRV=raw; path=/"], "the server's own SRV cookie goes, its others stay: {reply:?}");
    assert_eq!(all(&reply, "cache-control"), ["no-store"], "the server's no-store stays: {reply:?}");
    let reply = get(at, "/cache/max-age", &[]).unwrap();
    assert_eq!(all(&reply, "cache-control"), ["max-age=60", "private"], "{reply:?}");
    // A client that already names the server gets no cookie, and not the server's either.
    let reply = get(at, "/own-cookie-no-store", &[("Cookie", "SRV=raw")]).unwrap();
    assert_eq!(all(&reply, "set-cookie"), ["SRVX=1"], "{reply:?}");

    // `private` goes only on what a cache would keep, as HAProxy 2.6 decides it
    // (measured: cookie SRV insert nocache).
    let private = ["max-age", "s-maxage", "expires", "etag", "last-modified", "no-cache-set-cookie", "not-found"];
    for (case, _) in CACHE_CASES {
        let reply = get(at, &format!("/cache/{case}"), &[]).unwrap();
        assert!(reply.header("set-cookie").is_some(), "{case}: {reply:?}");
        let added = all(&reply, "cache-control").last().is_some_and(|v| v == "private");
        assert_eq!(added, private.contains(case), "{case}: {reply:?}");
    }
    // Nor on the answer to a POST.
    let mut s = connect(at, None).unwrap();
    s.write_all(b"POST /cache/max-age HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 1\r\n\r\nx").unwrap();
    let reply = client::read_reply(&mut BufReader::new(s)).unwrap();
    assert_eq!(all(&reply, "cache-control"), ["max-age=60"], "{reply:?}");
}

/// A listener whose accept queue is full: the kernel drops further SYNs,
/// so a connect to it neither succeeds nor fails until its own timeout.
fn unanswered_connects() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Never accepted: these fill the queue (one fits with a backlog of 0).
    let fillers: Vec<_> = (0..2).filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()).collect();
    assert!(!fillers.is_empty(), "the first connect fills the accept queue");
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "a connect to a full accept queue is not answered"
    );
    (listener, fillers, addr)
}

#[test]
fn a_connect_the_server_never_answers_gives_up_after_timeouts_connect_for_each_attempt() {
    let c = Cluster::formed(1);
    let (_listener, _fillers, silent) = unanswered_connects();
    let bind = front();
    let servers = format!("      - {{ name: silent, address: \"{silent}\" }}\n");
    apply_spec(&c, 1, "ct.yaml", &http_spec(bind, "", &servers));
    wait_for(Duration::from_secs(5), "the frontend to listen", || connect(c.nodes[0].frontend(bind), None).ok());
    // timeouts.connect is 500ms and retries 2: three attempts, then 503.
    let started = Instant::now();
    let r = get(bind, "/", &[]).unwrap();
    let took = started.elapsed();
    let stats = c.nodes[0].stats();
    let app = &stats["backends"]["app"];
    assert_eq!(r.status, 503);
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "3 connects of 500ms took {took:?}: {app}");
    assert_eq!((app["retries"].as_u64(), app["servers"]["silent"]["errors"].as_u64()), (Some(2), Some(3)), "{app}");
}

#[test]
fn without_redispatch_a_retry_stays_on_the_refusing_server() {
    let c = Cluster::formed(1);
    let good = http_server("good", "127.0.0.1:0");
    let dead = format!("127.0.0.1:{}", free_port());
    let bind = front();
    let spec = format!(
        "defaults:\n  timeouts: {{ connect: 100ms }}\n  retries: 2\n  redispatch: false\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    balance: roundrobin\n    servers:\n      - {{ name: dead, address: \"{dead}\" }}\n{}",
        servers_yaml(&[(&good, "")])
    );
    apply_spec(&c, 1, "noredispatch.yaml", &spec);
    wait_for(Duration::from_secs(5), "the frontend to listen", || connect(c.nodes[0].frontend(bind), None).ok());
    let started = Instant::now();
    let statuses: Vec<u16> = (0..20).map(|_| get(bind, "/", &[]).unwrap().status).collect();
    let took = started.elapsed();
    // Round robin alternates; the requests it gives the dead server fail
    // after their retries, each after a pause of timeouts.connect (100ms).
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 10, "{statuses:?}");
    assert!(took >= Duration::from_secs(2), "20 retries after a refusal took {took:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    let app = &c.nodes[0].stats()["backends"]["app"];
    assert_eq!((app["retries"].as_u64(), app["redispatches"].as_u64()), (Some(20), Some(0)), "{app}");
}

#[test]
fn a_stalled_server_gives_504_after_the_server_timeout_and_a_slow_or_silent_client_gets_408() {
    let c = Cluster::formed(1);
    let (_server, bind) = serve_one(&c, "t.yaml");

    let started = Instant::now();
    let r = get(bind, "/stall", &[]).unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "timeouts.server is 1s, took {took:?}");

    // Slowloris: half a request head, then silence past timeouts.http_request.
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb.test\r\nX-Slow: ").unwrap();
    let started = Instant::now();
    let r = client::read_reply(&mut BufReader::new(s)).unwrap();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(3), "http_request is 1s, took {:?}", started.elapsed());

    // A new connection that sends nothing at all gets the same answer, as with HAProxy.
    let s = connect(bind, None).unwrap();
    let started = Instant::now();
    let r = client::read_reply(&mut BufReader::new(s)).unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 408);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "http_request is 1s, took {took:?}");
}

#[test]
fn a_client_that_shuts_its_side_after_the_request_still_gets_the_response() {
    let c = Cluster::formed(1);
    let (_server, bind) = serve_one(&c, "half.yaml");
    // The server takes its time: the end of the client's stream arrives
    // while the request is with the server, and must not end the exchange.
    for (path, close) in [("/slow?ms=300", ""), ("/slow?ms=300", "Connection: close\r\n"), ("/", "")] {
        let mut s = connect(bind, None).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n{close}\r\n").as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let r = client::read_reply(&mut BufReader::new(s)).unwrap_or_else(|e| panic!("{path} {close:?}: no response: {e}"));
        assert_eq!(r.status, 200, "{path} {close:?}");
    }
}

#[test]
fn the_client_timeout_ends_a_stalled_upload_with_408_and_cuts_a_client_that_stops_reading() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    let spec = format!(
        "defaults:\n  timeouts: {{ client: 500ms, server: 5s }}\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n{}",
        servers_yaml(&[(&a, "")])
    );
    apply_spec(&c, 1, "client.yaml", &spec);
    wait_serving(&c, bind);
    let upload = |body: &[u8], announced: usize| {
        let mut s = connect(bind, None).unwrap();
        s.write_all(format!("POST /upload HTTP/1.1\r\nHost: lb.test\r\nContent-Length: {announced}\r\n\r\n").as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let started = Instant::now();
        (client::read_reply(&mut BufReader::new(s)).unwrap(), started.elapsed())
    };
    let (whole, _) = upload(&[b'u'; 100], 100);
    assert_eq!((whole.status, whole.json()["body_bytes"].as_u64()), (200, Some(100)), "a complete upload goes through");
    let (stalled, took) = upload(b"0123456789", 100);
    assert_eq!(stalled.status, 408, "{stalled:?}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(3), "timeouts.client is 500ms, took {took:?}");

    // 64 MiB asked for and never read: the proxy's writes block, and it gives up.
    let errors = || c.nodes[0].stats()["frontends"]["web"]["errors"].as_u64().unwrap();
    let before = errors();
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"GET /big?mb=64 HTTP/1.1\r\nHost: lb.test\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut received = Vec::new();
    let _ = s.read_to_end(&mut received); // an end of stream or a reset: either way it ends
    assert!(received.len() < 64 << 20, "the client got everything ({} bytes) though it read nothing for 2 s", received.len());
    assert_eq!(errors(), before + 1, "the cut connection is counted");
}

#[test]
fn a_frontend_at_maxconn_holds_new_clients_until_a_slot_frees() {
    let c = Cluster::formed(1);
    let a = tcp_server("a", "127.0.0.1:0");
    let bind = front();
    let spec = format!(
        "frontends:\n  - {{ name: db, bind: [\"{bind}\"], mode: tcp, maxconn: 1, default_backend: db }}\nbackends:\n  - name: db\n    servers:\n{}",
        servers_yaml(&[(&a, "")])
    );
    apply_spec(&c, 1, "maxconn.yaml", &spec);
    let first = wait_for(Duration::from_secs(5), "the frontend", || connect(bind, None).ok());
    assert_eq!(line_within(&first, Duration::from_secs(2)).unwrap(), "hello from a\n");
    // The kernel completes the handshake, but the node does not take the connection.
    let second = connect(bind, None).unwrap();
    assert!(line_within(&second, Duration::from_millis(500)).is_err(), "a second client is served past maxconn 1");
    drop(first);
    assert_eq!(line_within(&second, Duration::from_secs(2)).unwrap(), "hello from a\n", "served once the first left");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_http_keep_alive() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    let spec = format!(
        "defaults:\n  timeouts: {{ http_keep_alive: 300ms, http_request: 5s }}\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n{}",
        servers_yaml(&[(&a, "")])
    );
    apply_spec(&c, 1, "ka.yaml", &spec);
    wait_serving(&c, bind);
    let mut conn = KeepAlive::open(bind).unwrap();
    assert_eq!(conn.get("/", &[]).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(conn.get("/", &[]).unwrap().status, 200, "kept alive within the limit");
    std::thread::sleep(Duration::from_millis(800));
    assert!(conn.get("/", &[]).is_err(), "the idle connection was closed");
}

#[test]
fn hop_by_hop_headers_stop_at_the_proxy_and_ipv6_frontends_serve() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, free_port()));
    let spec = format!(
        "frontends:\n  - {{ name: web, bind: [\"{v6}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n{}",
        servers_yaml(&[(&a, "")])
    );
    apply_spec(&c, 1, "v6.yaml", &spec);
    let reply = wait_for(Duration::from_secs(5), "the IPv6 frontend", || {
        get(v6, "/", &[("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("X-End-To-End", "1")]).ok()
    });
    assert_eq!(reply.status, 200);
    let h = &reply.json()["headers"];
    assert_eq!(h["x-end-to-end"], "1");
    for hop in ["x-hop", "keep-alive", "connection"] {
        assert!(h.get(hop).is_none(), "{hop} reached the server: {h}");
    }
}

#[test]
fn an_oversized_head_gets_431_garbage_400_and_a_body_that_cannot_go_on_400_or_422() {
    let c = Cluster::formed(1);
    let (a, bind) = serve_one(&c, "g.yaml");
    let hits = a.hits();
    let big = "x".repeat(100 * 1024);
    let answer = |bytes: &[u8]| {
        let mut s = connect(bind, None).unwrap();
        s.write_all(bytes).unwrap();
        client::read_reply(&mut BufReader::new(s)).unwrap()
    };
    let raw = |bytes: &[u8]| answer(bytes).status;
    // Each with HAProxy's kind of page, as every other error answer.
    let page = |reply: &client::Reply, status: &str| {
        assert_eq!(reply.header("content-type"), Some("text/html"), "{reply:?}");
        assert!(reply.body.starts_with(&format!("<html><body><h1>{status} ")), "{reply:?}");
        assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    };
    let too_large = answer(format!("GET / HTTP/1.1\r\nHost: lb.test\r\nX-Big: {big}\r\n\r\n").as_bytes());
    assert_eq!(too_large.status, 431);
    page(&too_large, "431");
    let garbage = answer(b"\x16\x03\x01 this is not http\r\n\r\n");
    assert_eq!(garbage.status, 400);
    page(&garbage, "400");
    let no_colon = answer(b"GET / HTTP/1.1\r\nHost lb.test\r\n\r\n");
    assert_eq!(no_colon.status, 400);
    page(&no_colon, "400");
    // Garbage after a good request on the same connection: the good one is
    // answered, then the garbage gets its page.
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb.test\r\n\r\nGARBAGE\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(client::read_reply(&mut r).unwrap().status, 200);
    let after = client::read_reply(&mut r).unwrap();
    assert_eq!(after.status, 400);
    page(&after, "400");
    assert_eq!(a.hits(), hits + 1, "nothing malformed reached the server");
    // A connection's error is counted as it ends, just after its page went out.
    let stats = wait_for(Duration::from_secs(2), "the connections to end", || {
        let stats = c.nodes[0].stats();
        (stats["frontends"]["web"]["sessions_current"] == 0).then_some(stats)
    });
    assert_eq!(stats["frontends"]["web"]["responses"]["4xx"], 4, "each answer counted: {stats}");
    assert_eq!(stats["frontends"]["web"]["errors"], 4, "{stats}");
    // A malformed chunk in a request body is the client's error, not the server's.
    let bad_chunk = raw(b"POST / HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n");
    assert_eq!(bad_chunk, 400);
    // A coding besides chunked would be lost on the way (the body goes on chunked): 422, as HAProxy.
    let hits = a.hits();
    assert_eq!(raw(b"POST / HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), 422);
    assert_eq!(a.hits(), hits, "a refused body reaches no server");
    let stats = c.nodes[0].stats();
    assert_eq!(stats["backends"]["app"]["errors"], 0, "the server is not blamed: {stats}");
    assert_eq!(stats["backends"]["app"]["servers"]["a"]["errors"], 0, "{stats}");
}

#[test]
fn spec_changes_under_steady_load_drop_no_request() {
    let c = Cluster::formed(1);
    let (a, b, d) = (http_server("a", "127.0.0.1:0"), http_server("b", "127.0.0.1:0"), http_server("d", "127.0.0.1:0"));
    let bind = front();
    let spec = |servers: &str, rule: &str| {
        format!(
            "frontends:\n  - name: web\n    bind: [\"{bind}\"]\n    mode: http\n    rules:\n      - when: {{ path_prefix: {rule} }}\n        use_backend: other\n    default_backend: app\nbackends:\n  - name: app\n    servers:\n{servers}  - name: other\n    servers:\n{}",
            servers_yaml(&[(&d, "")])
        )
    };
    apply_spec(&c, 1, "l1.yaml", &spec(&servers_yaml(&[(&a, "")]), "/other"));
    wait_serving(&c, bind);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut keep = KeepAlive::open(bind).unwrap();
                let mut failures = Vec::new();
                while !stop.load(Relaxed) {
                    // Half the workers keep their connection alive, half open one per request.
                    let r = if w % 2 == 0 { keep.get("/", &[]) } else { get(bind, "/", &[]) };
                    match r {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Relaxed),
                        other => {
                            failures.push(format!("{other:?}"));
                            failed.fetch_add(1, Relaxed)
                        }
                    };
                }
                failures
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    apply_spec(&c, 1, "l2.yaml", &spec(&servers_yaml(&[(&a, ""), (&b, "")]), "/other")); // add a server
    std::thread::sleep(Duration::from_millis(300));
    apply_spec(&c, 1, "l3.yaml", &spec(&servers_yaml(&[(&b, "")]), "/other")); // remove a server
    std::thread::sleep(Duration::from_millis(300));
    apply_spec(&c, 1, "l4.yaml", &spec(&servers_yaml(&[(&b, "")]), "/elsewhere")); // change a rule
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Relaxed);
    let failures: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.load(Relaxed),
        ok.load(Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Relaxed) > 200, "the load was steady: {} requests", ok.load(Relaxed));
    assert!(b.hits() > 0, "the added server took traffic");
}

#[test]
fn rules_deny_and_route_and_headers_are_set_deleted_and_forwarded_for() {
    let c = Cluster::formed(1);
    let (app, api) = (http_server("app", "127.0.0.1:0"), http_server("api", "127.0.0.1:0"));
    let bind = front();
    let spec = format!(
        "frontends:
  - name: web
    bind: [\"{bind}\"]
    mode: http
    forwardfor: true
    rules:
      - when: {{ path_prefix: /admin, src_not: [127.0.0.2/32] }}
        deny: 403
      - when: {{ host: api.example.com }}
        use_backend: api
      - when: {{ header: {{ name: X-Canary, value: \"1\" }} }}
        use_backend: api
    request_headers:
      set: {{ X-Served-By: raftlb }}
      delete: [X-Internal-Debug]
    default_backend: app
backends:
  - name: app
    servers:
{}  - name: api
    servers:
{}",
        servers_yaml(&[(&app, "")]),
        servers_yaml(&[(&api, "")])
    );
    apply_spec(&c, 1, "rules.yaml", &spec);
    wait_serving(&c, bind);
    let hits = app.hits();
    assert_eq!(get(bind, "/admin/users", &[]).unwrap().status, 403);
    assert_eq!(app.hits(), hits, "a denied request reaches no server");
    let local2 = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    assert_eq!(get_from(local2, bind, "/admin/users", &[]).unwrap().server(), "app", "src_not lets the admin network through");

    let raw = |head: &str| {
        let mut s = connect(bind, None).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        client::read_reply(&mut BufReader::new(s)).unwrap()
    };
    assert_eq!(raw("GET / HTTP/1.1\r\nHost: API.example.com:8080\r\nConnection: close\r\n\r\n").server(), "api");
    // One host for the rules and the server: Host headers that disagree with
    // each other or with an absolute-form target's host are refused.
    let (app_hits, api_hits) = (app.hits(), api.hits());
    let two = raw("GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: api.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(two.status, 400);
    let absolute = raw("GET http://api.example.com/ HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(absolute.status, 400);
    assert_eq!((app.hits(), api.hits()), (app_hits, api_hits), "a refused request reaches no server");
    let same = raw("GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: API.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(same.server(), "api");
    assert_eq!(same.json()["headers"]["host"], "api.example.com", "repeated equal hosts go on as one");
    let absolute = raw("GET http://api.example.com:80/ HTTP/1.1\r\nHost: API.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(absolute.server(), "api", "the default port is no difference");
    assert_eq!(raw("GET http://api.example.com/ HTTP/1.1\r\nConnection: close\r\n\r\n").server(), "api", "no Host: the target's host");
    assert_eq!(raw("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").server(), "app", "no host at all: the default backend");
    assert_eq!(get(bind, "/", &[("X-Canary", "1")]).unwrap().server(), "api");
    assert_eq!(get(bind, "/", &[("X-Canary", "2")]).unwrap().server(), "app");

    let seen =
        get(bind, "/", &[("X-Internal-Debug", "secret"), ("X-Served-By", "spoofed"), ("X-Forwarded-For", "203.0.113.9")]).unwrap().json();
    let h = &seen["headers"];
    assert_eq!(h["x-served-by"], "raftlb");
    assert!(h.get("x-internal-debug").is_none(), "{h}");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "the client address is appended");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(c.nodes[0].stats()["frontends"]["web"]["denied"], 1);
}

#[test]
fn the_queue_holds_requests_at_maxconn_and_answers_503_after_its_timeout() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    let spec = |queue: &str| {
        format!(
            "defaults:\n  timeouts: {{ queue: {queue}, server: 5s }}\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n{}",
            servers_yaml(&[(&a, ", maxconn: 1")])
        )
    };
    let burst = || -> Vec<u16> {
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(move || get(bind, "/slow?ms=300", &[]).unwrap().status)).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    apply_spec(&c, 1, "q1.yaml", &spec("3s"));
    wait_serving(&c, bind);
    let started = Instant::now();
    assert_eq!(burst(), [200, 200, 200, 200], "the queue holds what maxconn refuses");
    assert!(started.elapsed() >= Duration::from_millis(1200), "one at a time: four requests of 300 ms, took {:?}", started.elapsed());

    apply_spec(&c, 1, "q2.yaml", &spec("100ms"));
    std::thread::sleep(Duration::from_millis(200));
    let statuses = burst();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 3, "{statuses:?}");
    assert!(c.nodes[0].stats()["backends"]["app"]["queue_total"].as_u64().unwrap() >= 6);
}

#[test]
fn a_persistent_client_waits_for_its_server_at_maxconn_and_others_go_elsewhere() {
    let c = Cluster::formed(1);
    let (a, b) = (http_server("a", "127.0.0.1:0"), http_server("b", "127.0.0.1:0"));
    let bind = front();
    let spec = format!(
        "defaults:\n  timeouts: {{ queue: 2s, server: 6s }}\nfrontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, default_backend: app }}\nbackends:\n  - name: app\n    cookie: {{ name: SRV, mode: insert }}\n    servers:\n{}",
        servers_yaml(&[(&a, ", maxconn: 1"), (&b, "")])
    );
    apply_spec(&c, 1, "persist-full.yaml", &spec);
    wait_serving(&c, bind);
    let on_a = [("Cookie", "SRV=a")];
    // Holds a's one slot for `ms`, returning once it holds it.
    let hold = |ms: u64| {
        let held = std::thread::spawn(move || get(bind, &format!("/slow?ms={ms}"), &[("Cookie", "SRV=a")]).unwrap());
        wait_for(Duration::from_secs(5), "a's slot to be taken", || {
            (c.nodes[0].stats()["backends"]["app"]["servers"]["a"]["sessions_current"] == 1).then_some(())
        });
        held
    };
    let held = hold(1000);
    let started = Instant::now();
    let r = get(bind, "/", &on_a).unwrap();
    assert_eq!((r.status, r.server()), (200, "a".to_owned()), "the client of a waits for a: {r:?}");
    assert!(started.elapsed() >= Duration::from_millis(200), "served before a's slot freed: {:?}", started.elapsed());
    assert_eq!(held.join().unwrap().server(), "a");
    // Held longer than timeouts.queue: 503, while a client of no server goes to b.
    let held = hold(4000);
    assert_eq!(get(bind, "/", &[]).unwrap().server(), "b");
    let r = get(bind, "/", &on_a).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(held.join().unwrap().status, 200);
}

#[test]
fn a_connect_is_tunnelled_when_the_server_agrees_and_answered_when_it_refuses() {
    let c = Cluster::formed(1);
    let (_server, bind) = serve_one(&c, "connect.yaml");
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    // A 2xx to a CONNECT has no body: the tunnel starts after its head.
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(r.read_line(&mut head).unwrap() > 0, "the connection closed in the head: {head:?}");
    }
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    for msg in ["first bytes", "second bytes"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        r.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"CONNECT refuse.test:443 HTTP/1.1\r\nHost: refuse.test:443\r\n\r\n").unwrap();
    let refused = client::read_reply(&mut BufReader::new(s)).unwrap();
    assert_eq!((refused.status, refused.body.as_str()), (403, "not there"));
}

#[test]
fn a_websocket_upgrade_is_tunnelled_both_ways() {
    let c = Cluster::formed(1);
    let (_server, bind) = serve_one(&c, "ws.yaml");
    let mut s = connect(bind, None).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: lb.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let reply = client::read_reply(&mut r).unwrap();
    assert_eq!(reply.status, 101);
    assert_eq!(reply.header("upgrade"), Some("echo"));
    for msg in ["first frame", "second frame"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        r.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
}

#[test]
fn tcp_mode_half_closes_and_announces_the_client_with_proxy_protocol() {
    let c = Cluster::formed(1);
    let (plain, v1, v2) = (tcp_server("plain", "127.0.0.1:0"), tcp_server("v1", "127.0.0.1:0"), tcp_server("v2", "127.0.0.1:0"));
    let (b0, b1, b2) = (front(), front(), front());
    // On every address of the host: the header names the one the client reached.
    let wildcard = SocketAddr::from(([0, 0, 0, 0], free_port()));
    let spec = format!(
        "frontends:
  - {{ name: plain, bind: [\"{b0}\"], mode: tcp, default_backend: plain }}
  - {{ name: v1, bind: [\"{b1}\"], mode: tcp, default_backend: v1 }}
  - {{ name: wildcard, bind: [\"{wildcard}\"], mode: tcp, default_backend: v1 }}
  - {{ name: v2, bind: [\"{b2}\"], mode: tcp, default_backend: v2 }}
backends:
  - name: plain
    servers:
{}  - name: v1
    proxy_protocol: v1
    servers:
{}  - name: v2
    proxy_protocol: v2
    servers:
{}",
        servers_yaml(&[(&plain, "")]),
        servers_yaml(&[(&v1, "")]),
        servers_yaml(&[(&v2, "")])
    );
    apply_spec(&c, 1, "tcp.yaml", &spec);

    let mut s = wait_for(Duration::from_secs(5), "the tcp frontend", || connect(b0, None).ok());
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from plain\n");
    s.write_all(b"ping\n").unwrap();
    // Half-close: the server sees the end of our data and still answers.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "ping\nbye\n");

    // The server sends back "preface " and what preceded its greeting: v1 is
    // one text line, v2 a binary block of 16 + 12 bytes for TCP over IPv4.
    let connect_to = |bind: SocketAddr| {
        let s = wait_for(Duration::from_secs(5), "the tcp frontend", || connect(bind, None).ok());
        (s.local_addr().unwrap(), BufReader::new(s))
    };
    let (local, mut r) = connect_to(b1);
    let mut got = Vec::new();
    r.read_until(b'\n', &mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), format!("preface PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n", local.port(), b1.port()));
    let reached = SocketAddr::from(([127, 0, 0, 3], wildcard.port()));
    let (local, mut r) = connect_to(reached);
    let mut got = Vec::new();
    r.read_until(b'\n', &mut got).unwrap();
    let expected = format!("preface PROXY TCP4 {} 127.0.0.3 {} {}\r\n", local.ip(), local.port(), wildcard.port());
    assert_eq!(String::from_utf8_lossy(&got), expected);
    let (local, mut r) = connect_to(b2);
    let mut got = vec![0u8; 8 + 28];
    r.read_exact(&mut got).unwrap();
    assert!(got.starts_with(b"preface \r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"), "{got:?}");
    assert_eq!(&got[24..28], &[127, 0, 0, 1]);
    assert_eq!(&got[32..34], &local.port().to_be_bytes());
    assert_eq!(&got[34..36], &b2.port().to_be_bytes());
}

#[test]
fn a_new_spec_is_live_on_every_node_within_100ms_of_commit() {
    let c = Cluster::formed(3);
    let (old, new) = (http_server("old", "127.0.0.1:0"), http_server("new", "127.0.0.1:0"));
    let bind = front();
    apply_spec(&c, 1, "v1.yaml", &http_spec(bind, "", &servers_yaml(&[(&old, "")])));
    for node in &c.nodes {
        let at = node.frontend(bind);
        wait_for(Duration::from_secs(5), "every node to serve", || get(at, "/", &[]).ok().filter(|r| r.status == 200).map(|_| ()));
    }
    let mut conns: Vec<KeepAlive> = c.nodes.iter().map(|n| KeepAlive::open(n.frontend(bind)).unwrap()).collect();
    apply_spec(&c, 2, "v2.yaml", &http_spec(bind, "", &servers_yaml(&[(&new, "")])));
    let committed = Instant::now();
    for (i, conn) in conns.iter_mut().enumerate() {
        wait_for(Duration::from_secs(1), "the new spec to serve", || (conn.get("/", &[]).unwrap().server() == "new").then_some(()));
        let took = committed.elapsed();
        eprintln!("node {} serves the new spec {took:?} after the commit", i + 1);
        assert!(took < Duration::from_millis(100), "node {} took {took:?}", i + 1);
    }
}

/// The CPUs each data plane thread of process `pid` may run on, by thread name.
fn dataplane_cpus(pid: i32) -> Vec<(String, String)> {
    let mut threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the node's threads")
        .filter_map(|task| {
            let task = task.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?.trim().to_owned();
            let status = std::fs::read_to_string(task.join("status")).ok()?;
            let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim().to_owned();
            name.starts_with("dataplane-").then_some((name, cpus))
        })
        .collect();
    threads.sort();
    threads
}

#[test]
fn data_plane_threads_run_on_the_cpus_the_node_config_names_and_still_serve() {
    // The last CPU this test may use, which the node may use too.
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpu = (0..nix::sched::CpuSet::count()).rev().find(|c| allowed.is_set(*c).unwrap()).unwrap();
    let c = Cluster::start_with_config(1, Some(&format!("threads: 2\ncpus: \"{cpu}\"\n")));
    c.init();
    let (a, bind) = serve_one(&c, "pinned.yaml");
    let want = vec![("dataplane-0".to_owned(), cpu.to_string()), ("dataplane-1".to_owned(), cpu.to_string())];
    assert_eq!(dataplane_cpus(c.nodes[0].pid().unwrap()), want);
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(get(c.nodes[0].frontend(bind), "/", &[]).unwrap().status, 200);
    }
    assert_eq!(a.hits() - before, 20);
    assert!(c.nodes[0].log().contains("data plane threads pinned"), "the log says where they run: {}", c.nodes[0].log());
}

#[test]
fn a_data_plane_setting_the_host_cannot_serve_stops_the_node_with_the_value_named() {
    let dir = tempfile::TempDir::new().unwrap();
    for (args, want) in [
        (
            "--cpus 0-x",
            "invalid value '0-x' for '--cpus <LIST>': \"0-x\" is not a CPU list: write CPU numbers and ranges like 0-3,6, or `auto`, or `none`",
        ),
        ("--cpus 1023", "cpus: CPU 1023 is not one this node may run on (it may use"),
        // An address of no interface here (the root namespace never has 192.0.2.0/24).
        (
            "--source 192.0.2.1",
            "source 192.0.2.1 (--source) cannot be used: Cannot assign requested address (os error 99): give an address of this host",
        ),
        // More threads than 64 open files allow (each has its own reactor).
        ("--threads 64", "cannot start 64 data plane threads (--threads): "),
    ] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 64 && exec timeout 10 \"$0\" --id 1 --listen 127.0.0.1:{} --data-dir \"$1\" {args}",
                raftlb_tests::free_port()
            ))
            .arg(raftlb_tests::binary("lbnode"))
            .arg(dir.path().join("node"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{args}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path().join("node").exists(), "{args}: a refused setting touches no data dir");
    }
}

/// Reads one line from a TCP-mode connection, within `limit`.
fn line_within(s: &std::net::TcpStream, limit: Duration) -> std::io::Result<String> {
    s.set_read_timeout(Some(limit))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

fn http_and_tcp_spec(web: SocketAddr, db: SocketAddr, a: &TestServer, t: &TestServer) -> String {
    format!(
        "defaults:\n  timeouts: {{ server: 5s, http_keep_alive: 5s }}\nfrontends:\n  - {{ name: web, bind: [\"{web}\"], mode: http, default_backend: app }}\n  - {{ name: db, bind: [\"{db}\"], mode: tcp, default_backend: db }}\nbackends:\n  - name: app\n    servers:\n{}  - name: db\n    servers:\n{}",
        servers_yaml(&[(a, "")]),
        servers_yaml(&[(t, "")])
    )
}

#[test]
fn a_stopping_node_accepts_nothing_new_and_lets_its_connections_finish() {
    let mut c = Cluster::formed(1);
    let (a, t) = (http_server("a", "127.0.0.1:0"), tcp_server("t", "127.0.0.1:0"));
    let (web, db) = (front(), front());
    apply_spec(&c, 1, "stop.yaml", &http_and_tcp_spec(web, db, &a, &t));
    wait_serving(&c, web);
    let hits_before = a.hits();

    // An idle keep-alive connection, a request in flight and a TCP session.
    let mut idle = KeepAlive::open(web).unwrap();
    assert_eq!(idle.get("/", &[]).unwrap().status, 200);
    let busy = std::thread::spawn(move || KeepAlive::open(web).and_then(|mut k| k.get("/slow?ms=2500", &[])));
    let tcp = wait_for(Duration::from_secs(5), "the tcp frontend", || connect(db, None).ok());
    assert_eq!(line_within(&tcp, Duration::from_secs(2)).unwrap(), "hello from t\n");
    wait_for(Duration::from_secs(5), "the slow request to reach the server", || (a.hits() == hits_before + 2).then_some(()));

    c.nodes[0].signal(nix::sys::signal::Signal::SIGTERM);
    // The listeners close: a new client is refused, not left waiting.
    let refused = wait_for(Duration::from_secs(3), "the frontends to stop accepting", || {
        match std::net::TcpStream::connect_timeout(&web, Duration::from_secs(1)) {
            Err(e) => Some(e.kind()),
            Ok(_) => None,
        }
    });
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
    assert!(matches!(connect(db, None).map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused)), "the tcp frontend closed too");
    assert!(c.nodes[0].exited().is_none(), "the node waits for its connections");
    let health = client::get(c.nodes[0].monitor, "/healthz", &[]).unwrap();
    assert_eq!((health.status, health.json()["status"].as_str()), (503, Some("stopping")));

    // The request in flight is answered, as the last of its connection
    // (`Connection: close` is only said once the node stops).
    let slow = busy.join().unwrap().expect("the request in flight at SIGTERM is answered");
    assert_eq!((slow.status, slow.header("connection")), (200, Some("close")));
    // The idle connection's next request is served, and it is the last.
    let next = idle.get("/", &[]).expect("a request on an idle connection after SIGTERM is served");
    assert_eq!((next.status, next.header("connection")), (200, Some("close")));
    assert!(idle.get("/", &[]).is_err(), "the connection closed after that response");
    // The TCP session still carries traffic both ways until it ends.
    let mut w = tcp.try_clone().unwrap();
    w.write_all(b"ping\n").unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    BufReader::new(&tcp).read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "ping\nbye\n");

    let status = wait_for(Duration::from_secs(5), "the node to exit once its connections ended", || c.nodes[0].exited());
    assert!(status.success(), "{status}");
    assert!(c.nodes[0].log().contains("every client connection has ended"), "{}", c.nodes[0].log());
}

#[test]
fn stop_grace_bounds_the_wait_and_a_second_signal_ends_it_at_once() {
    for (config, signals, within) in
        [(Some("stop_grace: 1s\n"), 1, Duration::from_secs(1)..Duration::from_secs(4)), (None, 2, Duration::ZERO..Duration::from_secs(3))]
    {
        let mut c = Cluster::start_with_config(1, config);
        c.init();
        let t = tcp_server("t", "127.0.0.1:0");
        let db = front();
        let spec = format!(
            "frontends:\n  - {{ name: db, bind: [\"{db}\"], mode: tcp, default_backend: db }}\nbackends:\n  - name: db\n    servers:\n{}",
            servers_yaml(&[(&t, "")])
        );
        apply_spec(&c, 1, "grace.yaml", &spec);
        let tcp = wait_for(Duration::from_secs(5), "the tcp frontend", || connect(db, None).ok());
        assert_eq!(line_within(&tcp, Duration::from_secs(2)).unwrap(), "hello from t\n");
        let asked = Instant::now();
        for _ in 0..signals {
            c.nodes[0].signal(nix::sys::signal::Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(300));
        }
        // The session would stay open for the default 30 s and the tunnel timeout.
        let status = wait_for(Duration::from_secs(10), "the node to exit", || c.nodes[0].exited());
        let took = asked.elapsed();
        assert!(status.success(), "{status}");
        assert!(within.contains(&took), "{config:?}, {signals} SIGTERM: exited after {took:?}, expected within {within:?}");
        assert_eq!(line_within(&tcp, Duration::from_secs(2)).unwrap(), "", "the session still open was closed");
    }
}

#[test]
fn a_websocket_tunnel_keeps_its_place_under_maxconn() {
    let c = Cluster::formed(1);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    let spec = format!(
        "frontends:\n  - {{ name: web, bind: [\"{bind}\"], mode: http, maxconn: 1, default_backend: app }}\nbackends:\n  - name: app\n    servers:\n{}",
        servers_yaml(&[(&a, "")])
    );
    apply_spec(&c, 1, "ws-maxconn.yaml", &spec);
    wait_serving(&c, bind);
    let mut ws = connect(bind, None).unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: lb.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
    let mut r = BufReader::new(ws.try_clone().unwrap());
    assert_eq!(client::read_reply(&mut r).unwrap().status, 101);
    // The tunnel is the frontend's one connection: the next client waits.
    let waiting = std::thread::spawn(move || (get(bind, "/", &[]).map(|r| r.status).ok(), Instant::now()));
    std::thread::sleep(Duration::from_millis(700));
    assert!(!waiting.is_finished(), "a second client was served while the tunnel held the frontend's maxconn 1");
    // The tunnel is a current session of the frontend and of the server.
    let stats = c.nodes[0].stats();
    assert_eq!(stats["frontends"]["web"]["sessions_current"], 1, "{stats}");
    assert_eq!(stats["backends"]["app"]["servers"]["a"]["sessions_current"], 1, "{stats}");
    ws.write_all(b"still open").unwrap();
    let mut back = [0u8; 10];
    r.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still open");
    let closing = Instant::now();
    drop((r, ws));
    let (status, answered) = waiting.join().unwrap();
    assert_eq!(status, Some(200), "served once the tunnel closed");
    assert!(answered >= closing, "answered {:?} before the tunnel closed", closing - answered);
}

/// A client that keeps one connection to one node, and moves to the next
/// node when its node ends the connection after a response (`Connection:
/// close`) or refuses to connect, as a client behind DNS round robin does.
/// A request written and not answered is a dropped request.
fn rolling_client(fronts: Vec<SocketAddr>, start: usize, stop: Arc<AtomicBool>) -> (u64, Vec<String>, Vec<usize>) {
    let (mut answered, mut dropped, mut served_by) = (0, Vec::new(), vec![0; fronts.len()]);
    let mut at = start;
    let mut conn: Option<KeepAlive> = None;
    while !stop.load(Relaxed) {
        let Some(c) = conn.as_mut() else {
            match KeepAlive::open(fronts[at]) {
                Ok(c) => conn = Some(c),
                // Refused (the node stopped or is not back yet): nothing was sent.
                Err(_) => {
                    at = (at + 1) % fronts.len();
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            continue;
        };
        match c.get("/", &[]) {
            Ok(r) if r.status == 200 => {
                answered += 1;
                served_by[at] += 1;
                if r.header("connection") == Some("close") {
                    conn = None;
                    at = (at + 1) % fronts.len();
                }
            }
            Ok(r) => dropped.push(format!("node {}: status {}", at + 1, r.status)),
            Err(e) => {
                dropped.push(format!("node {}: {e}", at + 1));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (answered, dropped, served_by)
}

#[test]
fn a_rolling_restart_of_every_node_under_load_drops_no_request() {
    let mut c = Cluster::formed(3);
    let a = http_server("a", "127.0.0.1:0");
    let bind = front();
    apply_spec(&c, 1, "rolling.yaml", &http_spec(bind, "", &servers_yaml(&[(&a, "")])));
    let fronts: Vec<SocketAddr> = c.nodes.iter().map(|n| n.frontend(bind)).collect();
    for &at in &fronts {
        wait_for(Duration::from_secs(5), "every node to serve", || get(at, "/", &[]).ok().filter(|r| r.status == 200));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (fronts, stop) = (fronts.clone(), stop.clone());
            std::thread::spawn(move || rolling_client(fronts, i % 3, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    for id in 1..=3u64 {
        c.node(id).signal(nix::sys::signal::Signal::SIGTERM);
        // Its clients leave after their next response: it has nothing left to wait for.
        let status = wait_for(Duration::from_secs(5), "the node to stop once its clients left", || c.node(id).exited());
        assert!(status.success(), "node {id}: {status}");
        c.node(id).start();
        c.wait_until_answers(id);
        let at = fronts[id as usize - 1];
        wait_for(Duration::from_secs(10), "the restarted node to serve", || get(at, "/", &[]).ok().filter(|r| r.status == 200));
        c.agreed_leader(Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    let (mut answered, mut dropped, mut served_by) = (0, Vec::new(), [0; 3]);
    for client in clients {
        let (n, d, by) = client.join().unwrap();
        answered += n;
        dropped.extend(d);
        for (total, n) in served_by.iter_mut().zip(by) {
            *total += n;
        }
    }
    eprintln!("rolling restart: {answered} requests answered, by node {served_by:?}");
    assert!(dropped.is_empty(), "{} of {} requests dropped: {dropped:?}", dropped.len(), answered + dropped.len() as u64);
    assert!(answered > 500, "the clients kept sending: {answered} answered");
    assert!(served_by.iter().all(|&n| n > 0), "every node served during the restarts: {served_by:?}");
    assert_eq!(c.config_versions(), vec![Some(1); 3], "every node back on the committed spec");
}
