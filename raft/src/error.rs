//! What can go wrong when the cluster is asked to do something. Each message
//! tells the operator what happened and what to do; the errors cross the wire
//! when a follower forwards an operation to the leader.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ClusterError {
    #[error("node {node} is not part of a cluster yet: run `lbctl cluster init` on it to start one, or `lbctl node add {node} ADDR` on a member to join it")]
    NotInitialized { node: u64 },

    #[error("the cluster is already initialized (node {node} is a member; leader: {leader}, term {term}); to join another node use `lbctl node add`")]
    AlreadyInitialized { node: u64, leader: String, term: u64 },

    #[error(
        "no leader was elected within {waited_ms} ms: fewer than a quorum of the voters ({voters}) are reachable; start the stopped nodes"
    )]
    NoLeader { waited_ms: u64, voters: String },

    #[error("the leader (node {leader}) could not commit within {waited_ms} ms: fewer than a quorum of the voters ({voters}) acknowledge it; start the stopped nodes")]
    NoQuorum { leader: u64, waited_ms: u64, voters: String },

    /// Leadership moved while the operation was on its way; the caller retries.
    #[error("node {node} is no longer the leader")]
    NotLeader { node: u64 },

    /// The operation does not fit the cluster as it is; nothing changed.
    #[error("{0}")]
    Rejected(String),

    #[error("storage failed on node {node}: {reason}")]
    Storage { node: u64, reason: String },

    #[error("the Raft engine on node {node} stopped: {reason}; restart the node")]
    Fatal { node: u64, reason: String },
}
