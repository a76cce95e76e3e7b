//! [`Cluster`]: one node's handle on the Raft group. It starts openraft on
//! the sled stores, runs the operations only a leader may run (writes,
//! membership changes) and forwards them to the leader when this node is not
//! it, so a client never has to find the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState, SnapshotPolicy};
use raftlb_proto::raft::raft_transport_client::RaftTransportClient;
use raftlb_proto::raft::raft_transport_server::RaftTransportServer;
use raftlb_proto::raft::Payload;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::network::{Network, Peers};
use crate::service::TransportService;
use crate::state::{Command, CommandResult};
use crate::store::{self, Applied};
use crate::{ClusterError, NodeId, Raft};

/// How this node takes part in the group. Timings default to DESIGN.md's.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: NodeId,
    /// The gRPC address peers and lbctl reach this node at.
    pub addr: String,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// How long a write may wait for a leader and a quorum before it fails.
    pub write_timeout: Duration,
    /// Log entries between snapshots.
    pub snapshot_after: u64,
    /// Log entries kept behind a snapshot, for followers that lag a little;
    /// one further behind is sent the snapshot.
    pub logs_kept_after_snapshot: u64,
    /// The software version this node reports into the registry.
    pub version: String,
}

impl Settings {
    pub fn new(id: NodeId, addr: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Settings {
            id,
            addr: addr.into(),
            data_dir: data_dir.into(),
            heartbeat: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            write_timeout: Duration::from_secs(5),
            snapshot_after: 1000,
            logs_kept_after_snapshot: 100,
            version: raftlb_proto::VERSION.to_owned(),
        }
    }
}

/// The voters and learners after a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    Leader,
    Follower,
    Candidate,
    Learner,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Leader => "leader",
            MemberRole::Follower => "follower",
            MemberRole::Candidate => "candidate",
            MemberRole::Learner => "learner",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addr: String,
    pub role: MemberRole,
    pub version: String,
    pub drain: bool,
    /// False while the member's self-check fails.
    pub serving: bool,
    /// Since the last Raft message between this node and the member; `None`
    /// for this node itself and for members it never exchanged one with.
    pub last_contact: Option<Duration>,
}

/// The group as this node sees it.
#[derive(Debug, Clone)]
pub struct Status {
    pub node: NodeId,
    pub initialized: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub config_version: u64,
    pub last_applied: u64,
    pub members: Vec<MemberStatus>,
}

/// How long a node goes without a sign of a quorum (a leader that heard from
/// a quorum; a follower that heard from its leader) before it says it has
/// none: several election timeouts, so one lost heartbeat is not a loss.
pub const QUORUM_LOST_AFTER: Duration = Duration::from_secs(1);

/// How long a handoff may take after the lease ran out before it is given up.
const HANDOVER_LIMIT: Duration = Duration::from_secs(2);

/// How long `set_drain` waits for a drained leader to hand over.
const DRAIN_HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// After a drained leader failed to hand over, before it tries again.
const DRAIN_RETRY: Duration = Duration::from_secs(10);

/// How often a drained leader looks for a voter in contact to hand over to.
const DRAIN_LOOK: Duration = Duration::from_millis(100);

/// How long this node goes without a leader before it stands although
/// drained: a cluster without a leader could not even end the drain.
pub(crate) const DRAINED_STANDS_AFTER: Duration = Duration::from_secs(3);

/// How long before the successor is asked to stand the VIPs are released.
const RELEASE_AHEAD: Duration = Duration::from_millis(20);

/// How long the handoff waits for the VIP manager to say it released.
const RELEASE_WAIT: Duration = Duration::from_millis(200);

/// Why a node keeps itself from leading.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// The node's data plane fails its self-check.
    SelfCheck = 1,
    /// The node hands leadership to another on purpose.
    Transfer = 2,
    /// The node stops (SIGTERM): it must not lead again before it exits.
    Stopping = 4,
}

impl Hold {
    fn as_str(self) -> &'static str {
        match self {
            Hold::SelfCheck => "its self-check fails",
            Hold::Transfer => "it hands leadership over",
            Hold::Stopping => "it stops",
        }
    }
}

