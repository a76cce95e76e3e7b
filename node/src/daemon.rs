//! Runs one node: binds its listeners, starts its Raft instance on its data
//! dir, serves the transport and admin API until SIGTERM or SIGINT, then
//! hands leadership and the VIPs over, stops accepting traffic and waits up
//! to `stop_grace` for its connections to end, and stops Raft cleanly.

use anyhow::Context;
use raftlb_proto::admin::admin_server::AdminServer;
use raftlb_raft::Cluster;
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use std::sync::Arc;

use crate::admin::AdminService;
use crate::config::Resolved;
use crate::dataplane::runtime::Shared;
use crate::dataplane::workers::Workers;
use crate::dataplane::DataPlane;
use crate::health::selfcheck::SelfChecker;
use crate::health::{checker, view, Health};
use crate::monitor;
use crate::vip::{VipManager, VipStatus};

/// How long a stopping leader tries to hand leadership over.
const HANDOFF_ON_STOP: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn run(node: Resolved) -> anyhow::Result<()> {
    let Resolved { settings, bind_rewrite, threads, worker_cpus, listen, monitor, source, self_check, vip, stop_grace, .. } = node;
    // Bind first: a taken port fails before the data dir is touched.
    let incoming =
        TcpIncoming::bind(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen} (--listen): {e}"))?.with_nodelay(Some(true));
    let monitor_listener = match monitor {
        Some(addr) => Some(monitor::bind(addr).await?),
        None => None,
    };
    if let Some(ip) = source {
        // Every connection to a server would fail to bind it: say so now.
        std::net::UdpSocket::bind((ip, 0)).map_err(|e| {
            anyhow::anyhow!(
                "source {ip} (--source) cannot be used: {e}: give an address of this host, or leave it out for the kernel's choice"
            )
        })?;
    }
    // The threads before the data dir too: too many for the host fails here.
    let workers = Arc::new(Workers::start(threads, &worker_cpus).map_err(|e| {
        anyhow::anyhow!("cannot start {threads} data plane threads (--threads): {e:#}: give fewer, or leave it out for one per core")
    })?);
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;

    let (id, data_dir) = (settings.id, settings.data_dir.clone());
    let cluster = Cluster::start(settings)
        .await
        .with_context(|| format!("node {id} cannot start on {} (is another lbnode using this data dir?)", data_dir.display()))?;
    tracing::info!(node = id, %listen, data_dir = %data_dir.display(), version = raftlb_proto::VERSION, "lbnode started");
    if !cluster.is_initialized() {
        tracing::info!("not a member of a cluster yet: run `lbctl cluster init` on the first node, or `lbctl node add` on a member");
    }
    match worker_cpus.as_slice() {
        [] => tracing::info!(threads, "data plane threads placed by the kernel"),
        cpus => tracing::info!(threads, ?cpus, "data plane threads pinned, one CPU each in turn"),
    }
    let shared = Arc::new(Shared::new(workers.len(), source));
    let (dataplane, stop_traffic) = DataPlane::new(shared.clone(), workers.clone(), bind_rewrite);
    let runtime = dataplane.subscribe();
    tokio::spawn(dataplane.run(cluster.clone()));
    tokio::spawn(crate::dataplane::close_on_moved_vips(cluster.clone(), workers.clone()));

    let health = Arc::new(Health::default());
    tokio::spawn(checker::run(health.clone(), runtime.clone(), cluster.clone(), source));
    tokio::spawn(checker::report(health.clone(), cluster.clone()));
    tokio::spawn(view::run(health.clone(), runtime.clone(), cluster.clone()));
    let selfcheck = SelfChecker {
        health: health.clone(),
        shared: shared.clone(),
        workers,
        runtime: runtime.clone(),
        cluster: cluster.clone(),
        settings: self_check,
    };
    tokio::spawn(selfcheck.run());
    let stick_links = Arc::new(crate::stick_sync::Links::default());
    tokio::spawn(crate::stick_sync::run(cluster.clone(), runtime.clone(), stick_links.clone()));
    let vips = Arc::new(VipStatus::default());
    let (stop_vips, vips_stopped) = tokio::sync::watch::channel(false);
    let manager = VipManager::new(cluster.clone(), vip, vips.clone()).context("cannot open a netlink socket for the VIPs")?;
    let vip_task = tokio::spawn(manager.run(vips_stopped));
    if let Some(listener) = monitor_listener {
        tokio::spawn(monitor::serve(listener, cluster.clone(), shared));
    }

    let leaving = cluster.clone();
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        // A leader hands over first: the VIPs move by a planned handoff, not a failover.
        if leaving.leader() == Some(leaving.id()) && leaving.status().members.len() > 1 {
            match tokio::time::timeout(HANDOFF_ON_STOP, leaving.transfer_leadership(None)).await {
                Ok(Ok(next)) => tracing::info!(leader = next, "handed leadership over before stopping"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not hand leadership over; the others elect a leader"),
                Err(_) => tracing::warn!("handing leadership over took too long; the others elect a leader"),
            }
        }
        // Not to lead (and hold the VIPs) again while the connections finish.
        leaving.stop_leading();
        let _ = stop_vips.send(true);
        let _ = vip_task.await;
        // The connections on these are closed once the host no longer has them.
        let vips: Vec<std::net::IpAddr> =
            leaving.applied().state.current().map(|c| c.spec.vips.iter().map(|v| v.address.0.addr()).collect()).unwrap_or_default();
        // Raft keeps running meanwhile: this node still counts in the quorum.
        tokio::select! {
            open = stop_traffic.drain(stop_grace, &vips) => match open {
                0 => tracing::info!("every client connection has ended"),
                n => tracing::warn!(connections = n, grace = ?stop_grace, "stop_grace is over: closing the connections still open"),
            },
            _ = term.recv() => tracing::warn!("SIGTERM again: closing the open connections now"),
            _ = int.recv() => tracing::warn!("SIGINT again: closing the open connections now"),
        }
    };
    Server::builder()
        .add_service(cluster.transport_service())
        .add_service(AdminServer::new(AdminService::new(cluster.clone(), health, runtime, vips, stick_links)))
        .serve_with_incoming_shutdown(incoming, stop)
        .await
        .context("the gRPC server failed")?;
    cluster.shutdown().await;
    tracing::info!(node = id, "lbnode stopped");
    Ok(())
}
