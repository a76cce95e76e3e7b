//! VIP ownership. The leader holds every VIP of the spec, and only while it
//! can prove it leads: a quorum acknowledged it within `vip.lease`, which is
//! shorter than any election could take. Past that it removes them at once.
//! Each VIP is added with a short address lifetime and refreshed while the
//! lease holds, so the kernel removes the address of a holder too frozen to
//! fence itself. A planned handoff keeps the VIPs until just before the
//! successor may be elected. See docs/fencing.md for the timing argument.

mod announce;
mod netlink;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use openraft::ServerState;
use raftlb_proto::spec::Vip;
use raftlb_raft::{Cluster, Command, Handover, VipAssignment};
use tokio::sync::watch;

use crate::config::{Fencing, VipSettings};
use crate::health::now_ms;
use netlink::{Link, Netlink};

/// How soon the manager looks again at something due that it could not
/// settle (a leader waiting for a quorum's first acknowledgement, a refresh
/// that failed), besides every change.
const TICK: Duration = Duration::from_millis(10);

/// The longest a leader goes without looking, whatever is due: for what
/// nothing signals (a peer reconnected, a VIP record to write again).
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// A VIP that cannot be added is tried again after this, then after twice
/// as long each time, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// When to try adding a VIP again that could not be added.
struct Retry {
    at: Instant,
    /// The wait before `at`; the next one is twice as long.
    backoff: Duration,
    /// The spec's `interface` it failed with.
    interface: String,
}

/// A VIP this node holds now, as `lbctl vip list` shows it.
#[derive(Debug, Clone)]
pub struct HeldVip {
    pub vip: IpNet,
    pub interface: String,
    pub since_ms: u64,
    pub term: u64,
}

/// What the manager holds, for the admin API.
#[derive(Default)]
pub struct VipStatus {
    held: Mutex<Vec<HeldVip>>,
    /// Problems adding or announcing, and hooks that failed: the last one, and how many.
    pub last_error: Mutex<Option<String>>,
    pub hook_failures: std::sync::atomic::AtomicU64,
}

impl VipStatus {
    pub fn held(&self) -> Vec<HeldVip> {
        self.held.lock().expect("vip status lock").clone()
    }
}

struct Held {
    link: Link,
    /// The spec's `interface` it was added for (`auto` or a name).
    wanted_interface: String,
    since_ms: u64,
    term: u64,
    refreshed: Instant,
    next_announce: Instant,
    /// Rounds of announcements sent so far.
    announced: u8,
}

pub struct VipManager {
    cluster: Cluster,
    settings: VipSettings,
    netlink: Netlink,
    status: Arc<VipStatus>,
    held: BTreeMap<IpNet, Held>,
    /// The term this node leads in, and since when.
    leading: Option<(u64, Instant)>,
    /// The spec version whose VIPs were last cleared of a crashed run's copies.
    cleared: u64,
    announcer: announce::Announcer,
    /// VIPs that could not be added, and when to try again.
    retry: BTreeMap<IpNet, Retry>,
    /// Peer reconnects seen so far: a new one (a partition healed) makes the
    /// holder announce its VIPs again at once.
    reconnects: u64,
    /// The record of held VIPs last proposed for commit; cleared again when
    /// the write failed, so that it is proposed anew.
    recording: Arc<Mutex<Option<VipRecord>>>,
}

/// A term and the VIPs its leader holds.
type VipRecord = (u64, Vec<String>);

impl VipManager {
    pub fn new(cluster: Cluster, settings: VipSettings, status: Arc<VipStatus>) -> std::io::Result<VipManager> {
        Ok(VipManager {
            cluster,
            settings,
            netlink: Netlink::connect()?,
            status,
            held: BTreeMap::new(),
            leading: None,
            cleared: 0,
            announcer: Default::default(),
            retry: BTreeMap::new(),
            reconnects: 0,
            recording: Arc::default(),
        })
    }

