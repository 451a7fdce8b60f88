//! Golden tests for the samples in config/samples (the Star Wars demo and a cluster deny):
//! the full compiled state is pinned in tests/golden/*.txt (regenerate with UPDATE_GOLDEN=1
//! after a deliberate change, and review the diff), and the verdicts the demo shows are
//! asserted through the lookup simulation and the L7 table.

mod common;

use common::{iface, ip, node, ns, pod, sim};
use moat::api::validate::anchored_regex;
use moat::compiler::{CompileConfig, DesiredState, HttpMatcher, L7Key, compile};
use moat::identity::Allocations;
use moat::model::{Model, Policy};
use moat_common::{direction, identity};
use std::fmt::Write;
use std::path::Path;

fn sample(name: &str) -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/samples")
        .join(name);
    Policy::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn galaxy(policies: Vec<Policy>) -> Model {
    Model {
        local_node: "node-1".into(),
        namespaces: vec![ns("default", &[])],
        nodes: vec![node("node-1", "172.18.0.2")],
        endpoints: vec![
            pod(
                "default",
                "deathstar",
                "node-1",
                &[("org", "empire"), ("class", "deathstar")],
                "10.244.0.10",
            ),
            pod(
                "default",
                "tiefighter",
                "node-1",
                &[("org", "empire"), ("class", "tiefighter")],
                "10.244.0.11",
            ),
            pod(
                "default",
                "xwing",
                "node-1",
                &[("org", "alliance"), ("class", "xwing")],
                "10.244.0.12",
            ),
        ],
        policies,
    }
}

fn render(s: &DesiredState) -> String {
    let mut out = String::new();
    for (k, v) in &s.maps.ipcache {
        writeln!(
            out,
            "ipcache {k} identity={} endpoint={}",
            v.identity, v.endpoint_id
        )
        .unwrap();
    }
    for (k, v) in &s.maps.endpoints {
        writeln!(
            out,
            "endpoint {k} id={} identity={} ruleset={} flags={:#x} isolating={:?} audit_isolating={:?}",
            v.endpoint_id, v.identity, v.ruleset_id, v.flags, v.isolating_rule, v.audit_isolating_rule
        )
        .unwrap();
    }
    for (k, v) in &s.maps.exact {
        writeln!(
            out,
            "exact subject={} peer={} dir={} proto={} port={} -> action={} rule={} audit={} audit_rule={} proxy={}",
            k.subject, k.peer, k.direction, k.protocol, u16::from_be_bytes(k.dport), v.action, v.rule_id, v.audit_action, v.audit_rule_id, v.proxy_port
        )
        .unwrap();
    }
    for ((k, len), v) in &s.maps.prefixes {
        writeln!(
            out,
            "prefix subject={} peer={} dir={} proto={} port={}/{len} -> action={} rule={} audit={} audit_rule={} proxy={}",
            k.subject, k.peer, k.direction, k.protocol, u16::from_be_bytes(k.dport), v.action, v.rule_id, v.audit_action, v.audit_rule_id, v.proxy_port
        )
        .unwrap();
    }
    for (k, v) in &s.maps.prefilter {
        writeln!(out, "prefilter {k} rule={v}").unwrap();
    }
    for (k, ms) in &s.l7 {
        for m in ms {
            writeln!(out, "l7 {k:?} {m:?}").unwrap();
        }
    }
    for (id, r) in &s.rules {
        writeln!(
            out,
            "rule {id} {} {}/{} {} {}",
            r.kind.as_str(),
            r.namespace,
            r.name,
            r.direction,
            r.rule
        )
        .unwrap();
    }
    for (r, o) in &s.policies {
        writeln!(
            out,
            "policy {r} accepted={} selected={} {}",
            o.accepted, o.selected_endpoints, o.message
        )
        .unwrap();
    }
    out
}

fn golden(name: &str, s: &DesiredState) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    let text = render(s);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == text,
        "{} differs (UPDATE_GOLDEN=1 regenerates it):\n{text}",
        path.display()
    );
}

fn compiled(policies: Vec<Policy>) -> (Model, DesiredState) {
    let m = galaxy(policies);
    let s = compile(&m, &Allocations::default(), &CompileConfig::default())
        .unwrap()
        .0;
    (m, s)
}

/// Does the flow src -> dst on TCP `port` pass both ends?
fn reaches(s: &DesiredState, src: &str, src_ip: &str, dst: &str, dst_ip: &str, port: u16) -> bool {
    sim::decide(
        &s.maps,
        &iface("default", src),
        direction::EGRESS,
        ip(dst_ip),
        6,
        port,
    )
    .allow
        && sim::decide(
            &s.maps,
            &iface("default", dst),
            direction::INGRESS,
            ip(src_ip),
            6,
            port,
        )
        .allow
}

const DS: &str = "10.244.0.10";
const TIE: &str = "10.244.0.11";
const XW: &str = "10.244.0.12";

