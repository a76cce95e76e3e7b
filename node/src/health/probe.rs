//! One health check: a TCP connect, or an HTTP request whose status (and
//! optionally body) must match. Each check is a fresh connection, closed
//! after the answer, from the node's source address if it has one.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use raftlb_proto::spec::{CheckType, HealthCheck};

use super::{now_ms, CheckResult};
use crate::dataplane::connect::dial;

/// The most of a response body an `expect_body` check reads.
const BODY_LIMIT: usize = 64 << 10;

/// Where and how to check one server; a change of any part restarts its checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The server's traffic address.
    pub server: SocketAddr,
    /// The address checked: the server's, or its `port` override.
    pub addr: SocketAddr,
    pub check: HealthCheck,
    pub timeout: Duration,
    pub source: Option<IpAddr>,
}

pub async fn run(target: &Target) -> CheckResult {
    let started = Instant::now();
    let outcome = match tokio::time::timeout(target.timeout, attempt(target)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {:?}", target.timeout)),
    };
    let ok = outcome.is_ok();
    let detail = outcome.unwrap_or_else(|e| e);
    CheckResult { ok, detail, latency: started.elapsed(), at_ms: now_ms() }
}

async fn attempt(target: &Target) -> Result<String, String> {
    let stream = dial(target.addr, target.source, target.timeout).await.map_err(|e| e.to_string())?;
    match target.check.kind {
        CheckType::Tcp => Ok("connected".to_owned()),
        CheckType::Http => http(stream, target).await,
    }
}

async fn http(stream: tokio::net::TcpStream, target: &Target) -> Result<String, String> {
    let check = &target.check;
    let method = Method::from_bytes(check.method.as_bytes()).map_err(|_| format!("{:?} is not an HTTP method", check.method))?;
    let host = check.host.clone().unwrap_or_else(|| target.addr.to_string());
    let req = Request::builder()
        .method(method)
        .uri(&check.path)
        .header(HOST, host)
        .header(USER_AGENT, concat!("raftlb-check/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the check request: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP: {e}"))?;
    let exchange = async move {
        let resp = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status().as_u16();
        if !check.expect_status.contains(status) {
            return Err(format!("HTTP {status}, expected {}", check.expect_status));
        }
        if let Some(want) = &check.expect_body {
            let body =
                Limited::new(resp.into_body(), BODY_LIMIT).collect().await.map_err(|e| format!("HTTP {status}, body: {e}"))?.to_bytes();
            if !contains(&body, want.as_bytes()) {
                return Err(format!("HTTP {status}, the body lacks {want:?}"));
            }
        }
        Ok(format!("HTTP {status}"))
    };
    // The connection is driven here, not in a task of its own, so a check
    // that times out leaves nothing behind.
    let (outcome, _) = tokio::join!(exchange, conn);
    outcome
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
