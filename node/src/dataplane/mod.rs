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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raftlb_proto::spec::Mode;
use raftlb_raft::Cluster;
use runtime::{BindRewrite, Runtime, RuntimeWatch, Shared};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use workers::Workers;

pub struct DataPlane {
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    rewrite: BindRewrite,
    runtime: watch::Sender<Option<Arc<Runtime>>>,
    listeners: HashMap<SocketAddr, JoinHandle<()>>,
}

impl DataPlane {
    pub fn new(shared: Arc<Shared>, workers: Arc<Workers>, rewrite: BindRewrite) -> Self {
        DataPlane { shared, workers, rewrite, runtime: watch::channel(None).0, listeners: HashMap::new() }
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
                // A bind that failed (the address is not there yet) is tried again.
                _ = retry.tick(), if self.missing_listeners() => {}
            }
        }
    }

    fn wanted(&self) -> Vec<SocketAddr> {
        self.runtime.borrow().as_ref().map(|rt| rt.by_bind.keys().copied().collect()).unwrap_or_default()
    }

    fn missing_listeners(&self) -> bool {
        self.wanted().iter().any(|a| !self.listeners.contains_key(a))
    }

    fn reconcile_listeners(&mut self) {
        let wanted = self.wanted();
        self.listeners.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                // Stops accepting; the connections it accepted run in their own tasks and finish.
                task.abort();
                self.shared.listening.lock().expect("listening lock").remove(addr);
                tracing::info!(%addr, "stopped listening");
            }
            keep
        });
        for addr in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    tracing::info!(%addr, "listening");
                    let task = accept_loop(listener, addr, self.runtime.subscribe(), self.workers.clone());
                    self.listeners.insert(addr, tokio::spawn(task));
                    self.shared.listening.lock().expect("listening lock").insert(addr);
                }
                Err(e) => tracing::error!(%addr, error = %e, "cannot listen on a frontend address; retrying every second"),
            }
        }
    }
}

/// A listening socket that may bind an address the node does not hold yet
/// (a VIP): IP_FREEBIND, so every node listens before it holds the VIP.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
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
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, runtime: RuntimeWatch, workers: Arc<Workers>) {
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let Some(rt) = runtime.borrow().clone() else { return };
        let Some(fe) = rt.by_bind.get(&addr).cloned() else { return };
        // At maxconn (the node's or the frontend's) no connection is accepted:
        // new clients wait in the kernel's backlog, as with HAProxy.
        let Ok(node_slot) = rt.node_slots.clone().acquire_owned().await else { return };
        let Ok(fe_slot) = fe.slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
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
        let rt = runtime.borrow().clone().unwrap_or(rt);
        let Some(fe) = rt.by_bind.get(&addr).cloned() else { continue };
        // Handed to a worker as a plain socket: it registers with that worker's reactor.
        let Ok(stream) = stream.into_std() else { continue };
        let runtime = runtime.clone();
        workers.spawn(async move {
            let _slots = (node_slot, fe_slot);
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return };
            let _ = stream.set_nodelay(true);
            let _session = fe.counters.session();
            match fe.spec.mode {
                Mode::Tcp => tcp::serve(rt, fe.clone(), stream, peer, addr).await,
                Mode::Http => http::serve(runtime, fe.clone(), stream, peer, addr).await,
            }
        });
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
}
