//! The node's check of its own data plane, as Keepalived's track_script on
//! HAProxy: every frontend address of the spec in force is listened on, and
//! every data plane thread runs. A node whose check fails `fall` times in a
//! row reports it to the cluster and stops leading (and so holding VIPs)
//! while another voter serves; it stands again after `rise` passes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftlb_raft::{Cluster, Command};
use tokio::time::MissedTickBehavior;

use super::Health;
use crate::config::SelfCheck;
use crate::dataplane::runtime::{RuntimeWatch, Shared};
use crate::dataplane::workers::Workers;

/// How long a data plane thread may take to run a task before it counts as stuck.
const WORKER_LIMIT: Duration = Duration::from_secs(1);

/// A failing node that held back and sees no other leader for this long
/// stands again: a cluster with no leader cannot even take a fixed spec.
const LEADERLESS_LIMIT: Duration = Duration::from_secs(3);

/// After standing again for want of another leader, how long before holding back again.
const STAND_AFTER_LEADERLESS: Duration = Duration::from_secs(30);

pub struct SelfChecker {
    pub health: Arc<Health>,
    pub shared: Arc<Shared>,
    pub workers: Arc<Workers>,
    pub runtime: RuntimeWatch,
    pub cluster: Cluster,
    pub settings: SelfCheck,
}

impl SelfChecker {
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.settings.interval.get());
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut streak = 0;
        let mut leaderless_since: Option<Instant> = None;
        let mut stand_until: Option<Instant> = None;
        loop {
            ticks.tick().await;
            // A stopping node closed its listeners on purpose and leads no more.
            if crate::dataplane::stopping() {
                continue;
            }
            let result = self.check().await;
            let serving = !self.health.failing.load(Relaxed);
            *self.health.self_check.lock().expect("self-check lock") = match &result {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.clone(),
            };
            if result.is_ok() == serving {
                streak = 0;
            } else {
                streak += 1;
                if streak >= if serving { self.settings.fall } else { self.settings.rise } {
                    streak = 0;
                    self.health.failing.store(serving, Relaxed);
                    match &result {
                        Ok(()) => tracing::info!("self-check passes again: this node serves"),
                        Err(e) => tracing::error!(problem = %e, "self-check fails: this node's data plane does not serve"),
                    }
                }
            }
            let serving = !self.health.failing.load(Relaxed);
            if serving {
                self.cluster.hold_back(false);
                self.report(true).await;
                continue;
            }
            // Tell the cluster first: a node held back writes nothing.
            self.report(false).await;
            let applied = self.cluster.applied();
            let me = self.cluster.id();
            let others_serve = applied.state.voters.iter().any(|v| *v != me && applied.state.nodes.get(v).is_some_and(|n| n.serving));
            let other_leader = self.cluster.leader().is_some_and(|l| l != me);
            if self.cluster.is_held_back() && !other_leader {
                let since = *leaderless_since.get_or_insert_with(Instant::now);
                if since.elapsed() > LEADERLESS_LIMIT {
                    tracing::warn!("no other node leads: this node stands for leadership although its self-check fails");
                    stand_until = Some(Instant::now() + STAND_AFTER_LEADERLESS);
                }
            } else {
                leaderless_since = None;
            }
            let standing = stand_until.is_some_and(|t| Instant::now() < t);
            if standing {
                leaderless_since = None;
            }
            self.cluster.hold_back(others_serve && !standing);
        }
    }

    /// Every frontend address of the spec in force is listened on, and every
    /// data plane thread answers. Sends no traffic.
    async fn check(&self) -> Result<(), String> {
        let wanted: Vec<std::net::SocketAddr> =
            self.runtime.borrow().as_ref().map(|rt| rt.by_bind.keys().copied().collect()).unwrap_or_default();
        {
            let listening = self.shared.listening.lock().expect("listening lock");
            if let Some(addr) = wanted.iter().find(|a| !listening.contains(a)) {
                return Err(format!("not listening on frontend address {addr}"));
            }
        }
        self.workers.responsive(WORKER_LIMIT).await.map_err(|i| format!("data plane thread {i} does not run tasks"))
    }

    /// Brings the registry's entry for this node in line; a failed write is
    /// tried again next round.
    async fn report(&self, serving: bool) {
        let applied = self.cluster.applied();
        let me = self.cluster.id();
        if applied.state.nodes.get(&me).is_none_or(|n| n.serving == serving) {
            return;
        }
        let write = self.cluster.write(Command::ReportServing { id: me, serving });
        match tokio::time::timeout(self.settings.interval.get().max(Duration::from_secs(1)), write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot report the self-check yet"),
            Err(_) => tracing::debug!("cannot report the self-check yet: no answer"),
        }
    }
}
