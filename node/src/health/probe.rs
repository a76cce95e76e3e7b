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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use raftlb_proto::spec::Spec;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers every connection with `response` after the
    /// request head, and keeps the last head it read.
    async fn answering(response: &'static str) -> (SocketAddr, Arc<Mutex<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let last = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let last = last.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    *last.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (addr, seen)
    }

    fn target(addr: SocketAddr, check: &str) -> Target {
        let yaml = format!("backends:\n  - name: b\n    health_check: {check}\n    servers: []\n");
        let spec = Spec::from_yaml(&yaml).unwrap();
        let check = spec.backends[0].health_check.clone().unwrap();
        Target { server: addr, addr, check, timeout: Duration::from_millis(500), source: None }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nstatus: good";

    #[tokio::test]
    async fn an_http_check_matches_status_and_body_and_sends_method_path_and_host() {
        let (addr, seen) = answering(OK).await;
        let ok = run(&target(addr, "{ type: http, method: HEAD, path: /ping, host: api.example.com }")).await;
        assert!(ok.ok && ok.detail == "HTTP 200", "{ok:?}");
        let head = seen.lock().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("head /ping http/1.1\r\n") && head.contains("\r\nhost: api.example.com\r\n"), "{head}");
        let ok = run(&target(addr, "{ type: http, expect_body: good }")).await;
        assert!(ok.ok, "{ok:?}");
        let lacks = run(&target(addr, "{ type: http, expect_body: bad }")).await;
        assert!(!lacks.ok && lacks.detail == "HTTP 200, the body lacks \"bad\"", "{lacks:?}");
        let status = run(&target(addr, "{ type: http, expect_status: 300-399 }")).await;
        assert!(!status.ok && status.detail == "HTTP 200, expected 300-399", "{status:?}");
        let _ = run(&target(addr, "{ type: http }")).await;
        let head = seen.lock().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get / http/1.1\r\n") && head.contains(&format!("\r\nhost: {addr}\r\n")), "defaults: {head}");
    }

    #[tokio::test]
    async fn a_tcp_check_fails_on_a_refused_connect_and_a_silent_server_times_out() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let refused = run(&target(closed, "{ type: tcp }")).await;
        assert!(!refused.ok && refused.detail.contains("refused"), "{refused:?}");
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = run(&target(open.local_addr().unwrap(), "{ type: tcp }")).await;
        assert!(up.ok && up.detail == "connected", "{up:?}");
        // Accepts (the kernel does) but never answers an HTTP check.
        let silent = run(&target(open.local_addr().unwrap(), "{ type: http }")).await;
        assert!(!silent.ok && silent.detail.starts_with("no answer within"), "{silent:?}");
        assert!(silent.latency >= Duration::from_millis(500));
    }
}
