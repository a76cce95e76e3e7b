//! The node config: a YAML file (`--config`) whose every setting a flag of
//! the same name overrides. It says who this node is and where it listens;
//! what it balances is the cluster spec, replicated by Raft.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use raftlb_proto::spec::Duration;
use raftlb_raft::Settings;

use crate::dataplane::runtime::BindRewrite;
use serde::Deserialize;

/// The node config file. Every field is optional here: flags may supply it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster: a number above 0, unique and never reused.
    pub id: Option<u64>,
    /// Where the gRPC server (Raft between nodes, and the admin API) listens.
    pub listen: Option<SocketAddr>,
    /// The address peers and lbctl use to reach this node; defaults to `listen`.
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Where the monitor HTTP server (`GET /healthz`) listens; off when absent.
    pub monitor: Option<SocketAddr>,
    /// Frontend bind addresses this node moves to another IP, for several
    /// nodes on one host: `{"127.0.0.1": "127.0.0.2"}`.
    #[serde(default)]
    pub bind_rewrite: BTreeMap<IpAddr, IpAddr>,
    /// Threads that carry traffic; defaults to one per core.
    pub threads: Option<usize>,
    /// The CPUs those threads run on: `auto`, `none` or a list like `0-3,6`.
    pub cpus: Option<Cpus>,
    /// Source address of connections to servers (traffic and health checks),
    /// as HAProxy's `source`; the kernel chooses when absent.
    pub source: Option<IpAddr>,
    /// How long a stopping node waits for its connections to end.
    pub stop_grace: Option<Duration>,
    #[serde(default)]
    pub self_check: SelfCheck,
    #[serde(default)]
    pub vip: VipSettings,
    #[serde(default)]
    pub raft: RaftTimings,
    #[serde(default)]
    pub log: LogSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTimings {
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// How long a write may wait for a leader and a quorum before it fails.
    pub write_timeout: Duration,
    /// Log entries between two snapshots.
    pub snapshot_after: u64,
    /// Log entries kept behind a snapshot; a follower further behind is sent the snapshot.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftTimings {
    /// The Raft crate's defaults, stated once there.
    fn default() -> Self {
        let d = Settings::new(0, String::new(), PathBuf::new());
        let ms = |t: std::time::Duration| Duration::from_millis(t.as_millis() as u64);
        RaftTimings {
            heartbeat: ms(d.heartbeat),
            election_timeout_min: ms(d.election_timeout_min),
            election_timeout_max: ms(d.election_timeout_max),
            write_timeout: ms(d.write_timeout),
            snapshot_after: d.snapshot_after,
            logs_kept_after_snapshot: d.logs_kept_after_snapshot,
        }
    }
}

/// The node's check of its own frontends, like Keepalived's track_script on
/// HAProxy: a node whose data plane fails gives up leadership (and its VIPs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfCheck {
    pub interval: Duration,
    /// Failed rounds in a row before the node counts as failing.
    pub fall: u32,
    /// Passed rounds in a row before a failing node counts as serving again.
    pub rise: u32,
}

impl Default for SelfCheck {
    fn default() -> Self {
        SelfCheck { interval: Duration::from_millis(500), fall: 3, rise: 2 }
    }
}

/// How the leader holds the VIPs of the spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VipSettings {
    pub fencing: Fencing,
    /// The holder keeps its VIPs only while a quorum acknowledged it within this.
    pub lease: Duration,
    /// Each VIP is added valid for this long and refreshed while the lease
    /// holds: the kernel removes the address of a frozen holder by itself.
    pub lifetime: Duration,
    /// Announcements (gratuitous ARP, neighbour advertisement) sent at once on takeover.
    pub announce_burst: u32,
    /// A second burst this long after the takeover.
    pub announce_again_after: Duration,
    /// Then one announcement every this long while holding.
    pub announce_every: Duration,
    /// Run on acquiring a VIP, with RAFTLB_VIP, RAFTLB_NODE and RAFTLB_EVENT=acquire
    /// in its environment (for networks that ignore ARP: move a cloud address).
    pub on_acquire: Option<String>,
    /// The same on releasing a VIP (RAFTLB_EVENT=release).
    pub on_release: Option<String>,
}

