//! `lbnode demo`, the README's first command: three nodes on loopback that
//! form a cluster with a spec applied, and stop when the demo is interrupted.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;

use raftlb_tests::client::get;
use raftlb_tests::{binary, lbctl, wait_for};

/// A base port whose demo ports are free: gRPC (+0..2), monitors (+100..102),
/// the frontend (+1079 on 127.0.0.1-3) and the two backends (+2000, +2001).
fn free_base() -> u16 {
    let free = |ip: [u8; 4], port: u16| TcpListener::bind((std::net::Ipv4Addr::from(ip), port)).is_ok();
    (0..200)
        .map(|i| 30_000 + i * 7)
        .find(|base| {
            (0..3).all(|i| {
                free([127, 0, 0, 1], base + i) && free([127, 0, 0, 1], base + i + 100) && free([127, 0, 0, 1 + i as u8], base + 1079)
            }) && free([127, 0, 0, 1], base + 2000)
                && free([127, 0, 0, 1], base + 2001)
        })
        .expect("free ports for the demo")
}

/// Starts `lbnode demo` and waits for its guide.
fn start_demo(base: u16, extra: &[&str]) -> (Child, String) {
    let mut demo = Command::new(binary("lbnode"))
        .args(["demo", "--base-port", &base.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("lbnode demo starts");
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.starts_with("Ctrl-C stops the demo") {
                let _ = tx.send(text.clone());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(guide) => (demo, guide),
        Err(RecvTimeoutError::Disconnected) => panic!("the demo exited before printing its guide: {:?}", demo.wait()),
        Err(RecvTimeoutError::Timeout) => {
            let _ = demo.kill();
            panic!("the demo printed no guide within 30 s");
        }
    }
}

/// One demo at a time: each looks for free ports, then binds them.
static ONE_DEMO: Mutex<()> = Mutex::new(());

fn one_demo() -> MutexGuard<'static, ()> {
    ONE_DEMO.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn none_answers(base: u16) -> bool {
    (0..3).all(|i| !lbctl(&format!("127.0.0.1:{}", base + i), &["cluster", "status", "--local"]).ok)
}

#[test]
fn the_demo_runs_a_three_node_cluster_and_stops_on_interrupt() {
    let _one = one_demo();
    let base = free_base();
    let (mut demo, guide) = start_demo(base, &[]);
    assert!(guide.contains("cluster status"), "the guide says what to try: {guide}");

    let endpoint = format!("127.0.0.1:{}", base + 1);
    let status = wait_for(Duration::from_secs(5), "every demo node to report its version", || {
        let s = lbctl(&endpoint, &["cluster", "status", "--json"]).json();
        let members = s["members"].as_array()?;
        let reported = members.iter().all(|m| m["version"].as_str().is_some_and(|v| !v.is_empty()));
        (members.len() == 3 && reported).then_some(s)
    });
    assert_eq!(status["config_version"], 1, "{status}");
    let spec = lbctl(&endpoint, &["config", "get", "--json"]).json();
    for server in spec["spec"]["backends"][0]["servers"].as_array().unwrap() {
        assert!(server["address"].as_str().unwrap().starts_with("127.0.0.1:"), "the demo stays on loopback: {server}");
    }

    // Traffic through every node, each on its own 127.0.0.N, to both backends.
    let mut answered = std::collections::BTreeSet::new();
    for n in 1..=3u8 {
        let front = SocketAddr::from(([127, 0, 0, n], base + 1079));
        for _ in 0..2 {
            let reply = wait_for(Duration::from_secs(5), "the demo frontend to serve", || get(front, "/", &[]).ok());
            assert_eq!(reply.status, 200, "node {n}: {reply:?}");
            assert!(reply.body.contains("X-Served-By: raftlb"), "{}", reply.body);
            answered.insert(reply.body.lines().next().unwrap().to_owned());
        }
    }
    assert_eq!(answered.len(), 2, "both demo backends answered: {answered:?}");

    kill(Pid::from_raw(demo.id() as i32), Signal::SIGINT).unwrap();
    let exited = wait_for(Duration::from_secs(15), "the demo to exit after SIGINT", || demo.try_wait().unwrap());
    assert!(exited.success(), "{exited}");
    assert!(none_answers(base), "a demo node still answers");
}

#[test]
fn the_demo_nodes_stop_when_the_demo_is_killed() {
    let _one = one_demo();
    let base = free_base();
    let dir = tempfile::TempDir::new().unwrap();
    let (mut demo, _) = start_demo(base, &["--dir", &dir.path().to_string_lossy()]);
    demo.kill().unwrap();
    demo.wait().unwrap();
    wait_for(Duration::from_secs(10), "the demo nodes to stop after the demo was killed", || none_answers(base).then_some(()));
}

#[test]
fn a_base_port_the_demo_cannot_use_is_refused_with_the_range() {
    for base in ["0", "65000"] {
        let out = Command::new(binary("lbnode")).args(["demo", "--base-port", base]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--base-port {base}: {stderr}");
        assert!(
            stderr.contains(&format!("--base-port {base} is out of range: the demo uses it and the 2001 ports above it; give 1 to 63534")),
            "--base-port {base}: {stderr}"
        );
    }
}
