//! Raft RPCs to peers over gRPC. One lazily connected tonic channel per peer
//! is kept and shared by every RPC to it. A peer that stops answering is
//! logged once when it becomes unreachable and once when it is back, never
//! per RPC, and its last successful contact is kept for `cluster status`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use raftlb_proto::raft::raft_transport_client::RaftTransportClient;
use raftlb_proto::raft::Payload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::{NodeId, TypeConfig};

/// How long a connection attempt to a peer may take. Short: on loopback and in
/// a LAN a live peer answers in well under this, and a dead one must not hold
/// up the heartbeats to the others.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The channels to every peer and what is known of their reachability.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
    contact: Mutex<HashMap<NodeId, Contact>>,
    /// Per follower, the term and the send time of the latest AppendEntries
    /// it accepted from this node as leader.
    acks: Mutex<HashMap<NodeId, (u64, Instant)>>,
    /// When this node last took an AppendEntries (or a snapshot) from a
    /// leader as its leader's.
    heard_from_leader: Mutex<Option<Instant>>,
    /// How many times a peer that was unreachable answered again.
    reconnects: std::sync::atomic::AtomicU64,
}

#[derive(Default, Clone, Copy)]
struct Contact {
    last_ok: Option<Instant>,
    unreachable: bool,
}

impl Peers {
    /// The channel to `id` at `addr`, made on first use and remade when the
    /// peer's address changed.
    pub fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer table lock");
        if let Some((known, ch)) = channels.get(&id) {
            if known == addr {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A connection whose peer vanished (a cut link) is found out within
            // two seconds even when idle, and then replaced.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(id, (addr.to_owned(), ch.clone()));
        Ok(ch)
    }

    /// Drops the channel to `id` after a failed RPC: the next one connects
    /// afresh. A TCP connection that lived through a cut link may sit in
    /// retransmission backoff for seconds after the link is back; a new one
    /// goes through at once.
    pub fn reset(&self, id: NodeId) {
        self.channels.lock().expect("peer table lock").remove(&id);
    }

    /// Follower `id` accepted an AppendEntries of `term` that was sent at `sent`.
    fn acked(&self, id: NodeId, term: u64, sent: Instant) {
        let mut acks = self.acks.lock().expect("peer ack lock");
        let entry = acks.entry(id).or_insert((term, sent));
        if (term, sent) > *entry {
            *entry = (term, sent);
        }
    }

    /// When the latest AppendEntries of `term` that `id` accepted was sent.
    pub fn acked_at(&self, id: NodeId, term: u64) -> Option<Instant> {
        self.acks.lock().expect("peer ack lock").get(&id).filter(|(t, _)| *t == term).map(|(_, at)| *at)
    }

    /// This node took a message from a leader as its leader's.
    pub fn leader_heard(&self) {
        *self.heard_from_leader.lock().expect("peer leader lock") = Some(Instant::now());
    }

    /// When this node last took a message from a leader; `None` if never.
    pub fn heard_from_leader(&self) -> Option<Instant> {
        *self.heard_from_leader.lock().expect("peer leader lock")
    }

    /// A message from or to `id` went through.
    pub fn contacted(&self, id: NodeId, addr: Option<&str>) {
        let mut contact = self.contact.lock().expect("peer contact lock");
        let c = contact.entry(id).or_default();
        if c.unreachable {
            tracing::info!(peer = id, addr, "peer is reachable again");
            self.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        *c = Contact { last_ok: Some(Instant::now()), unreachable: false };
    }

    fn unreachable(&self, id: NodeId, addr: &str, reason: &str) {
        let mut contact = self.contact.lock().expect("peer contact lock");
        let c = contact.entry(id).or_default();
        if !c.unreachable {
            tracing::warn!(peer = id, addr, reason, "peer is unreachable; retrying quietly until it answers");
            c.unreachable = true;
        }
    }

    /// How many times an unreachable peer became reachable again: a healed
    /// partition, a restarted node.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long ago a message to or from `id` last went through.
    pub fn last_contact(&self, id: NodeId) -> Option<Duration> {
        self.contact.lock().expect("peer contact lock").get(&id).and_then(|c| c.last_ok).map(|t| t.elapsed())
    }
}

/// Hands openraft one [`PeerClient`] per replication target.
#[derive(Clone)]
pub struct Network {
    pub(crate) peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient { target, node: node.clone(), peers: self.peers.clone() }
    }
}

pub struct PeerClient {
    target: NodeId,
    node: BasicNode,
    peers: Arc<Peers>,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    /// Sends one JSON-wrapped RPC and unwraps the peer's `Result`.
    async fn call<Req, Resp, E, F, Fut>(&self, req: &Req, option: &RPCOption, send: F) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftTransportClient<Channel>, tonic::Request<Payload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Payload>, tonic::Status>>,
    {
        let addr = self.node.addr.as_str();
        let channel = self.peers.channel(self.target, addr).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(Payload { json });
        request.set_timeout(option.hard_ttl());
        let reply = match send(RaftTransportClient::new(channel), request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                self.peers.reset(self.target);
                self.peers.unreachable(self.target, addr, status.message());
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        self.peers.contacted(self.target, Some(addr));
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let (term, sent) = (rpc.vote.leader_id().get_term(), Instant::now());
        let reply = self.call(&rpc, &option, |mut c, r| async move { c.append_entries(r).await }).await?;
        // Anything but a higher vote means the follower took this node as its leader.
        if !matches!(reply, AppendEntriesResponse::HigherVote(_)) && rpc.vote.is_committed() {
            self.peers.acked(self.target, term, sent);
        }
        Ok(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(&rpc, &option, |mut c, r| async move { c.install_snapshot(r).await }).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await }).await
    }

    /// Retries an unreachable peer every 50 ms, then every 100 ms: a node
    /// back from a partition or a restart hears from its leader before its
    /// election timer runs out, and does not unseat it.
    fn backoff(&self) -> Backoff {
        Backoff::new((0..).map(|i: u32| Duration::from_millis(if i < 2 { 50 } else { 100 })))
    }
}
