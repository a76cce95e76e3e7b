//! Semantic checks that serde cannot express: unique names, references
//! between frontends and backends, ranges, and options that need a mode.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{Backend, Frontend, Mode, Spec};

/// One problem in a spec, at a field path such as `backends[2].servers[0].address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a spec; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn one(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects problems with their paths while the checks walk the spec.
#[derive(Default)]
struct Findings(Vec<SpecError>);

impl Findings {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError::new(path, message));
    }

    fn name(&mut self, path: String, name: &str) {
        let ok = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.add(path, format!("{name:?} is not a valid name: use 1 to 64 letters, digits, '-', '_' or '.'"));
        }
    }

    /// Reports every name that appears more than once in `names`.
    fn unique<'a>(&mut self, list: &str, names: impl Iterator<Item = &'a str>) {
        let mut first: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, name) in names.enumerate() {
            if let Some(j) = first.insert(name, i) {
                first.insert(name, j);
                self.add(format!("{list}[{i}].name"), format!("{name:?} is already the name of {list}[{j}]: names must be unique"));
            }
        }
    }
}

impl Spec {
    /// Checks what the types alone do not; `from_yaml` calls it.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut f = Findings::default();
        self.check_defaults(&mut f);
        self.check_vips(&mut f);
        let backends: BTreeSet<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        for (i, fe) in self.frontends.iter().enumerate() {
            check_frontend(&mut f, &format!("frontends[{i}]"), fe, &backends);
        }
        f.unique("frontends", self.frontends.iter().map(|x| x.name.as_str()));
        let mut bound = BTreeMap::new();
        for (i, fe) in self.frontends.iter().enumerate() {
            for (j, addr) in fe.bind.iter().enumerate() {
                if let Some(other) = bound.insert(addr.0, format!("frontends[{i}].bind[{j}]")) {
                    f.add(
                        format!("frontends[{i}].bind[{j}]"),
                        format!("\"{addr}\" is already bound by {other}: each address and port belongs to one frontend"),
                    );
                }
            }
        }
        for (i, be) in self.backends.iter().enumerate() {
            check_backend(&mut f, &format!("backends[{i}]"), be);
        }
        f.unique("backends", self.backends.iter().map(|x| x.name.as_str()));
        if f.0.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(f.0))
        }
    }

    fn check_defaults(&self, f: &mut Findings) {
        let t = &self.defaults.timeouts;
        for (name, d) in [
            ("connect", t.connect),
            ("client", t.client),
            ("server", t.server),
            ("http_request", t.http_request),
            ("queue", t.queue),
            ("check", t.check),
        ] {
            if d.is_zero() {
                f.add(format!("defaults.timeouts.{name}"), "\"0s\" would time out at once: give a duration above zero");
            }
        }
        if self.defaults.maxconn.0 == 0 {
            f.add("defaults.maxconn", "0 would refuse every connection: give 1 or more");
        }
    }

    fn check_vips(&self, f: &mut Findings) {
        let mut seen = BTreeMap::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let path = format!("vips[{i}]");
            if let Some(j) = seen.insert(vip.address.0.addr(), i) {
                f.add(format!("{path}.address"), format!("\"{}\" is already vips[{j}]: each VIP is listed once", vip.address));
            }
            let net = vip.address.0;
            if net.addr() == net.network() && net.prefix_len() < net.max_prefix_len() {
                f.add(
                    format!("{path}.address"),
                    format!("\"{}\" is a network, not a host address: write the VIP with its prefix, like \"192.0.2.100/24\"", vip.address),
                );
            }
            let ifname = &vip.interface;
            let ok = ifname == "auto" || (!ifname.is_empty() && ifname.len() <= 15 && !ifname.contains(['/', ' ', ':']));
            if !ok {
                f.add(
                    format!("{path}.interface"),
                    format!("{ifname:?} is not an interface name: use \"auto\" or a name like \"eth0\" (at most 15 characters)"),
                );
            }
        }
    }
}

