//! The replicated backend-health view: per server, each node's latest
//! observation (proposed on a transition only, never per check), the
//! cluster's view derived from them by the spec's `health.policy`, and the
//! operator's state (maintenance, drain). Pure data, applied identically on
//! every node.

use std::collections::{BTreeMap, BTreeSet};

use raftlb_proto::spec::{HealthPolicy, Spec};
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// What the operator set for a server with `lbctl server`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic as its health allows.
    #[default]
    Ready,
    /// No new sessions; persistent clients and open sessions continue.
    Drain,
    /// Maintenance: no traffic at all.
    Maint,
}

impl AdminState {
    const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// The state `name` (as [`AdminState::as_str`] writes it) names.
    pub fn from_name(name: &str) -> Option<AdminState> {
        AdminState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One node's view of one server, as of its latest committed transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub up: bool,
    /// When the node saw the server become `up` (its clock, Unix ms).
    pub since_ms: u64,
    /// The check result that settled it ("HTTP 200", "connection refused").
    pub detail: String,
}

/// A change of one server's state seen by the proposing node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedChange {
    pub backend: String,
    pub server: String,
    pub up: bool,
    pub since_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHealth {
    /// The address the observations are about; a new address starts afresh.
    pub addr: String,
    /// False when the backend has no health check: the server counts as up.
    pub checked: bool,
    pub observations: BTreeMap<NodeId, Observation>,
    /// The committed cluster view.
    pub up: bool,
    /// When the committed view last changed (or the server appeared), Unix ms.
    pub since_ms: u64,
    /// How many times the committed view changed.
    pub transitions: u64,
    pub admin: AdminState,
    pub admin_since_ms: u64,
}

/// Per backend, per server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    pub backends: BTreeMap<String, BTreeMap<String, ServerHealth>>,
    /// The latest proposer time seen, for changes that carry none (membership).
    pub clock_ms: u64,
}

impl HealthState {
    pub fn server(&self, backend: &str, server: &str) -> Option<&ServerHealth> {
        self.backends.get(backend)?.get(server)
    }

    /// Follows a newly applied spec: servers it adds start up, servers it
    /// drops are forgotten, a server whose address or check changed starts
    /// afresh (keeping the operator's state, which is about the name).
    pub fn sync(&mut self, spec: &Spec, voters: &BTreeSet<NodeId>, at_ms: u64) {
        self.clock_ms = self.clock_ms.max(at_ms);
        let mut next = BTreeMap::new();
        for b in &spec.backends {
            let mut old = self.backends.remove(&b.name).unwrap_or_default();
            let checked = b.health_check.is_some();
            let servers: BTreeMap<String, ServerHealth> = b
                .servers
                .iter()
                .map(|s| {
                    let addr = s.address.0.to_string();
                    let fresh = ServerHealth {
                        addr: addr.clone(),
                        checked,
                        observations: BTreeMap::new(),
                        up: true,
                        since_ms: at_ms,
                        transitions: 0,
                        admin: AdminState::Ready,
                        admin_since_ms: at_ms,
                    };
                    let health = match old.remove(&s.name) {
                        Some(prev) if prev.addr == addr && prev.checked == checked => prev,
                        Some(prev) => ServerHealth { admin: prev.admin, admin_since_ms: prev.admin_since_ms, ..fresh },
                        None => fresh,
                    };
                    (s.name.clone(), health)
                })
                .collect();
            next.insert(b.name.clone(), servers);
        }
        self.backends = next;
        self.derive_all(spec.health.policy, voters, at_ms);
    }

