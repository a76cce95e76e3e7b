//! The monitor HTTP server: `GET /healthz` answers 200 while the node and its
//! Raft engine run, 503 once the node is stopping or the engine stopped,
//! with a small JSON summary;
//! `GET /stats` gives the traffic counters per frontend, backend and server.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use raftlb_raft::Cluster;
use tokio::net::TcpListener;

use crate::dataplane::runtime::Shared;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the monitor server (--monitor): {e}"))
}

pub async fn serve(listener: TcpListener, cluster: Cluster, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "monitor server: accept failed");
                continue;
            }
        };
        let (cluster, shared) = (cluster.clone(), shared.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (cluster, shared) = (cluster.clone(), shared.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &cluster, &shared)) }
            });
            // A client that hangs up mid-request is no event worth a log line.
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn answer(req: &Request<Incoming>, cluster: &Cluster, shared: &Shared) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a static response is well formed")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let running = cluster.raft().metrics().borrow().running_state.is_ok();
            let stopping = crate::dataplane::stopping();
            let status = cluster.status();
            let body = serde_json::json!({
                "status": if !running { "raft stopped" } else if stopping { "stopping" } else { "ok" },
                "node": status.node,
                "leader": status.leader,
                "term": status.term,
                "config_version": status.config_version,
            });
            let code = if running && !stopping { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            reply(code, format!("{body}\n"))
        }
        (&Method::GET, "/stats") => {
            let mut body = shared.stats.snapshot();
            for (backend, clients) in shared.stick_entries() {
                if let Some(b) = body["backends"].get_mut(&backend) {
                    b["stick_entries"] = clients.into();
                }
            }
            body["config_version"] = cluster.status().config_version.into();
            reply(StatusCode::OK, format!("{body}\n"))
        }
        (_, "/healthz" | "/stats") => reply(StatusCode::METHOD_NOT_ALLOWED, "{\"error\":\"use GET\"}\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "{\"error\":\"not found: try GET /healthz or GET /stats\"}\n".into()),
    }
}
