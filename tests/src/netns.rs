//! Network namespaces for the VIP tests: the topology of `scripts/netns.sh`
//! (three node hosts, two backends and a client on one bridge), code that
//! runs inside a namespace, a client that probes the VIP every 10 ms, and a
//! sampler that reads which nodes hold the VIP every 10 ms. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// The topology, removed again when dropped (also when a test fails).
pub struct Topology {
    pub prefix: String,
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns.sh")
}

impl Topology {
    pub fn up() -> Topology {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the VIP tests build network namespaces and need root: run the README's test command as root, as CI does"
        );
        let prefix = format!("r{}", std::process::id() % 100_000);
        let out = Command::new("bash").arg(script()).args(["up", &prefix]).output().expect("scripts/netns.sh runs");
        assert!(out.status.success(), "scripts/netns.sh up {prefix} failed: {}", String::from_utf8_lossy(&out.stderr));
        Topology { prefix }
    }

    /// The namespace of host `host` (n1..n3, b1, b2, c).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Runs `ip` with `args` inside the namespace of `host`.
    pub fn ip(&self, host: &str, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.ns(host)]).args(args).output().expect("ip runs");
        assert!(out.status.success(), "ip -n {} {args:?}: {}", self.ns(host), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside the namespace of `host`; panics if it fails.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.ns(host)]).args(cmd).output().expect("ip netns exec runs");
        assert!(out.status.success(), "{cmd:?} in {}: {}", self.ns(host), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The MAC address of `host`'s eth0.
    pub fn mac(&self, host: &str) -> String {
        let out = self.ip(host, &["-o", "link", "show", "eth0"]);
        out.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).expect("eth0 has a MAC").to_owned()
    }

    /// The MAC the client's neighbour table has for `ip`, if any.
    pub fn client_neighbour(&self, ip: &str) -> Option<String> {
        let out = self.ip("c", &["neigh", "show", ip]);
        out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_owned)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).args(["down", &self.prefix]).status();
    }
}

/// Moves the calling thread into namespace `ns` (threads it starts later follow).
pub fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("cannot enter namespace {ns}: {e}"));
}

/// Runs `f` on a thread inside namespace `ns` and returns what it returns.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .expect("the thread in the namespace ran")
}

/// A client in namespace `ns` that starts a `GET /` to `target` every 10 ms
/// (each on its own thread, so a probe that hangs does not delay the next),
/// each with a 100 ms limit, and records when each began and whether it
/// was answered.
pub struct Prober {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, bool)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    pub fn start(ns: &str, target: SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ns, stop2, log2) = (ns.to_owned(), stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let mut probes = Vec::new();
            let mut next = Instant::now();
            while !stop2.load(Relaxed) {
                let log = log2.clone();
                // Threads started here are in the client's namespace too.
                probes.push(std::thread::spawn(move || {
                    let began = Instant::now();
                    let ok = probe(target);
                    log.lock().unwrap().push((began, ok));
                }));
                next += Duration::from_millis(10);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for p in probes {
                let _ = p.join();
            }
        });
        Prober { stop, log, thread: Some(thread) }
    }

    /// Stops probing and returns how long the client went unanswered after
    /// `fault`: from the fault, or from the last answered probe before the
    /// first unanswered one if that came later (a planned move serves on for
    /// a while), to the first answered probe after it. Zero when every
    /// probe was answered.
    pub fn outage_after(mut self, fault: Instant) -> Duration {
        self.finish();
        let mut log = self.log.lock().unwrap().clone();
        log.sort_by_key(|(at, _)| *at);
        let after: Vec<(Instant, bool)> = log.into_iter().filter(|(at, _)| *at >= fault).collect();
        assert!(after.len() > 5, "probes ran after the fault ({})", after.len());
        let Some(first_failure) = after.iter().position(|(_, ok)| !ok) else { return Duration::ZERO };
        let from = after[..first_failure].iter().rev().find(|(_, ok)| *ok).map_or(fault, |(at, _)| *at);
        let back = after[first_failure..].iter().find(|(_, ok)| *ok).unwrap_or_else(|| panic!("the VIP never answered again"));
        back.0.duration_since(from)
    }

    fn finish(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.finish();
    }
}

fn probe(target: SocketAddr) -> bool {
    let limit = Duration::from_millis(100);
    let deadline = Instant::now() + limit;
    let Ok(mut s) = TcpStream::connect_timeout(&target, limit) else { return false };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = s.set_read_timeout(Some(left));
    let _ = s.set_write_timeout(Some(left));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// When a sample was taken, and which nodes held the VIP then.
pub type Sample = (Instant, Vec<u64>);

/// Reads every 10 ms which of the nodes' namespaces have `vip` on an
/// interface; each sample reads all nodes within a fraction of a millisecond.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// `nodes`: node id and namespace.
    pub fn start(nodes: Vec<(u64, String)>, vip: IpAddr) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stop2, samples2) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let files: Vec<(u64, std::fs::File)> = nodes
                .iter()
                .map(|(id, ns)| (*id, std::fs::File::open(format!("/run/netns/{ns}")).expect("the node's namespace")))
                .collect();
            while !stop2.load(Relaxed) {
                let at = Instant::now();
                let mut holders = Vec::new();
                for (id, file) in &files {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("enter the node's namespace");
                    if holds(vip) {
                        holders.push(*id);
                    }
                }
                samples2.lock().unwrap().push((at, holders));
                if let Some(rest) = Duration::from_millis(10).checked_sub(at.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        });
        Sampler { stop, samples, thread: Some(thread) }
    }

    /// Every sample so far: when, and which nodes held the VIP.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// The samples taken at or after `at`.
    pub fn since(&self, at: Instant) -> Vec<Sample> {
        self.samples.lock().unwrap().iter().filter(|(taken, _)| *taken >= at).cloned().collect()
    }

    /// The holders in the latest sample.
    pub fn holders(&self) -> Vec<u64> {
        self.samples.lock().unwrap().last().map(|(_, h)| h.clone()).unwrap_or_default()
    }

    /// Panics if any sample saw more than one holder.
    pub fn assert_never_two_holders(&self) {
        let samples = self.samples();
        assert!(samples.len() > 10, "the sampler ran ({} samples)", samples.len());
        if let Some((at, holders)) = samples.iter().find(|(_, h)| h.len() > 1) {
            let start = samples[0].0;
            panic!("nodes {holders:?} held the VIP at once, {} ms into the sampling", at.duration_since(start).as_millis());
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn holds(vip: IpAddr) -> bool {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs.into_iter().any(|a| {
                let ip = a.address.and_then(|s| {
                    s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())).or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                });
                ip == Some(vip)
            })
        })
        .unwrap_or(false)
}