impl Default for VipSettings {
    fn default() -> Self {
        VipSettings {
            fencing: Fencing::Lease,
            lease: Duration::from_millis(100),
            lifetime: Duration::from_secs(1),
            announce_burst: 3,
            announce_again_after: Duration::from_secs(1),
            announce_every: Duration::from_secs(10),
            on_acquire: None,
            on_release: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fencing {
    /// Take the VIPs over right after election; a frozen holder's address
    /// lingers at most one `lifetime`.
    #[default]
    Lease,
    /// Wait out the previous holder's address lifetime before adding the
    /// VIPs: never two holders, at the cost of a slower failover.
    Strict,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter, like `info` or `info,raftlb_raft=debug`; RUST_LOG wins over it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        // openraft reports every failed RPC to an unreachable peer; the node
        // logs reachability and leadership changes itself, once each.
        LogSettings { format: LogFormat::Text, level: "info,openraft=off".to_owned() }
    }
}

/// How long a stopping node waits for its connections by default.
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

/// The flags that override the file, as `lbnode` parses them.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Node config file (YAML); flags override its settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id: a number above 0, unique in the cluster.
    #[arg(long)]
    pub id: Option<u64>,
    /// gRPC address for Raft and the admin API, like 127.0.0.1:7001.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address peers and lbctl reach this node at (default: --listen).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Directory of the Raft log and snapshots.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP address of the monitor server (GET /healthz).
    #[arg(long, value_name = "ADDR")]
    pub monitor: Option<SocketAddr>,
    /// Threads that carry traffic (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// CPUs the traffic threads run on, one each in turn: a list like 0-3,6,
    /// `none`, or `auto` (default: one CPU per thread when there are as many
    /// threads as CPUs this node may use).
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<Cpus>,
    /// Source address of connections to servers (traffic and health checks).
    #[arg(long, value_name = "IP")]
    pub source: Option<IpAddr>,
    /// Serve frontends bound to FROM on TO instead, like 127.0.0.1=127.0.0.2 (repeatable).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_rewrite)]
    pub bind_rewrite: Vec<(IpAddr, IpAddr)>,
    /// How long a stopping node (SIGTERM) waits for its open connections to end (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub stop_grace: Option<Duration>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

fn parse_rewrite(s: &str) -> Result<(IpAddr, IpAddr), String> {
    let bad = || format!("{s:?} is not a rewrite: write FROM=TO with two IP addresses, like 127.0.0.1=127.0.0.2");
    let (from, to) = s.split_once('=').ok_or_else(bad)?;
    Ok((from.trim().parse().map_err(|_| bad())?, to.trim().parse().map_err(|_| bad())?))
}

/// Everything the node needs to run, complete and checked.
#[derive(Debug)]
pub struct Resolved {
    pub settings: Settings,
    pub bind_rewrite: BindRewrite,
    pub threads: usize,
    /// The CPU each traffic thread runs on, by thread; empty: where the kernel puts them.
    pub worker_cpus: Vec<usize>,
    pub listen: SocketAddr,
    pub monitor: Option<SocketAddr>,
    pub source: Option<IpAddr>,
    pub self_check: SelfCheck,
    pub vip: VipSettings,
    pub log: LogSettings,
    pub stop_grace: std::time::Duration,
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the node config {}", path.display()))?;
        let de = serde_norway::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path_in_file = e.path().to_string();
            let message = e.into_inner().to_string();
            // The YAML parser names where it was too (the key, or the section
            // holding an unknown key): said once is enough.
            let message = match message.split_once(": ") {
                Some((at, rest)) if path_in_file == at || path_in_file.starts_with(&format!("{at}.")) => rest.to_owned(),
                _ => message,
            };
            anyhow::anyhow!("{}: {path_in_file}: {message}", path.display())
        })
    }
}

