//! Types shared by `lbnode` and `lbctl`: the generated gRPC code for the Raft
//! transport and the admin API, and the cluster spec with its validation.

pub mod spec;

/// Node-to-node Raft transport.
pub mod raft {
    tonic::include_proto!("raftlb.raft");
}

/// The admin API that `lbctl` speaks.
pub mod admin {
    use std::time::Duration;

    use admin_client::AdminClient;
    use tonic::transport::{Channel, Endpoint};

    tonic::include_proto!("raftlb.admin");

    #[derive(Debug, thiserror::Error)]
    pub enum ConnectError {
        #[error("{0:?} is not an address: write it as HOST:PORT, like 127.0.0.1:7001")]
        BadAddress(String),
        /// The innermost cause, like "Connection refused (os error 111)".
        #[error("{0}")]
        Unreachable(String),
    }

    /// Connects to the admin API of the node at `addr` (HOST:PORT or a URI).
    pub async fn connect(addr: &str, timeout: Duration) -> Result<AdminClient<Channel>, ConnectError> {
        let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        let endpoint = Endpoint::from_shared(uri).map_err(|_| ConnectError::BadAddress(addr.to_owned()))?.connect_timeout(timeout);
        let channel = endpoint.connect().await.map_err(|e| {
            let mut cause: &(dyn std::error::Error + 'static) = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            ConnectError::Unreachable(cause.to_string())
        })?;
        Ok(AdminClient::new(channel))
    }
}

/// The software version every node reports into the node registry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
