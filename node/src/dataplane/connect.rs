//! Getting a server for a session: a slot from the backend, then a
//! connection, with `retries` on a failed connect and, with `redispatch`,
//! retries on another server. Shared by TCP and HTTP mode.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::IpBindAddressNoPort;
use tokio::net::{TcpSocket, TcpStream};

use raftlb_proto::spec::Balance;

use super::runtime::{BackendRt, Lease, NoServer, Runtime, ServerState};
use crate::stats::Counters;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NoServer(NoServer),
    /// Every attempt to connect failed.
    Connect,
}

/// Runs `attempt` against servers of `be` until one succeeds: at most
/// `1 + retries` attempts, each on a server slot the backend grants. Where
/// each retry goes and whether it waits first is HAProxy's schedule (see
/// [`next_attempt`]).
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
    // Whether the session is on its server by persistence, until redispatched.
    let mut direct = None;
    // The server of the attempt that failed last.
    let mut failed: Option<(usize, Arc<ServerState>)> = None;
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
        // As HAProxy counts them: a retry that went to another server is a
        // redispatch, else a retry, on the backend and the server that failed.
        if let Some((before, server)) = failed.take() {
            let counter: fn(&Counters) -> &AtomicU64 = if before == index { |c| &c.retries } else { |c| &c.redispatches };
            Counters::add(counter(&be.counters), 1);
            Counters::add(counter(&server.counters), 1);
        }
        let persistent = *direct.get_or_insert(lease.direct);
        match attempt(&lease.state).await {
            Ok(value) => return Ok((index, lease, value)),
            Err(e) => {
                tracing::debug!(backend = %be.spec.name, server = %lease.state.name, error = %e, "connect failed");
                Counters::add(&lease.state.counters.errors, 1);
                Counters::add(&be.counters.errors, 1);
                if n == rt.retries {
                    break;
                }
                let next = next_attempt(&AfterFailure {
                    redispatch: rt.redispatch,
                    last: n + 1 == rt.retries,
                    persistent,
                    server_up: lease.state.serves(),
                    hashing: be.spec.balance == Balance::Source,
                    usable: be.usable_primaries(),
                    refused: e.kind() != std::io::ErrorKind::TimedOut,
                });
                if next.elsewhere {
                    exclude.push(index);
                    prefer = None;
                    direct = Some(false);
                } else {
                    prefer = Some(lease.state.name.clone());
                }
                failed = Some((index, lease.state.clone()));
                // The slot goes back while waiting.
                drop(lease);
                if next.pause {
                    tokio::time::sleep(rt.timeouts.connect.get().min(TURNAROUND)).await;
                }
            }
        }
    }
    Err(Failure::Connect)
}

/// The longest wait before trying a server that refused again.
const TURNAROUND: Duration = Duration::from_secs(1);

/// What is known after a failed connect, with a retry left.
#[derive(Debug, Clone, Copy)]
struct AfterFailure {
    /// The spec's `redispatch`.
    redispatch: bool,
    /// The next attempt is the last retry.
    last: bool,
    /// The session was on that server by persistence (cookie, stick table).
    persistent: bool,
    /// The server is up by the health view, and not in maintenance.
    server_up: bool,
    /// The backend balances by a hash (`source`), which would choose it again.
    hashing: bool,
    /// Primary servers taking new sessions.
    usable: usize,
    /// The server refused or reset the connection, rather than let it time out.
    refused: bool,
}

/// Where a retry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NextAttempt {
    /// To another server (a redispatch), rather than the same one.
    elsewhere: bool,
    /// First wait `min(timeouts.connect, 1 s)`.
    pause: bool,
}

/// HAProxy's retry schedule (2.6, `option redispatch` at its default
/// interval). With `redispatch`, a retry goes to another server at once when
/// the failed one is down, or when the session was not persistent, the
/// backend does not hash and more than one primary server is usable; else
/// retries stay on the server and only the last one is redispatched. A retry
/// on the same server after a refusal waits `min(timeouts.connect, 1 s)`
/// first (a restarting server gets that long to come back), and so does
/// any retry when at most one primary is usable; a connect that timed out
/// has waited already.
fn next_attempt(f: &AfterFailure) -> NextAttempt {
    let elsewhere = f.redispatch && (!f.server_up || f.last || (!f.persistent && !f.hashing && f.usable > 1));
    NextAttempt { elsewhere, pause: f.refused && (!elsewhere || f.usable <= 1) }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal on a round robin backend of two servers, not persistent.
    const ROTATING: AfterFailure =
        AfterFailure { redispatch: true, last: false, persistent: false, server_up: true, hashing: false, usable: 2, refused: true };

    fn next(change: impl FnOnce(&mut AfterFailure)) -> (bool, bool) {
        let mut f = ROTATING;
        change(&mut f);
        let n = next_attempt(&f);
        (n.elsewhere, n.pause)
    }

    #[test]
    fn retries_follow_haproxys_schedule() {
        // (elsewhere, pause)
        assert_eq!(next(|_| {}), (true, false), "another server at once");
        assert_eq!(next(|f| f.hashing = true), (false, true), "source hashing stays and waits");
        assert_eq!(next(|f| (f.hashing, f.last) = (true, true)), (true, false), "until the last retry");
        assert_eq!(next(|f| f.persistent = true), (false, true), "a persistent client stays and waits");
        assert_eq!(next(|f| (f.persistent, f.server_up) = (true, false)), (true, false), "but not on a server that is down");
        assert_eq!(next(|f| f.usable = 1), (false, true), "one server: it again, after a wait");
        assert_eq!(next(|f| (f.usable, f.last) = (1, true)), (true, true), "the last retry waits too");
        assert_eq!(next(|f| f.redispatch = false), (false, true), "without redispatch: the same server, after a wait");
        assert_eq!(next(|f| (f.redispatch, f.last, f.server_up) = (false, true, false)), (false, true));
        assert_eq!(next(|f| (f.redispatch, f.refused) = (false, false)), (false, false), "a timed-out connect has waited");
        assert_eq!(next(|f| (f.usable, f.refused) = (1, false)), (false, false));
    }
}
