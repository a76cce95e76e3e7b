//! The receiving side of the Raft transport: hands each RPC to the local
//! openraft instance and runs operations that followers forward to the leader.

use raftlb_proto::raft::raft_transport_server::RaftTransport;
use raftlb_proto::raft::Payload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use openraft::raft::AppendEntriesResponse;

use crate::cluster::{Cluster, LeaderOp};
use crate::election::PreVote;

pub struct TransportService {
    pub(crate) cluster: Cluster,
}

fn decode<T: DeserializeOwned>(req: Request<Payload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json).map_err(|e| Status::invalid_argument(format!("malformed Raft message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<Payload>, Status> {
    let json = serde_json::to_vec(value).map_err(|e| Status::internal(format!("cannot encode the reply: {e}")))?;
    Ok(Response::new(Payload { json }))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: openraft::raft::AppendEntriesRequest<crate::TypeConfig> = decode(req)?;
        self.cluster.peers().contacted(rpc.vote.leader_id.node_id, None);
        let reply = self.cluster.raft().append_entries(rpc).await;
        // Anything but a higher vote means this node took the sender as its leader.
        if reply.as_ref().is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.cluster.peers().leader_heard();
        }
        encode(&reply)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: openraft::raft::VoteRequest<crate::NodeId> = decode(req)?;
        self.cluster.peers().contacted(rpc.vote.leader_id.node_id, None);
        encode(&self.cluster.raft().vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> = decode(req)?;
        self.cluster.peers().contacted(rpc.vote.leader_id.node_id, None);
        let leader = rpc.vote;
        let reply = self.cluster.raft().install_snapshot(rpc).await;
        if reply.as_ref().is_ok_and(|r| r.vote == leader) {
            self.cluster.peers().leader_heard();
        }
        encode(&reply)
    }

    async fn elect(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let from: crate::NodeId = decode(req)?;
        encode(&self.cluster.stand(from).await)
    }

    async fn pre_vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let req: PreVote = decode(req)?;
        encode(&self.cluster.grants_pre_vote(&req).await)
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let op: LeaderOp = decode(req)?;
        encode(&self.cluster.run_as_leader(op).await)
    }
}
