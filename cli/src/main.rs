//! `lbctl`: drives a raftlb cluster through the admin API of any one node.

mod client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use client::Client;
use raftlb_proto::admin::*;
use raftlb_proto::spec::{self, Spec};
use serde_json::json;

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Drive a raftlb cluster: membership, configuration, status")]
struct Cli {
    /// Admin address of any node of the cluster.
    #[arg(long, global = true, env = "LBCTL_ENDPOINT", default_value = "127.0.0.1:7001", value_name = "ADDR")]
    endpoint: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for an answer, like 15s or 500ms.
    #[arg(long, global = true, default_value = "15s", value_parser = parse_timeout, value_name = "DURATION")]
    timeout: Duration,
    #[command(subcommand)]
    command: Cmd,
}

/// A command line clap refused, as one line like every other failure: its
/// first paragraph (without tips), and the usage when clap gives one.
fn usage_error(rendered: &str) -> String {
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let what = first.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    let what = what.trim_start_matches("error: ");
    match rendered.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        Some(usage) => format!("{what} (usage: {usage})"),
        None => what.to_owned(),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<spec::Duration>().map(spec::Duration::get)? {
        d if d.is_zero() => Err(format!("{s:?} would give up before any answer: give a duration above zero, like \"15s\"")),
        d => Ok(d),
    }
}

/// Config versions are numbered from 1.
fn parse_version(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a config version: versions are numbered from 1 (see lbctl config history)")),
        Ok(v) => Ok(v),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, or show its state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Add or remove cluster members.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Move leadership on purpose.
    #[command(subcommand)]
    Leader(LeaderCmd),
    /// Where the VIPs are, and moving them.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Apply, inspect and roll back the cluster spec.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Backend health: the committed view, and each node's own checks.
    Health {
        /// Only this backend.
        backend: Option<String>,
    },
    /// Take a server out of rotation or put it back, on every node.
    #[command(subcommand)]
    Server(ServerCmd),
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Maintenance: the server gets no traffic at all.
    Disable { server: ServerRef },
    /// Back in rotation, as its health allows.
    Enable { server: ServerRef },
    /// No new sessions; open sessions and persistent clients continue.
    Drain { server: ServerRef },
}

/// BACKEND/SERVER, as `lbctl health` lists them.
#[derive(Clone)]
struct ServerRef {
    backend: String,
    server: String,
}

impl std::str::FromStr for ServerRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((b, srv)) if !b.is_empty() && !srv.is_empty() && !srv.contains('/') => {
                Ok(ServerRef { backend: b.to_owned(), server: srv.to_owned() })
            }
            _ => Err(format!("{s:?} does not name a server: write BACKEND/SERVER, like web/app1")),
        }
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make the node at --endpoint the first member of a new cluster.
    Init,
    /// Leader, term, config version, and every member with its role.
    Status {
        /// Show the answering node's own view instead of the leader's.
        #[arg(long)]
        local: bool,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Join a running lbnode: it catches up as a learner, then becomes a voter.
    Add {
        /// The node's id (its --id).
        id: u64,
        /// The node's gRPC address (its --listen or --advertise).
        addr: String,
    },
    /// Remove a member from the cluster.
    Remove { id: u64 },
    /// Drain a node for maintenance: it hands leadership and its VIPs to
    /// another voter and does not stand for election until undrained.
    Drain { id: u64 },
    /// End a node's drain: it may lead and hold VIPs again.
    Undrain { id: u64 },
}

#[derive(Subcommand)]
enum LeaderCmd {
    /// Hand leadership to NODE (default: the voter whose log is furthest along),
    /// faster and cleaner than a crash failover: for maintenance of the leader.
    Transfer { node: Option<u64> },
}

