//! Source-stickiness tables shared by the nodes, as HAProxy's peers share
//! stick tables: every [`EVERY`] a node sends the entries it made or
//! refreshed to every other member. A node that may have missed entries (it
//! started, or could not reach a member) asks that member for its whole
//! table, and sends its own. A client keeps its server when the VIP moves
//! to another node. Entries of a backend this node does not have (a spec
//! change on its way) are left out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftlb_proto::admin::admin_client::AdminClient;
use raftlb_proto::admin::{StickEntry, StickSyncRequest};
use raftlb_raft::Cluster;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Status;

use crate::dataplane::runtime::{BackendRt, Runtime, RuntimeWatch, StickCursor};

/// How often a node sends its new entries.
pub const EVERY: Duration = Duration::from_millis(100);
/// How soon a failed send to a member is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long a member may take to answer.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Batches waiting for a slow member; past it, the whole table goes instead.
const QUEUED: usize = 64;
/// Entries per call, so a large table stays well under gRPC's message limit.
const CHUNK: usize = 10_000;
/// Entries read from a stick table at once: requests of its backend wait
/// for that read (about half a millisecond for this many).
const READ: usize = 1_000;

/// The links to the other members, one task each; the admin API reaches
/// them too: a member that asks for the whole table gets it by its link.
#[derive(Default)]
pub struct Links {
    peers: Mutex<HashMap<u64, Peer>>,
}

impl Links {
    /// Member `from` asked for this node's whole table.
    pub fn send_whole_to(&self, from: u64) {
        if let Some(peer) = self.peers.lock().expect("stick links lock").get(&from) {
            peer.whole.store(true, Relaxed);
            // Wakes the link if it waits for a batch.
            let _ = peer.batches.try_send(Arc::new(Vec::new()));
        }
    }
}

/// Sends this node's entries to the other members until the node stops.
/// Without a backend that sticks, it only waits for the next spec.
pub async fn run(cluster: Cluster, mut runtime: RuntimeWatch, links: Arc<Links>) {
    let me = cluster.id();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let rt = runtime.borrow_and_update().clone();
        let sticky: Vec<&Arc<BackendRt>> = sticky(&rt).collect();
        if sticky.is_empty() {
            links.peers.lock().expect("stick links lock").clear();
            if runtime.changed().await.is_err() {
                return;
            }
            continue;
        }
        tick.tick().await;
        let members: HashMap<u64, String> =
            cluster.applied().state.nodes.values().filter(|n| n.id != me).map(|n| (n.id, n.addr.clone())).collect();
        let now = Instant::now();
        let news: Vec<StickEntry> = sticky.iter().flat_map(|b| entries(b, b.stick_news(), now)).collect();
        let mut peers = links.peers.lock().expect("stick links lock");
        // A member that left, or moved to another address, is let go.
        peers.retain(|id, peer| members.get(id) == Some(&peer.addr));
        for (id, addr) in members {
            peers.entry(id).or_insert_with(|| Peer::start(me, addr, runtime.clone()));
        }
        if news.is_empty() {
            continue;
        }
        let batch = Arc::new(news);
        for peer in peers.values() {
            if peer.batches.try_send(batch.clone()).is_err() {
                peer.whole.store(true, Relaxed);
            }
        }
    }
}

/// The link to one member: a task that sends it the batches in order.
struct Peer {
    addr: String,
    /// The next send is the whole table (a batch was dropped, or the member asked).
    whole: Arc<AtomicBool>,
    batches: mpsc::Sender<Arc<Vec<StickEntry>>>,
    task: JoinHandle<()>,
}