fn assert_l3l4(s: &DesiredState) {
    assert!(reaches(s, "tiefighter", TIE, "deathstar", DS, 80));
    assert!(!reaches(s, "xwing", XW, "deathstar", DS, 80));
    assert!(!reaches(s, "tiefighter", TIE, "deathstar", DS, 81));
    assert!(
        reaches(s, "deathstar", DS, "xwing", XW, 80),
        "the deathstar's egress is not isolated"
    );
    assert!(
        reaches(s, "xwing", XW, "tiefighter", TIE, 80),
        "other pods are not isolated"
    );
    // Rule 3: the node reaches the deathstar (kubelet probes).
    assert!(
        sim::decide(
            &s.maps,
            &iface("default", "deathstar"),
            direction::INGRESS,
            ip("172.18.0.2"),
            6,
            8080
        )
        .allow
    );
}

#[test]
fn starwars_l3l4() {
    let (_, s) = compiled(vec![sample("starwars-l3l4.yaml")]);
    assert_l3l4(&s);
    golden("starwars-l3l4", &s);
}

#[test]
fn starwars_upstream_networkpolicy_matches_the_moat_one() {
    let (_, s) = compiled(vec![sample("starwars-networkpolicy.yaml")]);
    assert_l3l4(&s);
    golden("starwars-networkpolicy", &s);
}

/// The proxy's decision as the L7 table defines it (see `L7Key`).
fn proxy_allows(
    s: &DesiredState,
    subject: u32,
    peer: u32,
    port: u16,
    method: &str,
    path: &str,
) -> bool {
    let matchers: Vec<&HttpMatcher> =
        s.l7.iter()
            .filter(|(k, _): &(&L7Key, _)| {
                k.subject == subject
                    && k.direction == direction::INGRESS
                    && (k.peer == peer || (k.peer == identity::ANY && peer != identity::HOST))
                    && (k.first_port..=k.last_port).contains(&port)
            })
            .flat_map(|(_, m)| m)
            .collect();
    matchers.iter().any(|m| {
        m.method.as_deref().is_none_or(|x| x == method)
            && m.path.as_deref().is_none_or(|x| x == path)
            && m.path_prefix.as_deref().is_none_or(|x| path.starts_with(x))
            && m.path_regex
                .as_deref()
                .is_none_or(|x| anchored_regex(x).unwrap().is_match(path))
            && m.headers.is_empty()
    })
}

#[test]
fn starwars_l7() {
    let (_, s) = compiled(vec![sample("starwars-l7.yaml")]);
    let ds = s.maps.endpoints[&iface("default", "deathstar")];
    let tie_id = s.maps.ipcache[&ip(TIE).into()].identity;
    let d = sim::decide(
        &s.maps,
        &iface("default", "deathstar"),
        direction::INGRESS,
        ip(TIE),
        6,
        80,
    );
    assert!(d.allow);
    assert_eq!(
        d.redirect,
        Some(CompileConfig::default().proxy_port),
        "tiefighter -> deathstar:80 goes through the proxy"
    );
    assert!(!reaches(&s, "xwing", XW, "deathstar", DS, 80));
    assert!(proxy_allows(
        &s,
        ds.ruleset_id,
        tie_id,
        80,
        "POST",
        "/v1/request-landing"
    ));
    assert!(!proxy_allows(
        &s,
        ds.ruleset_id,
        tie_id,
        80,
        "PUT",
        "/v1/exhaust-port"
    ));
    assert!(!proxy_allows(
        &s,
        ds.ruleset_id,
        tie_id,
        80,
        "GET",
        "/v1/request-landing"
    ));
    golden("starwars-l7", &s);
}

#[test]
fn starwars_l7_beside_an_l3_allow_does_not_narrow_it() {
    // Rule 7: the plain L3/L4 allow (from the l3l4 policy, renamed) overlaps the HTTP rule, so
    // the proxy lets every request through.
    let mut l3 = sample("starwars-l3l4.yaml");
    if let Policy::MoatNetworkPolicy(p) = &mut l3 {
        p.metadata.name = Some("plain".into());
    }
    let (_, s) = compiled(vec![sample("starwars-l7.yaml"), l3]);
    let ds = s.maps.endpoints[&iface("default", "deathstar")];
    let tie_id = s.maps.ipcache[&ip(TIE).into()].identity;
    assert!(proxy_allows(
        &s,
        ds.ruleset_id,
        tie_id,
        80,
        "PUT",
        "/v1/exhaust-port"
    ));
}

#[test]
fn cluster_deny_metadata_blocks_only_that() {
    let (_, s) = compiled(vec![sample("deny-metadata.yaml")]);
    for p in ["deathstar", "tiefighter", "xwing"] {
        assert!(
            !sim::decide(
                &s.maps,
                &iface("default", p),
                direction::EGRESS,
                ip("169.254.169.254"),
                6,
                80
            )
            .allow
        );
        assert!(
            sim::decide(
                &s.maps,
                &iface("default", p),
                direction::EGRESS,
                ip("169.254.169.253"),
                6,
                80
            )
            .allow
        );
        assert!(
            sim::decide(
                &s.maps,
                &iface("default", p),
                direction::EGRESS,
                ip("8.8.8.8"),
                17,
                53
            )
            .allow
        );
        assert!(
            sim::decide(
                &s.maps,
                &iface("default", p),
                direction::INGRESS,
                ip(XW),
                6,
                80
            )
            .allow
        );
    }
    golden("deny-metadata", &s);
}
