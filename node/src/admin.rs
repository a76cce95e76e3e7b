//! The admin gRPC service that lbctl talks to. Any node answers every call:
//! reads come from its applied state, writes and membership changes go
//! through [`Cluster`], which forwards them to the leader.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use raftlb_proto::admin::admin_client::AdminClient;
use raftlb_proto::admin::admin_server::Admin;
use raftlb_proto::admin::{self, *};
use raftlb_proto::spec::{self, HealthPolicy, Spec};
use raftlb_raft::{AdminState, Cluster, ClusterError, Command, CommandResult};
use tonic::{Request, Response, Status};

use crate::dataplane::runtime::RuntimeWatch;
use crate::health::{now_ms, Health};
use crate::stick_sync::Links;
use crate::vip::VipStatus;

/// How long a node waits for another node's admin API (the leader for a
/// status view, a joining node for its identity).
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminService {
    cluster: Cluster,
    health: Arc<Health>,
    runtime: RuntimeWatch,
    vips: Arc<VipStatus>,
    stick_links: Arc<Links>,
}

impl AdminService {
    pub fn new(cluster: Cluster, health: Arc<Health>, runtime: RuntimeWatch, vips: Arc<VipStatus>, stick_links: Arc<Links>) -> Self {
        AdminService { cluster, health, runtime, vips, stick_links }
    }

