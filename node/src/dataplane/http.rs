//! HTTP mode (HTTP/1.1 on both sides, hyper 1): routing rules, header edits,
//! X-Forwarded-*, cookie persistence, a per-server pool of backend
//! connections that honours `http_reuse`, WebSocket/Upgrade tunnels, and
//! HAProxy's error answers (400, 408, 431 to clients; 502, 503, 504 for
//! server trouble).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use raftlb_proto::spec::{CookieMode, HttpReuse};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::connect::{dial, with_retries, Failure};
use super::pipe::pipe;
use super::runtime::{BackendRt, FrontendRt, Lease, Runtime, RuntimeWatch};
use super::{workers, Held};
use crate::stats::Counters;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;
/// A connection to a server, carrying clients' requests.
type Upstream = SendRequest<RequestBody>;

/// Idle connections to one server, kept for reuse: one list per worker, as
/// a connection belongs to the worker whose runtime drives it.
pub struct Pool {
    idle: Box<[Mutex<Vec<Upstream>>]>,
}

const NO_SERVER: &str = "No server is available to handle this request.";
const BAD_REQUEST: &str = "Your browser sent an invalid request.";
const REQUEST_TIMEOUT: &str = "Your browser didn't send a complete request in time.";
const HEAD_TOO_LARGE: &str = "Your browser sent a request whose headers are too large.";
const URI_TOO_LONG: &str = "Your browser sent a request whose URI is too long.";

/// Idle connections kept per server.
const POOL_LIMIT: usize = 256;
/// How long a pooled connection may take to be ready before a new one is opened.
const POOL_READY: Duration = Duration::from_millis(20);
/// Largest request head a client may send: larger gets 431.
const MAX_HEAD: usize = 64 * 1024;

impl Pool {
    pub fn new(workers: usize) -> Self {
        Pool { idle: (0..workers.max(1)).map(|_| Mutex::default()).collect() }
    }

    fn mine(&self) -> &Mutex<Vec<Upstream>> {
        &self.idle[workers::current() % self.idle.len()]
    }

    /// The most recently used open connection of this worker. It may still be
    /// finishing its last exchange: the caller waits for it to be ready.
    fn take(&self) -> Option<Upstream> {
        let mut idle = self.mine().lock().expect("pool lock");
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: Upstream) {
        let mut idle = self.mine().lock().expect("pool lock");
        if idle.len() < POOL_LIMIT && !sender.is_closed() {
            idle.push(sender);
        }
    }
}

/// One client connection: what every request on it shares.
struct Client {
    /// The spec in force as this connection last saw it, with the receiver
    /// that tells when a newer one arrived. Checking for a change only reads;
    /// taking the watch's lock on every request made both workers fight over it.
    runtime: Mutex<Spec>,
    local: SocketAddr,
    peer: SocketAddr,
    conn: Arc<ConnState>,
    /// The wait for a server's response head, for one request at a time.
    server_wait: Mutex<IdleTimer>,
    /// With `http_reuse: never`, this client's own connection to a server,
    /// kept for its next requests and closed with it, never shared.
    own: Mutex<Option<Own>>,
    /// Kept until the connection and any tunnel it became have ended.
    held: Held,
}

/// A connection that belongs to one client.
struct Own {
    server: SocketAddr,
    sender: Upstream,
}

/// Where a connection goes once its response is complete.
enum Home {
    /// The server's pool, shared by every client of the worker.
    Pool,
    /// Back to the client that used it (`http_reuse: never`).
    Client(Arc<Client>),
}

/// What the connection's socket and its requests both see.
#[derive(Default)]
struct ConnState {
    /// Requests whose response (or tunnel) is not finished yet.
    in_flight: AtomicU64,
    /// A request head did not arrive whole within `timeouts.http_request`.
    head_timed_out: AtomicBool,
    /// The client asked to close the connection after this response.
    closing: AtomicBool,
    /// Requests handed to the service so far (`http_reuse: safe` keeps the
    /// first on its own connection; a write with none since the last is not
    /// an answer to one of them).
    served: AtomicU64,
    /// A request's response gave its last bytes to hyper, which may not have
    /// written them yet: the next write is theirs.
    tail: AtomicBool,
}

/// A client connection's view of the spec in force: the version, and the
/// frontend its address belongs to there.
struct Spec {
    receiver: RuntimeWatch,
    runtime: Option<Arc<Runtime>>,
    frontend: Option<Arc<FrontendRt>>,
}

/// A wait that went on past its limit.
struct TimedOut;

impl Client {
    /// `fut`, given up after `limit`. A connection's requests come one at a
    /// time and share one timer, left at an earlier deadline rather than
    /// moved (see [`IdleTimer::poll_until`]): no timer is set and cleared
    /// for each request.
    async fn within<F: Future>(&self, limit: Duration, fut: F) -> Result<F::Output, TimedOut> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let mut timer = self.server_wait.lock().expect("server wait lock");
            timer.poll_until(deadline, cx).map(|()| Err(TimedOut))
        })
        .await
    }

    /// The spec in force now, and this connection's frontend in it.
    fn current(&self) -> Option<(Arc<Runtime>, Arc<FrontendRt>)> {
        let mut guard = self.runtime.lock().expect("runtime cache lock");
        let spec = &mut *guard;
        if spec.receiver.has_changed().unwrap_or(false) {
            let newer = spec.receiver.borrow_and_update().clone();
            // The first look at the receiver may find the version already in use.
            let same = matches!((&newer, &spec.runtime), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
            if !same {
                spec.frontend = newer.as_ref().and_then(|rt| rt.by_bind.get(&self.local).cloned());
                spec.runtime = newer;
            }
        }
        Some((spec.runtime.clone()?, spec.frontend.clone()?))
    }
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(conn: &Arc<ConnState>) -> Self {
        conn.in_flight.fetch_add(1, Relaxed);
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        self.0.tail.store(true, Relaxed);
    }
}

