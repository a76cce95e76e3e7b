//! Getting a server for a session: a slot from the backend, then a
//! connection, with `retries` on a failed connect and, with `redispatch`,
//! each retry on another server. Shared by TCP and HTTP mode.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::IpBindAddressNoPort;
use tokio::net::{TcpSocket, TcpStream};

use super::runtime::{BackendRt, Lease, NoServer, Runtime, ServerState};
use crate::stats::Counters;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NoServer(NoServer),
    /// Every attempt to connect failed.
    Connect,
}

/// Runs `attempt` against servers of `be` until one succeeds: at most
/// `1 + retries` attempts, each on a server slot the backend grants.
pub async fn with_retries<T, F, Fut>(
    rt: &Runtime,
    be: &BackendRt,
    src: IpAddr,
    prefer: Option<&str>,
    mut attempt: F,
) -> Result<(usize, Lease, T), Failure>
where
    F: FnMut(&ServerState) -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let mut exclude = Vec::new();
    let mut prefer = prefer.map(str::to_owned);
    let queue = rt.timeouts.queue.get();
    for n in 0..=rt.retries {
        let leased = match be.lease(src, prefer.as_deref(), &exclude, queue).await {
            // Every server up was tried: a redispatched retry goes back to one
            // of them, as it may with HAProxy, rather than not happening.
            Err(NoServer::NoneUp) if !exclude.is_empty() => {
                exclude.clear();
                be.lease(src, prefer.as_deref(), &exclude, queue).await
            }
            leased => leased,
        };
        let (index, lease) = leased.map_err(Failure::NoServer)?;
        match attempt(&lease.state).await {
            Ok(value) => return Ok((index, lease, value)),
            Err(e) => {
                tracing::debug!(backend = %be.spec.name, server = %lease.state.name, error = %e, "connect failed");
                Counters::add(&lease.state.counters.errors, 1);
                Counters::add(&be.counters.errors, 1);
                if n == rt.retries {
                    break;
                }
                Counters::add(&be.counters.retries, 1);
                Counters::add(&lease.state.counters.retries, 1);
                if rt.redispatch {
                    Counters::add(&be.counters.redispatches, 1);
                    exclude.push(index);
                    prefer = None;
                } else {
                    // Without redispatch a retry goes to the same server, as in HAProxy.
                    prefer = Some(lease.state.name.clone());
                }
            }
        }
    }
    Err(Failure::Connect)
}

/// A TCP connection to `addr` within `limit`, from `source` if given, with Nagle off.
pub async fn dial(addr: SocketAddr, source: Option<IpAddr>, limit: Duration) -> std::io::Result<TcpStream> {
    let connect = async {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            // The port is chosen at connect time (shared where the 4-tuple
            // allows), not reserved at bind; and a connection's TIME_WAIT does
            // not keep a listener off its port. As HAProxy's `source` does.
            setsockopt(&socket, IpBindAddressNoPort, &true)?;
            socket.set_reuseaddr(true)?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind the source address {ip}: {e}")))?;
        }
        socket.connect(addr).await
    };
    let stream = tokio::time::timeout(limit, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection to {addr} within {limit:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
