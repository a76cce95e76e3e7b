//! One spec version compiled for serving: frontends by bind address,
//! backends with their servers, balancer and limits. What must outlive a
//! version (a server's open sessions, its idle connections, stick tables,
//! counters, maxconn slots) lives in [`Shared`] and is found again by name,
//! so a new version takes over without losing track of the traffic in flight.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftlb_proto::spec::{Backend, Frontend, Server, Spec, Timeouts};
use raftlb_raft::AdminState;
use smallvec::SmallVec;
use tokio::sync::Notify;

use super::http::Pool;
use crate::balance::{Balancer, Candidate};
use crate::stats::{Counters, Stats};

/// The spec version in force, as the data plane publishes it to its connections.
pub type RuntimeWatch = tokio::sync::watch::Receiver<Option<Arc<Runtime>>>;

/// Where this node places frontends whose bind address another node on the
/// same host already uses: `from` IP -> `to` IP (see the node config).
pub type BindRewrite = HashMap<IpAddr, IpAddr>;

/// A map looked up for every connection or request, keyed by what the spec
/// names (bind addresses, backend names): a fast hash, as no client chooses
/// its keys (the stick table, keyed by client addresses, keeps std's).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub struct Runtime {
    pub timeouts: Timeouts,
    /// The source address of connections to servers (the node config's `source`).
    pub source: Option<IpAddr>,
    pub retries: u32,
    pub redispatch: bool,
    /// The node-wide connection limit (`defaults.maxconn`).
    pub node_slots: Arc<Slots>,
    /// Each bind address this node listens on (after the rewrite), to the frontend it serves.
    pub by_bind: FastMap<SocketAddr, Arc<FrontendRt>>,
    pub backends: FastMap<String, Arc<BackendRt>>,
}

pub struct FrontendRt {
    pub spec: Frontend,
    pub counters: Arc<Counters>,
    pub slots: Arc<Slots>,
}

pub struct BackendRt {
    pub spec: Backend,
    pub servers: Vec<ServerRt>,
    pub balancer: Balancer,
    pub counters: Arc<Counters>,
    pub shared: Arc<BackendShared>,
    /// This version's queued requests that may take any server: a version
    /// of its own, so requests of a new version (which may have a server
    /// more) do not wait behind those of the old.
    line: Arc<Line>,
}

/// The queued requests free to take any server (not persistent), by ticket
/// in the order they came: only the first in line tries, so they are served
/// in order, and a request that comes while the line is not empty joins it
/// rather than pass it.
#[derive(Default)]
struct Line {
    order: Mutex<VecDeque<u64>>,
    /// The length of `order`, which every request reads, without its lock.
    len: AtomicU64,
    /// The next ticket.
    tickets: AtomicU64,
}

pub struct ServerRt {
    pub spec: Server,
    pub state: Arc<ServerState>,
}

impl ServerRt {
    /// Neither drained by its weight (0) nor by the operator: the balancer
    /// may give it new sessions while it is up.
    fn takes_new_sessions(&self) -> bool {
        self.spec.weight > 0 && self.state.admin() == AdminState::Ready
    }
}

/// A server's live state, the same object in every version that keeps the
/// server under the same name and address.
pub struct ServerState {
    pub name: String,
    pub addr: SocketAddr,
    pub active: AtomicU64,
    /// Set from the health view the node routes by; a server without checks is up.
    pub up: AtomicBool,
    /// The operator's state, an [`AdminState`] as set by [`ServerState::set_admin`].
    admin: AtomicU8,
    pub counters: Arc<Counters>,
    pub pool: Pool,
}

impl ServerState {
    pub fn admin(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    pub fn set_admin(&self, state: AdminState) {
        let n = match state {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        };
        self.admin.store(n, Relaxed);
    }

    /// Up and not in maintenance: it may serve clients that persist on it.
    pub fn serves(&self) -> bool {
        self.up.load(Relaxed) && self.admin() != AdminState::Maint
    }
}

/// What a backend keeps across versions.
#[derive(Default)]
pub struct BackendShared {
    /// Woken whenever a server slot frees up, for requests in the queue.
    released: Notify,
    /// Requests in the queue: a release wakes them only if there are any.
    waiting: AtomicU64,
    /// Source stickiness: client address -> server name, until the instant.
    stick: Mutex<StickTable>,
}

/// Where a read of a stick table stopped: the last entry's place in the
/// table's order.
pub type StickCursor = (Instant, IpAddr);

#[derive(Default)]
struct StickTable {
    entries: HashMap<IpAddr, Stuck>,
    /// Each entry's client by the expiry the entry had when it was made
    /// (or last put back in order), never later than its expiry now: the
    /// first is the first to check for expired entries or to make room.
    order: BTreeSet<(Instant, IpAddr)>,
    /// Entries made or refreshed here since the other nodes were last told.
    news: Vec<(IpAddr, String, Instant)>,
}

struct Stuck {
    server: String,
    until: Instant,
    /// The expiry the other nodes know of.
    told: Instant,
}

impl Stuck {
    fn live_at(&self, now: Instant) -> bool {
        self.until > now
    }
}

/// New entries kept for the other nodes between two sends.
const NEWS_LIMIT: usize = 100_000;

impl StickTable {
    /// The entries that have not expired.
    fn live(&self, now: Instant) -> impl Iterator<Item = (&IpAddr, &Stuck)> {
        self.entries.iter().filter(move |(_, s)| s.live_at(now))
    }

