//! Servers for the balancer to send traffic to, run by the test itself on
//! loopback: an HTTP server that answers with its name and what it received,
//! one that sends raw responses, and a TCP server that announces its name and
//! echoes. Each runs on its own thread and stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct TestServer {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests (HTTP) or connections (TCP) received.
    pub hits: Arc<AtomicU64>,
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    /// Connections accepted in all.
    pub accepted: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct OpenGuard(Arc<AtomicU64>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn spawn_server<F, Fut>(name: &str, addr: &str, serve: F) -> TestServer
where
    F: Fn(tokio::net::TcpStream, String, Arc<AtomicU64>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let hits = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (name_owned, addr_owned, hits2, open2, accepted2) =
        (name.to_owned(), addr.to_owned(), hits.clone(), open.clone(), accepted.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind(&addr_owned).await.expect("the test server binds");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let accept = async {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    open2.fetch_add(1, Relaxed);
                    accepted2.fetch_add(1, Relaxed);
                    let guard = OpenGuard(open2.clone());
                    let fut = serve(stream, name_owned.clone(), hits2.clone());
                    tokio::spawn(async move {
                        fut.await;
                        drop(guard);
                    });
                }
            };
            tokio::select! { _ = accept => {}, _ = stop_rx => {} }
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(5)).expect("the test server starts");
    TestServer { name: name.to_owned(), addr, hits, open, accepted, stop: Some(stop_tx) }
}

/// An HTTP/1.1 server on `addr` (use port 0 for any). It answers every
/// request, after reading its body, with a JSON body `{"server", "method",
/// "path", "headers", "body_bytes"}`, and: `/stall` never answers;
/// `/slow?ms=N` answers after N ms; `/big?mb=N` answers N MiB; `/empty`
/// answers 204 with no body; an Upgrade request gets 101 and then an echo of
/// the bytes that follow, and so does a CONNECT with 200, unless it is to
/// `refuse.test`, which gets 403.
pub fn http_server(name: &str, addr: &str) -> TestServer {
    spawn_server(name, addr, |stream, name, hits| async move {
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let (name, hits) = (name.clone(), hits.clone());
            async move {
                hits.fetch_add(1, Relaxed);
                let path = req.uri().path().to_owned();
                if path == "/stall" {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if path == "/slow" {
                    let ms: u64 = req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(100);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if path == "/empty" {
                    return Ok::<_, Infallible>(Response::builder().status(204).body(Full::new(Bytes::new())).unwrap());
                }
                if req.method() == hyper::Method::CONNECT {
                    if req.uri().host() == Some("refuse.test") {
                        return Ok(Response::builder().status(403).body(Full::new(Bytes::from_static(b"not there"))).unwrap());
                    }
                    echo_once_upgraded(hyper::upgrade::on(&mut req));
                    return Ok(Response::new(Full::new(Bytes::new())));
                }
                if req.headers().contains_key(hyper::header::UPGRADE) {
                    echo_once_upgraded(hyper::upgrade::on(&mut req));
                    return Ok(Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(Full::new(Bytes::new()))
                        .unwrap());
                }
                if let Some(mb) =
                    req.uri().query().and_then(|q| q.strip_prefix("mb=")).and_then(|v| v.parse::<usize>().ok()).filter(|_| path == "/big")
                {
                    return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; mb << 20]))));
                }
                let headers: serde_json::Map<String, serde_json::Value> =
                    req.headers().iter().map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("")))).collect();
                let method = req.method().as_str().to_owned();
                // A request body is read whole before the answer, as an upload handler would.
                let received = http_body_util::BodyExt::collect(req.into_body()).await.map(|b| b.to_bytes().len()).unwrap_or(0);
                let body =
                    serde_json::json!({ "server": name, "method": method, "path": path, "headers": headers, "body_bytes": received });
                Ok(Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body.to_string()))).unwrap())
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
    })
}

/// Echoes the bytes that follow on a connection once it is upgraded.
fn echo_once_upgraded(upgrade: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
}

