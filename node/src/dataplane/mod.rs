//! The data plane: serves the committed spec on every node. It follows the
//! applied cluster state; each new spec version is compiled and swapped in
//! at once, listeners are opened for new bind addresses and closed for
//! removed ones, and connections already accepted finish on the version
//! they started with (TCP) or the one their request arrived under (HTTP).
//! Nothing here waits on Raft: without quorum the last committed spec serves.

pub mod connect;
mod http;
mod pipe;
mod proxy_protocol;
pub mod runtime;
mod tcp;
pub mod workers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use raftlb_proto::spec::Mode;
use raftlb_raft::Cluster;
use runtime::{BindRewrite, FrontendRt, Runtime, RuntimeWatch, Shared, Slot};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use workers::{Entered, Placed, Workers};

use crate::stats::SessionGuard;

/// The node stops: no connection is accepted any more, and each HTTP
/// request answered from now on is the last of its connection. One data
/// plane runs per process.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether the node is stopping (see [`Stop`]).
pub fn stopping() -> bool {
    STOPPING.load(Relaxed)
}

pub struct DataPlane {
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    rewrite: BindRewrite,
    runtime: watch::Sender<Option<Arc<Runtime>>>,
    /// Per bind address, what keeps its accept loops (one per worker) going:
    /// dropped, they serve the clients already connected and close.
    listeners: HashMap<SocketAddr, watch::Sender<()>>,
    stop: watch::Receiver<bool>,
}

/// Stops the data plane softly, as HAProxy's soft stop does: the listening
/// sockets close, connections already accepted are served, an HTTP
/// connection ends after its next response (which says `Connection: close`)
/// or when it has been idle for `timeouts.http_keep_alive`, and TCP
/// connections and tunnels run until they end.
pub struct Stop {
    sender: watch::Sender<bool>,
    workers: Arc<Workers>,
}

/// How often a stopping node logs how many connections it still waits for.
const DRAIN_REPORT: Duration = Duration::from_secs(5);

impl Stop {
    /// Stops accepting and waits until every client connection ended, or
    /// `grace` is over; returns how many are still open then.
    ///
    /// Connections that reached one of `vips` are closed as soon as the
    /// host no longer has that address: their clients' packets go to the
    /// node that holds the VIP now, so they would only wait out their
    /// timeouts (a client that connected just before the VIP moved sends
    /// its request to the new holder, and its connection here waits in vain).
    pub async fn drain(self, grace: Duration, vips: &[IpAddr]) -> usize {
        STOPPING.store(true, Relaxed);
        let _ = self.sender.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let open = self.workers.open();
        if open > 0 {
            tracing::info!(connections = open, ?grace, "stopped accepting; waiting for the open connections to end");
        }
        let mut told = tokio::time::Instant::now();
        loop {
            if self.workers.open() > 0 && !vips.is_empty() {
                let (gone, closed) = close_on_gone(&self.workers, vips).await;
                if closed > 0 {
                    tracing::info!(connections = closed, vips = ?gone, "closed the connections on VIPs this node gave up: their clients reach the new holder");
                }
            }
            let open = self.workers.open();
            let now = tokio::time::Instant::now();
            if open == 0 || now >= deadline {
                return open;
            }
            if now - told >= DRAIN_REPORT {
                tracing::info!(
                    connections = open,
                    seconds_left = (deadline - now).as_secs(),
                    "still waiting for the open connections to end"
                );
                told = now;
            }
            tokio::time::sleep_until(deadline.min(now + Duration::from_millis(20))).await;
        }
    }
}

/// How long a VIP another node holds now may stay on this host (its
/// address lifetime is a second by default) before its connections here
/// are left to their timeouts.
const MOVED_VIP_LEAVES: Duration = Duration::from_secs(5);

