//! The replicated cluster state and how each committed entry changes it. This
//! is pure data: the stores persist it, the Raft group orders the commands,
//! and every node applies the same commands in the same order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use openraft::{BasicNode, Membership};
use raftlb_proto::spec::{Backend, HealthPolicy, Spec};
use serde::{Deserialize, Serialize};

use crate::health::{AdminState, HealthState, ObservedChange};
use crate::NodeId;

/// How many applied spec versions are kept for `config history` and rollback.
pub const CONFIG_HISTORY: usize = 50;

/// A change to the cluster state, proposed through Raft. Timestamps come from
/// the proposing node so that applying a command is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Make a validated spec the version in force.
    ApplySpec { spec: Arc<Spec>, at_ms: u64 },
    /// Make the spec of an earlier version the version in force, as a new version.
    Rollback { version: u64, at_ms: u64 },
    /// A member reports the software version it runs (at start, so after an upgrade).
    ReportNode { id: NodeId, version: String },
    /// A node's health checks settled on new states for these servers.
    Observe { node: NodeId, changes: Vec<ObservedChange>, at_ms: u64 },
    /// The operator puts a server in maintenance, drains it, or makes it ready.
    SetServerAdmin { backend: String, server: String, state: AdminState, at_ms: u64 },
    /// A node's self-check of its own frontends passed or failed.
    ReportServing { id: NodeId, serving: bool },
    /// The operator drains a node (it gives up leadership and its VIPs and
    /// does not stand for election) or ends the drain.
    SetNodeDrain { id: NodeId, drain: bool },
    /// The leader of `term` holds these VIPs (the spec's, written as in it)
    /// and no others. Refused from a term older than the record's.
    AssignVips { node: NodeId, term: u64, vips: Vec<String>, at_ms: u64 },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries, and commands with nothing to report.
    Done,
    /// The spec version in force after the command, and whether it is new.
    Config { version: u64, changed: bool },
    /// The command was valid to propose but not against the state it met
    /// (an unknown version, a node that left). Nothing changed.
    Rejected(String),
}

/// One applied spec version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub version: u64,
    pub spec: Arc<Spec>,
    pub applied_at_ms: u64,
    /// Set when the version was made by rolling back to an earlier one.
    pub rollback_of: Option<u64>,
}

/// A member of the cluster, as the node registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// The gRPC address peers and lbctl reach it at.
    pub addr: String,
    /// Software version the node reported; empty until it does.
    pub version: String,
    /// Set while the node is drained for maintenance.
    pub drain: bool,
    /// False while the node's self-check finds its own frontends failing.
    #[serde(default = "yes")]
    pub serving: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Applied spec versions, oldest first; the last one is in force.
    pub configs: VecDeque<ConfigVersion>,
    /// The node registry: exactly the members of the Raft group.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// The voting members, whose health observations count.
    #[serde(default)]
    pub voters: BTreeSet<NodeId>,
    #[serde(default)]
    pub health: HealthState,
    /// Which node holds which VIP, as its holder recorded it.
    #[serde(default)]
    pub vips: BTreeMap<String, VipAssignment>,
}

/// The committed record of a VIP's holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAssignment {
    pub node: NodeId,
    /// The Raft term the holder took the VIP in.
    pub term: u64,
    pub since_ms: u64,
}

impl ClusterState {
    /// The spec version in force, if any spec was applied.
    pub fn current(&self) -> Option<&ConfigVersion> {
        self.configs.back()
    }

    /// The number of the version in force; 0 before the first apply.
    pub fn config_version(&self) -> u64 {
        self.current().map_or(0, |c| c.version)
    }

    pub fn config(&self, version: u64) -> Option<&ConfigVersion> {
        self.configs.iter().find(|c| c.version == version)
    }