    /// A new client's entry, with room made for it: expired entries go,
    /// and while the table holds `size`, the entry that expires first. An
    /// entry refreshed since it was put in order is put back by its new
    /// expiry instead: a request refreshes an entry without reordering.
    fn add(&mut self, src: IpAddr, stuck: Stuck, size: usize, now: Instant) {
        while let Some(&(queued, ip)) = self.order.first() {
            let until = self.entries.get(&ip).map_or(queued, |s| s.until);
            let full = self.entries.len() >= size;
            if queued > now && !full {
                break;
            }
            self.order.pop_first();
            if until > now && until != queued {
                self.order.insert((until, ip));
            } else {
                self.entries.remove(&ip);
            }
        }
        self.order.insert((stuck.until, src));
        self.entries.insert(src, stuck);
    }
}

/// The state that outlives spec versions, found again by name.
#[derive(Default)]
pub struct Shared {
    pub stats: Arc<Stats>,
    /// The node config's source address for connections to servers.
    pub source: Option<IpAddr>,
    /// The frontend addresses this node listens on now, for its self-check.
    pub listening: Mutex<HashSet<SocketAddr>>,
    /// Data plane workers: each server keeps a connection pool per worker.
    workers: usize,
    servers: Mutex<HashMap<(String, String, SocketAddr), Arc<ServerState>>>,
    backends: Mutex<HashMap<String, Arc<BackendShared>>>,
    slots: Mutex<HashMap<(String, u64), Arc<Slots>>>,
}

impl Shared {
    pub fn new(workers: usize, source: Option<IpAddr>) -> Self {
        Shared { workers, source, ..Default::default() }
    }

    /// Each backend's count of clients in its stick table (unexpired entries).
    pub fn stick_entries(&self) -> Vec<(String, usize)> {
        let backends: Vec<(String, Arc<BackendShared>)> =
            self.backends.lock().expect("backend table lock").iter().map(|(name, b)| (name.clone(), b.clone())).collect();
        let now = Instant::now();
        backends
            .into_iter()
            .map(|(name, b)| {
                let table = b.stick.lock().expect("stick table lock");
                (name, table.live(now).count())
            })
            .collect()
    }

    fn slots(&self, key: &str, n: u64) -> Arc<Slots> {
        self.slots.lock().expect("slots lock").entry((key.to_owned(), n)).or_insert_with(|| Arc::new(Slots::new(n))).clone()
    }

    /// Compiles a validated spec; `rewrite` places this node's frontends.
    pub fn compile(&self, spec: &Spec, rewrite: &BindRewrite) -> Runtime {
        let backends: FastMap<String, Arc<BackendRt>> = spec.backends.iter().map(|b| (b.name.clone(), Arc::new(self.backend(b)))).collect();
        // Forget what the spec no longer names; connections still using it keep
        // their own references, and its pooled connections close with it.
        self.servers.lock().expect("server table lock").retain(|(b, s, addr), _| {
            backends.get(b).is_some_and(|be| be.servers.iter().any(|srv| srv.spec.name == *s && srv.state.addr == *addr))
        });
        self.backends.lock().expect("backend table lock").retain(|b, _| backends.contains_key(b));
        let mut by_bind = FastMap::default();
        for f in &spec.frontends {
            let fe = Arc::new(FrontendRt {
                spec: f.clone(),
                counters: self.stats.frontend(&f.name),
                slots: self.slots(&format!("frontend {}", f.name), f.maxconn.map_or(u64::from(u32::MAX), |m| m.0)),
            });
            for bind in &f.bind {
                let mut addr = bind.0;
                if let Some(to) = rewrite.get(&addr.ip()) {
                    addr.set_ip(*to);
                }
                by_bind.insert(addr, fe.clone());
            }
        }
        Runtime {
            timeouts: spec.defaults.timeouts.clone(),
            source: self.source,
            retries: spec.defaults.retries,
            redispatch: spec.defaults.redispatch,
            node_slots: self.slots("node", spec.defaults.maxconn.0),
            by_bind,
            backends,
        }
    }