fn check_frontend(f: &mut Findings, path: &str, fe: &Frontend, backends: &BTreeSet<&str>) {
    f.name(format!("{path}.name"), &fe.name);
    if fe.bind.is_empty() {
        f.add(format!("{path}.bind"), "is empty: give at least one address and port, like \"192.0.2.100:80\"");
    }
    for (j, addr) in fe.bind.iter().enumerate() {
        if addr.0.port() == 0 {
            // Each data plane thread would get a port of the kernel's choosing, none known to clients.
            f.add(format!("{path}.bind[{j}]"), format!("\"{}\" has port 0: give the port clients connect to", addr.0));
        }
    }
    if fe.maxconn.is_some_and(|m| m.0 == 0) {
        f.add(format!("{path}.maxconn"), "0 would refuse every connection: give 1 or more, or leave it out");
    }
    let known = |f: &mut Findings, field: String, name: &str| {
        if !backends.contains(name) {
            let list: Vec<_> = backends.iter().copied().collect();
            f.add(field, format!("{name:?} is not a backend: the spec defines [{}]", list.join(", ")));
        }
    };
    if let Some(name) = &fe.default_backend {
        known(f, format!("{path}.default_backend"), name);
    }
    if fe.mode == Mode::Tcp {
        for (field, set) in
            [("rules", !fe.rules.is_empty()), ("request_headers", fe.request_headers.is_some()), ("forwardfor", fe.forwardfor)]
        {
            if set {
                f.add(format!("{path}.{field}"), "works only with mode: http; a tcp frontend sends every connection to default_backend");
            }
        }
        if fe.default_backend.is_none() {
            f.add(format!("{path}.default_backend"), "is missing: a tcp frontend needs a backend for its connections");
        }
    }
    for (i, rule) in fe.rules.iter().enumerate() {
        let rpath = format!("{path}.rules[{i}]");
        let w = &rule.when;
        if w.host.is_none() && w.path_prefix.is_none() && w.header.is_none() && w.src.is_empty() && w.src_not.is_empty() {
            f.add(format!("{rpath}.when"), "names no condition: give host, path_prefix, header, src or src_not");
        }
        if let Some(host) = &w.host {
            check_host(f, format!("{rpath}.when.host"), host);
            if !host.starts_with('[') && host.contains(':') {
                f.add(
                    format!("{rpath}.when.host"),
                    format!("{host:?} has a port: a rule matches the host without its port, like \"api.example.com\""),
                );
            }
        }
        if let Some(p) = &w.path_prefix {
            check_path(f, format!("{rpath}.when.path_prefix"), p);
        }
        if let Some(h) = &w.header {
            check_header_name(f, format!("{rpath}.when.header.name"), &h.name);
            check_header_value(f, format!("{rpath}.when.header.value"), &h.value);
        }
        match (rule.deny, &rule.use_backend) {
            (Some(_), Some(_)) => f.add(rpath.clone(), "has both deny and use_backend: a rule does one of them"),
            (None, None) => f.add(rpath.clone(), "has neither deny nor use_backend: say what the rule does"),
            (Some(status), None) if !(200..=599).contains(&status) => f.add(
                format!("{rpath}.deny"),
                format!("{status} is not a status a deny can answer with: give one from 200 to 599, like 403"),
            ),
            (None, Some(name)) => known(f, format!("{rpath}.use_backend"), name),
            _ => {}
        }
    }
    if let Some(edits) = &fe.request_headers {
        for (name, value) in &edits.set {
            check_header_name(f, format!("{path}.request_headers.set.{name}"), name);
            check_header_value(f, format!("{path}.request_headers.set.{name}"), value);
        }
        for (i, name) in edits.delete.iter().enumerate() {
            check_header_name(f, format!("{path}.request_headers.delete[{i}]"), name);
        }
    }
}

