//! Reading and validating specs: the example spec users start from, and the
//! errors that bad input gets, each naming the field and the value.

use raftlb_proto::spec::{Balance, CheckType, HealthPolicy, Mode, Spec};

const EXAMPLE: &str = include_str!("data/spec-example.yaml");

fn errors(yaml: &str) -> String {
    Spec::from_yaml(yaml).expect_err("the spec must be refused").to_string()
}

#[test]
fn the_example_spec_reads_with_every_feature() {
    let spec = Spec::from_yaml(EXAMPLE).unwrap();
    assert_eq!(spec.defaults.timeouts.http_keep_alive.get().as_millis(), 4500);
    assert_eq!(spec.defaults.timeouts.tunnel.get().as_secs(), 600);
    assert_eq!(spec.defaults.maxconn.0, 90_000);
    assert_eq!(spec.vips.len(), 2);
    assert_eq!(spec.vips[1].interface, "eth0");
    assert_eq!(spec.frontends[0].mode, Mode::Http);
    assert_eq!(spec.frontends[0].rules.len(), 3);
    assert_eq!(spec.frontends[0].rules[0].deny, Some(403));
    assert_eq!(spec.frontends[1].mode, Mode::Tcp);
    let gateways = &spec.backends[0];
    assert_eq!(gateways.servers[2].weight, 0);
    assert!(gateways.servers[3].backup);
    let check = gateways.health_check.as_ref().unwrap();
    assert_eq!((check.kind, check.rise, check.fall), (CheckType::Http, 2, 3));
    assert!(check.expect_status.contains(301) && !check.expect_status.contains(404));
    assert_eq!(spec.backends[1].balance, Balance::Leastconn);
    assert_eq!(spec.backends[3].health_check.as_ref().unwrap().port, Some(9200));
    assert_eq!(spec.health.policy, HealthPolicy::Majority);
}

#[test]
fn canonical_yaml_reads_back_to_the_same_spec() {
    let spec = Spec::from_yaml(EXAMPLE).unwrap();
    let again = Spec::from_yaml(&spec.to_yaml()).unwrap();
    assert_eq!(spec, again);
    assert_eq!(spec.to_yaml(), again.to_yaml());
}

#[test]
fn an_invalid_server_address_names_the_field_and_the_value() {
    let err = errors("backends:\n  - name: b\n    servers:\n      - { name: s, address: \"10.0.0.300:80\" }\n");
    assert!(err.starts_with("backends[0].servers[0].address: \"10.0.0.300:80\" is not an IP address and port"), "{err}");
}

#[test]
fn a_misspelt_field_is_refused_not_ignored() {
    let err = errors("backends:\n  - name: b\n    servrs: []\n");
    assert!(err.contains("backends[0].servrs") && err.contains("unknown field `servrs`"), "{err}");
}

#[test]
fn an_unknown_backend_in_a_rule_is_refused() {
    let err = errors(
        "frontends:\n  - name: f\n    bind: [\"127.0.0.1:80\"]\n    mode: http\n    rules:\n      - when: { host: a.example }\n        use_backend: nope\n    default_backend: b\nbackends:\n  - name: b\n",
    );
    assert!(err.contains("frontends[0].rules[0].use_backend: \"nope\" is not a backend: the spec defines [b]"), "{err}");
}