    /// Holds the VIPs while this node may, until `stop` turns true; then
    /// releases them.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Only leadership and the term: the full metrics change with every
        // heartbeat.
        let mut metrics = self.cluster.raft().server_metrics();
        // The full metrics only while a leader waits for a quorum to
        // acknowledge it: they change as acknowledgements come in.
        let mut progress = self.cluster.raft().metrics();
        let mut applied = self.cluster.subscribe();
        let mut handover = self.cluster.handover();
        self.note_metrics(&metrics.borrow_and_update());
        loop {
            let state = *handover.borrow();
            self.step(state).await;
            let acked = self.cluster.quorum_acked_at();
            let look = self.next_look(state, acked);
            let awaits_quorum = self.leading.is_some() && !self.within_lease(acked);
            tokio::select! {
                _ = tokio::time::sleep_until(look.unwrap_or_else(Instant::now).into()), if look.is_some() => {}
                changed = progress.changed(), if awaits_quorum => if changed.is_err() { break },
                changed = metrics.changed() => {
                    if changed.is_err() { break }
                    self.note_metrics(&metrics.borrow_and_update());
                }
                changed = applied.changed() => if changed.is_err() { break },
                changed = handover.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
            }
        }
        self.release_all("the node stops").await;
    }

    fn note_metrics(&mut self, m: &openraft::metrics::RaftServerMetrics<u64, openraft::BasicNode>) {
        let term = m.vote.leader_id().get_term();
        if m.state != ServerState::Leader {
            self.leading = None;
        } else if self.leading.is_none_or(|(t, _)| t != term) {
            self.leading = Some((term, Instant::now()));
        }
    }

    /// When to look again if nothing changes first: the moment the lease
    /// runs out, a refresh, an announcement or a retry is due, or a handoff
    /// releases; as leader at least every `LOOK_EVERY`. None for a follower
    /// that holds nothing: only a change concerns it.
    fn next_look(&self, handover: Handover, acked: Option<Instant>) -> Option<Instant> {
        if self.leading.is_none() && self.held.is_empty() && handover == Handover::Idle {
            return None;
        }
        let now = Instant::now();
        // What is due already is looked at again after a tick, not in a loop.
        let due = |at: Instant| if at <= now { now + TICK } else { at };
        let Some(acked) = acked else { return Some(now + TICK) };
        let lifetime = self.settings.lifetime.get();
        let mut at = (now + LOOK_EVERY).min(due(acked + self.settings.lease.get()));
        for held in self.held.values() {
            at = at.min(due(held.refreshed + lifetime / 4)).min(due(held.next_announce));
        }
        for retry in self.retry.values() {
            at = at.min(due(retry.at));
        }
        if let Handover::Releasing { at: release } = handover {
            at = at.min(due(release));
        }
        if let (Fencing::Strict, Some((_, since)), true) = (self.settings.fencing, self.leading, self.held.is_empty()) {
            at = at.min(due(since + lifetime));
        }
        Some(at)
    }

    /// Whether `acked`, the send time of the heartbeat a quorum accepted
    /// ([`Cluster::quorum_acked_at`]: never later than the truth), is within the lease.
    fn within_lease(&self, acked: Option<Instant>) -> bool {
        acked.is_some_and(|t| t.elapsed() < self.settings.lease.get())
    }

    /// Whether this node may hold VIPs now, and if not, why.
    fn entitled(&self, handover: Handover) -> Result<(), &'static str> {
        let now = Instant::now();
        match handover {
            // Handing over: keep what is held until just before the successor may be elected.
            Handover::Releasing { at } if now < at && !self.held.is_empty() => return Ok(()),
            Handover::Releasing { .. } | Handover::Released => return Err("leadership is handed over"),
            Handover::Idle => {}
        }
        let Some((_, since)) = self.leading else { return Err("this node does not lead") };
        if !self.within_lease(self.cluster.quorum_acked_at()) {
            return Err("no quorum acknowledged this node within the lease");
        }
        // Strict fencing: the previous holder's addresses expire within one lifetime.
        if self.settings.fencing == Fencing::Strict && self.held.is_empty() && now.duration_since(since) < self.settings.lifetime.get() {
            return Err("strict fencing: waiting out the previous holder's address lifetime");
        }
        Ok(())
    }

    async fn step(&mut self, handover: Handover) {
        let applied = self.cluster.applied();
        let version = applied.state.config_version();
        let wanted: Vec<Vip> = applied.state.current().map(|c| c.spec.vips.clone()).unwrap_or_default();
        // At start (the log is applied again shortly after) and for each new
        // spec: copies of its VIPs a crashed run left are not this node's.
        if version != self.cleared && self.held.is_empty() {
            self.cleared = version;
            self.remove_stale(&wanted).await;
        }
        // VIPs the spec no longer has are released whatever else happens; one
        // it names another interface for is released to be added there.
        let stale: Vec<(IpNet, &str)> = self
            .held
            .iter()
            .filter_map(|(vip, held)| match wanted.iter().find(|w| w.address.0 == *vip) {
                None => Some((*vip, "the spec no longer has it")),
                Some(w) if w.interface != held.wanted_interface => Some((*vip, "the spec names another interface for it")),
                Some(_) => None,
            })
            .collect();
        for (vip, why) in stale {
            self.release(vip, why).await;
        }
        let reconnects = self.cluster.peer_reconnects();
        if reconnects != self.reconnects {
            self.reconnects = reconnects;
            // Hosts on the other side of a healed partition may have cached
            // another holder: a new burst, as on takeover.
            for held in self.held.values_mut() {
                held.next_announce = Instant::now();
                held.announced = 0;
            }
        }
        match self.entitled(handover) {
            Ok(()) => {
                for vip in &wanted {
                    self.hold(vip).await;
                }
                self.record(&applied.state.vips);
            }
            Err(why) => {
                self.retry.clear();
                self.release_all(why).await;
                if matches!(handover, Handover::Releasing { at } if Instant::now() >= at) {
                    self.cluster.handover_released();
                }
            }
        }
        self.publish();
    }

    /// Adds the VIP if this node does not hold it yet, refreshes its lifetime
    /// when due, and announces it when due.
    async fn hold(&mut self, vip: &Vip) {
        let net = vip.address.0;
        let now = Instant::now();
        let lifetime = self.settings.lifetime.get();
        if !self.held.contains_key(&net) {
            // A spec that names another interface is tried at once.
            if self.retry.get(&net).is_some_and(|r| now < r.at && r.interface == vip.interface) {
                return;
            }
            let added = match self.netlink.link_for(&net, &vip.interface).await {
                Ok(link) => self.netlink.add(&link, &net, lifetime.as_secs() as u32).await.map(|()| link),
                Err(e) => Err(e),
            };
            let link = match added {
                Ok(link) => link,
                Err(e) => {
                    // Tried again soon (a passing failure), then less and less often.
                    let before = self.retry.get(&net).filter(|r| r.interface == vip.interface);
                    let backoff = before.map_or(RETRY_FIRST, |r| (r.backoff * 2).min(RETRY_MAX));
                    self.retry.insert(net, Retry { at: now + backoff, backoff, interface: vip.interface.clone() });
                    return self.failed(e);
                }
            };
            self.retry.remove(&net);
            let term = self.leading.map_or(0, |(t, _)| t);
            tracing::info!(vip = %net, interface = %link.name, term, "VIP acquired");
            self.hook("acquire", net);
            let held = Held {
                link,
                wanted_interface: vip.interface.clone(),
                since_ms: now_ms(),
                term,
                refreshed: now,
                next_announce: now,
                announced: 0,
            };
            self.held.insert(net, held);
        }
        let held = self.held.get_mut(&net).expect("held above");
        // Four refreshes a lifetime: a late one or two still keeps the address.
        if now.duration_since(held.refreshed) >= lifetime / 4 {
            match self.netlink.add(&held.link, &net, lifetime.as_secs() as u32).await {
                Ok(()) => held.refreshed = now,
                Err(e) => tracing::warn!(vip = %net, error = %e, "cannot refresh the VIP's lifetime"),
            }
        }
        if now >= held.next_announce {
            // The takeover burst, a second burst a moment later, then one now and then.
            let count = if held.announced < 2 { self.settings.announce_burst.max(1) } else { 1 };
            for _ in 0..count {
                if let Err(e) = self.announcer.announce(&held.link, net.addr()) {
                    tracing::warn!(vip = %net, error = %e, "cannot announce the VIP");
                    break;
                }
            }
            held.next_announce =
                now + if held.announced == 0 { self.settings.announce_again_after.get() } else { self.settings.announce_every.get() };
            held.announced = held.announced.saturating_add(1);
        }
    }

    /// Commits which VIPs this node holds and in which term, unless the
    /// record says so already. In the background: holding a VIP never
    /// waits for a write.
    fn record(&self, committed: &BTreeMap<String, VipAssignment>) {
        let Some((term, _)) = self.leading else { return };
        let me = self.cluster.id();
        let vips: Vec<String> = self.held.keys().map(|v| v.to_string()).collect();
        let recorded =
            committed.len() == vips.len() && vips.iter().all(|v| committed.get(v).is_some_and(|a| a.node == me && a.term == term));
        let mut recording = self.recording.lock().expect("vip record lock");
        if recorded || recording.as_ref() == Some(&(term, vips.clone())) {
            return;
        }
        *recording = Some((term, vips.clone()));
        let (cluster, slot) = (self.cluster.clone(), self.recording.clone());
        tokio::spawn(async move {
            if let Err(e) = cluster.write(Command::AssignVips { node: me, term, vips, at_ms: now_ms() }).await {
                tracing::warn!(error = %e, "cannot record the VIPs this node holds; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                *slot.lock().expect("vip record lock") = None;
            }
        });
    }

    async fn release(&mut self, vip: IpNet, why: &str) {
        if self.held.remove(&vip).is_none() {
            return;
        }
        match self.netlink.remove(&vip).await {
            Ok(_) => tracing::info!(vip = %vip, reason = why, "VIP released"),
            Err(e) => tracing::error!(vip = %vip, error = %e, "cannot remove the VIP; its address lifetime removes it"),
        }
        self.hook("release", vip);
    }

    async fn release_all(&mut self, why: &str) {
        let held: Vec<IpNet> = self.held.keys().copied().collect();
        for vip in held {
            self.release(vip, why).await;
        }
        self.publish();
    }

    /// A crashed run may have left VIPs on the interfaces: none is this
    /// node's until it leads again.
    async fn remove_stale(&mut self, vips: &[Vip]) {
        for vip in vips {
            match self.netlink.remove(&vip.address.0).await {
                Ok(0) => {}
                Ok(_) => tracing::warn!(vip = %vip.address.0, "removed a VIP left by an earlier run"),
                Err(e) => self.failed(e),
            }
        }
    }

    /// Runs the configured hook for `event`, without waiting for it: a hook
    /// never holds up fencing. Its failure is logged and counted.
    fn hook(&self, event: &'static str, vip: IpNet) {
        let command = match event {
            "acquire" => self.settings.on_acquire.clone(),
            _ => self.settings.on_release.clone(),
        };
        let Some(command) = command else { return };
        let status = self.status.clone();
        let node = self.cluster.id().to_string();
        tokio::spawn(async move {
            let outcome = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("RAFTLB_VIP", vip.to_string())
                .env("RAFTLB_NODE", node)
                .env("RAFTLB_EVENT", event)
                .status()
                .await;
            let failure = match outcome {
                Ok(s) if s.success() => return,
                Ok(s) => format!("the {event} hook for {vip} exited with {s}"),
                Err(e) => format!("the {event} hook for {vip} did not run: {e}"),
            };
            tracing::error!(hook = %command, "{failure}");
            status.hook_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *status.last_error.lock().expect("vip status lock") = Some(failure);
        });
    }

    fn failed(&self, error: String) {
        let mut last = self.status.last_error.lock().expect("vip status lock");
        // Said once, not every tick.
        if last.as_deref() != Some(error.as_str()) {
            tracing::error!(error = %error, "VIP");
            *last = Some(error);
        }
    }

    fn publish(&self) {
        let held = self
            .held
            .iter()
            .map(|(vip, h)| HeldVip { vip: *vip, interface: h.link.name.clone(), since_ms: h.since_ms, term: h.term })
            .collect();
        *self.status.held.lock().expect("vip status lock") = held;
    }
}
