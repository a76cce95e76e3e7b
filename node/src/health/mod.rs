//! Backend health. Every node probes every server that has a health check
//! ([`checker`]); a change that passes `rise`/`fall` is proposed to Raft as
//! this node's observation, and only then: never one proposal per check.
//! The state machine derives the cluster's view by `health.policy`, and
//! every node routes by that committed view ([`view`]), or by its own checks
//! under `policy: local` or while it has no quorum. [`selfcheck`] watches the
//! node's own data plane and keeps a failing node from leading.

pub mod checker;
mod probe;
pub mod selfcheck;
pub mod view;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

pub use view::ViewMode;

/// A server by backend and name.
pub type ServerKey = (String, String);

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub ok: bool,
    /// "HTTP 200", "connection refused", "no answer within 3s".
    pub detail: String,
    pub latency: Duration,
    pub at_ms: u64,
}

/// This node's own view of one server.
#[derive(Debug, Clone)]
pub struct LocalServer {
    /// The server's traffic address, which the committed entry must match.
    pub addr: SocketAddr,
    pub up: bool,
    /// When `up` last changed here (or checking began), Unix ms.
    pub since_ms: u64,
    /// The result that settled `up`.
    pub settled_by: String,
    pub last: Option<CheckResult>,
    /// Observations this node proposed to Raft for the server.
    pub proposals: u64,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

/// Every server this node checks, and a counter that moves on each change
/// of a server's state (not on each check).
pub struct LocalHealth {
    servers: Mutex<BTreeMap<ServerKey, LocalServer>>,
    changes: watch::Sender<u64>,
}

impl Default for LocalHealth {
    fn default() -> Self {
        LocalHealth { servers: Mutex::default(), changes: watch::channel(0).0 }
    }
}

impl LocalHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ServerKey, LocalServer>> {
        self.servers.lock().expect("local health lock")
    }

    pub fn snapshot(&self) -> BTreeMap<ServerKey, LocalServer> {
        self.lock().clone()
    }

    pub fn get(&self, key: &ServerKey) -> Option<LocalServer> {
        self.lock().get(key).cloned()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Starts tracking a server in the state it is believed to be in.
    fn begin(&self, key: ServerKey, addr: SocketAddr, up: bool, detail: String) {
        let server = LocalServer { addr, up, since_ms: now_ms(), settled_by: detail, last: None, proposals: 0, streak: 0 };
        self.lock().insert(key, server);
        self.changed();
    }

    fn forget(&self, key: &ServerKey) {
        if self.lock().remove(key).is_some() {
            self.changed();
        }
    }

    /// Records a check result; returns the new state when `rise` or `fall`
    /// results in a row changed it, as HAProxy counts them.
    fn record(&self, key: &ServerKey, result: CheckResult, rise: u32, fall: u32) -> Option<bool> {
        let mut servers = self.lock();
        let server = servers.get_mut(key)?;
        let settles = settle(server, &result, rise, fall);
        server.last = Some(result);
        drop(servers);
        if settles.is_some() {
            self.changed();
        }
        settles
    }

    fn count_proposal(&self, keys: &[ServerKey]) {
        let mut servers = self.lock();
        for key in keys {
            if let Some(s) = servers.get_mut(key) {
                s.proposals += 1;
            }
        }
    }
}

fn settle(server: &mut LocalServer, result: &CheckResult, rise: u32, fall: u32) -> Option<bool> {
    if result.ok == server.up {
        server.streak = 0;
        return None;
    }
    server.streak += 1;
    if server.streak < if server.up { fall } else { rise } {
        return None;
    }
    server.up = result.ok;
    server.since_ms = result.at_ms;
    server.settled_by.clone_from(&result.detail);
    server.streak = 0;
    Some(server.up)
}

/// The node's health: its own checks, the view it routes by, its self-check.
#[derive(Default)]
pub struct Health {
    pub local: LocalHealth,
    mode: Mutex<ViewMode>,
    failing: AtomicBool,
    self_check: Mutex<String>,
}

impl Health {
    /// Which view this node routes by now.
    pub fn mode(&self) -> ViewMode {
        *self.mode.lock().expect("view mode lock")
    }

    /// Whether the self-check passes, and what it found last.
    pub fn serving(&self) -> (bool, String) {
        (!self.failing.load(Relaxed), self.self_check.lock().expect("self-check lock").clone())
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ok: bool) -> CheckResult {
        CheckResult { ok, detail: if ok { "ok" } else { "refused" }.into(), latency: Duration::ZERO, at_ms: 1 }
    }

    #[test]
    fn rise_and_fall_count_results_in_a_row() {
        let local = LocalHealth::default();
        let key: ServerKey = ("b".into(), "s".into());
        local.begin(key.clone(), "127.0.0.1:1".parse().unwrap(), true, String::new());
        let seq = |oks: &[bool]| oks.iter().map(|ok| local.record(&key, result(*ok), 2, 3)).collect::<Vec<_>>();
        assert_eq!(seq(&[false, false, true]), [None, None, None], "two failures then a success: no fall");
        assert_eq!(seq(&[false, false, false]), [None, None, Some(false)], "three in a row: down");
        assert_eq!(seq(&[true, false, true, true]), [None, None, None, Some(true)], "two successes in a row: up");
        // Alternating results never settle either way.
        assert!(seq(&[false, true, false, true, false, true]).iter().all(Option::is_none));
    }
}