/// A TCP server that first sends back what arrived before its greeting
/// would be due (a PROXY protocol header, if any, up to 200 ms), then
/// `hello from NAME\n`, then echoes until the client half-closes, and then
/// writes `bye\n` and closes.
pub fn tcp_server(name: &str, addr: &str) -> TestServer {
    spawn_server(name, addr, |mut stream, name, hits| async move {
        hits.fetch_add(1, Relaxed);
        let mut first = vec![0u8; 512];
        let n = match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut first)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        let mut greeting = format!("hello from {name}\n").into_bytes();
        if n > 0 {
            greeting = [b"preface ".as_slice(), &first[..n], b"\n", &greeting].concat();
        }
        if stream.write_all(&greeting).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let _ = stream.write_all(b"bye\n").await;
        let _ = stream.shutdown().await;
    })
}

/// Reads up to the end of a request head (and whatever came with it); `None`
/// if the connection ends or fails first.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Responses that caches may or may not keep: `/cache/NAME` on a
/// [`raw_http_server`] answers with the head named NAME and a 5-byte body.
pub const CACHE_CASES: &[(&str, &str)] = &[
    ("none", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    ("public", "HTTP/1.1 200 OK\r\nCache-Control: public\r\nContent-Length: 5\r\n\r\n"),
    ("max-age", "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\n"),
    ("s-maxage", "HTTP/1.1 200 OK\r\nCache-Control: s-maxage=60\r\nContent-Length: 5\r\n\r\n"),
    ("expires", "HTTP/1.1 200 OK\r\nExpires: Thu, 01 Jan 2099 00:00:00 GMT\r\nContent-Length: 5\r\n\r\n"),
    ("etag", "HTTP/1.1 200 OK\r\nETag: \"x\"\r\nContent-Length: 5\r\n\r\n"),
    ("last-modified", "HTTP/1.1 200 OK\r\nLast-Modified: Sat, 01 Jan 2000 00:00:00 GMT\r\nContent-Length: 5\r\n\r\n"),
    ("max-age-0", "HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nContent-Length: 5\r\n\r\n"),
    ("max-age-0-s-maxage", "HTTP/1.1 200 OK\r\nCache-Control: max-age=0, s-maxage=60\r\nContent-Length: 5\r\n\r\n"),
    ("no-cache", "HTTP/1.1 200 OK\r\nCache-Control: max-age=60, no-cache\r\nContent-Length: 5\r\n\r\n"),
    ("private-upper", "HTTP/1.1 200 OK\r\nCache-Control: Max-Age=60 , PRIVATE\r\nContent-Length: 5\r\n\r\n"),
    ("no-store-apart", "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nCache-Control: no-store\r\nContent-Length: 5\r\n\r\n"),
    ("no-cache-set-cookie", "HTTP/1.1 200 OK\r\nCache-Control: max-age=60, no-cache=\"set-cookie\"\r\nContent-Length: 5\r\n\r\n"),
    ("pragma", "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nPragma: no-cache\r\nContent-Length: 5\r\n\r\n"),
    ("found", "HTTP/1.1 302 Found\r\nLocation: /\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\n"),
    ("not-found", "HTTP/1.1 404 Not Found\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\n"),
];

/// Bytes of the very form the proxy's HTTP library writes by itself when a
/// client's request head does not parse.
pub const ERROR_FORM: &str =
    "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 23 Nov 2026 06:15:18 GMT\r\n\r\n";

/// A server that answers each request with the raw response its path names,
/// for responses a well-behaved server would not send: `/bad-chunk` (a chunk
/// size that does not parse), `/folded` (an obsolete folded header),
/// `/lengths` (`Content-Length: 5, 5`), `/space-before-colon`,
/// `/own-cookie-no-store` (its own `SRV` cookie and `no-store`),
/// `/cache/CASE` (a head of [`CACHE_CASES`]), `/error-form` (a body of
/// `abc` then, 100 ms later, [`ERROR_FORM`]); any other path gets a chunked
/// `hello`, whose body for `/late` follows 100 ms after the head. One
/// request per connection.
pub fn raw_http_server(name: &str, addr: &str) -> TestServer {
    spawn_server(name, addr, |mut stream, _name, hits| async move {
        let Some(request) = read_head(&mut stream).await else { return };
        hits.fetch_add(1, Relaxed);
        let path = String::from_utf8_lossy(&request).split_whitespace().nth(1).unwrap_or_default().to_owned();
        if path == "/error-form" {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nabc", 3 + ERROR_FORM.len());
            let _ = stream.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = stream.write_all(ERROR_FORM.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, body) = match path.as_str() {
            "/bad-chunk" => (chunked, "zz\r\nhello\r\n0\r\n\r\n"),
            "/folded" => ("HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nContent-Length: 5\r\n\r\n", "hello"),
            "/lengths" => ("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", "hello"),
            "/space-before-colon" => ("HTTP/1.1 200 OK\r\nX-A : one\r\nContent-Length: 5\r\n\r\n", "hello"),
            "/own-cookie-no-store" => (
                "HTTP/1.1 200 OK\r\nSet-Cookie: SRV=app; path=/\r\nSet-Cookie: SRVX=1\r\nCache-Control: no-store\r\nContent-Length: 5\r\n\r\n",
                "hello",
            ),
            cache if cache.starts_with("/cache/") => match CACHE_CASES.iter().find(|(case, _)| cache.strip_prefix("/cache/") == Some(*case)) {
                Some((_, head)) => (*head, "hello"),
                None => ("HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\n", "hello"),
            },
            _ => (chunked, "5\r\nhello\r\n0\r\n\r\n"),
        };
        if path == "/late" {
            let _ = stream.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = stream.write_all(body.as_bytes()).await;
        } else {
            let _ = stream.write_all(format!("{head}{body}").as_bytes()).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
}

/// How a [`CheckGate`] answers health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// `200 OK` to every check.
    Pass,
    /// Every check's connection is closed at once.
    Fail,
    /// Each source address gets pass, fail, pass, fail, ... in turn.
    Flap,
}

/// A health-check endpoint for a server (`health_check.port`): answers an
/// HTTP check with 200 or closes the connection, by its mode and by the
/// source address, so one node can be cut off while the others pass. Counts
/// the checks from each source address.
pub struct CheckGate {
    pub addr: SocketAddr,
    state: Arc<std::sync::Mutex<GateState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct GateState {
    mode: Option<GateMode>,
    blocked: std::collections::HashSet<std::net::IpAddr>,
    checks: std::collections::HashMap<std::net::IpAddr, u64>,
}

impl CheckGate {
    pub fn start(addr: &str) -> CheckGate {
        let state = Arc::new(std::sync::Mutex::new(GateState { mode: Some(GateMode::Pass), ..Default::default() }));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_owned, shared) = (addr.to_owned(), state.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind(&addr_owned).await.expect("the check gate binds");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((mut stream, peer)) = listener.accept().await else { continue };
                        let pass = {
                            let mut st = shared.lock().unwrap();
                            let n = st.checks.entry(peer.ip()).or_insert(0);
                            *n += 1;
                            let turn = *n;
                            !st.blocked.contains(&peer.ip())
                                && match st.mode.unwrap_or(GateMode::Pass) {
                                    GateMode::Pass => true,
                                    GateMode::Fail => false,
                                    GateMode::Flap => turn % 2 == 1,
                                }
                        };
                        if !pass {
                            continue;
                        }
                        tokio::spawn(async move {
                            if read_head(&mut stream).await.is_none() {
                                return;
                            }
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                        });
                    }
                };
                tokio::select! { _ = accept => {}, _ = stop_rx => {} }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(5)).expect("the check gate starts");
        CheckGate { addr, state, stop: Some(stop_tx) }
    }

    pub fn set(&self, mode: GateMode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    /// Closes every check from `ip` at once, whatever the mode.
    pub fn block(&self, ip: std::net::IpAddr) {
        self.state.lock().unwrap().blocked.insert(ip);
    }

    /// Checks received from `ip`.
    pub fn checks_from(&self, ip: std::net::IpAddr) -> u64 {
        self.state.lock().unwrap().checks.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for CheckGate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