    fn backend(&self, b: &Backend) -> BackendRt {
        let servers = b
            .servers
            .iter()
            .map(|s| {
                let key = (b.name.clone(), s.name.clone(), s.address.0);
                let state = self
                    .servers
                    .lock()
                    .expect("server table lock")
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(ServerState {
                            name: s.name.clone(),
                            addr: s.address.0,
                            active: AtomicU64::new(0),
                            up: AtomicBool::new(true),
                            admin: AtomicU8::new(0),
                            counters: self.stats.server(&b.name, &s.name),
                            pool: Pool::new(self.workers),
                        })
                    })
                    .clone();
                ServerRt { spec: s.clone(), state }
            })
            .collect();
        BackendRt {
            spec: b.clone(),
            servers,
            balancer: Balancer::new(b.balance),
            counters: self.stats.backend(&b.name),
            shared: self.backends.lock().expect("backend table lock").entry(b.name.clone()).or_default().clone(),
            line: Arc::default(),
        }
    }
}

/// A connection limit (`maxconn` of the node or of a frontend): slots taken
/// by open connections, and a wake-up for the accept loops that wait for
/// one. Taking and freeing a slot is one atomic operation each while nobody
/// waits (a semaphore takes a lock to give a permit back).
pub struct Slots {
    limit: u64,
    taken: AtomicU64,
    /// Accept loops waiting for a slot: a release wakes them only if there are any.
    waiting: AtomicUsize,
    freed: Notify,
}

/// One slot of a [`Slots`], freed on drop.
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(limit: u64) -> Slots {
        Slots { limit, taken: AtomicU64::new(0), waiting: AtomicUsize::new(0), freed: Notify::new() }
    }

    /// A slot if one is free now.
    pub fn try_take_slot(self: &Arc<Self>) -> Option<Slot> {
        let taken = self.taken.fetch_update(Relaxed, Relaxed, |n| (n < self.limit).then_some(n + 1)).is_ok();
        taken.then(|| Slot(self.clone()))
    }

    /// A slot, once one is free.
    pub async fn take(self: &Arc<Self>) -> Slot {
        if let Some(slot) = self.try_take_slot() {
            return slot;
        }
        self.waiting.fetch_add(1, Relaxed);
        // Counted as waiting until this returns or the wait is dropped.
        let _waiting = Waiting(&self.waiting);
        loop {
            // Registered before the look, so a release between the look and
            // the wait is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Pairs with the fence in `Slot::drop`: either this look sees the
            // freed slot, or that release sees this waiter and wakes it.
            fence(SeqCst);
            if let Some(slot) = self.try_take_slot() {
                return slot;
            }
            freed.await;
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Relaxed);
        fence(SeqCst);
        if self.0.waiting.load(Relaxed) > 0 {
            self.0.freed.notify_waiters();
        }
    }
}

/// A server slot held for one session or request; freed on drop.
pub struct Lease {
    pub state: Arc<ServerState>,
    /// The server was the client's by persistence (a cookie, the stick
    /// table), not the balancer's choice.
    pub direct: bool,
    shared: Arc<BackendShared>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Relaxed);
        // Pairs with the fence in `lease`: either the waiter sees this free
        // slot, or this release sees the waiter and wakes it.
        fence(SeqCst);
        if self.shared.waiting.load(Relaxed) > 0 {
            self.shared.released.notify_waiters();
        }
    }
}

/// Why a backend could not give a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoServer {
    /// No server is up and taking sessions.
    NoneUp,
    /// Every server was at maxconn for the whole `timeouts.queue`.
    QueueTimeout,
}

/// A request's place in its backend's queue, given up when dropped: when it
/// is served, times out, or its task is cancelled.
struct Queued {
    shared: Arc<BackendShared>,
    counters: Arc<Counters>,
    /// The place in the line, for a request that may take any server.
    place: Option<(Arc<Line>, u64)>,
}

impl Queued {
    fn join(be: &BackendRt, in_line: bool) -> Queued {
        let place = in_line.then(|| {
            let ticket = be.line.tickets.fetch_add(1, Relaxed);
            be.line.order.lock().expect("queue line lock").push_back(ticket);
            be.line.len.fetch_add(1, Relaxed);
            (be.line.clone(), ticket)
        });
        be.shared.waiting.fetch_add(1, Relaxed);
        // Pairs with the fence in the drop of a `Lease`.
        fence(SeqCst);
        Counters::add(&be.counters.queue_current, 1);
        Counters::add(&be.counters.queue_total, 1);
        Queued { shared: be.shared.clone(), counters: be.counters.clone(), place }
    }

    /// Whether it is this request's turn to look for a slot.
    fn first(&self) -> bool {
        self.place.as_ref().is_none_or(|(line, ticket)| line.order.lock().expect("queue line lock").front() == Some(ticket))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.shared.waiting.fetch_sub(1, Relaxed);
        self.counters.queue_current.fetch_sub(1, Relaxed);
        if let Some((line, ticket)) = &self.place {
            let mut order = line.order.lock().expect("queue line lock");
            let at = order.iter().position(|t| t == ticket);
            if let Some(at) = at {
                order.remove(at);
            }
            line.len.fetch_sub(1, Relaxed);
            drop(order);
            if at == Some(0) {
                // The next in line may find a slot now.
                self.shared.released.notify_waiters();
            }
        }
    }
}