impl Overrides {
    /// Reads the file if given, lays the flags over it and checks the result.
    pub fn resolve(self) -> anyhow::Result<Resolved> {
        let mut file = match &self.config {
            Some(path) => NodeConfig::load(path)?,
            None => NodeConfig::default(),
        };
        let missing = |flag: &str| format!("--{flag} is missing: give it as a flag or as `{}:` in the node config", flag.replace('-', "_"));
        let id = self.id.or(file.id).with_context(|| missing("id"))?;
        if id == 0 {
            bail!("--id 0 is not a node id: use a number above 0");
        }
        let listen = self.listen.or(file.listen).with_context(|| missing("listen"))?;
        let data_dir = self.data_dir.or(file.data_dir).with_context(|| missing("data-dir"))?;
        let advertise = self.advertise.or(file.advertise).unwrap_or_else(|| listen.to_string());
        if listen.ip().is_unspecified() && advertise == listen.to_string() {
            bail!("--listen {listen} is not an address peers can reach: give --advertise with this node's reachable address");
        }
        if !is_host_and_port(&advertise) {
            bail!(
                "--advertise {advertise:?} is not an address peers can reach: write HOST:PORT, like 10.0.0.1:7001 or lb1.example.net:7001"
            );
        }
        if let Some(format) = self.log_format {
            file.log.format = format;
        }
        let t = &file.raft;
        if t.election_timeout_min >= t.election_timeout_max {
            bail!(
                "raft.election_timeout_min ({}) must be below raft.election_timeout_max ({})",
                t.election_timeout_min,
                t.election_timeout_max
            );
        }
        if t.heartbeat.is_zero() || t.heartbeat >= t.election_timeout_min {
            bail!("raft.heartbeat ({}) must be above zero and below raft.election_timeout_min ({})", t.heartbeat, t.election_timeout_min);
        }
        if t.write_timeout.is_zero() {
            bail!("raft.write_timeout ({}) must be above zero: every write would fail at once", t.write_timeout);
        }
        if t.snapshot_after == 0 {
            bail!("raft.snapshot_after (0) must be 1 or more log entries between two snapshots, like 1000");
        }
        let mut settings = Settings::new(id, advertise, data_dir);
        settings.heartbeat = t.heartbeat.get();
        settings.election_timeout_min = t.election_timeout_min.get();
        settings.election_timeout_max = t.election_timeout_max.get();
        settings.write_timeout = t.write_timeout.get();
        settings.snapshot_after = t.snapshot_after;
        settings.logs_kept_after_snapshot = t.logs_kept_after_snapshot;
        let threads = match self.threads.or(file.threads) {
            Some(0) => bail!("--threads 0 would carry no traffic: give 1 or more, or leave it out for one per core"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let worker_cpus = self.cpus.or(file.cpus).unwrap_or(Cpus::Auto).place(threads, &allowed_cpus()?)?;
        let c = &file.self_check;
        if c.interval.is_zero() || c.fall == 0 || c.rise == 0 {
            bail!(
                "self_check: interval ({}), fall ({}) and rise ({}) must all be above zero, like {{ interval: 500ms, fall: 3, rise: 2 }}",
                c.interval,
                c.fall,
                c.rise
            );
        }
        let v = &file.vip;
        if v.lease.get() <= t.heartbeat.get() || v.lease >= t.election_timeout_min {
            bail!(
                "vip.lease ({}) must be above raft.heartbeat ({}), or a healthy holder drops its VIPs between heartbeats, \
                 and below raft.election_timeout_min ({}): a holder must drop its VIPs before another node can be elected",
                v.lease,
                t.heartbeat,
                t.election_timeout_min
            );
        }
        if v.announce_again_after.is_zero() || v.announce_every.is_zero() || v.announce_burst == 0 {
            bail!(
                "vip.announce_burst ({}), vip.announce_again_after ({}) and vip.announce_every ({}) must be above zero",
                v.announce_burst,
                v.announce_again_after,
                v.announce_every
            );
        }
        for (key, command) in [("on_acquire", &v.on_acquire), ("on_release", &v.on_release)] {
            if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                bail!("vip.{key} is empty: give the command to run, or leave the key out");
            }
        }
        if v.lifetime.get() < std::time::Duration::from_secs(1) || v.lifetime.get().subsec_nanos() != 0 {
            bail!("vip.lifetime ({}) must be whole seconds, at least 1s: the kernel counts address lifetimes in seconds", v.lifetime);
        }
        let mut bind_rewrite: BindRewrite = file.bind_rewrite.into_iter().collect();
        bind_rewrite.extend(self.bind_rewrite);
        Ok(Resolved {
            settings,
            bind_rewrite,
            threads,
            worker_cpus,
            listen,
            monitor: self.monitor.or(file.monitor),
            source: self.source.or(file.source),
            self_check: file.self_check,
            vip: file.vip,
            log: file.log,
            stop_grace: self.stop_grace.or(file.stop_grace).unwrap_or(DEFAULT_STOP_GRACE).get(),
        })
    }
}

/// Where the traffic threads run (`cpus`). A thread serves its connections
/// from start to end, so two threads sharing a CPU take turns a whole
/// scheduler tick each, and the connections of the one waiting stall that
/// long: a thread of its own per CPU keeps the latency even. HAProxy's
/// `cpu-map`, nginx's `worker_cpu_affinity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cpus {
    /// One CPU each when there are exactly as many threads as CPUs this node
    /// may run on (a machine or a cpuset given to the balancer); otherwise the
    /// kernel places the threads, as other work shares the CPUs.
    Auto,
    /// The kernel places the threads.
    None,
    /// Thread i runs on the i-th CPU listed, starting over when there are
    /// more threads than CPUs.
    List(Vec<usize>),
}