    fn local_status(&self) -> ClusterStatusReply {
        let s = self.cluster.status();
        ClusterStatusReply {
            health_view: String::new(),
            contacted: 0,
            self_check: String::new(),
            leader: s.leader,
            term: s.term,
            config_version: s.config_version,
            answered_by: s.node,
            initialized: s.initialized,
            last_applied: s.last_applied,
            members: s
                .members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    addr: m.addr,
                    role: m.role.as_str().to_owned(),
                    version: m.version,
                    drain: m.drain,
                    serving: m.serving,
                    last_contact_ms: m.last_contact.map(|d| d.as_millis() as u64),
                })
                .collect(),
        }
    }

    /// The leader's status, which has contact times for every member; `None`
    /// when this node leads, no leader is known or it does not answer.
    async fn leader_status(&self) -> Option<ClusterStatusReply> {
        let s = self.cluster.status();
        let leader = s.leader.filter(|l| *l != s.node)?;
        let addr = s.members.iter().find(|m| m.id == leader)?.addr.clone();
        let mut client = connect(&addr).await.ok()?;
        let mut req = Request::new(ClusterStatusRequest { local: true });
        req.set_timeout(PEER_TIMEOUT);
        client.cluster_status(req).await.ok().map(Response::into_inner)
    }

    /// This node's own checks, and how it routes each server of the spec in force.
    fn local_health(&self) -> HealthLocalReply {
        let own = self.health.local.snapshot();
        let mut servers = Vec::new();
        if let Some(rt) = self.runtime.borrow().clone() {
            let mut backends: Vec<_> = rt.backends.iter().collect();
            backends.sort_by(|a, b| a.0.cmp(b.0));
            for (b, be) in backends {
                for s in &be.servers {
                    let local = own.get(&(b.clone(), s.spec.name.clone())).filter(|l| l.addr == s.state.addr);
                    let last = local.and_then(|l| l.last.as_ref());
                    servers.push(LocalServer {
                        backend: b.clone(),
                        server: s.spec.name.clone(),
                        address: s.state.addr.to_string(),
                        checked: local.is_some(),
                        up: local.is_none_or(|l| l.up),
                        since_ms: local.map_or(0, |l| l.since_ms),
                        last_ok: last.map(|r| r.ok),
                        last_result: last.map(|r| r.detail.clone()).unwrap_or_default(),
                        latency_us: last.map_or(0, |r| r.latency.as_micros() as u64),
                        last_at_ms: last.map_or(0, |r| r.at_ms),
                        proposals: local.map_or(0, |l| l.proposals),
                        routes: s.state.up.load(Relaxed) && s.state.admin() == AdminState::Ready,
                    });
                }
            }
        }
        HealthLocalReply { node: self.cluster.id(), servers, view: self.health.mode().as_str().to_owned() }
    }

    /// Asks every other member at once with `ask` and adds `mine`, this
    /// node's own answer; a member that does not answer within the peer
    /// timeout is left out.
    async fn ask_members<T, F, Fut>(&self, mine: T, ask: F) -> HashMap<u64, T>
    where
        T: Send + 'static,
        F: Fn(AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>> + Send + 'static,
    {
        let me = self.cluster.id();
        let members: Vec<(u64, String)> = self.cluster.applied().state.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        let mut asks = tokio::task::JoinSet::new();
        for (id, addr) in members.into_iter().filter(|(id, _)| *id != me) {
            let Ok(client) = connect(&addr).await else { continue };
            let call = ask(client);
            asks.spawn(async move { tokio::time::timeout(PEER_TIMEOUT, call).await.ok()?.ok().map(|r| (id, r.into_inner())) });
        }
        let mut answers = HashMap::from([(me, mine)]);
        while let Some(answer) = asks.join_next().await {
            if let Ok(Some((id, reply))) = answer {
                answers.insert(id, reply);
            }
        }
        answers
    }

    /// The VIPs of the spec in force, with their prefix lengths.
    fn spec_vips(&self) -> Vec<String> {
        let applied = self.cluster.applied();
        applied.state.current().map(|c| c.spec.vips.iter().map(|v| v.address.0.to_string()).collect()).unwrap_or_default()
    }

    fn local_vips(&self) -> VipLocalReply {
        let vips = self
            .vips
            .held()
            .into_iter()
            .map(|h| HeldVip {
                vip: h.vip.to_string(),
                node: self.cluster.id(),
                interface: h.interface,
                since_ms: h.since_ms,
                term: h.term,
            })
            .collect();
        VipLocalReply {
            node: self.cluster.id(),
            vips,
            last_error: self.vips.last_error.lock().expect("vip status lock").clone().unwrap_or_default(),
            hook_failures: self.vips.hook_failures.load(Relaxed),
        }
    }

    fn spec_yaml(&self, version: u64) -> Result<(u64, String), Status> {
        let applied = self.cluster.applied();
        let state = &applied.state;
        let found = if version == 0 { state.current() } else { state.config(version) };
        match found {
            Some(c) => Ok((c.version, c.spec.to_yaml())),
            None if state.configs.is_empty() => {
                Err(Status::not_found("no spec has been applied yet: apply one with `lbctl config apply -f FILE`"))
            }
            None => Err(Status::not_found(state.unknown_version(version))),
        }
    }

    fn current_yaml(&self) -> String {
        self.cluster.applied().state.current().map(|c| c.spec.to_yaml()).unwrap_or_default()
    }

    async fn commit(&self, cmd: Command, before: &str) -> Result<Response<ConfigApplyReply>, Status> {
        match self.cluster.write(cmd).await.map_err(status_of)? {
            CommandResult::Config { version, changed } => {
                let after = self.spec_yaml(version).map(|(_, y)| y).unwrap_or_default();
                let diff = spec::diff(before, &after, "in force", &format!("version {version}"));
                Ok(Response::new(ConfigApplyReply { version, changed, diff }))
            }
            other => Err(Status::internal(format!("unexpected result of a config change: {other:?}"))),
        }
    }
}

/// Connects to another node's admin API.
pub async fn connect(addr: &str) -> Result<AdminClient<tonic::transport::Channel>, admin::ConnectError> {
    admin::connect(addr, PEER_TIMEOUT).await
}

pub fn status_of(e: ClusterError) -> Status {
    let message = e.to_string();
    match e {
        ClusterError::NotInitialized { .. } | ClusterError::Rejected(_) => Status::failed_precondition(message),
        ClusterError::AlreadyInitialized { .. } => Status::already_exists(message),
        ClusterError::NoLeader { .. } | ClusterError::NoQuorum { .. } | ClusterError::NotLeader { .. } => Status::unavailable(message),
        ClusterError::Storage { .. } | ClusterError::Fatal { .. } => Status::internal(message),
    }
}

