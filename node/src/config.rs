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
    /// Source address of connections to servers (traffic and health checks),
    /// as HAProxy's `source`; the kernel chooses when absent.
    pub source: Option<IpAddr>,
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
    /// Source address of connections to servers (traffic and health checks).
    #[arg(long, value_name = "IP")]
    pub source: Option<IpAddr>,
    /// Serve frontends bound to FROM on TO instead, like 127.0.0.1=127.0.0.2 (repeatable).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_rewrite)]
    pub bind_rewrite: Vec<(IpAddr, IpAddr)>,
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
    pub listen: SocketAddr,
    pub monitor: Option<SocketAddr>,
    pub source: Option<IpAddr>,
    pub self_check: SelfCheck,
    pub vip: VipSettings,
    pub log: LogSettings,
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the node config {}", path.display()))?;
        let de = serde_norway::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path_in_file = e.path().to_string();
            anyhow::anyhow!("{}: {path_in_file}: {}", path.display(), e.into_inner())
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
        let mut settings = Settings::new(id, advertise, data_dir);
        settings.heartbeat = t.heartbeat.get();
        settings.election_timeout_min = t.election_timeout_min.get();
        settings.election_timeout_max = t.election_timeout_max.get();
        settings.write_timeout = t.write_timeout.get();
        settings.snapshot_after = t.snapshot_after.max(1);
        settings.logs_kept_after_snapshot = t.logs_kept_after_snapshot;
        let threads = match self.threads.or(file.threads) {
            Some(0) => bail!("--threads 0 would carry no traffic: give 1 or more, or leave it out for one per core"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
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
        if v.lifetime.get() < std::time::Duration::from_secs(1) || v.lifetime.get().subsec_nanos() != 0 {
            bail!("vip.lifetime ({}) must be whole seconds, at least 1s: the kernel counts address lifetimes in seconds", v.lifetime);
        }
        let mut bind_rewrite: BindRewrite = file.bind_rewrite.into_iter().collect();
        bind_rewrite.extend(self.bind_rewrite);
        Ok(Resolved {
            settings,
            bind_rewrite,
            threads,
            listen,
            monitor: self.monitor.or(file.monitor),
            source: self.source.or(file.source),
            self_check: file.self_check,
            vip: file.vip,
            log: file.log,
        })
    }
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
        assert!(err.contains("raft.hearbeat") && err.contains("unknown field `hearbeat`"), "{err}");
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
}