impl Cpus {
    /// The CPU of each of `threads` threads, given the CPUs this node may run
    /// on; empty when the kernel places them.
    pub fn place(&self, threads: usize, allowed: &[usize]) -> anyhow::Result<Vec<usize>> {
        let list = match self {
            Cpus::Auto if threads == allowed.len() => allowed,
            Cpus::Auto | Cpus::None => return Ok(Vec::new()),
            Cpus::List(list) => {
                if let Some((_, cpu)) = list.iter().enumerate().find(|(i, c)| list[..*i].contains(c)) {
                    bail!("cpus: CPU {cpu} is listed more than once: threads that share a CPU stall each other; list each CPU once");
                }
                if let Some(cpu) = list.iter().find(|c| !allowed.contains(c)) {
                    bail!(
                        "cpus: CPU {cpu} is not one this node may run on (it may use {}): list CPUs among those, or give `auto` or `none`",
                        cpu_list(allowed)
                    );
                }
                list
            }
        };
        Ok((0..threads).map(|i| list[i % list.len()]).collect())
    }
}

impl std::str::FromStr for Cpus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a CPU list: write CPU numbers and ranges like 0-3,6, or `auto`, or `none`");
        match s.trim() {
            "auto" => return Ok(Cpus::Auto),
            "none" => return Ok(Cpus::None),
            _ => {}
        }
        let cpu = |n: &str| n.trim().parse::<usize>().ok().filter(|n| *n < nix::sched::CpuSet::count()).ok_or_else(bad);
        let mut list = Vec::new();
        for item in s.split(',') {
            match item.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (cpu(first)?, cpu(last)?);
                    if first > last {
                        return Err(bad());
                    }
                    list.extend(first..=last);
                }
                None => list.push(cpu(item)?),
            }
        }
        Ok(Cpus::List(list))
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Cpus;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a CPU list like \"0-3,6\" or [0, 1], or `auto`, or `none`")
            }

            /// `cpus: 3` is a list of one, as `cpus: "3"`.
            fn visit_u64<E: serde::de::Error>(self, cpu: u64) -> Result<Cpus, E> {
                cpu.to_string().parse().map_err(E::custom)
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Cpus, E> {
                s.parse().map_err(E::custom)
            }

            /// `cpus: [0, 1]`, as `cpus: "0,1"`.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Cpus, A::Error> {
                let mut cpus = Vec::new();
                while let Some(cpu) = seq.next_element::<u64>()? {
                    cpus.push(cpu.to_string());
                }
                cpus.join(",").parse().map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `HOST:PORT`: an IP address and port (`[v6]:port` for IPv6), or a DNS name
/// and port. A node's own `advertise` and the address `lbctl node add` gives.
pub fn is_host_and_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    let name = |label: &str| !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    port.parse::<u16>().is_ok_and(|p| p > 0) && host.len() <= 253 && host.split('.').all(name)
}

/// The CPUs the calling thread may run on (at start-up: those of the process).
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("cannot read the CPUs this node may run on")?;
    Ok((0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect())
}

