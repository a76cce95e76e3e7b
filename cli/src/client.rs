//! The connection to one node's admin API, and how its failures read.

use std::time::Duration;

use anyhow::anyhow;
use raftlb_proto::admin::admin_client::AdminClient;
use raftlb_proto::admin::{self, ConnectError};
use tonic::transport::Channel;

pub struct Client {
    pub admin: AdminClient<Channel>,
    endpoint: String,
    timeout: Duration,
}

impl Client {
    pub async fn connect(endpoint: &str, timeout: Duration) -> anyhow::Result<Client> {
        let admin = admin::connect(endpoint, timeout.min(Duration::from_secs(3))).await.map_err(|e| match e {
            ConnectError::BadAddress(_) => anyhow!("--endpoint {e}"),
            ConnectError::Unreachable(why) => {
                anyhow!("cannot reach lbnode at {endpoint}: {why}; is it running there? (set --endpoint or LBCTL_ENDPOINT)")
            }
        })?;
        Ok(Client { admin, endpoint: endpoint.to_owned(), timeout })
    }

    /// Wraps a message into a request bounded by `--timeout`.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// Turns a failed call into one line for the operator.
    pub fn fail(&self, status: tonic::Status) -> anyhow::Error {
        match status.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                anyhow!("lbnode at {} did not answer within {:?} (--timeout)", self.endpoint, self.timeout)
            }
            tonic::Code::Unavailable if status.message().contains("transport") || status.message().contains("connect") => {
                anyhow!("lost the connection to lbnode at {}: {}", self.endpoint, status.message())
            }
            _ => anyhow!("{}", status.message()),
        }
    }
}
