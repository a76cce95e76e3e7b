//! Runs the checks of the spec in force, one task per checked server, and
//! reports this node's state changes to the cluster.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftlb_raft::health::ObservedChange;
use raftlb_raft::{Cluster, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::probe::{self, Target};
use super::{now_ms, Health, ServerKey};
use crate::dataplane::runtime::{Runtime, RuntimeWatch};

/// Checks in flight at once on a node, whatever the number of servers.
const CONCURRENT_CHECKS: usize = 64;

/// How long a proposal stands before the same one is sent again: its commit
/// may take a moment to reach this node's applied state.
const PROPOSAL_STANDS: Duration = Duration::from_secs(3);

/// Follows the spec in force: starts checking each server that has a health
/// check, restarts a server's checks when its address or check changes, and
/// stops checking servers the spec no longer has.
pub async fn run(health: Arc<Health>, mut runtime: RuntimeWatch, cluster: Cluster, source: Option<IpAddr>) {
    let limit = Arc::new(Semaphore::new(CONCURRENT_CHECKS));
    let mut tasks: HashMap<ServerKey, (Target, JoinHandle<()>)> = HashMap::new();
    loop {
        let rt = runtime.borrow_and_update().clone();
        let wanted = rt.map(|rt| targets(&rt, source)).unwrap_or_default();
        tasks.retain(|key, (target, task)| {
            let keep = wanted.get(key) == Some(target);
            if !keep {
                task.abort();
                health.local.forget(key);
            }
            keep
        });
        for (key, target) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            // A restarted node goes on from what it last told the cluster.
            let applied = cluster.applied();
            let committed = applied
                .state
                .health
                .server(&key.0, &key.1)
                .filter(|h| h.addr == target.server.to_string())
                .and_then(|h| h.observations.get(&cluster.id()).cloned());
            let (up, detail) = committed.map_or((true, "not checked yet".to_owned()), |o| (o.up, o.detail));
            health.local.begin(key.clone(), target.server, up, detail);
            let task = tokio::spawn(check_loop(health.clone(), key.clone(), target.clone(), limit.clone()));
            tasks.insert(key, (target, task));
        }
        if runtime.changed().await.is_err() {
            return;
        }
    }
}

fn targets(rt: &Runtime, source: Option<IpAddr>) -> HashMap<ServerKey, Target> {
    let mut out = HashMap::new();
    for (name, be) in &rt.backends {
        let Some(check) = &be.spec.health_check else { continue };
        for s in &be.servers {
            let server = s.state.addr;
            let addr = SocketAddr::new(server.ip(), check.port.unwrap_or(server.port()));
            let target = Target { server, addr, check: check.clone(), timeout: rt.timeouts.check.get(), source };
            out.insert((name.clone(), s.spec.name.clone()), target);
        }
    }
    out
}

/// Checks one server every `interval`, the first time at a random point of
/// the first interval so that checks spread instead of firing together.
async fn check_loop(health: Arc<Health>, key: ServerKey, target: Target, limit: Arc<Semaphore>) {
    let interval = target.check.interval.get();
    tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Ok(_slot) = limit.acquire().await else { return };
        let result = probe::run(&target).await;
        let detail = result.detail.clone();
        if let Some(up) = health.local.record(&key, result, target.check.rise, target.check.fall) {
            let (backend, server) = &key;
            if up {
                tracing::info!(backend, server, check = %detail, "server is up for this node");
            } else {
                tracing::warn!(backend, server, check = %detail, "server is down for this node");
            }
        }
    }
}

/// Proposes this node's observations wherever they differ from what the
/// cluster has committed for it: after a change, and again while a
/// proposal could not commit (no quorum). Never once per check.
pub async fn report(health: Arc<Health>, cluster: Cluster) {
    let mut local = health.local.subscribe();
    let mut applied = cluster.subscribe();
    let mut proposed: HashMap<ServerKey, (bool, Instant)> = HashMap::new();
    loop {
        let changes = differences(&health, &cluster, &proposed);
        if !changes.is_empty() && cluster.is_initialized() {
            let keys: Vec<ServerKey> = changes.iter().map(|c| (c.backend.clone(), c.server.clone())).collect();
            let ups: Vec<bool> = changes.iter().map(|c| c.up).collect();
            match cluster.write(Command::Observe { node: cluster.id(), changes, at_ms: now_ms() }).await {
                Ok(_) => {
                    health.local.count_proposal(&keys);
                    for (key, up) in keys.into_iter().zip(ups) {
                        proposed.insert(key, (up, Instant::now()));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot report health changes yet; routing by this node's own checks meanwhile");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        tokio::select! {
            changed = local.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(PROPOSAL_STANDS) => {}
        }
    }
}

fn differences(health: &Health, cluster: &Cluster, proposed: &HashMap<ServerKey, (bool, Instant)>) -> Vec<ObservedChange> {
    let applied = cluster.applied();
    let me = cluster.id();
    let mut out = Vec::new();
    for ((backend, server), local) in health.local.snapshot() {
        // Only about the server the committed state knows, at the same address.
        let Some(committed) = applied.state.health.server(&backend, &server).filter(|h| h.checked && h.addr == local.addr.to_string())
        else {
            continue;
        };
        let known = committed.observations.get(&me).is_none_or(|o| o.up);
        if known == local.up {
            continue;
        }
        let key = (backend, server);
        if proposed.get(&key).is_some_and(|(up, at)| *up == local.up && at.elapsed() < PROPOSAL_STANDS) {
            continue;
        }
        out.push(ObservedChange { backend: key.0, server: key.1, up: local.up, since_ms: local.since_ms, detail: local.settled_by });
    }
    out
}