    /// Records a node's observations and derives the view again.
    pub fn observe(&mut self, node: NodeId, changes: &[ObservedChange], policy: HealthPolicy, voters: &BTreeSet<NodeId>, at_ms: u64) {
        self.clock_ms = self.clock_ms.max(at_ms);
        for c in changes {
            // A report about a server the spec no longer has (it raced a spec change) is moot.
            let Some(health) = self.backends.get_mut(&c.backend).and_then(|b| b.get_mut(&c.server)) else { continue };
            if !health.checked {
                continue;
            }
            health.observations.insert(node, Observation { up: c.up, since_ms: c.since_ms, detail: c.detail.clone() });
            health.derive(policy, voters, at_ms);
        }
    }

    /// Members that left take their observations with them.
    pub fn retain_nodes(&mut self, members: &BTreeSet<NodeId>, policy: HealthPolicy, voters: &BTreeSet<NodeId>) {
        for servers in self.backends.values_mut() {
            for health in servers.values_mut() {
                health.observations.retain(|n, _| members.contains(n));
            }
        }
        self.derive_all(policy, voters, self.clock_ms);
    }

    fn derive_all(&mut self, policy: HealthPolicy, voters: &BTreeSet<NodeId>, at_ms: u64) {
        for servers in self.backends.values_mut() {
            for health in servers.values_mut() {
                health.derive(policy, voters, at_ms);
            }
        }
    }
}

impl ServerHealth {
    fn derive(&mut self, policy: HealthPolicy, voters: &BTreeSet<NodeId>, at_ms: u64) {
        let up = !self.checked || view(policy, voters, &self.observations);
        if up != self.up {
            self.up = up;
            self.since_ms = at_ms;
            self.transitions += 1;
        }
    }
}

/// The cluster's view of a server from its observations. Only voters count.
/// A voter that has not reported counts as seeing the server up: checks start
/// a server up, as HAProxy's do, and a node reports only when that changes.
/// `local` has no cluster view for routing; the majority view is kept for display.
pub fn view(policy: HealthPolicy, voters: &BTreeSet<NodeId>, observations: &BTreeMap<NodeId, Observation>) -> bool {
    let down = voters.iter().filter(|n| observations.get(n).is_some_and(|o| !o.up)).count();
    match policy {
        HealthPolicy::Majority | HealthPolicy::Local => down * 2 <= voters.len(),
        HealthPolicy::Any => down == 0,
        HealthPolicy::All => voters.is_empty() || down < voters.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ups: &[(NodeId, bool)]) -> BTreeMap<NodeId, Observation> {
        ups.iter().map(|(n, up)| (*n, Observation { up: *up, since_ms: 0, detail: String::new() })).collect()
    }

    #[test]
    fn each_policy_derives_its_view() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let one_down = obs(&[(1, false), (2, true), (3, true)]);
        let two_down = obs(&[(1, false), (2, false), (3, true)]);
        let all_down = obs(&[(1, false), (2, false), (3, false)]);
        assert!(view(HealthPolicy::Majority, &voters, &one_down), "one dissenter of three keeps it up");
        assert!(!view(HealthPolicy::Majority, &voters, &two_down));
        assert!(!view(HealthPolicy::Any, &voters, &one_down));
        assert!(view(HealthPolicy::All, &voters, &two_down));
        assert!(!view(HealthPolicy::All, &voters, &all_down));
        assert!(view(HealthPolicy::Majority, &voters, &obs(&[])), "no report: up");
        assert!(view(HealthPolicy::Majority, &[1, 2].into(), &obs(&[(1, false), (2, true)])), "a tie is no majority for down");
    }

    #[test]
    fn only_voters_count_and_a_silent_voter_counts_as_up() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        assert!(view(HealthPolicy::Majority, &voters, &obs(&[(1, false)])), "nodes 2 and 3 have seen no change");
        assert!(view(HealthPolicy::Majority, &voters, &obs(&[(1, false), (4, false)])), "node 4 is no voter");
        assert!(!view(HealthPolicy::Majority, &voters, &obs(&[(1, false), (2, false)])));
        assert!(view(HealthPolicy::All, &voters, &obs(&[(1, false), (2, false)])), "node 3 has not seen it down");
    }
}