/// What only the leader may run; followers forward it over the transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderOp {
    Write(Command),
    AddNode {
        id: NodeId,
        addr: String,
    },
    RemoveNode {
        id: NodeId,
    },
    /// Hand leadership to this voter, or to the best placed one.
    Transfer {
        to: Option<NodeId>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderReply {
    Written(CommandResult),
    Members(Membership),
    /// The new leader.
    Transferred(NodeId),
}

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    raft: Raft,
    peers: Arc<Peers>,
    applied: watch::Receiver<Arc<Applied>>,
    /// The reasons ([`Hold`] bits) this node must not lead now: while any is
    /// set it does not stand for election, and as leader it stops heartbeats
    /// and writes so that a follower takes over.
    held_back: AtomicU8,
    /// Told when `held_back` turns on or off, for the election loop.
    hold_changed: Notify,
    handover: watch::Sender<Handover>,
}

/// Where a planned handoff of leadership stands, for the VIP manager: the
/// outgoing leader keeps its VIPs until `Releasing::at` (followers refuse
/// to vote until a little after it), releases them, and says so; only then
/// is the successor asked to stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    Idle,
    Releasing { at: Instant },
    Released,
}

impl Cluster {
    /// Opens the node's stores under `data_dir` and starts its Raft instance.
    /// A node that was a member before rejoins with its data by itself.
    pub async fn start(settings: Settings) -> Result<Cluster, ClusterError> {
        let node = settings.id;
        // openraft 0.9 looks at its timers on a tick of 1.5 heartbeat
        // intervals and sends a heartbeat on a tick at most: asked for two
        // thirds of the interval, it sends one per `settings.heartbeat`.
        // Its election timer is off (elections are run by `run_elections`);
        // its `election_timeout_max` is the lease during which a voter
        // refuses any candidate after its leader's last heartbeat, and
        // `election_timeout_min` only bounds a vote request's wait.
        let lease = settings.election_timeout_min.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "raftlb".into(),
            heartbeat_interval: (settings.heartbeat.as_millis() as u64 * 2 / 3).max(1),
            election_timeout_min: lease.saturating_sub(1),
            election_timeout_max: lease,
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_after),
            max_in_snapshot_log_to_keep: settings.logs_kept_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Rejected(format!("Raft timings: {e}")))?;
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|e| ClusterError::Storage { node, reason: format!("cannot create {}: {e}", settings.data_dir.display()) })?;
        let (log, sm) = store::open(&settings.data_dir.join("raft"))
            .await
            .map_err(|e| ClusterError::Storage { node, reason: format!("cannot open {}: {e}", settings.data_dir.display()) })?;
        let applied = sm.subscribe();
        let peers = Arc::new(Peers::default());
        let raft = Raft::new(node, Arc::new(config), Network { peers: peers.clone() }, log, sm)
            .await
            .map_err(|e| ClusterError::Fatal { node, reason: e.to_string() })?;
        let cluster = Cluster {
            inner: Arc::new(Inner {
                settings,
                raft,
                peers,
                applied,
                held_back: AtomicU8::new(0),
                hold_changed: Notify::new(),
                handover: watch::channel(Handover::Idle).0,
            }),
        };
        tokio::spawn(cluster.clone().log_leadership());
        tokio::spawn(cluster.clone().run_elections());
        tokio::spawn(cluster.clone().follow_drain());
        tokio::spawn(cluster.clone().report_version());
        Ok(cluster)
    }

    pub fn id(&self) -> NodeId {
        self.inner.settings.id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub(crate) fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The gRPC service peers send Raft messages and forwarded operations to.
    pub fn transport_service(&self) -> RaftTransportServer<TransportService> {
        RaftTransportServer::new(TransportService { cluster: self.clone() })
    }

    /// The latest applied state.
    pub fn applied(&self) -> Arc<Applied> {
        self.inner.applied.borrow().clone()
    }

    /// A receiver that sees every applied state, for those that follow changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.inner.applied.clone()
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub(crate) fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    pub fn is_initialized(&self) -> bool {
        self.metrics().membership_config.membership().nodes().next().is_some()
    }

    /// Starts a new cluster with this node as its only voter, and waits until
    /// it leads.
    pub async fn initialize(&self) -> Result<(), ClusterError> {
        let node = self.id();
        let members = BTreeMap::from([(node, BasicNode::new(&self.inner.settings.addr))]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                let m = self.metrics();
                let leader = m.current_leader.map_or("none yet".to_owned(), |l| format!("node {l}"));
                return Err(ClusterError::AlreadyInitialized { node, leader, term: m.current_term });
            }
            Err(e) => return Err(ClusterError::Rejected(format!("cannot initialize: {e}"))),
        }
        self.inner
            .raft
            .wait(Some(self.inner.settings.write_timeout))
            .state(ServerState::Leader, "initialized node becomes leader")
            .await
            .map_err(|_| ClusterError::NoLeader {
            waited_ms: self.inner.settings.write_timeout.as_millis() as u64,
            voters: node.to_string(),
        })?;
        Ok(())
    }

    /// Commits a command through the leader and returns what applying it did.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, ClusterError> {
        match self.on_leader(LeaderOp::Write(cmd)).await? {
            LeaderReply::Written(CommandResult::Rejected(why)) => Err(ClusterError::Rejected(why)),
            LeaderReply::Written(result) => Ok(result),
            _ => unreachable!("a write is answered with its result"),
        }
    }

    /// Adds a node as a learner, waits until it caught up, then makes it a voter.
    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<Membership, ClusterError> {
        match self.on_leader(LeaderOp::AddNode { id, addr }).await? {
            LeaderReply::Members(m) => Ok(m),
            _ => unreachable!("a membership change is answered with the members"),
        }
    }

    pub async fn remove_node(&self, id: NodeId) -> Result<Membership, ClusterError> {
        match self.on_leader(LeaderOp::RemoveNode { id }).await? {
            LeaderReply::Members(m) => Ok(m),
            _ => unreachable!("a membership change is answered with the members"),
        }
    }

    /// Hands leadership to voter `to`, or to the voter whose log is furthest
    /// along; returns the new leader. A planned handoff: the leader stops its
    /// heartbeats and writes, waits out the lease during which followers
    /// refuse to vote, and asks the target to stand at once, instead of
    /// the followers standing in turn as after a crash.
    pub async fn transfer_leadership(&self, to: Option<NodeId>) -> Result<NodeId, ClusterError> {
        match self.on_leader(LeaderOp::Transfer { to }).await? {
            LeaderReply::Transferred(leader) => Ok(leader),
            _ => unreachable!("a transfer is answered with the new leader"),
        }
    }

    /// Runs `op` on the leader: here if this node leads, else forwarded to
    /// it. Retries while leadership moves, until the write timeout.
    async fn on_leader(&self, op: LeaderOp) -> Result<LeaderReply, ClusterError> {
        let node = self.id();
        let timeout = self.inner.settings.write_timeout;
        let deadline = Instant::now() + timeout;
        let mut last_leader = None;
        loop {
            let m = self.metrics();
            let membership = m.membership_config.membership();
            if membership.nodes().next().is_none() {
                return Err(ClusterError::NotInitialized { node });
            }
            if let Some(leader) = m.current_leader {
                last_leader = Some(leader);
                let outcome = if leader == node {
                    self.run_as_leader(op.clone()).await
                } else {
                    let addr = membership.get_node(&leader).map(|n| n.addr.clone()).unwrap_or_default();
                    self.forward(leader, &addr, &op, deadline.saturating_duration_since(Instant::now())).await
                };
                match outcome {
                    Err(ClusterError::NotLeader { .. }) => {}
                    Err(ClusterError::NoQuorum { .. }) if Instant::now() < deadline => {}
                    other => return other,
                }
            }
            if Instant::now() >= deadline {
                let voters = list(membership.voter_ids());
                let waited_ms = timeout.as_millis() as u64;
                return Err(match last_leader {
                    Some(leader) => ClusterError::NoQuorum { leader, waited_ms, voters },
                    None => ClusterError::NoLeader { waited_ms, voters },
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `op` to the leader. A leader that cannot be reached counts as
    /// "not the leader": the caller waits for the next one.
    async fn forward(&self, leader: NodeId, addr: &str, op: &LeaderOp, budget: Duration) -> Result<LeaderReply, ClusterError> {
        let not_leader = ClusterError::NotLeader { node: leader };
        let Ok(channel) = self.inner.peers.channel(leader, addr) else {
            return Err(not_leader);
        };
        let json = serde_json::to_vec(op).map_err(|e| ClusterError::Rejected(format!("cannot encode the operation: {e}")))?;
        let mut req = tonic::Request::new(Payload { json });
        req.set_timeout(budget.max(Duration::from_millis(10)));
        match RaftTransportClient::new(channel).forward(req).await {
            Ok(reply) => serde_json::from_slice(&reply.into_inner().json)
                .unwrap_or_else(|e| Err(ClusterError::Rejected(format!("the leader's reply is malformed: {e}")))),
            Err(status) => {
                tracing::debug!(leader, addr, %status, "forwarding to the leader failed; waiting for leadership to settle");
                Err(not_leader)
            }
        }
    }

    /// Runs an operation on this node, which must be the leader. Bounded by
    /// the write timeout: a leader without quorum answers instead of hanging.
    pub(crate) async fn run_as_leader(&self, op: LeaderOp) -> Result<LeaderReply, ClusterError> {
        if self.is_held_back() {
            // A write would be replicated and keep the followers from electing.
            return Err(ClusterError::NotLeader { node: self.id() });
        }
        let timeout = self.inner.settings.write_timeout;
        match tokio::time::timeout(timeout, self.execute(op)).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::NoQuorum {
                leader: self.id(),
                waited_ms: timeout.as_millis() as u64,
                voters: list(self.metrics().membership_config.membership().voter_ids()),
            }),
        }
    }

    /// Retrying an operation after leadership moved may run it twice; every
    /// command is idempotent against the state it meets (an equal spec makes
    /// no new version), and a membership change checks the membership first.
    async fn execute(&self, op: LeaderOp) -> Result<LeaderReply, ClusterError> {
        let raft = &self.inner.raft;
        match op {
            LeaderOp::Write(cmd) => {
                let resp = raft.client_write(cmd).await.map_err(|e| self.write_error(e))?;
                Ok(LeaderReply::Written(resp.data))
            }
            LeaderOp::AddNode { id, addr } => {
                self.check_new_member(id, &addr)?;
                // Catching up gets half the budget, so that a node the leader cannot
                // replicate to is reported as such rather than as a lost quorum.
                let catch_up = self.inner.settings.write_timeout / 2;
                match tokio::time::timeout(catch_up, raft.add_learner(id, BasicNode::new(&addr), true)).await {
                    Ok(result) => result.map_err(|e| self.write_error(e))?,
                    Err(_) => {
                        return Err(ClusterError::Rejected(format!(
                            "node {id} at {addr} did not catch up within {} ms: the leader (node {}) cannot replicate to it; \
                             it stays a learner until `lbctl node remove {id}`",
                            catch_up.as_millis(),
                            self.id()
                        )))
                    }
                };
                let resp = raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false).await.map_err(|e| self.write_error(e))?;
                tracing::info!(node = id, addr, "node joined as a voter");
                Ok(LeaderReply::Members(membership_of(resp.membership.as_ref())))
            }
            LeaderOp::Transfer { to } => self.hand_over(to).await.map(LeaderReply::Transferred),
            LeaderOp::RemoveNode { id } => {
                let m = self.metrics();
                let membership = m.membership_config.membership();
                let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
                let change = if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(ClusterError::Rejected(format!("node {id} is the last voter: a cluster keeps at least one")));
                    }
                    ChangeMembers::RemoveVoters([id].into())
                } else if membership.get_node(&id).is_some() {
                    ChangeMembers::RemoveNodes([id].into())
                } else {
                    return Err(ClusterError::Rejected(format!(
                        "node {id} is not a member: the members are {}",
                        list(membership.nodes().map(|(id, _)| *id))
                    )));
                };
                let resp = raft.change_membership(change, false).await.map_err(|e| self.write_error(e))?;
                tracing::info!(node = id, "node removed from the cluster");
                Ok(LeaderReply::Members(membership_of(resp.membership.as_ref())))
            }
        }
    }

    async fn hand_over(&self, to: Option<NodeId>) -> Result<NodeId, ClusterError> {
        let me = self.id();
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let target = match to {
            Some(t) if t == me => return Err(ClusterError::Rejected(format!("node {me} already leads"))),
            Some(t) if !voters.contains(&t) => {
                return Err(ClusterError::Rejected(format!("node {t} is not a voter: the voters are {}", list(voters.into_iter()))))
            }
            Some(t) if self.is_drained(t) => {
                return Err(ClusterError::Rejected(format!("node {t} is drained: run `lbctl node undrain {t}` first")))
            }
            Some(t) => t,
            None => {
                let matched = |id: &NodeId| m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
                voters.iter().copied().filter(|v| *v != me && !self.is_drained(*v)).max_by_key(matched).ok_or_else(|| {
                    ClusterError::Rejected(format!("node {me} is the only voter not drained: there is no other node to lead"))
                })?
            }
        };
        let addr = membership.get_node(&target).map(|n| n.addr.clone()).unwrap_or_default();
        tracing::info!(to = target, "handing leadership over");
        self.hold(Hold::Transfer, true);
        let outcome = self.await_successor(target, &addr).await;
        self.inner.handover.send_replace(Handover::Idle);
        self.hold(Hold::Transfer, false);
        outcome
    }

    /// Waits out the voters' lease (from the last acknowledged heartbeat),
    /// has the VIPs released just before it ends, then asks `target` to
    /// stand and waits for it (or, should it fail, another node) to lead.
    async fn await_successor(&self, target: NodeId, addr: &str) -> Result<NodeId, ClusterError> {
        let me = self.id();
        let lease = self.voter_lease();
        let mut metrics = self.inner.raft.metrics();
        // Any quorum that can elect a successor holds a node that got a
        // heartbeat sent at or after the last one a quorum acknowledged, and
        // that node neither votes nor stands until its lease from then ran out.
        // Without a quorum acknowledgement on record nothing is held back: release and ask at once.
        let acked = self.quorum_acked_at().unwrap_or_else(|| Instant::now() - lease);
        let stand_at = acked + lease;
        self.inner.handover.send_replace(Handover::Releasing { at: stand_at - RELEASE_AHEAD });
        let mut handover = self.inner.handover.subscribe();
        let released =
            tokio::time::timeout_at((stand_at + RELEASE_WAIT).into(), handover.wait_for(|h| *h == Handover::Released)).await.is_ok();
        if !released {
            // Asking a successor to stand now could make two VIP holders: the
            // followers stand by themselves once they miss the heartbeats.
            tracing::warn!("the VIP manager did not confirm the release in time; leaving the election to the followers");
        }
        tokio::time::sleep_until(stand_at.into()).await;
        let deadline = Instant::now() + HANDOVER_LIMIT;
        // Another node leads: the handoff is done.
        let successor = |metrics: &mut watch::Receiver<RaftMetrics<NodeId, BasicNode>>| {
            let leader = metrics.borrow_and_update().current_leader.filter(|l| *l != me)?;
            tracing::info!(leader, "leadership handed over");
            Some(leader)
        };
        loop {
            // A follower may have stood by itself meanwhile: never unseat the new leader.
            if let Some(leader) = successor(&mut metrics) {
                return Ok(leader);
            }
            if released {
                self.ask_to_stand(target, addr).await;
            }
            let round = (Instant::now() + lease).min(deadline);
            loop {
                if let Some(leader) = successor(&mut metrics) {
                    return Ok(leader);
                }
                if tokio::time::timeout_at(round.into(), metrics.changed()).await.is_err() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Rejected(format!(
                    "node {target} did not take over within {} ms; node {me} leads on",
                    (lease + HANDOVER_LIMIT).as_millis()
                )));
            }
        }
    }

    /// Follows planned handoffs of leadership (for the VIP manager).
    pub fn handover(&self) -> watch::Receiver<Handover> {
        self.inner.handover.subscribe()
    }

    /// The VIP manager released its VIPs for the handoff under way.
    pub fn handover_released(&self) {
        self.inner.handover.send_if_modified(|h| {
            let releasing = matches!(h, Handover::Releasing { .. });
            if releasing {
                *h = Handover::Released;
            }
            releasing
        });
    }

    async fn ask_to_stand(&self, target: NodeId, addr: &str) {
        let Ok(channel) = self.inner.peers.channel(target, addr) else { return };
        let json = serde_json::to_vec(&self.id()).unwrap_or_default();
        let mut req = tonic::Request::new(Payload { json });
        req.set_timeout(self.inner.settings.election_timeout_max);
        if let Err(status) = RaftTransportClient::new(channel).elect(req).await {
            tracing::debug!(node = target, %status, "could not ask the node to stand for election");
        }
    }

    /// Stands for election now, as the leader handing over (`from`) asks;
    /// not if another node has taken over meanwhile.
    pub(crate) async fn stand(&self, from: NodeId) -> Result<(), ClusterError> {
        let me = self.id();
        if self.is_held_back() {
            return Err(ClusterError::Rejected(format!("node {me} must not lead now")));
        }
        if let Some(leader) = self.leader().filter(|l| *l != from && *l != me) {
            return Err(ClusterError::Rejected(format!("node {leader} leads already")));
        }
        self.inner.raft.trigger().elect().await.map_err(|e| ClusterError::Fatal { node: self.id(), reason: e.to_string() })
    }

    fn check_new_member(&self, id: NodeId, addr: &str) -> Result<(), ClusterError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Err(ClusterError::Rejected(format!("node {id} is already a voter of the cluster")));
        }
        if let Some(node) = membership.get_node(&id) {
            if node.addr != addr {
                return Err(ClusterError::Rejected(format!(
                    "node {id} is already a learner at {}: run `lbctl node remove {id}` first to move it to {addr}",
                    node.addr
                )));
            }
        }
        if let Some((other, _)) = membership.nodes().find(|(other, n)| n.addr == addr && **other != id) {
            return Err(ClusterError::Rejected(format!("address {addr} already belongs to node {other}")));
        }
        Ok(())
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ClusterError {
        let node = self.id();
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ClusterError::NotLeader { node },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ClusterError::Rejected(e.to_string()),
            RaftError::Fatal(f) => ClusterError::Fatal { node, reason: f.to_string() },
        }
    }

    /// The group as this node sees it: leader, term, members with their roles.
    pub fn status(&self) -> Status {
        let m = self.metrics();
        let applied = self.applied();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let me = self.id();
        let members = membership
            .nodes()
            .map(|(&id, node)| {
                let role = if id == me {
                    match m.state {
                        ServerState::Leader => MemberRole::Leader,
                        ServerState::Candidate => MemberRole::Candidate,
                        ServerState::Learner => MemberRole::Learner,
                        _ if !voters.contains(&id) => MemberRole::Learner,
                        _ => MemberRole::Follower,
                    }
                } else if !voters.contains(&id) {
                    MemberRole::Learner
                } else if m.current_leader == Some(id) {
                    MemberRole::Leader
                } else {
                    MemberRole::Follower
                };
                let info = applied.state.nodes.get(&id);
                MemberStatus {
                    id,
                    addr: node.addr.clone(),
                    role,
                    version: info.map(|i| i.version.clone()).unwrap_or_default(),
                    drain: info.is_some_and(|i| i.drain),
                    serving: info.is_none_or(|i| i.serving),
                    last_contact: if id == me { None } else { self.inner.peers.last_contact(id) },
                }
            })
            .collect();
        let initialized = membership.nodes().next().is_some();
        Status {
            node: me,
            initialized,
            leader: m.current_leader,
            term: m.current_term,
            config_version: applied.state.config_version(),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            members,
        }
    }

    /// Whether this node has a recent sign of a quorum: as leader, a quorum
    /// acknowledged it within [`QUORUM_LOST_AFTER`]; as follower, it heard
    /// from its leader within that time.
    pub fn has_quorum(&self) -> bool {
        let m = self.metrics();
        let me = self.id();
        match m.current_leader {
            Some(leader) if leader == me => self.quorum_acked_at().is_some_and(|t| t.elapsed() < QUORUM_LOST_AFTER),
            Some(leader) => self.inner.peers.last_contact(leader).is_some_and(|d| d < QUORUM_LOST_AFTER),
            None => false,
        }
    }

    /// Keeps this node from leading while `on` (its self-check fails): it
    /// stops standing for election and, if it leads, stops its heartbeats and
    /// refuses writes, so the followers elect another leader once their
    /// lease ran out. Off again, it takes part in elections as before.
    pub fn hold_back(&self, on: bool) {
        self.hold(Hold::SelfCheck, on);
    }

    /// Keeps this node from leading until it exits: it stops. Called once
    /// leadership was handed over, so that while its connections finish it
    /// does not win an election (and the VIPs with it) again.
    pub fn stop_leading(&self) {
        self.hold(Hold::Stopping, true);
    }

    fn hold(&self, reason: Hold, on: bool) {
        let bit = reason as u8;
        let before = self.inner.held_back.fetch_update(Relaxed, Relaxed, |h| Some(if on { h | bit } else { h & !bit })).unwrap_or_default();
        let after = if on { before | bit } else { before & !bit };
        if (before == 0) == (after == 0) {
            return;
        }
        // Elections check the hold themselves (`run_elections`).
        self.inner.hold_changed.notify_one();
        self.inner.raft.runtime_config().heartbeat(!on);
        if on {
            match reason {
                // A failing data plane is news; a handoff or a stop is what the operator asked for.
                Hold::SelfCheck => tracing::warn!(reason = reason.as_str(), "this node stops standing for leadership"),
                Hold::Transfer | Hold::Stopping => tracing::info!(reason = reason.as_str(), "this node stops standing for leadership"),
            }
            tokio::spawn(self.clone().resume_heartbeats_after_stepping_down());
        } else {
            tracing::info!("this node stands for leadership again");
        }
    }

    /// The leader this node knows of, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    pub fn is_held_back(&self) -> bool {
        self.inner.held_back.load(Relaxed) != 0
    }

    pub(crate) fn hold_changed(&self) -> &Notify {
        &self.inner.hold_changed
    }

    /// Heartbeats were stopped to hand leadership over; once another node
    /// leads they are needed again for the time this node might lead anew.
    async fn resume_heartbeats_after_stepping_down(self) {
        let mut metrics = self.inner.raft.metrics();
        loop {
            let leads = metrics.borrow_and_update().current_leader == Some(self.id());
            if !leads || !self.is_held_back() {
                self.inner.raft.runtime_config().heartbeat(true);
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// As leader: the send time of the latest heartbeat (or append) that a
    /// quorum of voters accepted, this node counting as accepting at once.
    /// Measured by the transport itself when the message was sent, so it
    /// is never later than the truth however late this is asked.
    pub fn quorum_acked_at(&self) -> Option<Instant> {
        // Read in place from the server metrics: the VIP manager asks on each wake-up.
        let (term, voters) = {
            let m = self.inner.raft.server_metrics();
            let m = m.borrow();
            if m.state != ServerState::Leader {
                return None;
            }
            (m.vote.leader_id().get_term(), m.membership_config.membership().voter_ids().collect::<Vec<NodeId>>())
        };
        let me = self.id();
        let now = Instant::now();
        let mut acked: Vec<Instant> =
            voters.iter().filter_map(|v| if *v == me { Some(now) } else { self.inner.peers.acked_at(*v, term) }).collect();
        let quorum = voters.len() / 2 + 1;
        if acked.len() < quorum {
            return None;
        }
        acked.sort_by(|a, b| b.cmp(a));
        Some(acked[quorum - 1])
    }

    /// Logs each change of leader, so an operator reading one node's log
    /// sees the group's history without openraft's internals.
    async fn log_leadership(self) {
        // Leadership only: the full metrics change with every heartbeat.
        let mut server = self.inner.raft.server_metrics();
        let mut seen = None;
        loop {
            let (leader, term) = {
                let m = server.borrow_and_update();
                (m.current_leader, m.vote.leader_id().get_term())
            };
            if leader != seen {
                match leader {
                    Some(l) if l == self.id() => tracing::info!(term, "this node is the leader"),
                    Some(l) => tracing::info!(leader = l, term, "following the leader"),
                    None => tracing::info!("no leader known"),
                }
                seen = leader;
            }
            if server.changed().await.is_err() {
                // The engine ended; the full metrics say why.
                match self.inner.raft.metrics().borrow().running_state.as_ref().err() {
                    // `Cluster::shutdown`: the node stops as asked.
                    Some(openraft::error::Fatal::Stopped) | None => tracing::info!("the Raft engine stopped"),
                    Some(fatal) => tracing::error!(error = %fatal, "the Raft engine stopped"),
                }
                return;
            }
        }
    }

    /// How many times a peer this node could not reach answered again
    /// (for the VIP manager: after a partition heals it announces anew).
    pub fn peer_reconnects(&self) -> u64 {
        self.inner.peers.reconnects()
    }

    /// Whether node `id` is drained in the registry.
    pub fn is_drained(&self, id: NodeId) -> bool {
        self.applied().state.nodes.get(&id).is_some_and(|n| n.drain)
    }

    /// Drains node `id` (or ends its drain). A drained node does not stand
    /// for election; if it leads, it hands leadership (and with it the VIPs)
    /// to another voter, which this waits for. Returns the leader after.
    pub async fn set_drain(&self, id: NodeId, drain: bool) -> Result<Option<NodeId>, ClusterError> {
        self.write(Command::SetNodeDrain { id, drain }).await?;
        if !drain {
            return Ok(self.leader());
        }
        let mut metrics = self.inner.raft.metrics();
        let moved = async {
            loop {
                if let Some(leader) = metrics.borrow_and_update().current_leader.filter(|l| *l != id) {
                    return Some(leader);
                }
                metrics.changed().await.ok()?;
            }
        };
        match tokio::time::timeout(DRAIN_HANDOVER_WAIT, moved).await {
            Ok(leader) => Ok(leader),
            Err(_) => Err(ClusterError::Rejected(format!(
                "node {id} is drained but still leads after {} ms: no other voter took over yet; it hands over as soon as one can",
                DRAIN_HANDOVER_WAIT.as_millis()
            ))),
        }
    }

    /// As a drained leader, hands leadership over to an undrained voter
    /// that is in contact; after a failed handoff, tries again later.
    async fn follow_drain(self) {
        let me = self.id();
        let mut server = self.inner.raft.server_metrics();
        let mut applied = self.subscribe();
        let mut handover = self.handover();
        loop {
            server.borrow_and_update();
            applied.borrow_and_update();
            handover.borrow_and_update();
            // Looked at on each change of leader, drain or handoff, and
            // while a drained leader has no voter to hand over to, again
            // and again until one answers.
            let mut again = None;
            let m = self.metrics();
            if m.current_leader == Some(me) && self.is_drained(me) && *self.inner.handover.borrow() == Handover::Idle {
                let reachable = |v: &NodeId| self.inner.peers.last_contact(*v).is_some_and(|d| d < QUORUM_LOST_AFTER);
                if m.membership_config.membership().voter_ids().any(|v| v != me && !self.is_drained(v) && reachable(&v)) {
                    tracing::info!("this node is drained: handing leadership over");
                    if let Err(e) = self.transfer_leadership(None).await {
                        tracing::warn!(error = %e, "a drained leader could not hand over; trying again later");
                        tokio::time::sleep(DRAIN_RETRY).await;
                    }
                    continue;
                }
                again = Some(DRAIN_LOOK);
            }
            tokio::select! {
                _ = tokio::time::sleep(again.unwrap_or_default()), if again.is_some() => {}
                changed = server.changed() => if changed.is_err() { return },
                changed = applied.changed() => if changed.is_err() { return },
                changed = handover.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Keeps this node's entry in the registry at the software version it
    /// runs: after a restart on a new version the registry shows it.
    async fn report_version(self) {
        let mut applied = self.subscribe();
        let version = self.inner.settings.version.clone();
        loop {
            let stale = applied.borrow_and_update().state.nodes.get(&self.id()).is_some_and(|n| n.version != version);
            if stale {
                let cmd = Command::ReportNode { id: self.id(), version: version.clone() };
                if let Err(e) = self.write(cmd).await {
                    tracing::debug!(error = %e, "could not report the software version yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not stop cleanly");
        }
    }
}

fn membership_of(m: Option<&openraft::Membership<NodeId, BasicNode>>) -> Membership {
    match m {
        Some(m) => Membership { voters: m.voter_ids().collect(), learners: m.learner_ids().collect() },
        None => Membership { voters: vec![], learners: vec![] },
    }
}

fn list(ids: impl Iterator<Item = NodeId>) -> String {
    ids.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}