/// Serves one client connection until it closes.
/// `rt` is the spec version `fe` belongs to; `runtime` tells of newer ones.
pub async fn serve(
    runtime: RuntimeWatch,
    rt: Arc<Runtime>,
    fe: Arc<FrontendRt>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    held: Held,
) {
    let (head_timeout, idle_timeout, client_timeout) =
        (rt.timeouts.http_request.get(), rt.timeouts.http_keep_alive.get(), rt.timeouts.client.get());
    let server_timeout = rt.timeouts.server.get();
    // The connection's I/O ends it when a request head times out, and
    // HAProxy's answer to that is a 408: the socket comes back here when
    // hyper drops it, to write that answer.
    let returned = Arc::new(Mutex::new(None));
    let conn = Arc::new(ConnState::default());
    let io = ClientIo {
        inner: Some(ClientSocket::Direct(stream)),
        returned: returned.clone(),
        head: head_timeout,
        idle: idle_timeout,
        waiting_since: tokio::time::Instant::now(),
        head_started: None,
        kept_alive: false,
        wait: IdleTimer::new(head_timeout),
        write_blocked: IdleTimer::new(client_timeout),
        served_at_write: 0,
        write_unfinished: false,
        page: None,
        conn: conn.clone(),
        counters: fe.counters.clone(),
    };
    let spec = Spec { receiver: runtime, frontend: Some(fe.clone()), runtime: Some(rt) };
    let client = Arc::new(Client {
        runtime: Mutex::new(spec),
        local,
        peer,
        conn: conn.clone(),
        server_wait: Mutex::new(IdleTimer::new(server_timeout)),
        own: Mutex::default(),
        held,
    });
    // `client` itself stays here to the end: the 408 below is still this connection.
    let service = {
        let client = client.clone();
        hyper::service::service_fn(move |req| {
            let client = client.clone();
            async move { Ok::<_, Infallible>(handle(&client, req).await) }
        })
    };
    let result = hyper::server::conn::http1::Builder::new()
        .max_header_size(MAX_HEAD)
        .keep_alive(true)
        // A client may shut its side after its request and still get the
        // response, as with HAProxy; and hyper does not read while a response
        // is on its way, to find whether the client left (HAProxy does not
        // watch for that either unless told to: `option abortonclose`), so a
        // short connection's socket need not be registered with the reactor.
        .half_close(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    match result {
        // No complete head in time: answer 408, as HAProxy does. hyper ends
        // with an error for a started head and quietly for a connection that
        // sent nothing.
        _ if conn.head_timed_out.load(Relaxed) => {
            Counters::add(&fe.counters.errors, 1);
            fe.counters.response(408);
            let reply = canned(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT);
            let socket = returned.lock().expect("returned socket lock").take();
            if let Some(mut stream) = socket.and_then(|s| s.polled().ok()) {
                // Bounded: a client that reads nothing does not keep the connection.
                let _ = tokio::time::timeout(client_timeout, stream.write_all(&reply)).await;
                let _ = stream.shutdown().await;
            }
        }
        Err(e) => {
            Counters::add(&fe.counters.errors, 1);
            tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
        }
        Ok(()) => {}
    }
}

/// The page of an error answer, as HAProxy words them.
fn error_page(status: StatusCode, text: &str) -> String {
    format!("<html><body><h1>{} {}</h1>\n{text}\n</body></html>\n", status.as_u16(), status.canonical_reason().unwrap_or(""))
}

/// A whole HTTP/1.1 error response, for the one case written outside hyper.
fn canned(status: StatusCode, text: &str) -> Vec<u8> {
    let body = error_page(status, text);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/html\r\ncontent-length: {}\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// An error answer after which the connection cannot go on (the request was
/// malformed or not read whole): hyper closes it once this is written.
fn last_answer(client: &Client, status: StatusCode, text: &str) -> Response<ProxyBody> {
    client.conn.closing.store(true, Relaxed);
    let mut response = error_response(status, text);
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn error_response(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let body = error_page(status, text);
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("a static response is well formed")
}

async fn handle(client: &Arc<Client>, req: Request<Incoming>) -> Response<ProxyBody> {
    let first = client.conn.served.fetch_add(1, Relaxed) == 0;
    if asks_to_close(&req) {
        // hyper closes the connection after this response: no wait for another.
        client.conn.closing.store(true, Relaxed);
    }
    let in_flight = InFlight::new(&client.conn);
    // Each request is served with the spec in force when it arrives.
    let Some((rt, fe)) = client.current() else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_SERVER);
    };
    let connect = req.method() == hyper::Method::CONNECT;
    let mut response = route_and_forward(&rt, &fe, client, req, first, in_flight).await;
    fe.counters.response(response.status().as_u16());
    // The node stops (or began to while this request was served): the last
    // response of this connection (hyper closes it after).
    if super::stopping() && !opens_tunnel(connect, response.status()) {
        client.conn.closing.store(true, Relaxed);
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

enum Route<'a> {
    Deny(u16),
    Backend(&'a str),
    Nowhere,
}

/// One host for the rules and the server, as HAProxy settles it: `Host`
/// headers that disagree, or a `Host` header that disagrees with an
/// absolute-form target's authority (which the server takes, RFC 9112
/// 3.2.2), make a malformed request; repeated equal `Host` headers become one.
fn settle_host(req: &mut Request<Incoming>) -> Result<(), ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else { return Ok(()) };
    let mut repeated = false;
    for other in hosts {
        if !other.as_bytes().eq_ignore_ascii_case(host.as_bytes()) {
            return Err(());
        }
        repeated = true;
    }
    if let Some(authority) = req.uri().authority() {
        // A scheme's default port is no part of the comparison (`http://a:80/` is `a`).
        let default_port = if req.uri().scheme() == Some(&hyper::http::uri::Scheme::HTTPS) { ":443" } else { ":80" };
        let bare = |h: &[u8]| h.strip_suffix(default_port.as_bytes()).unwrap_or(h).to_ascii_lowercase();
        if bare(host.as_bytes()) != bare(authority.as_str().as_bytes()) {
            return Err(());
        }
    }
    if repeated {
        let host = host.clone();
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

fn route<'a>(fe: &'a FrontendRt, req: &Request<Incoming>, peer: SocketAddr) -> Route<'a> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| h.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(h, |(name, _)| name));
    for rule in &fe.spec.rules {
        let w = &rule.when;
        let matches = w.host.as_ref().is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
            && w.path_prefix.as_ref().is_none_or(|p| req.uri().path().starts_with(p.as_str()))
            && w.header.as_ref().is_none_or(|m| req.headers().get_all(m.name.as_str()).iter().any(|v| v.as_bytes() == m.value.as_bytes()))
            && (w.src.is_empty() || w.src.iter().any(|net| net.0.contains(&peer.ip())))
            && !w.src_not.iter().any(|net| net.0.contains(&peer.ip()));
        if matches {
            return match (rule.deny, &rule.use_backend) {
                (Some(status), _) => Route::Deny(status),
                (None, Some(name)) => Route::Backend(name),
                (None, None) => Route::Nowhere,
            };
        }
    }
    fe.spec.default_backend.as_deref().map_or(Route::Nowhere, Route::Backend)
}

async fn route_and_forward(
    rt: &Arc<Runtime>,
    fe: &Arc<FrontendRt>,
    client: &Arc<Client>,
    mut req: Request<Incoming>,
    first: bool,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    if settle_host(&mut req).is_err() {
        Counters::add(&fe.counters.errors, 1);
        return last_answer(client, StatusCode::BAD_REQUEST, BAD_REQUEST);
    }
    if !req.body().is_end_stream() && codes_beyond_chunked(req.headers()) {
        // The body goes on chunked: another coding would be lost on the way.
        Counters::add(&fe.counters.errors, 1);
        return last_answer(client, StatusCode::UNPROCESSABLE_ENTITY, "The server cannot process the contained instructions.");
    }
    let be = match route(fe, &req, client.peer) {
        Route::Deny(status) => {
            Counters::add(&fe.counters.denied, 1);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            return error_response(status, "Request forbidden by administrative rules.");
        }
        Route::Backend(name) => match rt.backends.get(name) {
            Some(be) => be.clone(),
            None => return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_SERVER),
        },
        Route::Nowhere => return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_SERVER),
    };
    let upgrade = wants_upgrade(req.headers());
    // An Upgrade (WebSocket) or a CONNECT becomes a tunnel if the server agrees.
    let connect = req.method() == hyper::Method::CONNECT;
    let tunnel = upgrade || connect;
    let client_upgrade = tunnel.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if req.version() == hyper::Version::HTTP_10 && !tunnel {
        // The server keeps its connection for the next request, whatever the
        // HTTP/1.0 client does with its own, as HAProxy asks it to.
        req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if let Some(edits) = &fe.spec.request_headers {
        for name in &edits.delete {
            req.headers_mut().remove(name.as_str());
        }
        for (name, value) in &edits.set {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                req.headers_mut().insert(n, v);
            }
        }
    }
    if fe.spec.forwardfor {
        forwarded_for(req.headers_mut(), client.peer);
    }
    // HAProxy takes only the answers to these as cacheable (`nocache`).
    let cacheable_method = matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD);
    let cookie_server = be.spec.cookie.as_ref().and_then(|c| cookie_value(req.headers(), &c.name));
    if let Some(c) = be.spec.cookie.as_ref().filter(|c| c.indirect) {
        remove_cookie(req.headers_mut(), &c.name);
    }

    let reuse = match be.spec.http_reuse {
        HttpReuse::Never => false,
        HttpReuse::Safe => !first,
        HttpReuse::Always => true,
    } && !tunnel;
    let (connect_timeout, source) = (rt.timeouts.connect.get(), rt.source);
    let never = be.spec.http_reuse == HttpReuse::Never;
    let got = with_retries(rt, &be, client.peer.ip(), cookie_server.as_deref(), |server| {
        let pooled = if never && !tunnel {
            // The client's own connection, if it goes to this server.
            let mut own = client.own.lock().expect("own connection lock");
            own.take_if(|own| own.server == server.addr).map(|own| own.sender)
        } else if reuse {
            server.pool.take()
        } else {
            None
        };
        let addr = server.addr;
        async move {
            // Right after its last response ended, hyper may not have closed
            // the exchange yet; a pooled connection is ready a moment later.
            if let Some(mut sender) = pooled {
                if let Ok(Ok(())) = tokio::time::timeout(POOL_READY, sender.ready()).await {
                    return Ok(sender);
                }
            }
            handshake(addr, source, connect_timeout, tunnel).await
        }
    })
    .await;
    let (index, lease, mut sender) = match got {
        Ok(got) => got,
        Err(Failure::NoServer(_)) | Err(Failure::Connect) => {
            Counters::add(&fe.counters.errors, 1);
            return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_SERVER);
        }
    };
    let server_session = lease.state.counters.session();
    Counters::add(&be.counters.sessions_total, 1);
    // The backend's and the server's: the frontend's bytes are counted at the client socket.
    let counters = [be.counters.clone(), lease.state.counters.clone()];
    // Most requests have no body: nothing to count, nor to wait for.
    let client_fault = (!req.body().is_end_stream()).then(|| Arc::new(AtomicU8::new(CLIENT_OK)));
    let req = req.map(|body| RequestBody {
        watch: client_fault.as_ref().map(|fault| {
            Box::new(BodyWatch { quiet: IdleTimer::new(rt.timeouts.client.get()), fault: fault.clone(), counters: counters.clone() })
        }),
        inner: body,
    });

    let server_timeout = rt.timeouts.server.get();
    let mut response = match client.within(server_timeout, sender.try_send_request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(mut e)) => match e.take_message() {
            // A pooled connection the server had closed: the request was not sent, so a fresh connection may carry it.
            Some(req) => match handshake(lease.state.addr, source, connect_timeout, tunnel).await {
                Ok(mut fresh) => match client.within(server_timeout, fresh.send_request(req)).await {
                    Ok(Ok(resp)) => {
                        sender = fresh;
                        resp
                    }
                    Ok(Err(_)) => return bad_gateway(fe, &be, &lease),
                    Err(_) => return gateway_timeout(fe, &be, &lease),
                },
                Err(_) => return bad_gateway(fe, &be, &lease),
            },
            None => {
                let fault = client_fault.map_or(CLIENT_OK, |f| f.load(Relaxed));
                if fault == CLIENT_OK {
                    return bad_gateway(fe, &be, &lease);
                }
                // The request body failed on the client's side: not the server's fault.
                Counters::add(&fe.counters.errors, 1);
                return match fault {
                    // It stopped sending its request body for timeouts.client.
                    CLIENT_STALLED => last_answer(client, StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT),
                    // A malformed body (a bad chunk), or the client left mid-body.
                    _ => last_answer(client, StatusCode::BAD_REQUEST, BAD_REQUEST),
                };
            }
        },
        Err(_) => return gateway_timeout(fe, &be, &lease),
    };
    // A chunked body's first chunk mostly comes in with the head: if it does
    // not parse, the response is invalid and nothing has gone to the client
    // yet, so it gets 502, as HAProxy, which parses both in one buffer, answers.
    let first = if response.headers().contains_key(header::TRANSFER_ENCODING) {
        match response.body_mut().frame().now_or_never() {
            Some(Some(Err(_))) => return bad_gateway(fe, &be, &lease),
            peeked => peeked,
        }
    } else {
        None
    };
    let status = response.status();
    be.counters.response(status.as_u16());
    lease.state.counters.response(status.as_u16());

    if opens_tunnel(connect, status) {
        if let Some(client_upgrade) = client_upgrade {
            let server_upgrade = hyper::upgrade::on(&mut response);
            let (idle_limit, be) = (rt.timeouts.tunnel.get(), be.clone());
            let kept = client.clone();
            let tunnel = tokio::spawn(async move {
                // The client connection lives on as this tunnel: it keeps its
                // places, and the server counts it as a session.
                let (_lease, _in_flight, _client, _server_session) = (lease, in_flight, kept, server_session);
                if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                    // The frontend counts the tunnel at the client socket.
                    let up = [&be.counters.bytes_in];
                    let down = [&be.counters.bytes_out];
                    let _ = pipe(TokioIo::new(c), TokioIo::new(s), idle_limit, &up, &down).await;
                }
            });
            client.held.track(tunnel.abort_handle());
            return response.map(|_| Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
        }
    }
    drop(server_session);

    strip_hop_by_hop(response.headers_mut(), false);
    same_lengths_as_one(&mut response);
    // The client's hop is HTTP/1.1 whatever the server spoke.
    *response.version_mut() = hyper::Version::HTTP_11;
    if let Some(cookie) = be.spec.cookie.as_ref().filter(|c| c.mode == CookieMode::Insert) {
        // The persistence cookie is the balancer's: one the server sets under its name goes, as HAProxy drops it.
        remove_set_cookie(response.headers_mut(), &cookie.name);
        let name = &be.servers[index].spec.name;
        if cookie_server.as_deref() != Some(name.as_str()) {
            if let Ok(v) = HeaderValue::from_str(&format!("{}={name}; path=/", cookie.name)) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            // Kept from shared caches, with the server's own directives kept too.
            if cookie.nocache && cacheable_method && cacheable(status, response.headers()) {
                response.headers_mut().append(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
    }
    let home = if never { Home::Client(client.clone()) } else { Home::Pool };
    response.map(|body| {
        let done = Done { _lease: lease, _in_flight: in_flight, sender, home };
        ResponseBody { inner: body, first, quiet: IdleTimer::new(server_timeout), counters, done: Some(done) }.boxed()
    })
}

/// A `Content-Length` listing one length more than once (`2, 2`), which
/// hyper read as that length, goes on as the one length, as HAProxy sends it.
fn same_lengths_as_one(response: &mut Response<Incoming>) {
    let listed = response.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes().contains(&b','));
    if let Some(length) = response.body().size_hint().exact().filter(|_| listed) {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
}

fn bad_gateway(fe: &FrontendRt, be: &BackendRt, lease: &Lease) -> Response<ProxyBody> {
    for c in [&fe.counters, &be.counters, &lease.state.counters] {
        Counters::add(&c.errors, 1);
    }
    error_response(StatusCode::BAD_GATEWAY, "The server returned an invalid or incomplete response.")
}

fn gateway_timeout(fe: &FrontendRt, be: &BackendRt, lease: &Lease) -> Response<ProxyBody> {
    for c in [&fe.counters, &be.counters, &lease.state.counters] {
        Counters::add(&c.errors, 1);
    }
    error_response(StatusCode::GATEWAY_TIMEOUT, "The server didn't respond in time.")
}

/// A new HTTP/1.1 connection to a server. Boxed: it is the rare path, and
/// inline its future would make every request's future larger to move.
fn handshake(
    addr: SocketAddr,
    source: Option<IpAddr>,
    limit: Duration,
    upgrades: bool,
) -> Pin<Box<impl Future<Output = std::io::Result<Upstream>>>> {
    Box::pin(async move {
        let stream = dial(addr, source, limit).await?;
        // A response with an obsolete folded header value gets 502, which RFC
        // 9112 allows a proxy (HAProxy unfolds it instead): unfolding made
        // hyper scan every response header value, about 2% of a request's
        // instructions.
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(ServerIo(stream))).await.map_err(std::io::Error::other)?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(sender)
    })
}

/// A server connection's socket. hyper hands a request over as a list of
/// buffers (the head, then any body chunks), and tokio writes such a list
/// with `writev`, which costs more in the kernel than `send` (the file
/// layer's checks and notifications). Most requests are one buffer: those
/// go out with `send`, a longer list with `sendmsg`.
struct ServerIo(TcpStream);

impl AsyncRead for ServerIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        if let [one] = bufs {
            return Pin::new(&mut self.0).poll_write(cx, one);
        }
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            let stream = &self.0;
            match stream.try_io(tokio::io::Interest::WRITABLE, || socket2::SockRef::from(stream).send_vectored(bufs)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Whether the client's connection ends with this request's response
/// (`Connection: close`, or HTTP/1.0 without keep-alive), as hyper decides.
fn asks_to_close(req: &Request<Incoming>) -> bool {
    let headers = req.headers();
    connection_has(headers, "close") || (req.version() == hyper::Version::HTTP_10 && !connection_has(headers, "keep-alive"))
}

/// Whether a request's `Transfer-Encoding` names a coding besides chunked
/// (like `gzip, chunked`): HAProxy answers such a request 422.
fn codes_beyond_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))))
}

