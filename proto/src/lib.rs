//! Types shared by `lbnode` and `lbctl`: the generated gRPC code for the Raft
//! transport and the admin API, and the cluster spec with its validation.

pub mod spec;

/// Node-to-node Raft transport.
pub mod raft {
    tonic::include_proto!("raftlb.raft");
}

/// The admin API that `lbctl` speaks.
pub mod admin {
    tonic::include_proto!("raftlb.admin");
}

/// The software version every node reports into the node registry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