/// CPUs as ranges: `0-3,6`.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", cpus[i], cpus[j]) } else { cpus[i].to_string() });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn vip_settings_that_break_fencing_are_refused() {
        for (vip, says) in [
            ("{ lease: 200ms }", "vip.lease (200ms) must be above raft.heartbeat (50ms), or a healthy holder drops its VIPs between heartbeats, and below raft.election_timeout_min (150ms)"),
            ("{ lease: 50ms }", "vip.lease (50ms) must be above raft.heartbeat (50ms)"),
            ("{ lifetime: 500ms }", "vip.lifetime (500ms) must be whole seconds"),
            ("{ announce_every: 0s }", "must be above zero"),
            ("{ fencing: sometimes }", "unknown variant `sometimes`"),
        ] {
            let (_d, path) = file(&format!("id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\nvip: {vip}\n"));
            let err = match NodeConfig::load(&path) {
                Err(e) => e.to_string(),
                Ok(_) => Overrides { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string(),
            };
            assert!(err.contains(says), "{vip}: {err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, path) = file("id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\nraft:\n  heartbeat: 40ms\n");
        let flags = Overrides { config: Some(path), id: Some(2), data_dir: Some("/tmp/b".into()), ..Default::default() };
        let r = flags.resolve().unwrap();
        assert_eq!(r.settings.id, 2);
        assert_eq!(r.settings.data_dir, PathBuf::from("/tmp/b"));
        assert_eq!(r.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(r.settings.addr, "127.0.0.1:7001", "advertise defaults to listen");
        assert_eq!(r.settings.heartbeat.as_millis(), 40);
        assert_eq!(r.settings.election_timeout_min.as_millis(), 150, "unset timings keep their defaults");
    }

    #[test]
    fn stop_grace_defaults_to_30s_and_the_flag_wins_over_the_file() {
        let base = "id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\n";
        let (_d, plain) = file(base);
        let r = Overrides { config: Some(plain), ..Default::default() }.resolve().unwrap();
        assert_eq!(r.stop_grace, std::time::Duration::from_secs(30));
        let (_d, set) = file(&format!("{base}stop_grace: 2m\n"));
        let r = Overrides { config: Some(set.clone()), ..Default::default() }.resolve().unwrap();
        assert_eq!(r.stop_grace, std::time::Duration::from_secs(120));
        let r = Overrides { config: Some(set), stop_grace: Some(Duration::from_millis(0)), ..Default::default() }.resolve().unwrap();
        assert_eq!(r.stop_grace, std::time::Duration::ZERO, "0s: close the connections at once");
        let (_d, bad) = file(&format!("{base}stop_grace: 5\n"));
        let err = Overrides { config: Some(bad), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(err.contains("stop_grace: \"5\" has no unit"), "{err}");
    }

    #[test]
    fn a_missing_setting_names_the_flag_and_the_key() {
        let err = Overrides { listen: Some("127.0.0.1:1".parse().unwrap()), data_dir: Some("/tmp".into()), ..Default::default() }
            .resolve()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--id is missing: give it as a flag or as `id:` in the node config");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_with_its_path() {
        let (_d, path) = file("id: 1\nraft:\n  hearbeat: 40ms\n");
        let err = Overrides { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(err.contains("node.yaml: raft.hearbeat: unknown field `hearbeat`"), "the path once, then the reason: {err}");
    }

    #[test]
    fn timings_that_cannot_elect_are_refused() {
        let (_d, path) =
            file("id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\nraft:\n  election_timeout_min: 300ms\n  election_timeout_max: 300ms\n");
        let err = Overrides { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(err.contains("raft.election_timeout_min (300ms) must be below raft.election_timeout_max (300ms)"), "{err}");
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertised_one() {
        let base =
            Overrides { id: Some(1), listen: Some("0.0.0.0:7001".parse().unwrap()), data_dir: Some("/tmp".into()), ..Default::default() };
        assert!(base.clone().resolve().unwrap_err().to_string().contains("--advertise"));
        let r = Overrides { advertise: Some("10.0.0.1:7001".into()), ..base }.resolve().unwrap();
        assert_eq!(r.settings.addr, "10.0.0.1:7001");
    }

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_refused_with_the_value() {
        assert_eq!("auto".parse::<Cpus>().unwrap(), Cpus::Auto);
        assert_eq!("none".parse::<Cpus>().unwrap(), Cpus::None);
        assert_eq!("0-3,6".parse::<Cpus>().unwrap(), Cpus::List(vec![0, 1, 2, 3, 6]));
        assert_eq!(" 2 ".parse::<Cpus>().unwrap(), Cpus::List(vec![2]));
        for bad in ["", "1,", "3-1", "x", "0-", "-1", "1024", "all"] {
            let err = bad.parse::<Cpus>().unwrap_err();
            assert_eq!(err, format!("{bad:?} is not a CPU list: write CPU numbers and ranges like 0-3,6, or `auto`, or `none`"));
        }
        let (_d, path) = file("cpus: 1\n");
        assert_eq!(NodeConfig::load(&path).unwrap().cpus, Some(Cpus::List(vec![1])));
        let (_d, path) = file("cpus: 0-1,4\n");
        assert_eq!(NodeConfig::load(&path).unwrap().cpus, Some(Cpus::List(vec![0, 1, 4])));
        let (_d, path) = file("cpus: [2, 3]\n");
        assert_eq!(NodeConfig::load(&path).unwrap().cpus, Some(Cpus::List(vec![2, 3])));
        for (yaml, says) in [
            ("0-x", "\"0-x\" is not a CPU list"),
            ("-1", "expected a CPU list like \"0-3,6\" or [0, 1], or `auto`, or `none`"),
            ("[]", "\"\" is not a CPU list"),
            ("{ a: 1 }", "expected a CPU list"),
        ] {
            let (_d, path) = file(&format!("cpus: {yaml}\n"));
            let err = NodeConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(": cpus: ") && err.contains(says), "{yaml}: {err}");
        }
    }

    #[test]
    fn threads_get_a_cpu_each_only_when_asked_or_when_they_match_the_cpus() {
        let allowed = [0, 1, 2, 3];
        assert_eq!(Cpus::Auto.place(4, &allowed).unwrap(), vec![0, 1, 2, 3], "one per CPU");
        assert!(Cpus::Auto.place(2, &allowed).unwrap().is_empty(), "fewer threads than CPUs: the kernel places them");
        assert!(Cpus::Auto.place(6, &allowed).unwrap().is_empty(), "more threads than CPUs: the kernel places them");
        assert!(Cpus::None.place(4, &allowed).unwrap().is_empty());
        assert_eq!(Cpus::List(vec![2, 3]).place(3, &allowed).unwrap(), vec![2, 3, 2], "in turn");
        let err = Cpus::List(vec![1, 7]).place(2, &[0, 1, 2, 3, 6]).unwrap_err().to_string();
        assert_eq!(err, "cpus: CPU 7 is not one this node may run on (it may use 0-3,6): list CPUs among those, or give `auto` or `none`");
        let twice = "0-1,1".parse::<Cpus>().unwrap();
        let err = twice.place(2, &allowed).unwrap_err().to_string();
        assert_eq!(err, "cpus: CPU 1 is listed more than once: threads that share a CPU stall each other; list each CPU once");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_key_and_the_value() {
        for (yaml, says) in [
            ("raft: { snapshot_after: 0 }", "raft.snapshot_after (0) must be 1 or more"),
            ("raft: { write_timeout: 0s }", "raft.write_timeout (0s) must be above zero"),
            ("vip: { on_acquire: \"\" }", "vip.on_acquire is empty: give the command to run, or leave the key out"),
            ("vip: { on_release: \" \" }", "vip.on_release is empty"),
            ("advertise: not an address", "--advertise \"not an address\" is not an address peers can reach: write HOST:PORT"),
            ("advertise: \"::1:7001\"", "--advertise \"::1:7001\" is not an address"),
            ("advertise: lb1.example.net:0", "--advertise \"lb1.example.net:0\" is not an address"),
            ("advertise: lb1..example.net:7001", "--advertise \"lb1..example.net:7001\" is not an address"),
        ] {
            let (_d, path) = file(&format!("id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\n{yaml}\n"));
            let err = Overrides { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
        for ok in ["10.0.0.1:7001", "[2001:db8::1]:7001", "lb1.example.net:7001", "lb-1:7001"] {
            let (_d, path) = file(&format!("id: 1\nlisten: 127.0.0.1:7001\ndata_dir: /tmp/a\nadvertise: \"{ok}\"\n"));
            let r = Overrides { config: Some(path), ..Default::default() }.resolve().unwrap();
            assert_eq!(r.settings.addr, ok);
        }
    }

    #[test]
    fn a_cpu_list_the_node_may_not_use_fails_the_config() {
        let flags = Overrides {
            id: Some(1),
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("/tmp".into()),
            cpus: Some(Cpus::List(vec![1023])),
            ..Default::default()
        };
        let err = flags.clone().resolve().unwrap_err().to_string();
        assert!(err.starts_with("cpus: CPU 1023 is not one this node may run on"), "{err}");
        let r = Overrides { cpus: Some(Cpus::None), ..flags }.resolve().unwrap();
        assert!(r.worker_cpus.is_empty());
    }
}