enum Pick {
    Leased(usize, Lease),
    Full,
    NoneUp,
}

impl BackendRt {
    /// A slot on a server for a client at `src`: the server `prefer` names
    /// (a persistence cookie, the stick table) while it serves, else the
    /// balancer's choice among the servers that take new sessions. Waits in
    /// the queue up to `queue` while that server, or every server, is at
    /// maxconn.
    pub async fn lease(&self, src: IpAddr, prefer: Option<&str>, exclude: &[usize], queue: Duration) -> Result<(usize, Lease), NoServer> {
        let stuck = self.stuck(src);
        let prefer = prefer.or(stuck.as_deref());
        // A persistent request waits for its own server, and a retry for a
        // server other than those it failed on: in the line, either would
        // hold up everyone behind it while a slot frees that it cannot take.
        let own_way = prefer.is_some() || !exclude.is_empty();
        // The end of the wait and the place in the queue, once queued: most
        // requests never are.
        let mut queued: Option<(tokio::time::Instant, Queued)> = None;
        let (index, lease) = loop {
            // Registered before the look, so a release between the look and
            // the wait is not missed; only once in the queue, as it costs a lock.
            let released = self.shared.released.notified();
            tokio::pin!(released);
            let turn = match &queued {
                Some((_, place)) => {
                    released.as_mut().enable();
                    place.first()
                }
                None => own_way || self.line.len.load(Relaxed) == 0,
            };
            let pick = if turn { self.try_pick(src, prefer, exclude) } else { Pick::Full };
            match (pick, &queued) {
                (Pick::Leased(index, lease), _) => break (index, lease),
                (Pick::NoneUp, _) => return Err(NoServer::NoneUp),
                (Pick::Full, None) => queued = Some((tokio::time::Instant::now() + queue, Queued::join(self, !own_way))),
                (Pick::Full, Some((deadline, _))) => {
                    if tokio::time::timeout_at(*deadline, released).await.is_err() {
                        return Err(NoServer::QueueTimeout);
                    }
                }
            }
        };
        self.stick(src, index);
        Ok((index, lease))
    }

    fn try_pick(&self, src: IpAddr, prefer: Option<&str>, exclude: &[usize]) -> Pick {
        let up = |i: &usize| !exclude.contains(i) && self.servers[*i].state.serves();
        // Backup servers serve only while no other server is up.
        let primaries = (0..self.servers.len()).filter(up).any(|i| !self.servers[i].spec.backup);
        let pool = || (0..self.servers.len()).filter(up).filter(|i| self.servers[*i].spec.backup != primaries);
        // A persistent client may stay on a drained server (weight 0, or
        // drained by the operator), and at the server's maxconn it waits for
        // a slot there, as in HAProxy: another server would not have its session.
        if let Some(name) = prefer {
            if let Some(i) = pool().find(|i| self.servers[*i].spec.name == name) {
                return match self.reserve(i) {
                    Some(mut lease) => {
                        lease.direct = true;
                        Pick::Leased(i, lease)
                    }
                    None => Pick::Full,
                };
            }
        }
        let mut open = false;
        // Backup servers take the load one at a time, in the spec's order, unless `allbackups`.
        let takers = if primaries || self.spec.allbackups { usize::MAX } else { 1 };
        // On the stack: a pick for every request must not allocate.
        let candidates: SmallVec<[Candidate; 8]> = pool()
            .filter(|i| self.servers[*i].takes_new_sessions())
            .take(takers)
            .inspect(|_| open = true)
            .filter(|i| self.has_slot(*i))
            .map(|i| {
                let s = &self.servers[i];
                Candidate { index: i, name: &s.spec.name, weight: s.spec.weight, active: s.state.active.load(Relaxed) }
            })
            .collect();
        if !open {
            return Pick::NoneUp;
        }
        let Some(i) = self.balancer.pick(&candidates, src) else {
            return Pick::Full;
        };
        match self.reserve(i) {
            Some(lease) => Pick::Leased(i, lease),
            // Taken between the look and the reservation: look again after the next release.
            None => Pick::Full,
        }
    }

    fn has_slot(&self, i: usize) -> bool {
        let s = &self.servers[i];
        s.spec.maxconn.is_none_or(|m| s.state.active.load(Relaxed) < m.0)
    }

    fn reserve(&self, i: usize) -> Option<Lease> {
        let s = &self.servers[i];
        let max = s.spec.maxconn.map_or(u64::MAX, |m| m.0);
        s.state.active.fetch_update(Relaxed, Relaxed, |a| (a < max).then_some(a + 1)).ok()?;
        Some(Lease { state: s.state.clone(), direct: false, shared: self.shared.clone() })
    }