impl Peer {
    fn start(me: u64, addr: String, runtime: RuntimeWatch) -> Peer {
        let (batches, queued) = mpsc::channel(QUEUED);
        let whole = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(link(me, addr.clone(), runtime, queued, whole.clone()));
        Peer { addr, whole, batches, task }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn link(me: u64, addr: String, runtime: RuntimeWatch, mut queued: mpsc::Receiver<Arc<Vec<StickEntry>>>, whole: Arc<AtomicBool>) {
    let mut client = None;
    // Until a first call went through, this node may lack the member's entries.
    let mut missed = true;
    loop {
        if missed || whole.swap(false, Relaxed) {
            // Reach the member before reading the table: a member that is
            // down for long costs no copy of the table every RETRY.
            if let Err(e) = reach(&mut client, &addr).await {
                tracing::debug!(peer = %addr, error = %e, "cannot reach the member for its stick table; trying again");
                missed = true;
                tokio::time::sleep(RETRY).await;
                continue;
            }
            // The whole table covers what is queued.
            while queued.try_recv().is_ok() {}
            let mut table = WholeTable::new(&runtime);
            let mut first = true;
            let sent = loop {
                let entries = table.next_chunk(CHUNK);
                // An empty table is still sent to ask for the member's.
                if entries.is_empty() && !(first && missed) {
                    break Ok(());
                }
                let request = StickSyncRequest { from: me, entries, send_whole: missed && first };
                if let Err(e) = send(&mut client, &addr, request).await {
                    break Err(e);
                }
                first = false;
            };
            match sent {
                Ok(()) => missed = false,
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "cannot send the stick table; trying again");
                    missed = true;
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let Some(batch) = queued.recv().await else { return };
        if batch.is_empty() {
            continue;
        }
        let request = StickSyncRequest { from: me, entries: batch.as_ref().clone(), send_whole: false };
        if let Err(e) = send(&mut client, &addr, request).await {
            tracing::debug!(peer = %addr, error = %e, "cannot send stick entries; the whole table next");
            missed = true;
        }
    }
}

/// The member's connection, opened when there is none.
async fn reach<'a>(client: &'a mut Option<AdminClient<Channel>>, addr: &str) -> Result<&'a mut AdminClient<Channel>, String> {
    let c = match client.take() {
        Some(c) => c,
        None => crate::admin::connect(addr).await.map_err(|e| e.to_string())?,
    };
    Ok(client.insert(c))
}

/// One call, on the member's connection (opened again after a failure).
async fn send(client: &mut Option<AdminClient<Channel>>, addr: &str, request: StickSyncRequest) -> Result<(), String> {
    let reply = tokio::time::timeout(SEND_TIMEOUT, reach(client, addr).await?.stick_sync(request)).await;
    let sent = match reply {
        Ok(reply) => reply.map(drop).map_err(|s| s.message().to_owned()),
        Err(_) => Err("no answer in time".to_owned()),
    };
    if sent.is_err() {
        *client = None;
    }
    sent
}

/// The backends of a spec that stick clients to servers.
fn sticky(rt: &Option<Arc<Runtime>>) -> impl Iterator<Item = &Arc<BackendRt>> {
    rt.iter().flat_map(|rt| rt.backends.values()).filter(|b| b.spec.stick.is_some())
}

fn entries(b: &BackendRt, list: Vec<(IpAddr, String, Instant)>, now: Instant) -> Vec<StickEntry> {
    list.into_iter()
        .filter(|(_, _, until)| *until > now)
        .map(|(client, server, until)| StickEntry {
            backend: b.spec.name.clone(),
            client: client.to_string(),
            server,
            expires_in_ms: until.duration_since(now).as_millis() as u64,
        })
        .collect()
}

/// This node's whole table (every backend with stickiness, unexpired
/// entries), read a chunk at a time as it is sent: requests wait for one
/// chunk's copy at most, and the table is never copied whole.
struct WholeTable {
    backends: Vec<Arc<BackendRt>>,
    from: Option<StickCursor>,
}

impl WholeTable {
    fn new(runtime: &RuntimeWatch) -> WholeTable {
        let rt = runtime.borrow().clone();
        WholeTable { backends: sticky(&rt).cloned().collect(), from: None }
    }