    /// The health policy of the spec in force.
    pub fn health_policy(&self) -> HealthPolicy {
        self.current().map(|c| c.spec.health.policy).unwrap_or_default()
    }

    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::ApplySpec { spec, at_ms } => self.push_config(spec.clone(), *at_ms, None),
            Command::Rollback { version, at_ms } => match self.config(*version) {
                Some(old) => self.push_config(old.spec.clone(), *at_ms, Some(*version)),
                None => CommandResult::Rejected(self.unknown_version(*version)),
            },
            Command::ReportNode { id, version } => match self.nodes.get_mut(id) {
                Some(node) => {
                    node.version.clone_from(version);
                    CommandResult::Done
                }
                None => CommandResult::Rejected(not_a_member(*id)),
            },
            Command::Observe { node, changes, at_ms } => {
                if !self.nodes.contains_key(node) {
                    return CommandResult::Rejected(not_a_member(*node));
                }
                let policy = self.health_policy();
                self.health.observe(*node, changes, policy, &self.voters, *at_ms);
                CommandResult::Done
            }
            Command::SetServerAdmin { backend, server, state, at_ms } => {
                if let Err(why) = self.server_exists(backend, server) {
                    return CommandResult::Rejected(why);
                }
                let health = self
                    .health
                    .backends
                    .get_mut(backend)
                    .and_then(|b| b.get_mut(server))
                    .expect("every server of the spec has a health entry");
                if health.admin != *state {
                    health.admin = *state;
                    health.admin_since_ms = *at_ms;
                }
                CommandResult::Done
            }
            Command::ReportServing { id, serving } => match self.nodes.get_mut(id) {
                Some(node) => {
                    node.serving = *serving;
                    CommandResult::Done
                }
                None => CommandResult::Rejected(not_a_member(*id)),
            },
            Command::SetNodeDrain { id, drain } => {
                if !self.nodes.contains_key(id) {
                    return CommandResult::Rejected(not_a_member(*id));
                }
                if *drain && !self.voters.iter().any(|v| v != id && !self.nodes.get(v).is_some_and(|n| n.drain)) {
                    return CommandResult::Rejected(format!(
                        "node {id} cannot be drained: no other voter is undrained to lead; undrain or add one first"
                    ));
                }
                self.nodes.get_mut(id).expect("checked above").drain = *drain;
                CommandResult::Done
            }
            Command::AssignVips { node, term, vips, at_ms } => {
                if let Some(newer) = self.vips.values().find(|a| a.term > *term) {
                    return CommandResult::Rejected(format!(
                        "node {node} of term {term} cannot record VIPs: node {} recorded them in term {}",
                        newer.node, newer.term
                    ));
                }
                let before = std::mem::take(&mut self.vips);
                for vip in vips {
                    let since_ms = match before.get(vip) {
                        Some(a) if a.node == *node && a.term == *term => a.since_ms,
                        _ => *at_ms,
                    };
                    self.vips.insert(vip.clone(), VipAssignment { node: *node, term: *term, since_ms });
                }
                CommandResult::Done
            }
        }
    }

    /// The backend of the spec in force by name; the error names those it has.
    pub fn backend(&self, name: &str) -> Result<&Backend, String> {
        let Some(spec) = self.current().map(|c| &c.spec) else {
            return Err("no spec has been applied yet: apply one with `lbctl config apply -f FILE`".to_owned());
        };
        spec.backends.iter().find(|b| b.name == name).ok_or_else(|| {
            let names: Vec<&str> = spec.backends.iter().map(|b| b.name.as_str()).collect();
            if names.is_empty() {
                format!("there is no backend `{name}`: the spec in force has none")
            } else {
                format!("there is no backend `{name}`: the backends are {}", names.join(", "))
            }
        })
    }

    /// Whether the spec in force has this server; the error names what it has.
    pub fn server_exists(&self, backend: &str, server: &str) -> Result<(), String> {
        let b = self.backend(backend)?;
        if !b.servers.iter().any(|s| s.name == server) {
            let names: Vec<&str> = b.servers.iter().map(|s| s.name.as_str()).collect();
            return Err(format!("backend `{backend}` has no server `{server}`: its servers are {}", names.join(", ")));
        }
        Ok(())
    }

    /// Keeps the registry equal to the membership: members that joined appear
    /// with their address, members that left disappear.
    pub fn apply_membership(&mut self, membership: &Membership<NodeId, BasicNode>) {
        let members: BTreeMap<NodeId, &BasicNode> = membership.nodes().map(|(id, n)| (*id, n)).collect();
        self.nodes.retain(|id, _| members.contains_key(id));
        for (id, node) in &members {
            let entry = self.nodes.entry(*id).or_insert_with(|| NodeInfo {
                id: *id,
                addr: node.addr.clone(),
                version: String::new(),
                drain: false,
                serving: true,
            });
            entry.addr.clone_from(&node.addr);
        }
        self.voters = membership.voter_ids().collect();
        let ids: BTreeSet<NodeId> = members.keys().copied().collect();
        let policy = self.health_policy();
        self.health.retain_nodes(&ids, policy, &self.voters);
    }

    fn push_config(&mut self, spec: Arc<Spec>, at_ms: u64, rollback_of: Option<u64>) -> CommandResult {
        if let Some(cur) = self.current() {
            if cur.spec == spec {
                return CommandResult::Config { version: cur.version, changed: false };
            }
        }
        let version = self.config_version() + 1;
        self.health.sync(&spec, &self.voters, at_ms);
        self.configs.push_back(ConfigVersion { version, spec, applied_at_ms: at_ms, rollback_of });
        while self.configs.len() > CONFIG_HISTORY {
            self.configs.pop_front();
        }
        CommandResult::Config { version, changed: true }
    }

    /// Why `version` cannot be found, for every place that looks one up.
    pub fn unknown_version(&self, version: u64) -> String {
        match (self.configs.front(), self.configs.back()) {
            (Some(first), Some(last)) => format!(
                "config version {version} is not in the history: versions {} to {} are kept (see lbctl config history)",
                first.version, last.version
            ),
            _ => format!("config version {version} does not exist: no spec has been applied yet"),
        }
    }
}