    /// Primary servers that would take new sessions now (HAProxy's count of
    /// active servers).
    pub fn usable_primaries(&self) -> usize {
        self.servers.iter().filter(|s| !s.spec.backup && s.state.serves() && s.takes_new_sessions()).count()
    }

    fn stuck(&self, src: IpAddr) -> Option<String> {
        self.spec.stick.as_ref()?;
        let table = self.shared.stick.lock().expect("stick table lock");
        table.entries.get(&src).filter(|s| s.live_at(Instant::now())).map(|s| s.server.clone())
    }

    fn stick(&self, src: IpAddr, index: usize) {
        let Some(stick) = &self.spec.stick else { return };
        let expire = stick.expire.get();
        let mut table = self.shared.stick.lock().expect("stick table lock");
        let now = Instant::now();
        let (server, until) = (&self.servers[index].spec.name, now + expire);
        // The others hear of a new entry, a new server, and a refresh that
        // moved the expiry by more than a quarter of `expire`: not of every request.
        let tell = match table.entries.get_mut(&src) {
            Some(s) if s.server == *server => {
                s.until = until;
                let tell = until > s.told + expire / 4;
                if tell {
                    s.told = until;
                }
                tell
            }
            Some(s) => {
                *s = Stuck { server: server.clone(), until, told: until };
                true
            }
            None => {
                table.add(src, Stuck { server: server.clone(), until, told: until }, stick.size() as usize, now);
                true
            }
        };
        if tell && table.news.len() < NEWS_LIMIT {
            table.news.push((src, server.clone(), until));
        }
    }

    /// An entry another node made: kept unless this node has a later one.
    pub fn learn(&self, src: IpAddr, server: String, until: Instant) {
        let Some(stick) = &self.spec.stick else { return };
        let mut table = self.shared.stick.lock().expect("stick table lock");
        // Known to the others already: not told again.
        let learned = Stuck { server, until, told: until };
        match table.entries.get_mut(&src) {
            Some(s) if s.until >= until => {}
            Some(s) => *s = learned,
            None => table.add(src, learned, stick.size() as usize, Instant::now()),
        }
    }

    /// The entries made or refreshed here since the last call.
    pub fn stick_news(&self) -> Vec<(IpAddr, String, Instant)> {
        std::mem::take(&mut self.shared.stick.lock().expect("stick table lock").news)
    }