    /// The next entries, at most `n`; none at the end.
    fn next_chunk(&mut self, n: usize) -> Vec<StickEntry> {
        let mut chunk = Vec::new();
        while chunk.len() < n {
            let Some(b) = self.backends.last().cloned() else { break };
            let (list, next) = b.stick_chunk(self.from, READ.min(n - chunk.len()));
            self.from = next;
            if next.is_none() {
                self.backends.pop();
            }
            chunk.extend(entries(&b, list, Instant::now()));
        }
        chunk
    }
}

/// Takes in another node's entries; all or nothing when one is malformed.
pub fn learn(runtime: &RuntimeWatch, entries: Vec<StickEntry>) -> Result<(), Status> {
    let mut parsed = Vec::with_capacity(entries.len());
    for e in entries {
        let client: IpAddr = e.client.parse().map_err(|_| {
            Status::invalid_argument(format!("stick entry of backend {:?}: {:?} is not an IP address", e.backend, e.client))
        })?;
        parsed.push((e.backend, client, e.server, e.expires_in_ms));
    }
    let Some(rt) = runtime.borrow().clone() else { return Ok(()) };
    let now = Instant::now();
    for (backend, client, server, ms) in parsed {
        let Some(b) = rt.backends.get(&backend) else { continue };
        let Some(stick) = &b.spec.stick else { continue };
        // Never longer than this node's own `expire`.
        let left = Duration::from_millis(ms).min(stick.expire.get());
        b.learn(client, server, now + left);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use raftlb_proto::spec::Spec;

    use super::*;
    use crate::dataplane::runtime::{BindRewrite, Shared};

    /// The whole table as a link sends it, `n` entries a call.
    fn whole_table(runtime: &RuntimeWatch, n: usize) -> Vec<StickEntry> {
        let mut table = WholeTable::new(runtime);
        let mut all = Vec::new();
        loop {
            let chunk = table.next_chunk(n);
            assert!(chunk.len() <= n, "{} entries in a chunk of {n}", chunk.len());
            if chunk.is_empty() {
                return all;
            }
            all.extend(chunk);
        }
    }

    #[test]
    fn the_whole_table_is_read_a_chunk_at_a_time_with_each_entry_once() {
        let backend =
            |name: &str, stick: &str| format!("  - name: {name}\n{stick}    servers:\n      - {{ name: a, address: \"127.0.0.1:1\" }}\n");
        let yaml = format!(
            "backends:\n{}{}{}",
            backend("one", "    stick: { on: src, expire: 10s }\n"),
            backend("two", "    stick: { on: src, expire: 10s }\n"),
            backend("plain", "")
        );
        let rt = Shared::default().compile(&Spec::from_yaml(&yaml).unwrap(), &BindRewrite::new());
        let (_spec, runtime) = tokio::sync::watch::channel(Some(Arc::new(rt)));
        let entry = |backend: &str, client: u8, expires_in_ms: u64| StickEntry {
            backend: backend.into(),
            client: format!("192.0.2.{client}"),
            server: "a".into(),
            expires_in_ms,
        };
        // Client 9's entry has expired: it comes first in the table's order and is left out.
        let mut made = vec![entry("one", 9, 0)];
        made.extend((1..=5).map(|c| entry("one", c, 1_000 * u64::from(c))));
        made.extend((6..=7).map(|c| entry("two", c, 5_000)));
        learn(&runtime, made).unwrap();
        let expected: Vec<(String, String)> = [("one", 1), ("one", 2), ("one", 3), ("one", 4), ("one", 5), ("two", 6), ("two", 7)]
            .map(|(b, c)| (b.to_owned(), format!("192.0.2.{c}")))
            .to_vec();
        for n in [1, 2, 3, CHUNK] {
            let mut read: Vec<(String, String)> = whole_table(&runtime, n).into_iter().map(|e| (e.backend, e.client)).collect();
            read.sort();
            assert_eq!(read, expected, "read {n} at a time");
        }
    }

    #[test]
    fn a_malformed_entry_is_refused_with_the_others_and_named() {
        let yaml =
            "backends:\n  - name: b\n    stick: { on: src, expire: 10s }\n    servers:\n      - { name: a, address: \"127.0.0.1:1\" }\n";
        let rt = Shared::default().compile(&Spec::from_yaml(yaml).unwrap(), &BindRewrite::new());
        let (_spec, runtime) = tokio::sync::watch::channel(Some(Arc::new(rt)));
        let good = StickEntry { backend: "b".into(), client: "192.0.2.7".into(), server: "a".into(), expires_in_ms: 60_000 };
        let bad = StickEntry { client: "192.0.2.x".into(), ..good.clone() };
        let refused = learn(&runtime, vec![good.clone(), bad]).unwrap_err();
        assert!(refused.message().contains("\"192.0.2.x\" is not an IP address"), "{refused:?}");
        assert!(whole_table(&runtime, CHUNK).is_empty(), "nothing taken");
        // A backend this node does not have is left out; the expiry is at most this node's `expire`.
        let elsewhere = StickEntry { backend: "other".into(), ..good.clone() };
        learn(&runtime, vec![good, elsewhere]).unwrap();
        let table = whole_table(&runtime, CHUNK);
        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!((table[0].backend.as_str(), table[0].client.as_str(), table[0].server.as_str()), ("b", "192.0.2.7", "a"));
        assert!(table[0].expires_in_ms <= 10_000, "{table:?}");
    }
}
