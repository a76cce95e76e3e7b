//! The cluster spec: what `lbctl config apply -f` takes and what the Raft
//! group replicates. Reading a spec is a pipeline: YAML text -> typed structs
//! (serde, with the path of any bad field) -> semantic validation (names,
//! references, ranges) -> a [`Spec`] that every node may serve as it is.
//!
//! Every struct refuses unknown fields, so a typo is an error that names the
//! field, never a silently ignored setting.

mod validate;
mod values;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use validate::{SpecError, SpecErrors};
pub use values::{Addr, Cidr, Count, Duration, StatusRange};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<Vip>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<Frontend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub health: HealthSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    pub timeouts: Timeouts,
    /// Connection attempts after the first failed connect.
    pub retries: u32,
    /// Whether a retry may go to another server.
    pub redispatch: bool,
    /// Connections the whole node accepts at once.
    pub maxconn: Count,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { timeouts: Timeouts::default(), retries: 3, redispatch: true, maxconn: Count(100_000) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub connect: Duration,
    pub client: Duration,
    pub server: Duration,
    pub http_request: Duration,
    pub http_keep_alive: Duration,
    pub tunnel: Duration,
    pub queue: Duration,
    pub check: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            client: Duration::from_secs(30),
            server: Duration::from_secs(30),
            http_request: Duration::from_secs(10),
            http_keep_alive: Duration::from_secs(5),
            tunnel: Duration::from_secs(3_600),
            queue: Duration::from_secs(5),
            check: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub address: Cidr,
    /// `auto`: the interface whose network contains the address.
    #[serde(default = "auto")]
    pub interface: String,
}

fn auto() -> String {
    "auto".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: String,
    pub bind: Vec<Addr>,
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxconn: Option<Count>,
    /// Adds X-Forwarded-For and X-Forwarded-Proto (http mode).
    #[serde(default, skip_serializing_if = "is_false")]
    pub forwardfor: bool,
    /// First match wins (http mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_backend: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub when: Condition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_backend: Option<String>,
}

/// Every condition given must hold for the rule to match.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    /// The client address is in one of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<Cidr>,
    /// The client address is in none of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_not: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Roundrobin,
    Leastconn,
    Source,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpReuse {
    Never,
    #[default]
    Safe,
    Always,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub http_reuse: HttpReuse,
    /// While no other server is up, every backup server takes sessions
    /// (HAProxy's `option allbackups`); without it, only the first one in
    /// the list that can.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allbackups: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<Cookie>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stick: Option<Stick>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CookieMode {
    /// The balancer adds a cookie naming the server to the first response.
    Insert,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cookie {
    pub name: String,
    pub mode: CookieMode,
    #[serde(default, skip_serializing_if = "is_false")]
    pub indirect: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub nocache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StickOn {
    Src,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stick {
    pub on: StickOn,
    pub expire: Duration,
    /// How many clients the table keeps (default [`Stick::DEFAULT_SIZE`]);
    /// when it is full, the entry that expires first makes room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Count>,
}

impl Stick {
    pub const DEFAULT_SIZE: u64 = 200_000;

    pub fn size(&self) -> u64 {
        self.size.map_or(Self::DEFAULT_SIZE, |c| c.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckType,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default = "default_expect_status")]
    pub expect_status: StatusRange,
    /// A substring the response body must contain (http checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    /// Check this port instead of the server's traffic port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_interval")]
    pub interval: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_method() -> String {
    "GET".to_owned()
}
fn default_path() -> String {
    "/".to_owned()
}
fn default_expect_status() -> StatusRange {
    StatusRange { low: 200, high: 399 }
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub name: String,
    pub address: Addr,
    /// 0 drains the server: no new sessions, existing ones continue.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxconn: Option<Count>,
    /// Used only when no other server of the backend is up.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthPolicy {
    /// Down when a majority of the voting nodes that report see it down.
    #[default]
    Majority,
    Any,
    All,
    /// No consensus: each node routes by its own checks.
    Local,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    #[serde(default)]
    pub policy: HealthPolicy,
}

impl Spec {
    /// Reads and validates a spec written in YAML. Every problem found is
    /// returned, each with the path of the field and the offending value.
    pub fn from_yaml(text: &str) -> Result<Spec, SpecErrors> {
        // Every key has a default, so an empty file would read as a spec that
        // serves nothing: more likely a file cut short than a wish.
        let content = text.lines().map(str::trim).any(|l| !(l.is_empty() || l.starts_with('#') || l == "---" || l == "..."));
        if !content {
            return Err(SpecErrors::one(SpecError::new(
                "",
                "the spec is empty: write its frontends and backends (to serve nothing, write `frontends: []` explicitly)",
            )));
        }
        let de = serde_norway::Deserializer::from_str(text);
        let spec: Spec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // The YAML reader names the field itself ("a.b: unknown field"); keep one path.
            let message = e.into_inner().to_string();
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if !path.is_empty() && path.starts_with(prefix) => rest.to_owned(),
                _ => message,
            };
            SpecErrors::one(SpecError::new(path, message))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The canonical YAML of this spec: defaults filled in, fields in a fixed
    /// order, so two equal specs read the same and diff cleanly.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a spec always serialises: it holds only strings, numbers and maps")
    }
}

/// A unified diff between two specs' canonical YAML; empty when they are equal.
pub fn diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(3).header(old_name, new_name).to_string()
}
