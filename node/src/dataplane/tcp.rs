//! TCP mode: each client connection is spliced to one server connection,
//! optionally announced with a PROXY protocol header.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::connect::{dial, with_retries};
use super::pipe::pipe;
use super::proxy_protocol;
use super::runtime::{FrontendRt, Runtime};
use crate::stats::Counters;

/// Serves a client that connected from `peer` to `local`.
pub async fn serve(rt: Arc<Runtime>, fe: Arc<FrontendRt>, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
    // Validation guarantees a tcp frontend has a default backend that exists.
    let Some(be) = fe.spec.default_backend.as_ref().and_then(|name| rt.backends.get(name)).cloned() else {
        return;
    };
    let _session = be.counters.session();
    let (connect_timeout, source) = (rt.timeouts.connect.get(), rt.source);
    let connected = with_retries(&rt, &be, peer.ip(), None, |server| {
        let addr = server.addr;
        async move { dial(addr, source, connect_timeout).await }
    })
    .await;
    let (_, lease, mut server) = match connected {
        Ok(c) => c,
        Err(failure) => {
            tracing::debug!(frontend = %fe.spec.name, backend = %be.spec.name, ?failure, "no server for a tcp connection");
            Counters::add(&fe.counters.errors, 1);
            return;
        }
    };
    let _server_session = lease.state.counters.session();
    if let Some(version) = be.spec.proxy_protocol {
        if server.write_all(&proxy_protocol::header(version, peer, local)).await.is_err() {
            Counters::add(&lease.state.counters.errors, 1);
            return;
        }
    }
    let s = &lease.state.counters;
    let up = [&fe.counters.bytes_in, &be.counters.bytes_in, &s.bytes_in];
    let down = [&fe.counters.bytes_out, &be.counters.bytes_out, &s.bytes_out];
    if let Err(e) = pipe(client, server, rt.timeouts.tunnel.get(), &up, &down).await {
        tracing::debug!(frontend = %fe.spec.name, error = %e, "tcp session ended with an error");
    }
}