/// Closes the connections on a VIP that another node holds now (its record
/// is committed) once this host no longer has the address, as a stopping
/// node does: their clients' packets go to that node, and here they would
/// wait out their timeouts (a tunnel `timeouts.tunnel`), holding their
/// places under `maxconn`.
pub async fn close_on_moved_vips(cluster: Cluster, workers: Arc<Workers>) {
    let me = cluster.id();
    let mut applied = cluster.subscribe();
    // The holders already seen, and VIPs another holds that were still on
    // this host, looked at again for a while.
    let mut seen = Vec::new();
    let mut pending: Vec<IpAddr> = Vec::new();
    let mut until = tokio::time::Instant::now();
    loop {
        let elsewhere: Vec<(IpAddr, u64, u64)> = applied
            .borrow_and_update()
            .state
            .vips
            .iter()
            .filter(|(_, a)| a.node != me)
            .filter_map(|(vip, a)| Some((vip.parse::<ipnet::IpNet>().ok()?.addr(), a.node, a.term)))
            .collect();
        if elsewhere != seen {
            pending = elsewhere.iter().map(|(vip, ..)| *vip).collect();
            until = tokio::time::Instant::now() + MOVED_VIP_LEAVES;
            seen = elsewhere;
        }
        if tokio::time::Instant::now() >= until {
            pending.clear();
        }
        if !pending.is_empty() {
            let (gone, closed) = close_on_gone(&workers, &pending).await;
            pending.retain(|vip| !gone.contains(vip));
            if closed > 0 {
                tracing::info!(connections = closed, vips = ?gone, "closed the connections on VIPs another node holds now");
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            // Still on this host: the manager or the address's lifetime removes it soon.
            _ = tokio::time::sleep(Duration::from_millis(100)), if !pending.is_empty() => {}
        }
    }
}

/// Closes the connections on those of `vips` that this host no longer has;
/// returns those, and how many connections it closed.
async fn close_on_gone(workers: &Workers, vips: &[IpAddr]) -> (Vec<IpAddr>, usize) {
    let gone = not_on_this_host(vips);
    let closed = if gone.is_empty() { 0 } else { workers.close_on(&gone).await };
    (gone, closed)
}

/// Those of `addrs` that no interface of this host has.
fn not_on_this_host(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let here: Vec<IpAddr> = match nix::ifaddrs::getifaddrs() {
        Ok(ifaddrs) => ifaddrs
            .filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in().map(|a| IpAddr::V4(a.ip())).or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
            })
            .collect(),
        Err(e) => {
            // Nothing is known to be gone: nothing is closed.
            tracing::warn!(error = %e, "cannot list the host's addresses");
            return Vec::new();
        }
    };
    addrs.iter().filter(|a| !here.contains(a)).copied().collect()
}

/// What a client connection holds while it lives, also once it became a
/// tunnel: its places under the node's and the frontend's `maxconn`, its
/// count and entry on the worker that serves it, and its count in the
/// frontend's current sessions.
pub struct Held {
    _node: Slot,
    _frontend: Slot,
    _placed: Placed,
    entered: Entered,
    _session: SessionGuard,
}

impl Held {
    /// `task` serves this connection (a tunnel it became), on its worker:
    /// the node may have to close it, on a VIP it gave up (see [`Stop::drain`]
    /// and [`close_on_moved_vips`]).
    pub fn track(&self, task: tokio::task::AbortHandle) {
        self.entered.tracker().track(task);
    }
}

impl DataPlane {
    /// The data plane, and what stops it.
    pub fn new(shared: Arc<Shared>, workers: Arc<Workers>, rewrite: BindRewrite) -> (Self, Stop) {
        let (sender, stop) = watch::channel(false);
        let stopper = Stop { sender, workers: workers.clone() };
        (DataPlane { shared, workers, rewrite, runtime: watch::channel(None).0, listeners: HashMap::new(), stop }, stopper)
    }

    /// The spec version in force, compiled, as it changes.
    pub fn subscribe(&self) -> RuntimeWatch {
        self.runtime.subscribe()
    }

    /// Serves every spec version the cluster commits, until the node stops.
    pub async fn run(mut self, cluster: Cluster) {
        let mut applied = cluster.subscribe();
        let mut serving = 0;
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        // Until the node stops (or nothing can stop it any more).
        let mut watch_stop = true;
        loop {
            let current = applied.borrow_and_update().state.current().cloned();
            if let Some(config) = current.filter(|c| c.version != serving) {
                let rt = Arc::new(self.shared.compile(&config.spec, &self.rewrite));
                self.runtime.send_replace(Some(rt));
                serving = config.version;
                tracing::info!(version = serving, "serving config version");
            }
            self.reconcile_listeners();
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                // Stopping: the next reconcile closes every listener.
                changed = self.stop.changed(), if watch_stop => watch_stop = changed.is_ok() && !*self.stop.borrow(),
                // A bind that failed (the address is not there yet) is tried again.
                _ = retry.tick(), if self.missing_listeners() => {}
            }
        }
    }

    fn wanted(&self) -> Vec<SocketAddr> {
        if *self.stop.borrow() {
            return Vec::new();
        }
        self.runtime.borrow().as_ref().map(|rt| rt.by_bind.keys().copied().collect()).unwrap_or_default()
    }

    fn missing_listeners(&self) -> bool {
        self.wanted().iter().any(|a| !self.listeners.contains_key(a))
    }

    fn reconcile_listeners(&mut self) {
        let wanted = self.wanted();
        self.listeners.retain(|addr, _open| {
            let keep = wanted.contains(addr);
            if !keep {
                // Stops accepting (the sender is dropped); the connections
                // accepted run in their own tasks and finish.
                self.shared.listening.lock().expect("listening lock").remove(addr);
                tracing::info!(%addr, "stopped listening");
            }
            keep
        });
        for addr in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            // One socket per worker (SO_REUSEPORT, as HAProxy does): the kernel
            // spreads new connections over them, and each worker accepts and
            // serves its own without handing sockets between threads.
            match (0..self.workers.len()).map(|_| bind(addr)).collect::<std::io::Result<Vec<_>>>() {
                Ok(sockets) => {
                    tracing::info!(%addr, "listening");
                    let (open, kept_open) = watch::channel(());
                    for (i, socket) in sockets.into_iter().enumerate() {
                        let acceptor = Acceptor { addr, runtime: self.runtime.subscribe(), workers: self.workers.clone(), me: i };
                        self.workers.spawn_on(i, accept_loop(socket, acceptor, kept_open.clone()));
                    }
                    self.listeners.insert(addr, open);
                    self.shared.listening.lock().expect("listening lock").insert(addr);
                }
                Err(e) => tracing::error!(%addr, error = %e, "cannot listen on a frontend address; retrying every second"),
            }
        }
    }
}