fn not_a_member(id: NodeId) -> String {
    format!("node {id} is not a member of the cluster")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{AdminState, ObservedChange};

    fn spec(backend: &str) -> Arc<Spec> {
        let yaml = format!("backends:\n  - name: {backend}\n    servers: []\n");
        Arc::new(Spec::from_yaml(&yaml).unwrap())
    }

    #[test]
    fn each_new_spec_gets_the_next_version_and_an_equal_one_does_not() {
        let mut st = ClusterState::default();
        assert_eq!(st.apply(&Command::ApplySpec { spec: spec("a"), at_ms: 1 }), CommandResult::Config { version: 1, changed: true });
        assert_eq!(st.apply(&Command::ApplySpec { spec: spec("b"), at_ms: 2 }), CommandResult::Config { version: 2, changed: true });
        assert_eq!(st.apply(&Command::ApplySpec { spec: spec("b"), at_ms: 3 }), CommandResult::Config { version: 2, changed: false });
        assert_eq!(st.config_version(), 2);
    }

    #[test]
    fn rollback_makes_a_new_version_with_the_old_spec() {
        let mut st = ClusterState::default();
        st.apply(&Command::ApplySpec { spec: spec("a"), at_ms: 1 });
        st.apply(&Command::ApplySpec { spec: spec("b"), at_ms: 2 });
        assert_eq!(st.apply(&Command::Rollback { version: 1, at_ms: 3 }), CommandResult::Config { version: 3, changed: true });
        let cur = st.current().unwrap();
        assert_eq!(cur.spec, spec("a"));
        assert_eq!(cur.rollback_of, Some(1));
    }

    #[test]
    fn a_vip_record_keeps_its_holders_since_and_refuses_an_older_term() {
        let mut st = ClusterState::default();
        let assign = |node, term, vips: &[&str], at_ms| Command::AssignVips {
            node,
            term,
            vips: vips.iter().map(|v| v.to_string()).collect(),
            at_ms,
        };
        assert_eq!(st.apply(&assign(1, 3, &["192.0.2.100/24"], 10)), CommandResult::Done);
        assert_eq!(st.apply(&assign(1, 3, &["192.0.2.100/24", "192.0.2.101/24"], 20)), CommandResult::Done);
        assert_eq!(st.vips["192.0.2.100/24"], VipAssignment { node: 1, term: 3, since_ms: 10 }, "held on: the same since");
        assert_eq!(st.vips["192.0.2.101/24"].since_ms, 20);
        assert_eq!(st.apply(&assign(2, 4, &["192.0.2.100/24"], 30)), CommandResult::Done);
        assert_eq!(st.vips.len(), 1, "the holder records every VIP it holds and no others");
        assert_eq!(st.vips["192.0.2.100/24"], VipAssignment { node: 2, term: 4, since_ms: 30 }, "a new holder: a new since");
        let stale = st.apply(&assign(1, 3, &["192.0.2.100/24"], 40));
        assert!(matches!(&stale, CommandResult::Rejected(why) if why.contains("node 2 recorded them in term 4")), "{stale:?}");
        assert_eq!(st.vips["192.0.2.100/24"].node, 2, "nothing changed");
    }

    #[test]
    fn a_node_is_drained_only_while_another_voter_is_not() {
        let mut st = ClusterState::default();
        let members = Membership::new(vec![[1, 2].into()], None);
        st.apply_membership(&members);
        assert_eq!(st.apply(&Command::SetNodeDrain { id: 1, drain: true }), CommandResult::Done);
        assert!(st.nodes[&1].drain);
        let last = st.apply(&Command::SetNodeDrain { id: 2, drain: true });
        assert!(matches!(&last, CommandResult::Rejected(why) if why.contains("no other voter is undrained")), "{last:?}");
        assert!(!st.nodes[&2].drain, "nothing changed");
        assert!(matches!(st.apply(&Command::SetNodeDrain { id: 9, drain: true }), CommandResult::Rejected(_)));
        assert_eq!(st.apply(&Command::SetNodeDrain { id: 1, drain: false }), CommandResult::Done);
        assert!(!st.nodes[&1].drain);
    }

    #[test]
    fn rollback_to_an_unknown_version_changes_nothing() {
        let mut st = ClusterState::default();
        st.apply(&Command::ApplySpec { spec: spec("a"), at_ms: 1 });
        let before = st.clone();
        match st.apply(&Command::Rollback { version: 9, at_ms: 2 }) {
            CommandResult::Rejected(msg) => assert!(msg.contains("config version 9 is not in the history"), "{msg}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(st, before);
    }

    #[test]
    fn history_keeps_the_last_fifty_versions() {
        let mut st = ClusterState::default();
        for i in 0..60 {
            st.apply(&Command::ApplySpec { spec: spec(&format!("b{i}")), at_ms: i });
        }
        assert_eq!(st.configs.len(), CONFIG_HISTORY);
        assert_eq!(st.configs.front().unwrap().version, 11);
        assert_eq!(st.config_version(), 60);
        assert!(matches!(st.apply(&Command::Rollback { version: 10, at_ms: 61 }), CommandResult::Rejected(_)));
    }

    #[test]
    fn the_registry_follows_the_membership() {
        let mut st = ClusterState::default();
        let nodes =
            |ids: &[u64]| -> BTreeMap<u64, BasicNode> { ids.iter().map(|i| (*i, BasicNode::new(format!("127.0.0.1:{i}")))).collect() };
        st.apply_membership(&Membership::new(vec![[1, 2].into()], nodes(&[1, 2])));
        st.apply(&Command::ReportNode { id: 2, version: "0.1.0".into() });
        st.apply_membership(&Membership::new(vec![[2, 3].into()], nodes(&[2, 3])));
        assert_eq!(st.nodes.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(st.nodes[&2].version, "0.1.0", "a member that stays keeps what it reported");
        assert!(matches!(st.apply(&Command::ReportNode { id: 1, version: "x".into() }), CommandResult::Rejected(_)));
    }

    fn three_voters() -> ClusterState {
        let mut st = ClusterState::default();
        let nodes: BTreeMap<u64, BasicNode> = (1..=3).map(|i| (i, BasicNode::new(format!("127.0.0.1:{i}")))).collect();
        st.apply_membership(&Membership::new(vec![[1, 2, 3].into()], nodes));
        let yaml =
            "backends:\n  - name: web\n    health_check: { type: tcp }\n    servers:\n      - { name: a, address: \"127.0.0.1:1\" }\n";
        st.apply(&Command::ApplySpec { spec: Arc::new(Spec::from_yaml(yaml).unwrap()), at_ms: 1 });
        st
    }

    fn observe(st: &mut ClusterState, node: NodeId, up: bool, at_ms: u64) {
        let change = ObservedChange { backend: "web".into(), server: "a".into(), up, since_ms: at_ms, detail: String::new() };
        assert_eq!(st.apply(&Command::Observe { node, changes: vec![change], at_ms }), CommandResult::Done);
    }

    #[test]
    fn a_server_goes_down_when_a_majority_of_voters_sees_it_down() {
        let mut st = three_voters();
        let a = |st: &ClusterState| st.health.server("web", "a").unwrap().clone();
        assert!(a(&st).up, "a new server starts up");
        observe(&mut st, 1, false, 10);
        assert!(a(&st).up, "one node of three");
        observe(&mut st, 2, false, 20);
        assert!(!a(&st).up);
        assert_eq!((a(&st).since_ms, a(&st).transitions), (20, 1));
        observe(&mut st, 2, false, 30);
        assert_eq!(a(&st).transitions, 1, "a repeated report changes nothing");
        // Node 2 leaves: node 1 alone of two voters sees it down.
        let nodes: BTreeMap<u64, BasicNode> = [1, 3].iter().map(|i| (*i, BasicNode::new(format!("127.0.0.1:{i}")))).collect();
        st.apply_membership(&Membership::new(vec![[1, 3].into()], nodes));
        assert!(!a(&st).observations.contains_key(&2));
        assert!(a(&st).up, "one of two is no majority");
        assert_eq!(a(&st).transitions, 2);
    }

    #[test]
    fn operator_states_need_a_known_server_and_survive_a_spec_change() {
        let mut st = three_voters();
        let set = |backend: &str, server: &str, state| Command::SetServerAdmin {
            backend: backend.into(),
            server: server.into(),
            state,
            at_ms: 5,
        };
        assert_eq!(st.apply(&set("web", "a", AdminState::Maint)), CommandResult::Done);
        let before = st.clone();
        match st.apply(&set("web", "zz", AdminState::Drain)) {
            CommandResult::Rejected(msg) => assert!(msg.contains("backend `web` has no server `zz`: its servers are a"), "{msg}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        match st.apply(&set("nope", "a", AdminState::Drain)) {
            CommandResult::Rejected(msg) => assert!(msg.contains("there is no backend `nope`"), "{msg}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(st, before);
        let yaml = "backends:\n  - name: web\n    servers:\n      - { name: a, address: \"127.0.0.1:2\" }\n";
        st.apply(&Command::ApplySpec { spec: Arc::new(Spec::from_yaml(yaml).unwrap()), at_ms: 9 });
        let a = st.health.server("web", "a").unwrap();
        assert_eq!(a.admin, AdminState::Maint, "the operator's state is about the name");
        assert!(a.up && !a.checked && a.observations.is_empty(), "a new address and no check start afresh");
    }
}