#[derive(Subcommand)]
enum VipCmd {
    /// Each VIP of the spec and the node that holds it now, with since when and the term.
    List,
    /// Move VIP to NODE: a planned handoff of leadership (the leader holds every VIP).
    Move { vip: String, node: u64 },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a spec and make it the new version on every node.
    Apply {
        /// The spec file (YAML); - reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Validate and show the change; commit nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the spec in force, or an earlier version from the history.
    Get {
        #[arg(long, value_parser = parse_version)]
        version: Option<u64>,
    },
    /// List the versions kept for rollback.
    History,
    /// Show how a spec file differs from the spec in force.
    Diff {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Make an earlier version's spec the spec in force, as a new version.
    Rollback {
        #[arg(value_parser = parse_version)]
        version: u64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and the help shown for a command left unfinished.
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            eprintln!("lbctl: {}", usage_error(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // A spec is checked before any node is contacted: a bad file fails fast, offline.
    let local_spec = match &cli.command {
        Cmd::Config(ConfigCmd::Apply { file, .. } | ConfigCmd::Diff { file }) => Some(read_spec(file)?),
        _ => None,
    };
    let c = Client::connect(&cli.endpoint, cli.timeout).await?;
    let mut admin = c.admin.clone();
    let json_out = cli.json;
    match cli.command {
        Cmd::Cluster(ClusterCmd::Init) => {
            let r = admin.cluster_init(c.request(ClusterInitRequest {})).await.map_err(|s| c.fail(s))?.into_inner();
            emit(json_out, json!({ "node": r.node_id, "addr": r.addr }), || {
                format!("initialized a new cluster: node {} at {} leads it", r.node_id, r.addr)
            });
        }
        Cmd::Cluster(ClusterCmd::Status { local }) => {
            let r = admin.cluster_status(c.request(ClusterStatusRequest { local })).await.map_err(|s| c.fail(s))?.into_inner();
            print_status(json_out, &r);
        }
        Cmd::Node(NodeCmd::Add { id, addr }) => {
            let r = admin.node_add(c.request(NodeAddRequest { id, addr: addr.clone() })).await.map_err(|s| c.fail(s))?.into_inner();
            print_members(json_out, &format!("node {id} at {addr} joined as a voter"), &r);
        }
        Cmd::Node(NodeCmd::Remove { id }) => {
            let r = admin.node_remove(c.request(NodeRemoveRequest { id })).await.map_err(|s| c.fail(s))?.into_inner();
            print_members(json_out, &format!("node {id} removed"), &r);
        }
        Cmd::Node(NodeCmd::Drain { id }) => node_drain(&c, json_out, id, true).await?,
        Cmd::Node(NodeCmd::Undrain { id }) => node_drain(&c, json_out, id, false).await?,
        Cmd::Leader(LeaderCmd::Transfer { node }) => {
            let r = admin.leader_transfer(c.request(LeaderTransferRequest { node })).await.map_err(|s| c.fail(s))?.into_inner();
            emit(json_out, json!({ "from": r.from, "leader": r.leader, "took_ms": r.took_ms }), || {
                format!("node {} leads now (was node {}); the handoff took {} ms", r.leader, r.from, r.took_ms)
            });
        }
        Cmd::Vip(VipCmd::List) => {
            let r = admin.vip_list(c.request(VipListRequest {})).await.map_err(|s| c.fail(s))?.into_inner();
            print_vips(json_out, &r);
        }
        Cmd::Vip(VipCmd::Move { vip, node }) => {
            let r = admin.vip_move(c.request(VipMoveRequest { vip: vip.clone(), node })).await.map_err(|s| c.fail(s))?.into_inner();
            emit(json_out, json!({ "vip": vip, "from": r.from, "node": r.leader, "took_ms": r.took_ms }), || {
                format!("{vip} moved from node {} to node {} (with leadership and every other VIP) in {} ms", r.from, r.leader, r.took_ms)
            });
        }
        Cmd::Config(ConfigCmd::Apply { dry_run, .. }) => {
            let (_, yaml) = local_spec.expect("read above");
            let r =
                admin.config_apply(c.request(ConfigApplyRequest { spec_yaml: yaml, dry_run })).await.map_err(|s| c.fail(s))?.into_inner();
            let summary = match (dry_run, r.changed) {
                (true, true) => format!("dry run: the spec is valid and would replace version {}; nothing was committed", r.version),
                (true, false) => format!("dry run: the spec is valid and equals version {}, which is in force", r.version),
                (false, true) => format!("applied: version {} is in force", r.version),
                (false, false) => format!("unchanged: the spec equals version {}, which stays in force", r.version),
            };
            emit(json_out, json!({ "version": r.version, "changed": r.changed, "dry_run": dry_run, "diff": r.diff }), || {
                format!("{summary}\n{}", r.diff).trim_end().to_owned()
            });
        }
        Cmd::Config(ConfigCmd::Get { version }) => {
            let r =
                admin.config_get(c.request(ConfigGetRequest { version: version.unwrap_or(0) })).await.map_err(|s| c.fail(s))?.into_inner();
            if json_out {
                let spec = Spec::from_yaml(&r.spec_yaml).map_err(|e| anyhow!("the node sent a spec that does not validate here: {e}"))?;
                println!("{}", json!({ "version": r.version, "spec": spec }));
            } else {
                print!("# raftlb spec, version {}\n{}", r.version, r.spec_yaml);
            }
        }
        Cmd::Config(ConfigCmd::History) => {
            let r = admin.config_history(c.request(ConfigHistoryRequest {})).await.map_err(|s| c.fail(s))?.into_inner();
            print_history(json_out, &r);
        }
        Cmd::Config(ConfigCmd::Diff { file }) => {
            let (spec, _) = local_spec.expect("read above");
            let (version, current) = match admin.config_get(c.request(ConfigGetRequest { version: 0 })).await {
                Ok(r) => {
                    let r = r.into_inner();
                    (r.version, r.spec_yaml)
                }
                Err(s) if s.code() == tonic::Code::NotFound => (0, String::new()),
                Err(s) => return Err(c.fail(s)),
            };
            let diff = spec::diff(&current, &spec.to_yaml(), &format!("version {version}"), &file.display().to_string());
            emit(json_out, json!({ "version": version, "changed": !diff.is_empty(), "diff": diff }), || {
                if diff.is_empty() {
                    format!("{} equals version {version}, which is in force", file.display())
                } else {
                    diff.trim_end().to_owned()
                }
            });
        }
        Cmd::Health { backend } => {
            let req = HealthRequest { backend: backend.unwrap_or_default() };
            let r = admin.health(c.request(req)).await.map_err(|s| c.fail(s))?.into_inner();
            print_health(json_out, &r);
        }
        Cmd::Server(cmd) => {
            let (target, state, what) = match cmd {
                ServerCmd::Disable { server } => (server, "maint", "in maintenance: no traffic"),
                ServerCmd::Enable { server } => (server, "ready", "ready: in rotation as its health allows"),
                ServerCmd::Drain { server } => (server, "drain", "draining: no new sessions"),
            };
            let req = ServerSetStateRequest { backend: target.backend.clone(), server: target.server.clone(), state: state.to_owned() };
            admin.server_set_state(c.request(req)).await.map_err(|s| c.fail(s))?;
            emit(json_out, json!({ "backend": target.backend, "server": target.server, "state": state }), || {
                format!("{}/{} is {what}", target.backend, target.server)
            });
        }
        Cmd::Config(ConfigCmd::Rollback { version }) => {
            let r = admin.config_rollback(c.request(ConfigRollbackRequest { version })).await.map_err(|s| c.fail(s))?.into_inner();
            emit(json_out, json!({ "version": r.version, "changed": r.changed, "rollback_to": version, "diff": r.diff }), || {
                if r.changed {
                    format!("rolled back: version {} holds the spec of version {version}\n{}", r.version, r.diff).trim_end().to_owned()
                } else {
                    format!("unchanged: version {version}'s spec is already in force as version {}", r.version)
                }
            });
        }
    }
    Ok(())
}

/// Reads and validates a spec file; returns the spec and the text as written.
fn read_spec(path: &Path) -> anyhow::Result<(Spec, String)> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the spec from standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let spec = Spec::from_yaml(&text).map_err(|e| anyhow!("{} is not a valid spec; nothing was applied:\n{e}", path.display()))?;
    Ok((spec, text))
}

fn emit(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

fn print_status(json_out: bool, r: &ClusterStatusReply) {
    let members: Vec<_> = r
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "addr": m.addr, "role": m.role, "version": m.version, "drain": m.drain,
                "serving": m.serving, "last_contact_ms": m.last_contact_ms,
            })
        })
        .collect();
    let value = json!({
        "leader": r.leader, "term": r.term, "config_version": r.config_version, "answered_by": r.answered_by,
        "initialized": r.initialized, "last_applied": r.last_applied, "members": members,
        "contacted": r.contacted, "health_view": r.health_view, "self_check": r.self_check,
    });
    emit(json_out, value, || {
        if !r.initialized {
            return format!(
                "node {} is not part of a cluster yet: run `lbctl cluster init` on it, or `lbctl node add` on a member",
                r.answered_by
            );
        }
        let leader = r.leader.map_or("none".to_owned(), |l| l.to_string());
        let mut out =
            format!("leader: {leader}   term: {}   config version: {}   (view of node {})\n\n", r.term, r.config_version, r.answered_by);
        let mut rows = vec![["ID", "ADDRESS", "ROLE", "VERSION", "SELF-CHECK", "LAST CONTACT"].map(String::from).to_vec()];
        for m in &r.members {
            let contact = m.last_contact_ms.map_or("-".to_owned(), |ms| format!("{ms}ms ago"));
            let version = if m.version.is_empty() { "-".to_owned() } else { m.version.clone() };
            let role = if m.drain { format!("{} (drain)", m.role) } else { m.role.clone() };
            let serving = if m.serving { "serving" } else { "failing" };
            rows.push(vec![m.id.to_string(), m.addr.clone(), role, version, serving.to_owned(), contact]);
        }
        out.push_str(&table(&rows));
        out.push_str(&format!("\n\nnode {} routes by the {} health view; its self-check: {}", r.contacted, r.health_view, r.self_check));
        out
    });
}

fn print_health(json_out: bool, r: &HealthReply) {
    let servers: Vec<_> = r
        .servers
        .iter()
        .map(|s| {
            let nodes: Vec<_> = s
                .nodes
                .iter()
                .map(|n| {
                    let own = n.own.as_ref();
                    json!({
                        "node": n.node, "reported_up": n.reported_up, "reported_since_ms": n.reported_since_ms,
                        "reported_detail": n.reported_detail, "answered": own.is_some(),
                        "checked_up": own.filter(|o| o.checked).map(|o| o.up), "checked_since_ms": own.map_or(0, |o| o.since_ms),
                        "last_ok": own.and_then(|o| o.last_ok), "last_result": own.map_or("", |o| &o.last_result),
                        "latency_us": own.map_or(0, |o| o.latency_us), "last_at_ms": own.map_or(0, |o| o.last_at_ms),
                        "proposals": own.map_or(0, |o| o.proposals), "routes": own.is_some_and(|o| o.routes), "view": n.view,
                    })
                })
                .collect();
            json!({
                "backend": s.backend, "server": s.server, "address": s.address, "checked": s.checked,
                "state": if s.up { "up" } else { "down" }, "since_ms": s.since_ms, "transitions": s.transitions,
                "admin": s.admin, "admin_since_ms": s.admin_since_ms, "nodes": nodes,
            })
        })
        .collect();
    emit(json_out, json!({ "policy": r.policy, "answered_by": r.answered_by, "servers": servers }), || {
        if r.servers.is_empty() {
            return "no servers: no spec has been applied, or it has no backends".to_owned();
        }
        let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let ago = |ms: u64| {
            if ms == 0 {
                "-".to_owned()
            } else {
                format!("{} ago", humantime::format_duration(Duration::from_secs(now.saturating_sub(ms) / 1000)))
            }
        };
        let updown = |up: bool| if up { "up" } else { "down" }.to_owned();
        let mut rows = vec![["SERVER", "ADDRESS", "CLUSTER", "SINCE", "ADMIN", "NODE", "OWN CHECKS", "LAST CHECK", "ROUTES"]
            .map(String::from)
            .to_vec()];
        for s in &r.servers {
            let cluster = if s.checked { updown(s.up) } else { "up (no check)".to_owned() };
            let mut first = vec![format!("{}/{}", s.backend, s.server), s.address.clone(), cluster, ago(s.since_ms), s.admin.clone()];
            for (i, n) in s.nodes.iter().enumerate() {
                let head = if i == 0 { std::mem::take(&mut first) } else { vec![String::new(); 5] };
                let (own, last, routes) = match &n.own {
                    None => {
                        let reported = n.reported_up.map_or("no answer".to_owned(), |up| format!("{} (reported), no answer", updown(up)));
                        (reported, "-".to_owned(), "-".to_owned())
                    }
                    Some(o) => {
                        let own = if o.checked {
                            format!("{} for {}", updown(o.up), ago(o.since_ms).trim_end_matches(" ago"))
                        } else {
                            "-".to_owned()
                        };
                        let last = match o.last_ok {
                            Some(_) => format!("{} in {:.1}ms, {}", o.last_result, o.latency_us as f64 / 1000.0, ago(o.last_at_ms)),
                            None => "-".to_owned(),
                        };
                        (own, last, if o.routes { "yes".to_owned() } else { "no".to_owned() })
                    }
                };
                let mut row = head;
                row.extend([format!("node {}", n.node), own, last, routes]);
                rows.push(row);
            }
        }
        format!("policy: {}   (view of node {})\n\n{}", r.policy, r.answered_by, table(&rows))
    });
}

async fn node_drain(c: &Client, json_out: bool, id: u64, drain: bool) -> anyhow::Result<()> {
    let r = c.admin.clone().node_drain(c.request(NodeDrainRequest { id, drain })).await.map_err(|s| c.fail(s))?.into_inner();
    emit(json_out, json!({ "node": id, "drain": drain, "leader": r.leader }), || {
        if drain {
            format!("node {id} is drained: it holds no VIPs and does not stand for leadership; node {} leads", r.leader)
        } else {
            format!("node {id} is no longer drained: it may lead and hold VIPs again")
        }
    });
    Ok(())
}

fn print_vips(json_out: bool, r: &VipListReply) {
    let committed = |vip: &str| r.committed.iter().find(|c| c.vip == vip);
    if json_out {
        let record = |vip: &str| committed(vip).map(|c| json!({ "node": c.node, "term": c.term, "since_ms": c.since_ms }));
        let mut list: Vec<_> = r
            .vips
            .iter()
            .map(|v| {
                json!({ "vip": v.vip, "node": v.node, "interface": v.interface, "since_ms": v.since_ms, "term": v.term, "committed": record(&v.vip) })
            })
            .collect();
        list.extend(r.unheld.iter().map(|v| json!({ "vip": v, "node": null, "committed": record(v) })));
        println!("{}", serde_json::Value::Array(list));
        return;
    }
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let record = |vip: &str| committed(vip).map_or("-".to_owned(), |c| format!("node {} (term {})", c.node, c.term));
    let mut rows = vec![["VIP", "NODE", "INTERFACE", "SINCE", "TERM", "COMMITTED"].map(String::from).to_vec()];
    for v in &r.vips {
        let since = humantime::format_duration(Duration::from_secs(now.saturating_sub(v.since_ms) / 1000)).to_string();
        rows.push(vec![v.vip.clone(), v.node.to_string(), v.interface.clone(), format!("{since} ago"), v.term.to_string(), record(&v.vip)]);
    }
    for v in &r.unheld {
        rows.push(vec![v.clone(), "-".into(), "-".into(), "-".into(), "-".into(), record(v)]);
    }
    let mut out = if rows.len() == 1 { "the spec in force has no VIPs".to_owned() } else { table(&rows) };
    for id in &r.unreachable {
        out.push_str(&format!("\nnode {id} did not answer: it may hold a VIP not listed"));
    }
    for p in &r.problems {
        out.push_str(&format!("\n{p}"));
    }
    println!("{out}");
}

fn print_members(json_out: bool, what: &str, r: &NodeChangeReply) {
    let ids = |v: &[u64]| if v.is_empty() { "-".to_owned() } else { v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ") };
    emit(json_out, json!({ "voters": r.voters, "learners": r.learners }), || {
        format!("{what}: voters {}; learners {}", ids(&r.voters), ids(&r.learners))
    });
}

fn print_history(json_out: bool, r: &ConfigHistoryReply) {
    let versions: Vec<_> = r
        .versions
        .iter()
        .map(|v| json!({ "version": v.version, "applied_at_ms": v.applied_at_ms, "origin": v.origin, "current": v.current }))
        .collect();
    emit(json_out, json!({ "versions": versions }), || {
        if r.versions.is_empty() {
            return "no spec has been applied yet".to_owned();
        }
        let mut rows = vec![["VERSION", "APPLIED (UTC)", "ORIGIN", ""].map(String::from).to_vec()];
        for v in r.versions.iter().rev() {
            let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(v.applied_at_ms)).to_string();
            rows.push(vec![v.version.to_string(), at, v.origin.clone(), if v.current { "in force".into() } else { String::new() }]);
        }
        table(&rows)
    });
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(c, cell)| format!("{cell:<w$}", w = widths[c])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.trim_end().to_owned()
}