/// A listening socket that may bind an address the node does not hold yet
/// (a VIP): IP_FREEBIND, so every node listens before it holds the VIP.
/// SO_REUSEPORT: each worker binds its own.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A waiting connection, non-blocking from the start (one system call, not two).
fn accept(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, peer) = socket2::SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = peer.as_socket().ok_or_else(|| std::io::Error::other("accepted a connection without an IP address"))?;
    Ok((socket.into(), peer))
}

/// One worker's accept loop on one frontend address.
struct Acceptor {
    addr: SocketAddr,
    runtime: RuntimeWatch,
    workers: Arc<Workers>,
    me: usize,
}

/// Accepts on worker `me`'s socket and serves each connection there, or on
/// a worker that serves clearly fewer, until `open` is dropped (the address
/// is no longer served).
async fn accept_loop(listener: std::net::TcpListener, acceptor: Acceptor, mut open: watch::Receiver<()>) {
    let addr = acceptor.addr;
    // SAFETY: the listener owns its file descriptor, and nothing replaces or
    // closes it while the AsyncFd owns the listener.
    let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
        Ok(listener) => listener,
        Err(e) => return tracing::error!(%addr, error = %e, "cannot accept on a frontend address"),
    };
    let mut warned: Option<std::time::Instant> = None;
    let mut serving: Option<(Arc<Runtime>, Arc<FrontendRt>)> = None;
    loop {
        // The spec in force; while a newer one is dropping this address (its
        // `open` goes next), the last one that served it.
        if let Some((rt, fe)) = acceptor.current() {
            serving = Some((rt, fe));
        }
        let Some((rt, fe)) = serving.clone() else { return };
        let client = async {
            // A slot is taken only once a client waits on this worker's own
            // socket: a worker holding a slot while the waiting client sits on
            // another worker's socket would keep both waiting.
            let pending = listener.readable().await;
            // At maxconn (the node's or the frontend's) no connection is accepted:
            // new clients wait in the kernel's backlog, as with HAProxy.
            (pending, rt.node_slots.take().await, fe.slots.take().await)
        };
        let (pending, node_slot, fe_slot) = tokio::select! {
            biased;
            // Only ends when the sender is dropped.
            _ = open.changed() => return acceptor.serve_backlog(listener.get_ref(), &rt, &fe),
            client = client => client,
        };
        let mut pending = match pending {
            Ok(pending) => pending,
            Err(e) => return tracing::error!(%addr, error = %e, "cannot accept on a frontend address"),
        };
        let accepted = match pending.try_io(|l| accept(l.get_ref())) {
            Ok(accepted) => accepted,
            // Nobody waits any more (the client gave up): wait for the next one.
            Err(_) => continue,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, typically: say so at most once a second.
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(%addr, error = %e, "accept failed; check the file descriptor limit against maxconn");
                    warned = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // The spec in force now, which may be newer than the one the slots came from.
        let changed = acceptor.runtime.borrow().as_ref().is_some_and(|now| !Arc::ptr_eq(now, &rt));
        let (rt, fe) = if changed { acceptor.current().unwrap_or((rt, fe)) } else { (rt, fe) };
        acceptor.serve(stream, peer, rt, fe, (node_slot, fe_slot));
    }
}

impl Acceptor {
    /// The spec in force and this address's frontend in it, if it has one.
    fn current(&self) -> Option<(Arc<Runtime>, Arc<FrontendRt>)> {
        let rt = self.runtime.borrow().clone()?;
        let fe = rt.by_bind.get(&self.addr).cloned()?;
        Some((rt, fe))
    }