    /// The unexpired entries among the next `n` after `from` in the table's
    /// order (from its start without one), and where to go on from: `None`
    /// at the end. Requests wait for the table while one call copies, so a
    /// large table is read in several: 200,000 entries at once held it for
    /// about 25 ms. An entry made or refreshed between two calls may be
    /// read twice or not at all: the other nodes hear of it as news, from
    /// this node or from the one that made it.
    pub fn stick_chunk(&self, from: Option<StickCursor>, n: usize) -> (Vec<(IpAddr, String, Instant)>, Option<StickCursor>) {
        let n = n.max(1);
        let table = self.shared.stick.lock().expect("stick table lock");
        let now = Instant::now();
        let keys = match from {
            Some(from) => table.order.range((Bound::Excluded(from), Bound::Unbounded)),
            None => table.order.range(..),
        };
        let (mut chunk, mut read, mut last) = (Vec::new(), 0, None);
        for &(queued, ip) in keys.take(n) {
            (read, last) = (read + 1, Some((queued, ip)));
            if let Some(s) = table.entries.get(&ip).filter(|s| s.live_at(now)) {
                chunk.push((ip, s.server.clone(), s.until));
            }
        }
        (chunk, if read == n { last } else { None })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const NO_QUEUE: Duration = Duration::from_millis(50);

    fn backend(servers: &str) -> Arc<BackendRt> {
        backend_with("", servers)
    }

    /// Backend `b` with `extra` lines (`balance`, `stick`...) before its servers.
    fn backend_with(extra: &str, servers: &str) -> Arc<BackendRt> {
        let spec = Spec::from_yaml(&format!("backends:\n  - name: b\n{extra}    servers:\n{servers}")).unwrap();
        let rt = Shared::default().compile(&spec, &BindRewrite::new());
        rt.backends["b"].clone()
    }

    /// Servers a and b taken in turn, clients kept on theirs by `stick`.
    fn sticky(stick: &str) -> Arc<BackendRt> {
        let servers = "      - { name: a, address: \"127.0.0.1:1\" }\n      - { name: b, address: \"127.0.0.1:2\" }\n";
        backend_with(&format!("    balance: roundrobin\n    stick: {stick}\n"), servers)
    }

    async fn pick(be: &BackendRt, prefer: Option<&str>) -> Result<String, NoServer> {
        be.lease(CLIENT, prefer, &[], NO_QUEUE).await.map(|(i, _)| be.servers[i].spec.name.clone())
    }

    fn set_up(be: &BackendRt, name: &str, up: bool) {
        be.servers.iter().find(|s| s.spec.name == name).unwrap().state.up.store(up, Relaxed);
    }

    #[tokio::test]
    async fn backup_serves_only_while_no_other_server_is_up() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\" }\n      - { name: b, address: \"127.0.0.1:2\" }\n      - { name: spare, address: \"127.0.0.1:3\", backup: true }\n");
        for _ in 0..20 {
            assert_ne!(pick(&be, None).await.unwrap(), "spare");
        }
        set_up(&be, "a", false);
        for _ in 0..20 {
            assert_eq!(pick(&be, None).await.unwrap(), "b", "one primary still up");
        }
        set_up(&be, "b", false);
        assert_eq!(pick(&be, None).await.unwrap(), "spare");
        set_up(&be, "spare", false);
        assert_eq!(pick(&be, None).await, Err(NoServer::NoneUp));
        set_up(&be, "a", true);
        assert_eq!(pick(&be, None).await.unwrap(), "a", "back to the primary once it is up");
    }

    #[tokio::test]
    async fn the_first_backup_that_can_takes_the_load_unless_allbackups() {
        let servers = "      - { name: a, address: \"127.0.0.1:1\" }\n      - { name: drained, address: \"127.0.0.1:2\", backup: true, weight: 0 }\n      - { name: first, address: \"127.0.0.1:3\", backup: true, maxconn: 1 }\n      - { name: second, address: \"127.0.0.1:4\", backup: true }\n";
        let be = backend(servers);
        set_up(&be, "a", false);
        for _ in 0..3 {
            let (i, lease) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
            assert_eq!(be.servers[i].spec.name, "first", "the first backup that takes new sessions");
            // At its maxconn, the next request waits for it, as HAProxy's would.
            assert_eq!(pick(&be, None).await, Err(NoServer::QueueTimeout));
            drop(lease);
        }
        set_up(&be, "first", false);
        assert_eq!(pick(&be, None).await.unwrap(), "second", "the next one, once the first is down");

        let spec = Spec::from_yaml(&format!("backends:\n  - name: b\n    allbackups: true\n    servers:\n{servers}")).unwrap();
        let be = Shared::default().compile(&spec, &BindRewrite::new()).backends["b"].clone();
        set_up(&be, "a", false);
        let picked: std::collections::BTreeSet<_> = [pick(&be, None).await.unwrap(), pick(&be, None).await.unwrap()].into();
        assert_eq!(picked, ["first".to_owned(), "second".to_owned()].into(), "with allbackups, the backups share the load");
    }

    #[tokio::test]
    async fn a_drained_server_takes_only_persistent_clients() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\" }\n      - { name: drained, address: \"127.0.0.1:2\", weight: 0 }\n");
        for _ in 0..20 {
            assert_eq!(pick(&be, None).await.unwrap(), "a");
        }
        assert_eq!(pick(&be, Some("drained")).await.unwrap(), "drained", "a cookie or stick entry still reaches it");
        set_up(&be, "drained", false);
        assert_eq!(pick(&be, Some("drained")).await.unwrap(), "a", "not once it is down");
    }

    #[tokio::test]
    async fn maintenance_takes_no_traffic_and_an_operator_drain_only_persistent_clients() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\" }\n      - { name: b, address: \"127.0.0.1:2\" }\n");
        let state = |name: &str| be.servers.iter().find(|s| s.spec.name == name).unwrap().state.clone();
        state("b").set_admin(AdminState::Drain);
        for _ in 0..20 {
            assert_eq!(pick(&be, None).await.unwrap(), "a");
        }
        assert_eq!(pick(&be, Some("b")).await.unwrap(), "b", "a persistent client stays on a draining server");
        state("b").set_admin(AdminState::Maint);
        assert_eq!(pick(&be, Some("b")).await.unwrap(), "a", "not on one in maintenance");
        state("a").set_admin(AdminState::Maint);
        assert_eq!(pick(&be, None).await, Err(NoServer::NoneUp));
        state("a").set_admin(AdminState::Ready);
        assert_eq!(pick(&be, None).await.unwrap(), "a");
    }

    #[test]
    fn a_new_version_keeps_the_state_of_servers_it_keeps_and_drops_the_rest() {
        let shared = Shared::default();
        let spec = |servers: &str| Spec::from_yaml(&format!("backends:\n  - name: b\n    servers:\n{servers}")).unwrap();
        let a = "      - { name: a, address: \"127.0.0.1:1\" }\n";
        let b = "      - { name: b, address: \"127.0.0.1:2\" }\n";
        let v1 = shared.compile(&spec(&format!("{a}{b}")), &BindRewrite::new());
        v1.backends["b"].servers[0].state.active.store(7, Relaxed);
        let v2 = shared.compile(&spec(a), &BindRewrite::new());
        assert_eq!(v2.backends["b"].servers[0].state.active.load(Relaxed), 7, "server a's sessions carry over");
        assert!(Arc::ptr_eq(&v1.backends["b"].servers[0].state, &v2.backends["b"].servers[0].state));
        assert_eq!(shared.servers.lock().unwrap().len(), 1, "server b is forgotten");
        shared.compile(&Spec::default(), &BindRewrite::new());
        assert!(shared.servers.lock().unwrap().is_empty() && shared.backends.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn only_drained_servers_means_no_server() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\", weight: 0 }\n");
        assert_eq!(pick(&be, None).await, Err(NoServer::NoneUp));
    }

    #[tokio::test]
    async fn at_maxconn_a_request_waits_for_a_free_slot_or_times_out() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\", maxconn: 1 }\n");
        let (_, held) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        assert_eq!(be.lease(CLIENT, None, &[], NO_QUEUE).await.err(), Some(NoServer::QueueTimeout));
        let waiter = {
            let be = be.clone();
            tokio::spawn(async move { be.lease(CLIENT, None, &[], Duration::from_secs(5)).await.map(|(i, _)| i) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(be.counters.queue_current.load(Relaxed), 1, "the waiter is queued");
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(0), "a released slot goes to the queue");
        assert_eq!(be.counters.queue_current.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn the_queue_serves_in_order_and_a_newcomer_gets_in_line() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\", maxconn: 1 }\n");
        let (_, held) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..3 {
            let (be, served) = (be.clone(), served.clone());
            waiters.push(tokio::spawn(async move {
                let (_, lease) = be.lease(CLIENT, None, &[], Duration::from_secs(5)).await.unwrap();
                served.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(lease);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(be.counters.queue_current.load(Relaxed), 3);
        drop(held);
        // Before any waiter has run: the free slot is theirs, not a newcomer's.
        assert_eq!(be.lease(CLIENT, None, &[], NO_QUEUE).await.err(), Some(NoServer::QueueTimeout));
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*served.lock().unwrap(), [0, 1, 2]);
        assert_eq!(be.counters.queue_current.load(Relaxed), 0);
    }

    /// A request for a slot of `be`, queued (up to 5 s) once this returns.
    async fn queued(be: &Arc<BackendRt>) -> tokio::task::JoinHandle<Result<usize, NoServer>> {
        let be = be.clone();
        let request = tokio::spawn(async move { be.lease(CLIENT, None, &[], Duration::from_secs(5)).await.map(|(i, _)| i) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        request
    }

    #[tokio::test]
    async fn a_new_version_with_a_server_more_does_not_wait_behind_the_old_line() {
        let shared = Shared::default();
        let spec = |servers: &str| Spec::from_yaml(&format!("backends:\n  - name: b\n    servers:\n{servers}")).unwrap();
        let a = "      - { name: a, address: \"127.0.0.1:1\", maxconn: 1 }\n";
        let old = shared.compile(&spec(a), &BindRewrite::new()).backends["b"].clone();
        let (_, _held) = old.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        let waiting = queued(&old).await;
        assert_eq!(old.counters.queue_current.load(Relaxed), 1);
        let new = shared.compile(&spec(&format!("{a}      - {{ name: c, address: \"127.0.0.1:3\" }}\n")), &BindRewrite::new());
        let (i, _) = new.backends["b"].lease(CLIENT, None, &[], NO_QUEUE).await.expect("the new server takes it at once");
        assert_eq!(new.backends["b"].servers[i].spec.name, "c");
        waiting.abort();
    }

    #[tokio::test]
    async fn a_retry_in_the_queue_does_not_hold_up_the_line_for_a_server_it_avoids() {
        let be = backend(
            "      - { name: a, address: \"127.0.0.1:1\", maxconn: 1 }\n      - { name: b, address: \"127.0.0.1:2\", maxconn: 1 }\n",
        );
        let (first, held_first) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        let (second, held_second) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        // A retry after a failure on the first server, then a new request.
        let retry = {
            let be = be.clone();
            tokio::spawn(async move { be.lease(CLIENT, None, &[first], Duration::from_secs(5)).await.map(|(i, _)| i) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = queued(&be).await;
        assert_eq!(be.counters.queue_current.load(Relaxed), 2);
        drop(held_first);
        let got = tokio::time::timeout(Duration::from_secs(1), next).await.expect("the new request takes the slot the retry avoids");
        assert_eq!(got.unwrap(), Ok(first));
        drop(held_second);
        let got = tokio::time::timeout(Duration::from_secs(1), retry).await.expect("the retry takes the other server's slot");
        assert_eq!(got.unwrap(), Ok(second));
    }

    #[tokio::test]
    async fn a_request_that_leaves_the_queue_gives_up_its_place() {
        let be = backend("      - { name: a, address: \"127.0.0.1:1\", maxconn: 1 }\n");
        let (_, held) = be.lease(CLIENT, None, &[], NO_QUEUE).await.unwrap();
        let left = queued(&be).await;
        assert_eq!(be.counters.queue_current.load(Relaxed), 1);
        // The request's future is dropped mid-wait (its task cancelled).
        left.abort();
        let _ = left.await;
        assert_eq!(be.counters.queue_current.load(Relaxed), 0);
        let next = queued(&be).await;
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(1), next).await.expect("the line is not held by the one that left");
        assert_eq!(got.unwrap(), Ok(0));
    }

    #[tokio::test]
    async fn a_connection_limit_holds_the_next_connection_until_a_slot_frees() {
        let slots = Arc::new(Slots::new(2));
        let (first, _second) = (slots.take().await, slots.take().await);
        let third = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "both slots are taken");
        assert_eq!(slots.waiting.load(Relaxed), 1);
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await.expect("a freed slot goes to the waiter").unwrap();
        assert_eq!((slots.taken.load(Relaxed), slots.waiting.load(Relaxed)), (2, 0));
        // A wait given up (its accept loop stopped) is no longer counted.
        let given_up = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        given_up.abort();
        let _ = given_up.await;
        assert_eq!(slots.waiting.load(Relaxed), 0);
        drop(third);
        assert_eq!(slots.taken.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn source_stickiness_keeps_a_client_on_its_server_until_expiry() {
        let be = sticky("{ on: src, expire: 200ms }");
        let first = pick(&be, None).await.unwrap();
        for _ in 0..10 {
            assert_eq!(pick(&be, None).await.unwrap(), first, "round robin would alternate; the stick table holds");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Expired: balanced afresh. The stuck picks never reached round robin,
        // whose next turn is the other server; the client then sticks to it.
        let second = pick(&be, None).await.unwrap();
        assert_ne!(second, first);
        assert_eq!(pick(&be, None).await.unwrap(), second);
    }

    #[tokio::test]
    async fn a_full_stick_table_makes_room_by_dropping_the_entry_that_expires_first() {
        let be = sticky("{ on: src, expire: 10s, size: 2 }");
        let client = |n: u8| IpAddr::from([192, 0, 2, n]);
        let pick_for = |n: u8| {
            let be = be.clone();
            async move { be.lease(client(n), None, &[], NO_QUEUE).await.map(|(i, _)| be.servers[i].spec.name.clone()).unwrap() }
        };
        let clients = |be: &BackendRt| {
            let mut c: Vec<IpAddr> = be.stick_chunk(None, usize::MAX).0.into_iter().map(|(ip, _, _)| ip).collect();
            c.sort();
            c
        };
        pick_for(1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        pick_for(2).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Client 1 came back: its entry now expires last, and client 2's goes for client 3.
        pick_for(1).await;
        pick_for(3).await;
        assert_eq!(clients(&be), [client(1), client(3)]);
        // A learned entry takes its place the same way.
        be.learn(client(4), "a".into(), Instant::now() + Duration::from_secs(10));
        assert_eq!(clients(&be), [client(3), client(4)]);
        // An expired entry leaves first, whatever the size.
        be.learn(client(5), "a".into(), Instant::now() + Duration::from_millis(30));
        assert_eq!(clients(&be), [client(4), client(5)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        be.learn(client(6), "a".into(), Instant::now() + Duration::from_secs(1));
        assert_eq!(clients(&be), [client(4), client(6)], "client 5's entry had expired; client 4's stays");
    }

    #[tokio::test]
    async fn the_other_nodes_hear_of_new_entries_not_of_every_request_or_of_their_own() {
        let be = sticky("{ on: src, expire: 10s }");
        let first = pick(&be, None).await.unwrap();
        let news = be.stick_news();
        assert_eq!(news.len(), 1, "{news:?}");
        assert_eq!((news[0].0, news[0].1.as_str()), (CLIENT, first.as_str()));
        // Refreshed by every request, told again only once the expiry moved by a quarter.
        pick(&be, None).await.unwrap();
        assert!(be.stick_news().is_empty());
        // Another node's entry is kept, and not told back.
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        be.learn(other, "b".into(), Instant::now() + Duration::from_secs(5));
        assert!(be.stick_news().is_empty());
        assert!(be.stick_chunk(None, usize::MAX).0.iter().any(|(ip, server, _)| *ip == other && server == "b"));
        // One older than this node's own entry changes nothing.
        let second = if first == "a" { "b" } else { "a" };
        be.learn(CLIENT, second.into(), Instant::now() + Duration::from_secs(1));
        assert_eq!(pick(&be, None).await.unwrap(), first);
        // A later one wins: the newest decision, wherever it was made.
        be.learn(CLIENT, second.into(), Instant::now() + Duration::from_secs(20));
        assert_eq!(pick(&be, None).await.unwrap(), second);
    }
}
