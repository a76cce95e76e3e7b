//! A harness for end-to-end tests: clusters of real `lbnode` processes on
//! loopback, driven by the real `lbctl`. Every process a test starts is
//! killed when the test ends, also when it fails; the node logs of a failed
//! test are printed. `NODE_LOG` sets the nodes' log filter (for example
//! `info,openraft=info`); `KEEP_NODE_LOGS=DIR` keeps the whole logs of a
//! failed test in DIR.

pub mod backend;
pub mod client;
pub mod netns;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// Clusters run one at a time: Raft timings (150-300 ms elections) are real,
/// and several clusters at once on two cores would test the scheduler.
static SERIAL: Mutex<()> = Mutex::new(());

/// A built binary of the workspace, next to this test executable's folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --profile ci --bins` before the tests (the README's test command does)",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range (32768 and
/// up): nodes connect out from their own 127.0.0.N addresses, and a port the
/// kernel hands to such a connection must never be one a test is about to
/// listen on there.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(0, 21_000 + (std::process::id() % 50) * 200, Relaxed, Relaxed);
    loop {
        let port = NEXT.fetch_add(1, Relaxed);
        let port = 21_000 + (port - 21_000) % 11_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, or panics after `limit`
/// naming `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Node {
    pub id: u64,
    pub addr: SocketAddr,
    pub monitor: SocketAddr,
    pub data_dir: PathBuf,
    /// A node config file passed with --config, if the test wrote one.
    pub config: Option<PathBuf>,
    /// The network namespace the node runs in; `None`: loopback, where it
    /// serves frontends and connects to servers from its own 127.0.0.N.
    pub netns: Option<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the lbnode process (again) with the same id, address and data.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("the node log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                // `ip netns exec` enters the namespace and execs lbnode: the pid is lbnode's.
                cmd.args(["netns", "exec", ns]).arg(binary("lbnode"));
                cmd
            }
            None => {
                let mut cmd = Command::new(binary("lbnode"));
                // Several nodes on one host: node N serves frontends bound to 127.0.0.1 on 127.0.0.N,
                // and connects to servers from 127.0.0.N, so a server can tell the nodes apart.
                cmd.args(["--bind-rewrite", &format!("127.0.0.1=127.0.0.{}", self.id)]);
                cmd.args(["--source", &format!("127.0.0.{}", self.id)]);
                cmd
            }
        };
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .args(["--id", &self.id.to_string(), "--listen", &self.endpoint(), "--monitor", &self.monitor.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", std::env::var("NODE_LOG").unwrap_or_else(|_| "info,openraft=off".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the node log"))
            .stderr(log)
            .spawn()
            .expect("lbnode starts");
        self.child = Some(child);
    }

    /// SIGKILL: the process dies at once, with no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the node runs");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM is delivered");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("the node's status") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {} did not exit within 10 s of SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (or SIGINT) and returns at once: the node stops softly.
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("the node runs");
        kill(Pid::from_raw(pid), signal).expect("the signal is delivered");
    }

    /// The exit status, once the process has ended (it is then no longer running).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("the node's status")?;
        self.child = None;
        Some(status)
    }

    /// Where this node serves a frontend that the spec binds to `bind` on 127.0.0.1.
    pub fn frontend(&self, bind: SocketAddr) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, self.id as u8], bind.port()))
    }

    /// The node's traffic counters (`GET /stats` on its monitor).
    pub fn stats(&self) -> Value {
        let reply = client::get(self.monitor, "/stats", &[]).expect("the monitor answers");
        serde_json::from_str(&reply.body).expect("stats are JSON")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The result of one lbctl run.
pub struct Lbctl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Lbctl {
    pub fn json(&self) -> Value {
        assert!(self.ok, "lbctl failed: {}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("lbctl printed no JSON ({e}): {}", self.stdout))
    }
}

/// Runs lbctl against `endpoint` with `args`.
pub fn lbctl(endpoint: &str, args: &[&str]) -> Lbctl {
    lbctl_in(None, endpoint, args)
}

/// Runs lbctl inside network namespace `netns`, if given.
pub fn lbctl_in(netns: Option<&str>, endpoint: &str, args: &[&str]) -> Lbctl {
    let mut cmd = match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(binary("lbctl"));
            cmd
        }
        None => Command::new(binary("lbctl")),
    };
    let out: Output = cmd
        .args(["--endpoint", endpoint, "--timeout", "20s"])
        .args(args)
        .env_remove("LBCTL_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("lbctl runs");
    Lbctl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub dir: TempDir,
    /// The namespaces the nodes run in, if they do; removed after the nodes stop.
    pub topology: Option<netns::Topology>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts `n` lbnode processes with ids 1..=n; they form no cluster yet.
    pub fn start(n: u64) -> Cluster {
        Cluster::start_with_config(n, None)
    }

    /// Like [`Cluster::start`], every node also reading `node_config` (YAML) with --config.
    pub fn start_with_config(n: u64, node_config: Option<&str>) -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = TempDir::new().expect("a temporary directory");
        let config = node_config.map(|text| {
            let path = dir.path().join("node.yaml");
            std::fs::write(&path, text).expect("the node config");
            path
        });
        let nodes = (1..=n)
            .map(|id| Node {
                id,
                addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
                monitor: SocketAddr::from(([127, 0, 0, 1], free_port())),
                data_dir: dir.path().join(format!("node{id}")),
                config: config.clone(),
                netns: None,
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { nodes, dir, topology: None, _serial: serial };
        for i in 0..cluster.nodes.len() {
            cluster.nodes[i].start();
        }
        for node in &cluster.nodes {
            cluster.wait_until_answers(node.id);
        }
        cluster
    }

    /// Three nodes in a fresh namespace topology (`scripts/netns.sh`): node
    /// N in PREFIX-nN at 192.0.2.1N:7001, formed into a cluster.
    pub fn formed_in_namespaces(node_config: Option<&str>) -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let topology = netns::Topology::up();
        let dir = TempDir::new().expect("a temporary directory");
        let config = node_config.map(|text| {
            let path = dir.path().join("node.yaml");
            std::fs::write(&path, text).expect("the node config");
            path
        });
        let nodes = (1..=3)
            .map(|id| Node {
                id,
                addr: SocketAddr::from(([192, 0, 2, 10 + id as u8], 7001)),
                monitor: SocketAddr::from(([127, 0, 0, 1], 7101)),
                data_dir: dir.path().join(format!("node{id}")),
                config: config.clone(),
                netns: Some(topology.ns(&format!("n{id}"))),
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { nodes, dir, topology: Some(topology), _serial: serial };
        for i in 0..cluster.nodes.len() {
            cluster.nodes[i].start();
        }
        for id in 1..=3 {
            cluster.wait_until_answers(id);
        }
        cluster.init();
        cluster.add(2);
        cluster.add(3);
        cluster
    }

    pub fn topology(&self) -> &netns::Topology {
        self.topology.as_ref().expect("a cluster in namespaces")
    }

    /// Starts `n` nodes and forms a cluster of them: init on node 1, then
    /// `node add` for each other node.
    pub fn formed(n: u64) -> Cluster {
        let cluster = Cluster::start(n);
        cluster.init();
        for id in 2..=n {
            cluster.add(id);
        }
        cluster
    }

    /// `lbctl cluster init` on node 1.
    pub fn init(&self) {
        let init = self.ctl(1, &["cluster", "init"]);
        assert!(init.ok, "cluster init: {}", init.stderr);
    }

    /// `lbctl node add` of node `id`, sent to node 1.
    pub fn add(&self, id: u64) {
        let add = self.ctl(1, &["node", "add", &id.to_string(), &self.endpoint(id)]);
        assert!(add.ok, "node add {id}: {}", add.stderr);
    }

    /// Runs lbctl against node `id`, from inside its namespace if it has one.
    pub fn ctl(&self, id: u64, args: &[&str]) -> Lbctl {
        let node = self.nodes.iter().find(|n| n.id == id).expect("a node of this cluster");
        lbctl_in(node.netns.as_deref(), &node.endpoint(), args)
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("a node of this cluster")
    }

    pub fn endpoint(&self, id: u64) -> String {
        self.nodes.iter().find(|n| n.id == id).expect("a node of this cluster").endpoint()
    }

    pub fn wait_until_answers(&self, id: u64) {
        wait_for(Duration::from_secs(10), &format!("node {id} to answer"), || {
            self.ctl(id, &["cluster", "status", "--local", "--json"]).ok.then_some(())
        });
    }

    /// `cluster status --local --json` of one node; `None` if it does not answer.
    pub fn local_status(&self, id: u64) -> Option<Value> {
        let out = self.ctl(id, &["cluster", "status", "--local", "--json"]);
        out.ok.then(|| out.json())
    }

    /// The leader every running node agrees on, once they agree on one that
    /// is itself running (right after a crash the others still name the dead one).
    pub fn agreed_leader(&self, limit: Duration) -> u64 {
        wait_for(limit, "the running nodes to agree on a running leader", || {
            let mut leaders = self.nodes.iter().filter(|n| n.is_running()).map(|n| self.local_status(n.id)?["leader"].as_u64());
            let first = leaders.next()??;
            let running = self.nodes.iter().any(|n| n.id == first && n.is_running());
            (running && leaders.all(|l| l == Some(first))).then_some(first)
        })
    }

    /// The config version each running node reports.
    pub fn config_versions(&self) -> Vec<Option<u64>> {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| self.local_status(n.id).and_then(|s| s["config_version"].as_u64())).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if std::thread::panicking() {
            // KEEP_NODE_LOGS=DIR keeps the whole logs of a failed test.
            if let Ok(keep) = std::env::var("KEEP_NODE_LOGS") {
                let _ = std::fs::create_dir_all(&keep);
                for node in &self.nodes {
                    let _ = std::fs::copy(&node.log, Path::new(&keep).join(format!("node{}.log", node.id)));
                }
            }
            for node in &self.nodes {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- node {} log (last {} lines) ----", node.id, tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A spec that only uses loopback addresses; `n` makes each one different.
pub fn loopback_spec(n: u16) -> String {
    format!(
        "frontends:
  - name: web
    bind: [\"127.0.0.1:{front}\"]
    mode: http
    default_backend: app
backends:
  - name: app
    balance: roundrobin
    servers:
      - {{ name: s1, address: \"127.0.0.1:{s1}\" }}
      - {{ name: s2, address: \"127.0.0.1:{s2}\" }}
",
        front = 18000 + n,
        s1 = 19000 + n,
        s2 = 20000 + n
    )
}

/// Applies a spec (YAML) through node `via` and returns the new version.
pub fn apply_spec(cluster: &Cluster, via: u64, name: &str, yaml: &str) -> u64 {
    let file = spec_file(cluster, name, yaml);
    let out = lbctl(&cluster.endpoint(via), &["config", "apply", "-f", &file, "--json"]).json();
    out["version"].as_u64().expect("a version")
}

/// Writes a spec into the cluster's directory and returns its path.
pub fn spec_file(cluster: &Cluster, name: &str, text: &str) -> String {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text).expect("the spec file");
    path.to_string_lossy().into_owned()
}
