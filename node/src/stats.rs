//! Traffic counters per frontend, backend and server, kept from the first
//! connection and across spec versions (they are looked up by name), so the
//! statistics survive a config change. Everything is a relaxed atomic: the
//! data plane only adds, readers take a snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Debug, Default)]
pub struct Counters {
    pub sessions_current: AtomicU64,
    pub sessions_total: AtomicU64,
    /// Bytes from the client (frontend) or to the server (backend, server).
    pub bytes_in: AtomicU64,
    /// Bytes to the client (frontend) or from the server (backend, server).
    pub bytes_out: AtomicU64,
    /// Failed connects, broken or timed-out exchanges, malformed requests.
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub redispatches: AtomicU64,
    /// Requests waiting for a free server slot now, and in all.
    pub queue_current: AtomicU64,
    pub queue_total: AtomicU64,
    pub denied: AtomicU64,
    /// HTTP responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub responses: [AtomicU64; 5],
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn response(&self, status: u16) {
        if let Some(class) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
            self.responses[class as usize].fetch_add(1, Relaxed);
        }
    }

    /// Counts one session for as long as the returned guard lives.
    pub fn session(self: &Arc<Self>) -> SessionGuard {
        self.sessions_current.fetch_add(1, Relaxed);
        self.sessions_total.fetch_add(1, Relaxed);
        SessionGuard(self.clone())
    }

    pub fn snapshot(&self) -> Value {
        let r = |i: usize| self.responses[i].load(Relaxed);
        json!({
            "sessions_current": self.sessions_current.load(Relaxed),
            "sessions_total": self.sessions_total.load(Relaxed),
            "bytes_in": self.bytes_in.load(Relaxed),
            "bytes_out": self.bytes_out.load(Relaxed),
            "errors": self.errors.load(Relaxed),
            "retries": self.retries.load(Relaxed),
            "redispatches": self.redispatches.load(Relaxed),
            "queue_current": self.queue_current.load(Relaxed),
            "queue_total": self.queue_total.load(Relaxed),
            "denied": self.denied.load(Relaxed),
            "responses": { "1xx": r(0), "2xx": r(1), "3xx": r(2), "4xx": r(3), "5xx": r(4) },
        })
    }
}

pub struct SessionGuard(Arc<Counters>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions_current.fetch_sub(1, Relaxed);
    }
}

/// Every counter set of the node, by name.
#[derive(Default)]
pub struct Stats {
    frontends: Mutex<BTreeMap<String, Arc<Counters>>>,
    backends: Mutex<BTreeMap<String, Arc<Counters>>>,
    servers: Mutex<BTreeMap<(String, String), Arc<Counters>>>,
}

impl Stats {
    pub fn frontend(&self, name: &str) -> Arc<Counters> {
        self.frontends.lock().expect("stats lock").entry(name.to_owned()).or_default().clone()
    }

    pub fn backend(&self, name: &str) -> Arc<Counters> {
        self.backends.lock().expect("stats lock").entry(name.to_owned()).or_default().clone()
    }

    pub fn server(&self, backend: &str, server: &str) -> Arc<Counters> {
        self.servers.lock().expect("stats lock").entry((backend.to_owned(), server.to_owned())).or_default().clone()
    }

    pub fn snapshot(&self) -> Value {
        let frontends: BTreeMap<_, _> = self.frontends.lock().expect("stats lock").iter().map(|(k, c)| (k.clone(), c.snapshot())).collect();
        let mut backends: BTreeMap<String, Value> = self
            .backends
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(k, c)| {
                let mut v = c.snapshot();
                v["servers"] = json!({});
                (k.clone(), v)
            })
            .collect();
        for ((backend, server), c) in self.servers.lock().expect("stats lock").iter() {
            if let Some(b) = backends.get_mut(backend) {
                b["servers"][server] = c.snapshot();
            }
        }
        json!({ "frontends": frontends, "backends": backends })
    }
}