fn policy_name(policy: HealthPolicy) -> &'static str {
    match policy {
        HealthPolicy::Majority => "majority",
        HealthPolicy::Any => "any",
        HealthPolicy::All => "all",
        HealthPolicy::Local => "local",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_init(&self, _: Request<ClusterInitRequest>) -> Result<Response<ClusterInitReply>, Status> {
        self.cluster.initialize().await.map_err(status_of)?;
        let me = self.cluster.status();
        let addr = me.members.iter().find(|m| m.id == me.node).map(|m| m.addr.clone()).unwrap_or_default();
        tracing::info!(node = me.node, "initialized a new cluster");
        Ok(Response::new(ClusterInitReply { node_id: me.node, addr }))
    }

    async fn cluster_status(&self, req: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        let leader_view = if req.get_ref().local { None } else { self.leader_status().await };
        let mut reply = leader_view.unwrap_or_else(|| self.local_status());
        // What only the contacted node knows of itself.
        reply.contacted = self.cluster.id();
        reply.health_view = self.health.mode().as_str().to_owned();
        reply.self_check = self.health.serving().1;
        Ok(Response::new(reply))
    }

    async fn health(&self, req: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let backend = req.into_inner().backend;
        let applied = self.cluster.applied();
        let state = &applied.state;
        if !backend.is_empty() {
            state.backend(&backend).map_err(Status::not_found)?;
        }
        let views = self.ask_members(self.local_health(), |mut c| async move { c.health_local(HealthLocalRequest {}).await }).await;
        let mut servers = Vec::new();
        for (b, members) in state.health.backends.iter().filter(|(b, _)| backend.is_empty() || **b == backend) {
            for (name, h) in members {
                let nodes = state
                    .nodes
                    .keys()
                    .map(|id| {
                        let reported = h.observations.get(id);
                        let answer = views.get(id);
                        NodeView {
                            node: *id,
                            reported_up: reported.map(|o| o.up),
                            reported_since_ms: reported.map_or(0, |o| o.since_ms),
                            reported_detail: reported.map(|o| o.detail.clone()).unwrap_or_default(),
                            own: answer.and_then(|r| r.servers.iter().find(|l| l.backend == *b && l.server == *name).cloned()),
                            view: answer.map(|r| r.view.clone()).unwrap_or_default(),
                        }
                    })
                    .collect();
                servers.push(ServerHealth {
                    backend: b.clone(),
                    server: name.clone(),
                    address: h.addr.clone(),
                    checked: h.checked,
                    up: h.up,
                    since_ms: h.since_ms,
                    transitions: h.transitions,
                    admin: h.admin.as_str().to_owned(),
                    admin_since_ms: h.admin_since_ms,
                    nodes,
                });
            }
        }
        Ok(Response::new(HealthReply { policy: policy_name(state.health_policy()).to_owned(), answered_by: self.cluster.id(), servers }))
    }

    async fn health_local(&self, _: Request<HealthLocalRequest>) -> Result<Response<HealthLocalReply>, Status> {
        Ok(Response::new(self.local_health()))
    }

    async fn server_set_state(&self, req: Request<ServerSetStateRequest>) -> Result<Response<ServerSetStateReply>, Status> {
        let ServerSetStateRequest { backend, server, state } = req.into_inner();
        let Some(admin) = AdminState::from_name(&state) else {
            return Err(Status::invalid_argument(format!("{state:?} is not a server state: use ready, drain or maint")));
        };
        self.cluster.applied().state.server_exists(&backend, &server).map_err(Status::not_found)?;
        self.cluster.write(Command::SetServerAdmin { backend, server, state: admin, at_ms: now_ms() }).await.map_err(status_of)?;
        Ok(Response::new(ServerSetStateReply { state }))
    }

    async fn identity(&self, _: Request<IdentityRequest>) -> Result<Response<IdentityReply>, Status> {
        Ok(Response::new(IdentityReply {
            node_id: self.cluster.id(),
            version: raftlb_proto::VERSION.to_owned(),
            initialized: self.cluster.is_initialized(),
        }))
    }

    async fn node_add(&self, req: Request<NodeAddRequest>) -> Result<Response<NodeChangeReply>, Status> {
        let NodeAddRequest { id, addr } = req.into_inner();
        if id == 0 {
            return Err(Status::invalid_argument("node id 0 is not valid: use a number above 0"));
        }
        if !crate::config::is_host_and_port(&addr) {
            return Err(Status::invalid_argument(format!("{addr:?} is not an address: write it as HOST:PORT, like 127.0.0.1:7002")));
        }
        let already = self.cluster.status().members.iter().any(|m| m.id == id && m.addr == addr);
        if !already {
            // Check who answers there before the cluster starts replicating to it.
            let unreachable = |e: &dyn std::fmt::Display| {
                Status::failed_precondition(format!(
                    "cannot reach a node at {addr}: {e}; start it first with `lbnode --id {id} --listen {addr} --data-dir DIR`"
                ))
            };
            let mut client = connect(&addr).await.map_err(|e| unreachable(&e))?;
            let mut probe = Request::new(IdentityRequest {});
            probe.set_timeout(PEER_TIMEOUT);
            let who = client.identity(probe).await.map_err(|e| unreachable(&e.message()))?.into_inner();
            if who.node_id != id {
                return Err(Status::failed_precondition(format!("the node at {addr} is node {}, not node {id}", who.node_id)));
            }
            if who.initialized {
                return Err(Status::failed_precondition(format!(
                    "node {id} at {addr} already belongs to a cluster: stop it and empty its data dir to join it here"
                )));
            }
        }
        let m = self.cluster.add_node(id, addr).await.map_err(status_of)?;
        Ok(Response::new(NodeChangeReply { voters: m.voters, learners: m.learners }))
    }

    async fn node_remove(&self, req: Request<NodeRemoveRequest>) -> Result<Response<NodeChangeReply>, Status> {
        let m = self.cluster.remove_node(req.into_inner().id).await.map_err(status_of)?;
        Ok(Response::new(NodeChangeReply { voters: m.voters, learners: m.learners }))
    }

    async fn node_drain(&self, req: Request<NodeDrainRequest>) -> Result<Response<NodeDrainReply>, Status> {
        let NodeDrainRequest { id, drain } = req.into_inner();
        let leader = self.cluster.set_drain(id, drain).await.map_err(status_of)?;
        Ok(Response::new(NodeDrainReply { leader: leader.unwrap_or_default() }))
    }

    async fn leader_transfer(&self, req: Request<LeaderTransferRequest>) -> Result<Response<LeaderTransferReply>, Status> {
        let from = self.cluster.leader().unwrap_or_default();
        let started = std::time::Instant::now();
        let leader = self.cluster.transfer_leadership(req.into_inner().node).await.map_err(status_of)?;
        Ok(Response::new(LeaderTransferReply { from, leader, took_ms: started.elapsed().as_millis() as u64 }))
    }

    async fn vip_list(&self, _: Request<VipListRequest>) -> Result<Response<VipListReply>, Status> {
        let applied = self.cluster.applied();
        let spec_vips = self.spec_vips();
        let answers = self.ask_members(self.local_vips(), |mut c| async move { c.vip_local(VipLocalRequest {}).await }).await;
        let mut vips: Vec<HeldVip> = answers.values().flat_map(|a| a.vips.iter().cloned()).collect();
        vips.sort_by(|a, b| (&a.vip, a.node).cmp(&(&b.vip, b.node)));
        let unheld = spec_vips.into_iter().filter(|v| !vips.iter().any(|h| h.vip == *v)).collect();
        let unreachable = applied.state.nodes.keys().filter(|id| !answers.contains_key(id)).copied().collect();
        let problems =
            answers.values().filter(|a| !a.last_error.is_empty()).map(|a| format!("node {}: {}", a.node, a.last_error)).collect();
        let committed = applied
            .state
            .vips
            .iter()
            .map(|(vip, a)| HeldVip { vip: vip.clone(), node: a.node, interface: String::new(), since_ms: a.since_ms, term: a.term })
            .collect();
        Ok(Response::new(VipListReply { vips, unheld, unreachable, problems, committed }))
    }

    async fn stick_sync(&self, req: Request<StickSyncRequest>) -> Result<Response<StickSyncReply>, Status> {
        let StickSyncRequest { from, entries, send_whole } = req.into_inner();
        crate::stick_sync::learn(&self.runtime, entries)?;
        if send_whole {
            self.stick_links.send_whole_to(from);
        }
        Ok(Response::new(StickSyncReply {}))
    }

    async fn vip_local(&self, _: Request<VipLocalRequest>) -> Result<Response<VipLocalReply>, Status> {
        Ok(Response::new(self.local_vips()))
    }

    async fn vip_move(&self, req: Request<VipMoveRequest>) -> Result<Response<LeaderTransferReply>, Status> {
        let VipMoveRequest { vip, node } = req.into_inner();
        let known = self.spec_vips();
        let matches = |k: &String| *k == vip || k.split('/').next() == Some(vip.as_str());
        if !known.iter().any(matches) {
            let listed =
                if known.is_empty() { "the spec in force has none".to_owned() } else { format!("the VIPs are {}", known.join(", ")) };
            return Err(Status::not_found(format!("{vip} is not a VIP of the spec: {listed}")));
        }
        // The leader holds every VIP: moving one moves leadership, and with it all of them.
        let from = self.cluster.leader().unwrap_or_default();
        let started = std::time::Instant::now();
        let leader = self.cluster.transfer_leadership(Some(node)).await.map_err(status_of)?;
        Ok(Response::new(LeaderTransferReply { from, leader, took_ms: started.elapsed().as_millis() as u64 }))
    }

    async fn config_apply(&self, req: Request<ConfigApplyRequest>) -> Result<Response<ConfigApplyReply>, Status> {
        let ConfigApplyRequest { spec_yaml, dry_run } = req.into_inner();
        let spec = Spec::from_yaml(&spec_yaml).map_err(|e| Status::invalid_argument(format!("the spec is not valid:\n{e}")))?;
        let before = self.current_yaml();
        if dry_run {
            let version = self.cluster.applied().state.config_version();
            let diff = spec::diff(&before, &spec.to_yaml(), "in force", "spec");
            return Ok(Response::new(ConfigApplyReply { version, changed: !diff.is_empty(), diff }));
        }
        self.commit(Command::ApplySpec { spec: spec.into(), at_ms: now_ms() }, &before).await
    }

    async fn config_get(&self, req: Request<ConfigGetRequest>) -> Result<Response<ConfigGetReply>, Status> {
        let (version, spec_yaml) = self.spec_yaml(req.into_inner().version)?;
        Ok(Response::new(ConfigGetReply { version, spec_yaml }))
    }

    async fn config_history(&self, _: Request<ConfigHistoryRequest>) -> Result<Response<ConfigHistoryReply>, Status> {
        let applied = self.cluster.applied();
        let current = applied.state.config_version();
        let versions = applied
            .state
            .configs
            .iter()
            .map(|c| ConfigVersion {
                version: c.version,
                applied_at_ms: c.applied_at_ms,
                origin: c.rollback_of.map_or("apply".to_owned(), |v| format!("rollback to {v}")),
                current: c.version == current,
            })
            .collect();
        Ok(Response::new(ConfigHistoryReply { versions }))
    }

    async fn config_rollback(&self, req: Request<ConfigRollbackRequest>) -> Result<Response<ConfigApplyReply>, Status> {
        let version = req.into_inner().version;
        let before = self.current_yaml();
        self.commit(Command::Rollback { version, at_ms: now_ms() }, &before).await
    }
}