/// Whether a response opens a tunnel: 101 to an Upgrade, 2xx to a CONNECT.
fn opens_tunnel(connect: bool, status: StatusCode) -> bool {
    status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success())
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether a Connection header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// The headers that belong to one hop (RFC 9110 7.6.1), besides those the
/// Connection header names; `strip_hop_by_hop` numbers them in this order.
static HOP_BY_HOP: [HeaderName; 7] =
    [header::CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE];

/// Removes the headers that belong to one hop, and those the Connection
/// header names. An upgrade keeps Connection and Upgrade: the server must see them.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One look at each name finds the hop-by-hop headers there: most
    // messages carry none, or only Connection, and a lookup per name costs more.
    let mut present = 0u8;
    for name in headers.keys() {
        // Names are lower case; a match on the string compares lengths first.
        let i = match name.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "te" => 3,
            "trailer" => 4,
            "transfer-encoding" => 5,
            "upgrade" => 6,
            _ => continue,
        };
        present |= 1 << i;
    }
    if present == 0 && !upgrade {
        return;
    }
    let kept = |name: &HeaderName| upgrade && (name == header::CONNECTION || name == header::UPGRADE);
    if present & 1 != 0 {
        let named: SmallVec<[HeaderName; 4]> = headers
            .get_all(header::CONNECTION)
            .iter()
            // A shortcut for the usual value, one such token on its own.
            .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"keep-alive") && !v.as_bytes().eq_ignore_ascii_case(b"close"))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name no header beyond the fixed list.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !kept(n))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !kept(name) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_owned()))
}

fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').is_none_or(|(k, _)| k != name))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Drops the `Set-Cookie` headers that set the cookie `name`.
fn remove_set_cookie(headers: &mut HeaderMap, name: &str) {
    let sets = |v: &HeaderValue| v.as_bytes().strip_prefix(name.as_bytes()).is_some_and(|rest| rest.trim_ascii_start().starts_with(b"="));
    if !headers.get_all(header::SET_COOKIE).iter().any(sets) {
        return;
    }
    let kept: SmallVec<[HeaderValue; 4]> = headers.get_all(header::SET_COOKIE).iter().filter(|v| !sets(v)).cloned().collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Whether a response to a GET or HEAD is one a cache may keep, as HAProxy
/// decides it for `cookie ... nocache`: a status cacheable by default, no
/// `Pragma: no-cache`, no `Cache-Control` directive `private`, `no-cache`,
/// `no-store`, `max-age=0` or `s-maxage=0` (each matched whole: HAProxy
/// 2.6 takes `no-cache="set-cookie"` as cacheable, and `max-age=0` wins
/// over an `s-maxage`), and something a cache would go by: `max-age` or
/// `s-maxage`, `Expires`, or a validator (`ETag`, `Last-Modified`).
fn cacheable(status: StatusCode, headers: &HeaderMap) -> bool {
    if !matches!(status.as_u16(), 200 | 203 | 204 | 206 | 300 | 301 | 404 | 405 | 410 | 414 | 501) {
        return false;
    }
    if headers.get_all(header::PRAGMA).iter().any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"no-cache")) {
        return false;
    }
    let mut fresh = false;
    for directive in headers.get_all(header::CACHE_CONTROL).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')) {
        let directive = directive.trim_ascii();
        let is = |d: &str| directive.eq_ignore_ascii_case(d.as_bytes());
        if is("private") || is("no-cache") || is("no-store") || is("max-age=0") || is("s-maxage=0") {
            return false;
        }
        let starts = |d: &str| directive.get(..d.len()).is_some_and(|p| p.eq_ignore_ascii_case(d.as_bytes()));
        fresh |= starts("max-age") || starts("s-maxage");
    }
    fresh || [header::EXPIRES, header::ETAG, header::LAST_MODIFIED].iter().any(|h| headers.contains_key(h))
}

