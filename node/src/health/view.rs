//! Sets each server's routing state from the view this node routes by: the
//! committed cluster view, or its own checks under `policy: local` and while
//! it has no quorum. The operator's states are committed ones either way
//! (the last committed, without quorum).

use std::sync::Arc;
use std::time::Duration;

use raftlb_proto::spec::HealthPolicy;
use raftlb_raft::{AdminState, Cluster};

use super::Health;
use crate::dataplane::runtime::RuntimeWatch;

/// How often the quorum is looked at, besides every change of state.
const QUORUM_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ViewMode {
    /// The cluster's committed view.
    #[default]
    Committed,
    /// The spec says `health.policy: local`.
    LocalPolicy,
    /// No quorum: this node's own checks until it is back.
    NoQuorum,
}

impl ViewMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewMode::Committed => "committed",
            ViewMode::LocalPolicy => "local (health.policy: local)",
            ViewMode::NoQuorum => "local (no quorum)",
        }
    }
}

pub async fn run(health: Arc<Health>, mut runtime: RuntimeWatch, cluster: Cluster) {
    let mut applied = cluster.subscribe();
    let mut local = health.local.subscribe();
    let mut poll = tokio::time::interval(QUORUM_POLL);
    loop {
        let state = applied.borrow_and_update().clone();
        local.borrow_and_update();
        let mode = if state.state.health_policy() == HealthPolicy::Local {
            ViewMode::LocalPolicy
        } else if cluster.has_quorum() {
            ViewMode::Committed
        } else {
            ViewMode::NoQuorum
        };
        let before = std::mem::replace(&mut *health.mode.lock().expect("view mode lock"), mode);
        // A node that is not in a cluster yet has nothing to say about quorum.
        if before != mode && cluster.is_initialized() {
            match mode {
                ViewMode::NoQuorum => tracing::warn!("no quorum: routing by this node's own health checks until it is back"),
                _ => tracing::info!(view = mode.as_str(), "routing by the {} health view", mode.as_str()),
            }
        }
        if let Some(rt) = runtime.borrow_and_update().clone() {
            for (name, be) in &rt.backends {
                for s in &be.servers {
                    let committed = state.state.health.server(name, &s.spec.name);
                    let own = health.local.get(&(name.clone(), s.spec.name.clone())).filter(|l| l.addr == s.state.addr).map(|l| l.up);
                    let agreed = committed.filter(|h| h.addr == s.state.addr.to_string()).map(|h| h.up);
                    let up = match mode {
                        // A server the committed state does not know yet (a spec a moment
                        // ahead of it) goes by this node's checks meanwhile.
                        ViewMode::Committed => agreed.or(own),
                        ViewMode::LocalPolicy | ViewMode::NoQuorum => own,
                    };
                    s.state.up.store(up.unwrap_or(true), std::sync::atomic::Ordering::Relaxed);
                    s.state.set_admin(committed.map_or(AdminState::Ready, |h| h.admin));
                }
            }
        }
        tokio::select! {
            changed = runtime.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            changed = local.changed() => if changed.is_err() { return },
            _ = poll.tick() => {}
        }
    }
}
