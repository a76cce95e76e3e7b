//! The admin gRPC service that lbctl talks to. Any node answers every call:
//! reads come from its applied state, writes and membership changes go
//! through [`Cluster`], which forwards them to the leader.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use raftlb_proto::admin::admin_client::AdminClient;
use raftlb_proto::admin::admin_server::Admin;
use raftlb_proto::admin::{self, *};
use raftlb_proto::spec::{self, Spec};
use raftlb_raft::{Cluster, ClusterError, Command, CommandResult};
use tonic::{Request, Response, Status};

/// How long a node waits for another node's admin API (the leader for a
/// status view, a joining node for its identity).
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminService {
    cluster: Cluster,
}

impl AdminService {
    pub fn new(cluster: Cluster) -> Self {
        AdminService { cluster }
    }

    fn local_status(&self) -> ClusterStatusReply {
        let s = self.cluster.status();
        ClusterStatusReply {
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

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
        if !req.get_ref().local {
            if let Some(view) = self.leader_status().await {
                return Ok(Response::new(view));
            }
        }
        Ok(Response::new(self.local_status()))
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
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
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