    /// The address is no longer served. The clients the kernel has already
    /// connected (in the listen backlog) are accepted and served, as far as
    /// `maxconn` allows: closing the socket with them in it would reset
    /// them. The socket closes when the caller drops it.
    fn serve_backlog(&self, listener: &std::net::TcpListener, rt: &Arc<Runtime>, fe: &Arc<FrontendRt>) {
        let mut served = 0;
        while let (Some(node_slot), Some(fe_slot)) = (rt.node_slots.try_take_slot(), fe.slots.try_take_slot()) {
            let Ok((stream, peer)) = accept(listener) else { break };
            self.serve(stream, peer, rt.clone(), fe.clone(), (node_slot, fe_slot));
            served += 1;
        }
        if served > 0 {
            tracing::debug!(addr = %self.addr, served, "served the clients already connected before closing the listener");
        }
    }

    /// Serves an accepted connection, holding `slots`, on this worker or on one that serves clearly fewer.
    fn serve(&self, stream: std::net::TcpStream, peer: SocketAddr, rt: Arc<Runtime>, fe: Arc<FrontendRt>, slots: (Slot, Slot)) {
        // A wildcard bind accepts on every address of the host: the one this
        // client reached is the socket's own (the PROXY header names it).
        let local = if self.addr.ip().is_unspecified() { stream.local_addr().unwrap_or(self.addr) } else { self.addr };
        let placed = self.workers.place(self.me);
        let (addr, runtime, worker) = (self.addr, self.runtime.clone(), placed.worker);
        let session = fe.counters.session();
        // On the worker that serves it, which enters it among its own.
        let start = move || {
            let entered = Entered::new(local.ip());
            let tracker = entered.tracker();
            let held = Held { _node: slots.0, _frontend: slots.1, _placed: placed, entered, _session: session };
            let serve = async move {
                // Nagle is off: accepted sockets take TCP_NODELAY from the listener.
                match fe.spec.mode {
                    // Registered with the reactor of the worker that serves it.
                    Mode::Tcp => match TcpStream::from_std(stream) {
                        Ok(stream) => {
                            let _held = held;
                            tcp::serve(rt, fe.clone(), stream, peer, local).await
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "cannot serve an accepted connection"),
                    },
                    // Registered once it has to wait (see `http::ClientSocket`).
                    // A connection that becomes a tunnel hands `held` on to it.
                    Mode::Http => http::serve(runtime, rt, fe.clone(), stream, peer, addr, held).await,
                }
            };
            // Boxed: the future is large, and tokio moves it whole at spawn and at each change of the task's stage.
            tracker.track(tokio::spawn(Box::pin(serve)).abort_handle());
        };
        if worker == self.me {
            start();
        } else {
            self.workers.spawn_on(worker, async move { start() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VIP's address is not on the node until it holds it; the frontend
    /// must listen on it all the same. Binding sends no traffic.
    #[tokio::test]
    async fn frontends_bind_addresses_the_node_does_not_hold() {
        for addr in ["192.0.2.100:0", "[2001:db8::100]:0"] {
            let listener = bind(addr.parse().unwrap()).unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(listener.local_addr().unwrap().ip(), addr.parse::<SocketAddr>().unwrap().ip());
        }
    }

    /// A frontend address that is no longer served (a new spec, or the node
    /// stops): the clients the kernel already connected are served, not
    /// reset by closing the socket, and then the address refuses.
    #[tokio::test]
    async fn a_closed_frontend_serves_the_clients_already_connected_then_refuses() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"hello\n").await;
                });
            }
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = raftlb_proto::spec::Spec::from_yaml(&format!(
            "frontends:\n  - {{ name: f, bind: [\"{addr}\"], mode: tcp, default_backend: b }}\nbackends:\n  - name: b\n    servers: [{{ name: s, address: \"{server_addr}\" }}]\n"
        ))
        .unwrap();
        let rt = Arc::new(Shared::default().compile(&spec, &BindRewrite::new()));
        let (_runtime, watch) = watch::channel(Some(rt));
        // Two clients the kernel connects while nothing accepts yet.
        let mut waiting = Vec::new();
        for _ in 0..2 {
            waiting.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The address is dropped before its accept loop ever ran.
        let (open, kept_open) = watch::channel(());
        drop(open);
        let workers = Arc::new(Workers::start(1, &[]).unwrap());
        let acceptor = Acceptor { addr, runtime: watch, workers: workers.clone(), me: 0 };
        workers.spawn_on(0, accept_loop(listener, acceptor, kept_open)).await.unwrap();
        for mut client in waiting {
            let mut greeting = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut greeting)).await;
            assert!(matches!(read, Ok(Ok(_))), "{read:?}");
            assert_eq!(greeting, "hello\n", "a client already connected is served through the proxy");
        }
        let refused = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.kind());
        assert_eq!(refused.err(), Some(std::io::ErrorKind::ConnectionRefused), "the listener closed after");
    }
}