fn check_header_name(f: &mut Findings, path: String, name: &str) {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        f.add(path, format!("{name:?} is not a header name: use letters, digits and '-', like \"X-Served-By\""));
    }
}

fn check_header_value(f: &mut Findings, path: String, value: &str) {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        f.add(path, format!("{value:?} holds a control character: a header value is one line of text"));
    }
}

/// A host as the Host header carries it: a name or address, maybe a port.
fn check_host(f: &mut Findings, path: String, host: &str) {
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || "/?#@\"".contains(c)) {
        f.add(path, format!("{host:?} is not a host: write a name or address as the Host header carries it, like \"api.example.com\""));
    }
}

/// A request path: from '/', no spaces or control characters (they end the request line).
fn check_path(f: &mut Findings, path: String, value: &str) {
    if !value.starts_with('/') {
        f.add(path, format!("{value:?} does not start with '/'"));
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        f.add(path, format!("{value:?} holds a space or a control character: write it as it goes in a URL, like /a%20b"));
    }
}

fn check_backend(f: &mut Findings, path: &str, be: &Backend) {
    f.name(format!("{path}.name"), &be.name);
    if let Some(hc) = &be.health_check {
        let hpath = format!("{path}.health_check");
        if hc.interval.is_zero() {
            f.add(format!("{hpath}.interval"), "\"0s\" is no interval: give a duration above zero, like \"2s\"");
        }
        for (name, n) in [("rise", hc.rise), ("fall", hc.fall)] {
            if n == 0 {
                f.add(format!("{hpath}.{name}"), "0 is not a count of checks: give 1 or more");
            }
        }
        if hc.port == Some(0) {
            f.add(format!("{hpath}.port"), "0 is not a port: give 1 to 65535, or leave it out to check the traffic port");
        }
        check_path(f, format!("{hpath}.path"), &hc.path);
        if let Some(host) = &hc.host {
            check_host(f, format!("{hpath}.host"), host);
        }
        if hc.method.is_empty() || !hc.method.chars().all(|c| c.is_ascii_uppercase()) {
            f.add(
                format!("{hpath}.method"),
                format!("{:?} is not an HTTP method: use GET, HEAD, OPTIONS or another in capitals", hc.method),
            );
        }
    }
    if let Some(stick) = &be.stick {
        if stick.expire.is_zero() {
            f.add(format!("{path}.stick.expire"), "\"0s\" would forget every client at once: give a duration above zero");
        }
        if stick.size.is_some_and(|c| c.0 == 0) {
            f.add(format!("{path}.stick.size"), "0 would keep no client: give 1 or more (default 200k)");
        }
    }
    if let Some(cookie) = &be.cookie {
        let ok = !cookie.name.is_empty() && cookie.name.chars().all(|c| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c));
        if !ok {
            f.add(format!("{path}.cookie.name"), format!("{:?} is not a cookie name: use letters, digits and '-' or '_'", cookie.name));
        }
    }
    for (i, server) in be.servers.iter().enumerate() {
        let spath = format!("{path}.servers[{i}]");
        f.name(format!("{spath}.name"), &server.name);
        if server.weight > 256 {
            f.add(format!("{spath}.weight"), format!("{} is above the largest weight, 256", server.weight));
        }
        if server.address.0.port() == 0 {
            f.add(format!("{spath}.address"), format!("\"{}\" has port 0: give the port the server listens on", server.address));
        }
        if server.address.0.ip().is_unspecified() {
            f.add(format!("{spath}.address"), format!("\"{}\" names no host: give the server's own address", server.address));
        }
        if server.maxconn.is_some_and(|m| m.0 == 0) {
            f.add(format!("{spath}.maxconn"), "0 would refuse every connection: give 1 or more, or leave it out");
        }
    }
    f.unique(&format!("{path}.servers"), be.servers.iter().map(|s| s.name.as_str()));
}