#[test]
fn duplicate_names_are_refused_at_each_level() {
    let err = errors("backends:\n  - name: b\n    servers:\n      - { name: s, address: \"127.0.0.1:1\" }\n      - { name: s, address: \"127.0.0.1:2\" }\n  - name: b\n");
    assert!(err.contains("backends[0].servers[1].name: \"s\" is already the name of backends[0].servers[0]"), "{err}");
    assert!(err.contains("backends[1].name: \"b\" is already the name of backends[0]"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = errors(
        "frontends:\n  - name: t\n    bind: [\"127.0.0.1:80\"]\n    mode: tcp\n    forwardfor: true\nbackends:\n  - name: b\n    servers:\n      - { name: s, address: \"127.0.0.1:1\", weight: 300 }\n",
    );
    assert!(err.contains("frontends[0].forwardfor: works only with mode: http"), "{err}");
    assert!(err.contains("frontends[0].default_backend: is missing"), "{err}");
    assert!(err.contains("backends[0].servers[0].weight: 300 is above the largest weight, 256"), "{err}");
}

#[test]
fn an_empty_spec_is_refused_but_an_explicitly_empty_one_is_not() {
    for empty in ["", "\n  \n", "# nothing yet\n---\n"] {
        assert_eq!(
            errors(empty),
            "the spec is empty: write its frontends and backends (to serve nothing, write `frontends: []` explicitly)"
        );
    }
    let nothing = Spec::from_yaml("frontends: []\n").unwrap();
    assert!(nothing.frontends.is_empty() && nothing.backends.is_empty());
}

#[test]
fn malformed_yaml_says_where() {
    let err = errors("frontends: [\n");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn bad_values_name_their_field() {
    for (yaml, want) in [
        ("defaults:\n  timeouts:\n    connect: 5\n", "defaults.timeouts.connect: \"5\" has no unit"),
        ("backends:\n  - name: b\n    balance: roundrobinn\n", "backends[0].balance: unknown variant `roundrobinn`"),
        ("vips:\n  - address: 192.0.2.100\n", "vips[0].address: \"192.0.2.100\" is not an address with a prefix length"),
        ("vips:\n  - address: 192.0.2.0/24\n", "vips[0].address: \"192.0.2.0/24\" is a network, not a host address"),
        (
            "backends:\n  - name: b\n    health_check: { type: http, expect_status: 200-999 }\n",
            "backends[0].health_check.expect_status: \"200-999\"",
        ),
        ("backends:\n  - name: b\n    health_check: { type: tcp, rise: 0 }\n", "backends[0].health_check.rise: 0 is not a count"),
        ("backends:\n  - name: \"a b\"\n", "backends[0].name: \"a b\" is not a valid name"),
        ("backends:\n  - name: b\n    stick: { on: src, expire: 0s }\n", "backends[0].stick.expire: \"0s\" would forget every client"),
        ("backends:\n  - name: b\n    stick: { on: src, expire: 1m, size: 0 }\n", "backends[0].stick.size: 0 would keep no client"),
        (
            "frontends:\n  - name: f\n    bind: [\"127.0.0.1:80\"]\n    mode: http\n    request_headers: { set: { X-A: \"a\\r\\nX-B: b\" } }\n",
            "frontends[0].request_headers.set.X-A: \"a\\r\\nX-B: b\" holds a control character",
        ),
        (
            "frontends:\n  - name: f\n    bind: [\"127.0.0.1:80\"]\n    mode: http\n    rules:\n      - when: {}\n        deny: 403\n",
            "frontends[0].rules[0].when: names no condition",
        ),
        ("frontends:\n  - name: f\n    bind: [\"127.0.0.1:0\"]\n    mode: tcp\n", "frontends[0].bind[0]: \"127.0.0.1:0\" has port 0: give the port clients connect to"),
        (
            "backends:\n  - name: b\n    servers: [{ name: s, address: \"0.0.0.0:80\" }]\n",
            "backends[0].servers[0].address: \"0.0.0.0:80\" names no host: give the server's own address",
        ),
        ("backends:\n  - name: b\n    servers: [{ name: s, address: \"[::]:80\" }]\n", "\"[::]:80\" names no host"),
        (
            "backends:\n  - name: b\n    health_check: { type: http, host: \"a b\" }\n",
            "backends[0].health_check.host: \"a b\" is not a host: write a name or address as the Host header carries it",
        ),
        (
            "frontends:\n  - name: f\n    bind: [\"127.0.0.1:80\"]\n    mode: http\n    default_backend: b\n    rules:\n      - when: { host: \"api.example.com:8080\" }\n        use_backend: b\nbackends: [{ name: b }]\n",
            "frontends[0].rules[0].when.host: \"api.example.com:8080\" has a port: a rule matches the host without its port",
        ),
        (
            "backends:\n  - name: b\n    health_check: { type: http, path: \"/a b\" }\n",
            "backends[0].health_check.path: \"/a b\" holds a space or a control character",
        ),
    ] {
        let err = errors(yaml);
        assert!(err.contains(want), "for\n{yaml}\nwanted {want:?}, got: {err}");
    }
    // Every bad part of one rule is reported at once.
    let rule = "frontends:\n  - name: f\n    bind: [\"127.0.0.1:80\"]\n    mode: http\n    default_backend: b\n    rules:\n      - when: { host: \"x.example/\", path_prefix: \"/a\\tb\", header: { name: X-A, value: \"1\\n\" } }\n        deny: 403\nbackends: [{ name: b }]\n";
    let err = errors(rule);
    for want in [
        "rules[0].when.host",
        "rules[0].when.path_prefix: \"/a\\tb\" holds a space",
        "rules[0].when.header.value: \"1\\n\" holds a control character",
    ] {
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    }
}

#[test]
fn two_frontends_cannot_bind_the_same_address() {
    let err = errors(
        "frontends:\n  - { name: a, bind: [\"127.0.0.1:80\"], mode: http, default_backend: b }\n  - { name: c, bind: [\"127.0.0.1:80\"], mode: http, default_backend: b }\nbackends:\n  - name: b\n",
    );
    assert!(err.contains("frontends[1].bind[0]: \"127.0.0.1:80\" is already bound by frontends[0].bind[0]"), "{err}");
}