/// What a response holds until its body is done: the server slot, and the
/// connection to give back to the pool or to its client.
struct Done {
    _lease: Lease,
    _in_flight: InFlight,
    sender: Upstream,
    home: Home,
}

/// The server's response body on its way to the client: counts bytes, ends
/// with an error when the server is silent for `timeouts.server`, and
/// returns the connection to the pool once the body is complete.
struct ResponseBody {
    inner: Incoming,
    /// What was taken from `inner` before the head went on: its first frame,
    /// or its end (`Some(None)`).
    first: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
    /// The server's silence, limited to `timeouts.server`.
    quiet: IdleTimer,
    counters: [Arc<Counters>; 2],
    done: Option<Done>,
}

impl ResponseBody {
    /// The body is complete: the slot is freed and the connection kept for reuse.
    fn finish(&mut self) {
        let Some(Done { sender, _lease, home, .. }) = self.done.take() else { return };
        match home {
            Home::Pool => _lease.state.pool.put(sender),
            Home::Client(client) if !sender.is_closed() => {
                *client.own.lock().expect("own connection lock") = Some(Own { server: _lease.state.addr, sender });
            }
            Home::Client(_) => {}
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper drops a body that is empty from the start (204, 304, a HEAD
        // answer, `Content-Length: 0`) without polling it: the exchange is
        // complete all the same, and its connection is reused.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match this.first.take() {
            Some(first) => Poll::Ready(first),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    for c in &this.counters {
                        Counters::add(&c.bytes_out, data.len() as u64);
                    }
                }
                this.quiet.activity();
                // hyper stops polling a body that says it ended (a Content-Length
                // body after its last byte): finish here, not only on `None`.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if this.quiet.poll_quiet(cx).is_ready() {
                    this.done = None;
                    for c in &this.counters {
                        Counters::add(&c.errors, 1);
                    }
                    return Poll::Ready(Some(Err(format!("the server sent nothing for {:?}", this.quiet.limit).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's socket, with the timeouts of the wait for a request: a
/// request head must arrive whole within `http_request` of its first byte,
/// and a new connection must send one within `http_request` (else the read
/// fails and the connection is answered 408); a kept-alive connection
/// waiting for its next request ends after `http_keep_alive` (at most
/// `http_request`) as an end of stream, which hyper closes quietly. hyper's
/// own head timer would cost a timer per request; this one timer is reused.
struct ClientIo {
    /// `Some` until dropped, unless registering it with the reactor failed.
    inner: Option<ClientSocket>,
    /// Where the socket goes when hyper drops it.
    returned: Arc<Mutex<Option<ClientSocket>>>,
    head: Duration,
    idle: Duration,
    /// When the wait for the next request began: the connection's start or the last write.
    waiting_since: tokio::time::Instant,
    /// When the first byte read since the last write arrived: a request
    /// head is on its way. `None` while nothing was read since.
    head_started: Option<tokio::time::Instant>,
    /// A response was written: the connection waits as a kept-alive one.
    kept_alive: bool,
    /// The one timer of the wait, for the head or for the idle connection.
    wait: IdleTimer,
    /// A client that stops reading blocks our writes: `timeouts.client` ends it.
    write_blocked: IdleTimer,
    /// The connection's count of requests handed to the service at the last
    /// write: a write with none handed over since answers none of them.
    served_at_write: u64,
    /// The last write left bytes for later (hyper writes them next).
    write_unfinished: bool,
    /// An error page that stands in for hyper's own bodiless answer, and
    /// goes out before anything else.
    page: Option<Bytes>,
    conn: Arc<ConnState>,
    counters: Arc<Counters>,
}

/// A client's socket, read and written directly until a read or a write
/// would block, and only then registered with the worker's reactor: a short
/// connection (its request there at once, its response taken at once, then
/// closed) is served without the two `epoll_ctl` calls a registration and its
/// removal cost, as HAProxy serves it. Going through the reactor first would
/// also wait for it to report the request that is already there.
enum ClientSocket {
    Direct(std::net::TcpStream),
    Polled(TcpStream),
}

impl ClientSocket {
    /// The socket registered with the reactor of the worker running the caller.
    fn polled(self) -> std::io::Result<TcpStream> {
        match self {
            ClientSocket::Direct(stream) => TcpStream::from_std(stream),
            ClientSocket::Polled(stream) => Ok(stream),
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the client socket could not be registered with the reactor")
}

impl ClientIo {
    /// The socket, registered from now on: a read or write found it not ready.
    fn polled(&mut self) -> std::io::Result<Pin<&mut TcpStream>> {
        if let Some(ClientSocket::Direct(_)) = self.inner {
            let direct = self.inner.take().ok_or_else(gone)?;
            self.inner = Some(ClientSocket::Polled(direct.polled()?));
        }
        match self.inner.as_mut() {
            Some(ClientSocket::Polled(stream)) => Ok(Pin::new(stream)),
            _ => Err(gone()),
        }
    }

    /// When the wait for a request ends if none begins: `http_request` after
    /// the start for a new connection, `http_keep_alive` (at most
    /// `http_request`) after the last response for a kept-alive one.
    fn idle_deadline(&self) -> tokio::time::Instant {
        self.waiting_since + if self.kept_alive { self.idle.min(self.head) } else { self.head }
    }

    /// Nothing to read. While no request is in flight, the wait for one is
    /// limited: a started head or a new connection that sent nothing is
    /// answered 408 at its limit (as HAProxy does unless told to ignore such
    /// probes); an idle kept-alive connection ends quietly.
    fn wait_end(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.conn.in_flight.load(Relaxed) > 0 {
            return Poll::Pending;
        }
        let deadline = match self.head_started {
            Some(started) => started + self.head,
            None => self.idle_deadline(),
        };
        std::task::ready!(self.wait.poll_until(deadline, cx));
        if self.kept_alive && self.head_started.is_none() {
            return Poll::Ready(Ok(()));
        }
        self.conn.head_timed_out.store(true, Relaxed);
        let limit = self.head;
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no complete request head within {limit:?}"))))
    }

    /// `n` bytes of a response went out: the wait for the next request
    /// begins. Its timer is set here, as hyper does not read again before
    /// the next wake-up: the timer is that wake-up once it goes off.
    fn wrote(&mut self, n: usize, cx: &mut Context<'_>) {
        self.write_blocked.activity();
        if n > 0 {
            self.head_started = None;
            Counters::add(&self.counters.bytes_out, n as u64);
            self.waiting_since = tokio::time::Instant::now();
            self.kept_alive = true;
            if !self.conn.closing.load(Relaxed) {
                let deadline = self.idle_deadline();
                let _ = self.wait.poll_until(deadline, cx);
            }
        }
    }

    /// The client is not reading: after `timeouts.client` of that, the write fails.
    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.write_blocked.poll_quiet(cx).is_ready() {
            let limit = self.write_blocked.limit;
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the client read nothing for {limit:?}"))));
        }
        Poll::Pending
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.returned.lock() {
            *slot = self.inner.take();
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = match &self.inner {
            Some(ClientSocket::Direct(stream)) => {
                // SAFETY: recv only writes bytes, and only the `n` it wrote are marked filled.
                match socket2::SockRef::from(stream).recv(unsafe { buf.unfilled_mut() }) {
                    Ok(n) => {
                        // SAFETY: recv initialised the first `n` bytes of the unfilled part.
                        unsafe { buf.assume_init(n) };
                        buf.advance(n);
                        Poll::Ready(Ok(()))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.polled()?.poll_read(cx, buf),
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
            // tokio's own read: a short read tells the socket is drained, which
            // saves a read that would only find nothing.
            _ => self.polled()?.poll_read(cx, buf),
        };
        match read {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    self.head_started.get_or_insert_with(tokio::time::Instant::now);
                    Counters::add(&self.counters.bytes_in, n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.wait_end(cx),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.send_page(cx))?;
        if let Some(status) = self.hyper_answer(data) {
            // Taken as written: the page goes out instead, by the flush that
            // follows every write of hyper's.
            let text = match status {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => HEAD_TOO_LARGE,
                StatusCode::URI_TOO_LONG => URI_TOO_LONG,
                _ => BAD_REQUEST,
            };
            self.counters.response(status.as_u16());
            self.page = Some(Bytes::from(canned(status, text)));
            return Poll::Ready(Ok(data.len()));
        }
        self.served_at_write = self.conn.served.load(Relaxed);
        let written = self.send(cx, data);
        self.write_unfinished = !matches!(written, Poll::Ready(Ok(n)) if n == data.len());
        if !self.write_unfinished && self.conn.tail.load(Relaxed) {
            self.conn.tail.store(false, Relaxed);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here but a page.
        self.send_page(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.send_page(cx))?;
        if self.conn.head_timed_out.load(Relaxed) {
            // The 408 goes out first, once hyper has let go of the socket.
            return Poll::Ready(Ok(()));
        }
        match &self.inner {
            Some(ClientSocket::Direct(stream)) => Poll::Ready(stream.shutdown(std::net::Shutdown::Write)),
            _ => self.polled()?.poll_shutdown(cx),
        }
    }
}

impl ClientIo {
    /// Writes to the socket: directly while it takes the bytes, through the
    /// reactor once it would block.
    fn send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let direct = match &self.inner {
            Some(ClientSocket::Direct(stream)) => match std::io::Write::write(&mut &*stream, data) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                other => Some(other),
            },
            _ => None,
        };
        let polled = match direct {
            Some(written) => Poll::Ready(written),
            None => self.polled()?.poll_write(cx, data),
        };
        let written = match polled {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return self.write_pending(cx),
        };
        self.wrote(written, cx);
        Poll::Ready(Ok(written))
    }

    /// Sends what is left of an error page, if any.
    fn send_page(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some(mut page) = self.page.take() {
            let sent = match self.send(cx, &page) {
                Poll::Pending => {
                    self.page = Some(page);
                    return Poll::Pending;
                }
                Poll::Ready(sent) => sent?,
            };
            if sent == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            bytes::Buf::advance(&mut page, sent);
            if !page.is_empty() {
                self.page = Some(page);
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The status of hyper's own answer to a request head it could not parse
    /// (400, 414 or 431, with no body), when `data` is one: HAProxy answers
    /// these with a page, as every other error here. hyper writes such an
    /// answer only when no response is under way, so `data` is taken for one
    /// only then: no request was handed to the service since the last write,
    /// none is in flight, the last response's last bytes are written, and the
    /// last write went out whole.
    fn hyper_answer(&self, data: &[u8]) -> Option<StatusCode> {
        let status = automatic_answer(data)?;
        let quiet = !self.write_unfinished
            && self.conn.in_flight.load(Relaxed) == 0
            && !self.conn.tail.load(Relaxed)
            && self.conn.served.load(Relaxed) == self.served_at_write;
        quiet.then_some(status)
    }
}

/// The status of `data` when it is, whole, an answer of the form hyper
/// writes by itself for a head it cannot parse.
fn automatic_answer(data: &[u8]) -> Option<StatusCode> {
    const FORMS: [(StatusCode, &[u8]); 3] = [
        (StatusCode::BAD_REQUEST, b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: "),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
        ),
        (StatusCode::URI_TOO_LONG, b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: "),
    ];
    // The form ends with the date and the head's end: nothing follows.
    if data.len() > 160 || !data.starts_with(b"HTTP/1.1 4") || !data.ends_with(b" GMT\r\n\r\n") {
        return None;
    }
    FORMS.iter().find(|(_, form)| data.starts_with(form)).map(|(status, _)| *status)
}

/// A client's request body on its way to the server: counts bytes, and ends
/// with an error when the client sends nothing for `timeouts.client` while
/// the server waits for more (the server's own pace is not the client's
/// fault: this body is only polled when the server connection takes data).
struct RequestBody {
    inner: Incoming,
    /// `None` when the request has no body.
    watch: Option<Box<BodyWatch>>,
}

/// How a request body failed on the client's side (`BodyWatch::fault`).
const CLIENT_OK: u8 = 0;
const CLIENT_STALLED: u8 = 1;
const CLIENT_BROKE: u8 = 2;

struct BodyWatch {
    quiet: IdleTimer,
    /// Set when the body fails on the client's side, so the request is
    /// answered 408 or 400, not 502.
    fault: Arc<AtomicU8>,
    counters: [Arc<Counters>; 2],
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(watch) = this.watch.as_mut() else { return polled.map_err(Into::into) };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    for c in &watch.counters {
                        Counters::add(&c.bytes_in, data.len() as u64);
                    }
                }
                watch.quiet.activity();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                watch.fault.store(CLIENT_BROKE, Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if watch.quiet.poll_quiet(cx).is_ready() {
                    watch.fault.store(CLIENT_STALLED, Relaxed);
                    return Poll::Ready(Some(Err(format!("the client sent nothing for {:?}", watch.quiet.limit).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An inactivity limit on one reused timer: quiet time starts at the first
/// poll that finds nothing to do and ends at the next activity.
struct IdleTimer {
    limit: Duration,
    deadline: Option<tokio::time::Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker of the last poll that found the timer pending, while the
    /// timer was neither moved nor went off since: the timer will wake it,
    /// and polling it again from that task would only register it again.
    armed_for: Option<WakerId>,
}

/// What tells one waker from another (as `Waker::will_wake` compares them),
/// without the reference a clone would take.
#[derive(Clone, Copy, PartialEq, Eq)]
struct WakerId(usize, usize);

impl WakerId {
    fn of(waker: &std::task::Waker) -> Self {
        WakerId(waker.data() as usize, waker.vtable() as *const _ as usize)
    }
}

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        IdleTimer { limit, deadline: None, sleep: None, armed_for: None }
    }

    fn activity(&mut self) {
        self.deadline = None;
    }

    /// Ready once `limit` passed since the quiet time began.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = *self.deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.limit);
        self.poll_until(deadline, cx)
    }

    /// Ready once `deadline` passed. A timer set for an earlier deadline
    /// stays set, and is set again when it goes off early: moving a timer
    /// on every request costs more than one early wake-up per idle period.
    /// A connection's task polls its timers several times per request; one
    /// that will already wake it is left alone (a registration takes four
    /// atomic operations).
    fn poll_until(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
            self.armed_for = None;
        }
        let waker = WakerId::of(cx.waker());
        if self.armed_for == Some(waker) && !sleep.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                self.armed_for = Some(waker);
                return Poll::Pending;
            }
            self.armed_for = None;
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_form_of_hyper_s_own_answer_is_taken_for_one() {
        let date = "date: Mon, 23 Nov 2026 06:15:18 GMT\r\n\r\n";
        let form = |line: &str| format!("HTTP/1.1 {line}\r\nconnection: close\r\ncontent-length: 0\r\n{date}");
        assert_eq!(automatic_answer(form("400 Bad Request").as_bytes()), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            automatic_answer(form("431 Request Header Fields Too Large").as_bytes()),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(automatic_answer(form("414 URI Too Long").as_bytes()), Some(StatusCode::URI_TOO_LONG));
        // Any other status, header, or anything after the head is not it.
        assert_eq!(automatic_answer(form("404 Not Found").as_bytes()), None);
        assert_eq!(automatic_answer(format!("{}x", form("400 Bad Request")).as_bytes()), None);
        let other = format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n{date}");
        assert_eq!(automatic_answer(other.as_bytes()), None);
        assert_eq!(automatic_answer(&form("400 Bad Request").as_bytes()[..40]), None);
    }

    #[tokio::test]
    async fn an_idle_timer_polled_again_by_its_task_still_goes_off_at_its_deadline() {
        let mut timer = IdleTimer::new(Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        // Armed for an early deadline, then asked for a later one: it goes
        // off early, is set again, and is ready only at the later deadline.
        assert!(std::future::poll_fn(|cx| Poll::Ready(timer.poll_until(start + Duration::from_millis(20), cx))).await.is_pending());
        let later = start + Duration::from_millis(80);
        let mut polls = 0;
        // Polled twice per wake-up, as a connection's task does, and woken
        // meanwhile for other reasons.
        let ready = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| {
                polls += 1;
                let _ = timer.poll_until(later, cx);
                if polls < 5 {
                    cx.waker().wake_by_ref();
                }
                timer.poll_until(later, cx)
            }),
        )
        .await;
        assert!(ready.is_ok(), "the timer never went off");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(80), "ready after {waited:?}, before its deadline");
        assert!(waited < Duration::from_secs(2), "ready only after {waited:?}");
        // An earlier deadline moves the timer.
        let start = tokio::time::Instant::now();
        let ready = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| timer.poll_until(start + Duration::from_millis(30), cx)),
        )
        .await;
        assert!(ready.is_ok(), "the timer never went off");
        assert!(start.elapsed() >= Duration::from_millis(30), "ready after {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn an_idle_timer_polled_from_another_task_wakes_that_task() {
        let timer = Arc::new(Mutex::new(IdleTimer::new(Duration::from_secs(1))));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        // Armed for this task...
        assert!(std::future::poll_fn(|cx| Poll::Ready(timer.lock().unwrap().poll_until(deadline, cx))).await.is_pending());
        // ...then awaited by another, which must be woken at the deadline.
        let other = timer.clone();
        let waited = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::spawn(async move { std::future::poll_fn(|cx| other.lock().unwrap().poll_until(deadline, cx)).await }),
        )
        .await;
        assert!(matches!(waited, Ok(Ok(()))), "the other task was never woken");
        assert!(tokio::time::Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn a_request_in_several_buffers_reaches_the_server_whole_and_in_order() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut io = ServerIo(TcpStream::connect(listener.local_addr().unwrap()).await.unwrap());
        let (mut server, _) = listener.accept().await.unwrap();
        // Larger than the socket buffers: some writes are partial, some wait.
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| (0..3 << 20).map(|j: u32| i.wrapping_mul(31).wrapping_add(j as u8)).collect()).collect();
        let sent = parts.concat();
        let reader = tokio::spawn(async move {
            // A slow start, so the writer finds the socket full.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.map(|_| got)
        });
        let (mut slices, mut calls) = (parts.iter().map(|p| std::io::IoSlice::new(p)).collect::<Vec<_>>(), 0);
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = io.write_vectored(rest).await.unwrap();
            assert!(n > 0);
            std::io::IoSlice::advance_slices(&mut rest, n);
            calls += 1;
        }
        io.shutdown().await.unwrap();
        let got = reader.await.unwrap().unwrap();
        assert!(calls > 1, "every buffer went in one call: the test did not fill the socket");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the server got the bytes out of order");
    }
}
