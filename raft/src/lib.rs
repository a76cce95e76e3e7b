//! The Raft group of raftlb: openraft's type configuration, the sled-backed
//! log store and state machine, the gRPC transport between nodes, and
//! [`Cluster`], the handle the node uses to run and change the group.

mod cluster;
mod election;
mod error;
pub mod health;
mod network;
mod service;
pub mod state;
pub mod store;

use std::io::Cursor;

pub use cluster::{Cluster, Handover, MemberRole, MemberStatus, Membership, Settings, Status};
pub use error::ClusterError;
pub use health::{AdminState, HealthState, ObservedChange, ServerHealth};
pub use state::{ClusterState, Command, CommandResult, ConfigVersion, NodeInfo, VipAssignment};
pub use store::Applied;

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of raftlb: commands change the cluster state.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
