//! One test (or a few) per semantic rule of DESIGN.md, through the compiled maps and the
//! lookup simulation, plus the identity and capacity rules.

mod common;

use common::{iface, ip, node, ns, pod, policy, port, sim};
use moat::api::Protocol;
use moat::compiler::diff::{MapOp, RealizedState, diff, transition_overflow};
use moat::compiler::{CompileConfig, DesiredState, compile};
use moat::identity::Allocations;
use moat::model::{Endpoint, Model, Phase, Policy};
use moat_common::{direction::EGRESS, direction::INGRESS, ep_flag, ep_flags, identity};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn cluster(endpoints: Vec<Endpoint>, policies: Vec<Policy>) -> Model {
    Model {
        local_node: "n1".into(),
        namespaces: vec![ns("x", &[("team", "red")]), ns("y", &[("team", "blue")])],
        nodes: vec![
            node("n1", "10.0.0.1"),
            node("n2", "10.0.0.2"),
            node("n3", "10.0.0.3"),
        ],
        endpoints,
        policies,
    }
}

fn abc() -> Vec<Endpoint> {
    vec![
        pod("x", "a", "n1", &[("app", "a")], "10.244.0.1"),
        pod("x", "b", "n1", &[("app", "b")], "10.244.0.2"),
        pod("y", "a", "n1", &[("app", "a")], "10.244.0.3"),
        pod("y", "r", "n2", &[("app", "r")], "10.244.1.1"),
    ]
}

fn build(m: &Model) -> DesiredState {
    compile(m, &Allocations::default(), &CompileConfig::default())
        .unwrap()
        .0
}

fn dec(
    s: &DesiredState,
    ns: &str,
    p: &str,
    dir: u8,
    peer: &str,
    proto: u8,
    port: u16,
) -> sim::Decision {
    sim::decide(&s.maps, &iface(ns, p), dir, ip(peer), proto, port)
}

fn allows(s: &DesiredState, ns: &str, p: &str, dir: u8, peer: &str, proto: u8, port: u16) -> bool {
    dec(s, ns, p, dir, peer, proto, port).allow
}

fn mnp(name: &str, ns: &str, spec: &str) -> Policy {
    policy(&format!(
        "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    ))
}

fn mcnp(name: &str, spec: &str) -> Policy {
    policy(&format!(
        "apiVersion: moat.dev/v1alpha1\nkind: MoatClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    ))
}

fn np(name: &str, ns: &str, spec: &str) -> Policy {
    policy(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    ))
}

#[test]
fn rule1_isolation_is_per_direction() {
    let s = build(&cluster(
        abc(),
        vec![np(
            "p",
            "x",
            "  podSelector: {matchLabels: {app: a}}\n  ingress: []\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80));
    assert!(
        allows(&s, "x", "a", EGRESS, "10.244.0.2", TCP, 80),
        "egress not isolated"
    );
    assert!(
        allows(&s, "x", "b", INGRESS, "10.244.0.3", TCP, 80),
        "unselected pod not isolated"
    );
    let ep = s.maps.endpoints[&iface("x", "a")];
    assert_eq!(ep.flags & ep_flag(ep_flags::ISOLATED, EGRESS), 0);
    assert_ne!(ep.flags & ep_flag(ep_flags::ISOLATED, INGRESS), 0);
    // Egress in policyTypes without rules isolates egress (upstream defaulting respected).
    let s = build(&cluster(
        abc(),
        vec![np("p", "x", "  podSelector: {}\n  policyTypes: [Egress]\n")],
    ));
    assert!(!allows(&s, "x", "a", EGRESS, "10.244.0.3", TCP, 80));
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80));
}

#[test]
fn rule1_union_and_deny_subtracts() {
    let s = build(&cluster(
        abc(),
        vec![
            np(
                "p1",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 80}]\n",
            ),
            np(
                "p2",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 81}]\n",
            ),
            mnp(
                "deny",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - action: Deny\n    from: [{namespaceSelector: {matchLabels: {team: blue}}}]\n    ports: [{port: 80}]\n",
            ),
        ],
    ));
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80));
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 81));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 82));
    assert!(
        !allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80),
        "deny beats the allow"
    );
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 81));
}

#[test]
fn deny_only_policy_isolates_nothing() {
    let s = build(&cluster(
        abc(),
        vec![mcnp(
            "meta",
            "  egress:\n  - action: Deny\n    to: [{ipBlock: {cidr: 169.254.169.254/32}}]\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", EGRESS, "169.254.169.254", TCP, 80));
    assert!(allows(&s, "x", "a", EGRESS, "1.1.1.1", TCP, 80));
    assert_eq!(
        s.maps.endpoints[&iface("x", "a")].flags,
        ep_flag(ep_flags::POLICY, EGRESS)
    );
    // defaultDeny can be forced either way.
    let s = build(&cluster(
        abc(),
        vec![mcnp(
            "meta",
            "  defaultDeny: {egress: true}\n  egress:\n  - action: Deny\n    to: [{ipBlock: {cidr: 169.254.169.254/32}}]\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", EGRESS, "1.1.1.1", TCP, 80));
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "open",
            "x",
            "  podSelector: {}\n  defaultDeny: {ingress: false}\n  ingress:\n  - ports: [{port: 80}]\n",
        )],
    ));
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 9999));
}

#[test]
fn rule2_both_ends_decide() {
    let s = build(&cluster(
        abc(),
        vec![
            np(
                "eg",
                "x",
                "  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Egress]\n",
            ),
            np(
                "in",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{podSelector: {}}]\n",
            ),
        ],
    ));
    assert!(
        allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80),
        "a's ingress admits b"
    );
    assert!(
        !allows(&s, "x", "b", EGRESS, "10.244.0.1", TCP, 80),
        "but b's egress does not let it out"
    );
}

#[test]
fn rule3_node_and_self() {
    let s = build(&cluster(
        abc(),
        vec![np(
            "all",
            "x",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        )],
    ));
    assert!(
        allows(&s, "x", "a", INGRESS, "10.0.0.1", TCP, 10250),
        "own node reaches the pod"
    );
    assert!(allows(&s, "x", "a", EGRESS, "10.0.0.1", TCP, 443));
    assert!(
        !allows(&s, "x", "a", INGRESS, "10.0.0.2", TCP, 80),
        "another node is not the host"
    );
    assert!(
        allows(&s, "x", "a", INGRESS, "10.244.0.1", TCP, 80),
        "the pod reaches itself"
    );
    // A Deny that does not name host leaves the node alone; one naming host blocks it.
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "d",
            "x",
            "  podSelector: {}\n  ingress:\n  - action: Deny\n",
        )],
    ));
    assert!(allows(&s, "x", "a", INGRESS, "10.0.0.1", TCP, 80));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80));
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "d",
            "x",
            "  podSelector: {}\n  ingress:\n  - action: Deny\n    from: [{entities: [host]}]\n    ports: [{port: 22}]\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", INGRESS, "10.0.0.1", TCP, 22));
    assert!(allows(&s, "x", "a", INGRESS, "10.0.0.1", TCP, 80));
    assert!(
        allows(&s, "x", "a", INGRESS, "10.244.0.1", TCP, 22),
        "self is still allowed"
    );
}

#[test]
fn rule4_ipblock_matches_pods_and_splits_identities_only_when_cut() {
    let mut eps = abc();
    eps.push(pod("x", "a2", "n2", &[("app", "a")], "10.244.1.9"));
    // No CIDR: x/a and x/a2 share an identity.
    let s = build(&cluster(eps.clone(), vec![]));
    let id = |s: &DesiredState, a: &str| s.maps.ipcache[&ip(a).into()].identity;
    assert_eq!(id(&s, "10.244.0.1"), id(&s, "10.244.1.9"));
    assert_ne!(
        id(&s, "10.244.0.1"),
        id(&s, "10.244.0.3"),
        "namespace is part of the label set"
    );
    // A CIDR containing both does not split them.
    let p = np(
        "c",
        "y",
        "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.244.0.0/16}}]\n",
    );
    let s2 = build(&cluster(eps.clone(), vec![p]));
    assert_eq!(id(&s2, "10.244.0.1"), id(&s2, "10.244.1.9"));
    assert_eq!(
        id(&s2, "10.244.0.1"),
        id(&s, "10.244.0.1"),
        "number unchanged when not cut"
    );
    // A /32 on one of them splits them, and selects exactly that pod.
    let p = np(
        "c",
        "y",
        "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.244.1.9/32}}]\n",
    );
    let s3 = build(&cluster(eps.clone(), vec![p]));
    assert_ne!(id(&s3, "10.244.0.1"), id(&s3, "10.244.1.9"));
    assert!(allows(&s3, "y", "a", INGRESS, "10.244.1.9", TCP, 80));
    assert!(!allows(&s3, "y", "a", INGRESS, "10.244.0.1", TCP, 80));
    // Except carves out; world addresses inside get a CIDR identity; nodes are matched too.
    let p = np(
        "c",
        "y",
        "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/24]}}]\n",
    );
    let s4 = build(&cluster(eps, vec![p]));
    assert!(allows(&s4, "y", "a", INGRESS, "10.244.1.1", TCP, 80));
    assert!(!allows(&s4, "y", "a", INGRESS, "10.244.0.2", TCP, 80));
    assert!(allows(&s4, "y", "a", INGRESS, "10.9.9.9", TCP, 80));
    assert!(s4.maps.ipcache[&"10.0.0.0/8".parse().unwrap()].identity >= identity::FIRST_CIDR);
    assert!(
        allows(&s4, "y", "a", INGRESS, "10.0.0.2", TCP, 80),
        "a remote node inside the block"
    );
    assert!(
        !allows(&s4, "y", "a", INGRESS, "192.0.2.1", TCP, 80),
        "world outside"
    );
}

#[test]
fn rule4_ipcache_contents() {
    let mut eps = abc();
    let mut hn = pod("x", "hostnet", "n2", &[], "10.0.0.2");
    hn.host_network = true;
    let mut done = pod("x", "done", "n1", &[], "10.244.0.50");
    done.phase = Phase::Finished;
    eps.extend([hn, done]);
    let s = build(&cluster(eps, vec![]));
    assert_eq!(
        s.maps.ipcache[&ip("10.0.0.1").into()].identity,
        identity::HOST
    );
    assert_eq!(
        s.maps.ipcache[&ip("10.0.0.2").into()].identity,
        identity::REMOTE_NODE
    );
    assert!(
        !s.maps.ipcache.contains_key(&ip("10.244.0.50").into()),
        "finished pods are left out"
    );
    assert!(
        s.maps.ipcache[&ip("10.244.1.1").into()].identity >= identity::FIRST_LABEL,
        "remote pods are in"
    );
    assert_eq!(
        s.maps.ipcache[&ip("10.244.1.1").into()].endpoint_id,
        0,
        "remote pods have no endpoint id"
    );
    assert_ne!(s.maps.ipcache[&ip("10.244.0.1").into()].endpoint_id, 0);
    assert_eq!(s.maps.endpoints.len(), 3, "local, running, not hostNetwork");
}

#[test]
fn rule5_named_ports_resolve_per_pod() {
    let mut a1 = pod("x", "a1", "n1", &[("app", "web")], "10.244.0.11");
    a1.ports = vec![port("http", Protocol::Tcp, 80)];
    let mut a2 = pod("x", "a2", "n1", &[("app", "web")], "10.244.0.12");
    a2.ports = vec![port("http", Protocol::Tcp, 8080)];
    let c = pod("x", "c", "n1", &[("app", "client")], "10.244.0.13");
    let s = build(&cluster(
        vec![a1, a2, c],
        vec![
            np(
                "in",
                "x",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: http}]\n",
            ),
            np(
                "out",
                "x",
                "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: http}]\n",
            ),
        ],
    ));
    assert!(allows(&s, "x", "a1", INGRESS, "10.244.0.13", TCP, 80));
    assert!(!allows(&s, "x", "a1", INGRESS, "10.244.0.13", TCP, 8080));
    assert!(allows(&s, "x", "a2", INGRESS, "10.244.0.13", TCP, 8080));
    assert!(!allows(&s, "x", "a2", INGRESS, "10.244.0.13", TCP, 80));
    assert_ne!(
        s.maps.endpoints[&iface("x", "a1")].ruleset_id,
        s.maps.endpoints[&iface("x", "a2")].ruleset_id
    );
    assert!(allows(&s, "x", "c", EGRESS, "10.244.0.11", TCP, 80));
    assert!(
        !allows(&s, "x", "c", EGRESS, "10.244.0.11", TCP, 8080),
        "no leak of a2's number to a1"
    );
    assert!(allows(&s, "x", "c", EGRESS, "10.244.0.12", TCP, 8080));
    assert!(!allows(&s, "x", "c", EGRESS, "10.244.0.12", TCP, 80));
    let id = |a: &str| s.maps.ipcache[&ip(a).into()].identity;
    assert_ne!(
        id("10.244.0.11"),
        id("10.244.0.12"),
        "egress named port splits equal-label peers"
    );
}

#[test]
fn rulesets_are_shared_by_equal_policy() {
    let s = build(&cluster(
        abc(),
        vec![np(
            "p",
            "x",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n",
        )],
    ));
    let a = s.maps.endpoints[&iface("x", "a")];
    let b = s.maps.endpoints[&iface("x", "b")];
    assert_eq!(a.ruleset_id, b.ruleset_id);
    assert_ne!(a.ruleset_id, 0);
    assert_eq!(
        s.maps.endpoints[&iface("y", "a")].ruleset_id,
        0,
        "no entries, no subject"
    );
}

#[test]
fn rule6_revision_bumped_last_and_only_on_change() {
    let m1 = cluster(abc(), vec![]);
    let (s1, alloc) = compile(&m1, &Allocations::default(), &CompileConfig::default()).unwrap();
    let m2 = cluster(
        abc(),
        vec![np("p", "x", "  podSelector: {}\n  ingress: []\n")],
    );
    let (s2, _) = compile(&m2, &alloc, &CompileConfig::default()).unwrap();
    let realized = RealizedState {
        maps: s1.maps.clone(),
        revision: 41,
    };
    let ops = diff(&s2.maps, &realized);
    assert_eq!(ops.last(), Some(&MapOp::SetRevision(42)));
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, MapOp::SetRevision(_)))
            .count(),
        1
    );
    assert!(diff(&s1.maps, &realized).is_empty());
}

#[test]
fn rule7_http_beside_plain_allow_is_match_all_for_the_overlap() {
    let s = build(&cluster(
        abc(),
        vec![
            mnp(
                "l7",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 80}]\n    http: [{method: GET}]\n",
            ),
            np(
                "l3",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]\n",
            ),
        ],
    ));
    let d = dec(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80);
    assert!(
        d.allow && d.redirect.is_some(),
        "redirected: the any-peer HTTP rule covers port 80"
    );
    let subject = s.maps.endpoints[&iface("x", "a")].ruleset_id;
    let b_id = s.maps.ipcache[&ip("10.244.0.2").into()].identity;
    let for_b: Vec<_> =
        s.l7.iter()
            .filter(|(k, _)| k.subject == subject && k.peer == b_id)
            .flat_map(|(_, v)| v)
            .collect();
    assert!(
        for_b.iter().any(|m| m.method.is_none() && m.path.is_none()),
        "b keeps everything: {for_b:?}"
    );
    let any: Vec<_> =
        s.l7.iter()
            .filter(|(k, _)| k.subject == subject && k.peer == 0)
            .flat_map(|(_, v)| v)
            .collect();
    assert!(
        any.iter().all(|m| m.method.as_deref() == Some("GET")),
        "others only GET"
    );
    // Other ports for b: plain allow, no proxy.
    let d = dec(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 81);
    assert!(d.allow && d.redirect.is_none());
}

#[test]
fn rule8_audit_reports_without_enforcing() {
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "try",
            "x",
            "  podSelector: {matchLabels: {app: a}}\n  enforcementMode: Audit\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]\n",
        )],
    ));
    let from_y = dec(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80);
    assert!(
        from_y.allow && !from_y.audit_allow,
        "enforce allows, audit view denies -> AUDIT"
    );
    let from_b = dec(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80);
    assert!(from_b.allow && from_b.audit_allow);
    let ep = s.maps.endpoints[&iface("x", "a")];
    assert_eq!(ep.flags & ep_flag(ep_flags::ISOLATED, INGRESS), 0);
    assert_ne!(ep.flags & ep_flag(ep_flags::AUDIT_ISOLATED, INGRESS), 0);
    assert_ne!(ep.audit_isolating_rule[0], 0);
}

#[test]
fn rule9_attribution() {
    let s = build(&cluster(
        abc(),
        vec![
            np(
                "iso",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 80}]\n",
            ),
            mnp(
                "d",
                "x",
                "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - action: Allow\n    ports: [{port: 81}]\n  - action: Deny\n    ports: [{port: 80}]\n    from: [{podSelector: {matchLabels: {app: b}}}]\n",
            ),
        ],
    ));
    let denied = dec(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80);
    assert!(!denied.allow);
    let r = &s.rules[&denied.rule_id];
    assert_eq!(
        (r.name.as_str(), r.direction.as_str(), r.rule.as_str()),
        ("d", "ingress", "1")
    );
    let allowed = dec(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80);
    assert_eq!(s.rules[&allowed.rule_id].name, "iso");
    let dropped = dec(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 9);
    assert!(!dropped.allow);
    let r = &s.rules[&dropped.rule_id];
    assert_eq!(
        (r.name.as_str(), r.rule.as_str()),
        ("iso", "default-deny"),
        "first isolating policy (kind, namespace, name)"
    );
}

#[test]
fn cluster_policy_pod_selector_spans_namespaces() {
    let s = build(&cluster(
        abc(),
        vec![mcnp(
            "c",
            "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]\n",
        )],
    ));
    assert!(
        allows(&s, "y", "a", INGRESS, "10.244.0.2", TCP, 80),
        "x/b reaches y/a"
    );
    assert!(!allows(&s, "y", "a", INGRESS, "10.244.1.1", TCP, 80));
    let s = build(&cluster(
        abc(),
        vec![mcnp(
            "c",
            "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{podSelector: {}, namespaceSelector: {matchLabels: {team: blue}}}]\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80));
    assert!(allows(&s, "x", "a", INGRESS, "10.244.1.1", TCP, 80));
}

#[test]
fn entities() {
    let e = |ent: &str| {
        build(&cluster(
            abc(),
            vec![mnp(
                "e",
                "x",
                &format!("  podSelector: {{}}\n  egress:\n  - to: [{{entities: [{ent}]}}]\n"),
            )],
        ))
    };
    let w = e("world");
    assert!(allows(&w, "x", "a", EGRESS, "8.8.8.8", UDP, 53));
    assert!(!allows(&w, "x", "a", EGRESS, "10.244.0.3", TCP, 80));
    let c = e("cluster");
    assert!(!allows(&c, "x", "a", EGRESS, "8.8.8.8", UDP, 53));
    assert!(allows(&c, "x", "a", EGRESS, "10.244.1.1", TCP, 80));
    assert!(
        allows(&c, "x", "a", EGRESS, "10.0.0.3", TCP, 80),
        "remote nodes are cluster"
    );
    let all = e("all");
    assert!(allows(&all, "x", "a", EGRESS, "8.8.8.8", UDP, 53));
}

#[test]
fn ports_ranges_and_icmp() {
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "r",
            "x",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 1000, endPort: 2000}, {protocol: ICMP}, {protocol: UDP}]\n",
        )],
    ));
    for (p, want) in [
        (999, false),
        (1000, true),
        (1500, true),
        (2000, true),
        (2001, false),
    ] {
        assert_eq!(
            allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, p),
            want,
            "port {p}"
        );
    }
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.3", 1, 0));
    assert!(
        allows(&s, "x", "a", INGRESS, "fd00::3", 58, 0),
        "ICMPv6 too"
    );
    assert!(allows(&s, "x", "a", INGRESS, "10.244.0.3", UDP, 5353));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.3", 132, 80));
    let subject = s.maps.endpoints[&iface("x", "a")].ruleset_id;
    assert!(
        s.maps
            .prefixes
            .keys()
            .any(|(k, l)| k.subject == subject && k.protocol == 1 && *l == 80)
    );
}

#[test]
fn broader_deny_is_copied_onto_narrower_keys() {
    // All-TCP deny from b, port-80 allow from b: the exact key must carry the deny.
    let s = build(&cluster(
        abc(),
        vec![mnp(
            "m",
            "x",
            "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 80}]\n    from: [{podSelector: {matchLabels: {app: b}}}]\n  - action: Deny\n    ports: [{protocol: TCP}]\n    from: [{podSelector: {matchLabels: {app: b}}}]\n",
        )],
    ));
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.2", TCP, 80));
    assert!(
        s.maps
            .exact
            .values()
            .all(|v| v.action == moat_common::action::DENY)
    );
}

#[test]
fn allocations_survive_a_restart_and_stay_stable() {
    let m = cluster(
        abc(),
        vec![np(
            "p",
            "x",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n",
        )],
    );
    let (s, alloc) = compile(&m, &Allocations::default(), &CompileConfig::default()).unwrap();
    let saved = serde_json::to_string(&alloc).unwrap();
    let restored: Allocations = serde_json::from_str(&saved).unwrap();
    let (s2, _) = compile(&m, &restored, &CompileConfig::default()).unwrap();
    assert_eq!(s, s2, "a restarted agent computes the maps it left");
    // A new pod does not renumber anything else.
    let mut m3 = m.clone();
    m3.endpoints
        .insert(0, pod("z", "new", "n1", &[("app", "new")], "10.244.0.99"));
    m3.namespaces.push(ns("z", &[]));
    let (s3, _) = compile(&m3, &alloc, &CompileConfig::default()).unwrap();
    for (k, v) in &s.maps.ipcache {
        assert_eq!(s3.maps.ipcache[k], *v);
    }
    for (k, v) in &s.maps.endpoints {
        assert_eq!(s3.maps.endpoints[k], *v);
    }
    assert_eq!(s.rules, s3.rules);
}

#[test]
fn prefilter_entries() {
    let s = build(&cluster(
        abc(),
        vec![mcnp(
            "ddos",
            "  prefilter: {denySources: [203.0.113.0/24, '2001:db8:bad::/48']}\n",
        )],
    ));
    assert_eq!(s.maps.prefilter.len(), 2);
    let id = s.maps.prefilter[&"203.0.113.0/24".parse().unwrap()];
    assert_eq!(s.rules[&id].direction, "prefilter");
    assert!(
        s.maps.endpoints.values().all(|e| e.flags == 0),
        "a prefilter is not a policy rule"
    );
}

#[test]
fn overflow_refuses_the_policy_that_pushed_it_over() {
    let small = np(
        "a-small",
        "x",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n",
    );
    let n = moat_common::capacity::MAX_RULE_IDS as usize;
    let mut big = String::from("  podSelector: {matchLabels: {app: b}}\n  ingress:\n");
    for _ in 0..n {
        big.push_str("  - ports: [{port: 81}]\n");
    }
    let m = cluster(abc(), vec![small, np("b-big", "x", &big)]);
    let (s, _) = compile(&m, &Allocations::default(), &CompileConfig::default()).unwrap();
    let by_name = |n: &str| s.policies.iter().find(|(r, _)| r.name == n).unwrap().1;
    assert!(by_name("a-small").accepted);
    let big = by_name("b-big");
    assert!(!big.accepted);
    assert!(
        big.message.contains("rule ids") && big.message.contains("capacity"),
        "{}",
        big.message
    );
    assert!(
        allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 80),
        "what fits is compiled"
    );
    assert!(!allows(&s, "x", "a", INGRESS, "10.244.0.3", TCP, 81));
    assert!(
        allows(&s, "x", "b", INGRESS, "10.244.0.3", TCP, 80),
        "b only gets the small policy"
    );
}

/// Checks the transition invariant after every operation of `diff(new, old)` for `peers` on
/// every endpoint of either state, and that the batch ends in `new`.
fn assert_transition_invariant(
    old: &moat::compiler::Maps,
    new: &moat::compiler::Maps,
    peers: &[&str],
) {
    let mut cur = RealizedState {
        maps: old.clone(),
        revision: 1,
    };
    let ops = diff(new, &cur);
    let ifaces: std::collections::BTreeSet<&String> =
        old.endpoints.keys().chain(new.endpoints.keys()).collect();
    for (n, op) in ops.iter().enumerate() {
        op.apply(&mut cur);
        for iface in &ifaces {
            for peer in peers {
                for dir in [INGRESS, EGRESS] {
                    let was = sim::decide(old, iface, dir, ip(peer), TCP, 80).allow;
                    let will = sim::decide(new, iface, dir, ip(peer), TCP, 80).allow;
                    let now = sim::decide(&cur.maps, iface, dir, ip(peer), TCP, 80).allow;
                    assert!(
                        (was && will) <= now && now <= (was || will),
                        "after op {n} {op:?}: {iface} dir {dir} peer {peer}: was {was}, will {will}, now {now}"
                    );
                }
            }
        }
    }
    assert_eq!(&cur.maps, new);
}

fn allow_entry(subject: u32, peer: u32) -> (moat_common::PolicyKey, moat_common::PolicyValue) {
    (
        moat_common::PolicyKey {
            subject,
            peer,
            direction: INGRESS,
            protocol: TCP,
            dport: 80u16.to_be_bytes(),
        },
        moat_common::PolicyValue {
            action: moat_common::action::ALLOW,
            audit_action: moat_common::action::ALLOW,
            rule_id: 1,
            audit_rule_id: 1,
            ..Default::default()
        },
    )
}

fn isolated_endpoint(id: u32, subject: u32) -> moat_common::EndpointInfo {
    let f = ep_flag(
        ep_flags::POLICY | ep_flags::ISOLATED | ep_flags::AUDIT_ISOLATED,
        INGRESS,
    );
    moat_common::EndpointInfo {
        endpoint_id: id,
        identity: 300,
        ruleset_id: subject,
        flags: f,
        isolating_rule: [1, 0],
        audit_isolating_rule: [1, 0],
    }
}

fn address(identity: u32) -> moat_common::IpcacheValue {
    moat_common::IpcacheValue {
        identity,
        endpoint_id: 0,
        flags: 0,
    }
}

/// A peer relabelled (identity 400 -> 401) in the batch in which endpoint `a` leaves subject
/// 1 for subject 2 while `b` stays on subject 1: subject 1 allows the old identity only, so
/// `a` must keep the old meaning until it switches and `b` gets the new one — one transition
/// identity cannot mean both in subject 1, so `a` is parked on a copy first.
#[test]
fn peer_changing_identity_while_endpoints_switch_keeps_the_invariant() {
    let mut old = moat::compiler::Maps::default();
    old.endpoints.insert("a".into(), isolated_endpoint(1, 1));
    old.endpoints.insert("b".into(), isolated_endpoint(2, 1));
    old.exact.extend([allow_entry(1, 400)]);
    old.ipcache
        .insert("10.9.0.7/32".parse().unwrap(), address(400));
    let mut new = old.clone();
    new.endpoints.insert("a".into(), isolated_endpoint(1, 2));
    new.exact.extend([allow_entry(2, 401)]);
    new.ipcache
        .insert("10.9.0.7/32".parse().unwrap(), address(401));
    assert_transition_invariant(&old, &new, &["10.9.0.7"]);
    let ops = diff(
        &new,
        &RealizedState {
            maps: old.clone(),
            revision: 1,
        },
    );
    assert!(
        ops.iter()
            .any(|op| matches!(op, MapOp::EndpointUpsert(name, info)
            if name == "a" && info.ruleset_id >= moat::compiler::diff::FIRST_TRANSITION_SUBJECT)),
        "a is parked on a transition subject: {ops:?}"
    );

    // A new pod inside a CIDR another subject allows, an address leaving, an endpoint only
    // changing flags: each while endpoints switch.
    let mut old = moat::compiler::Maps::default();
    old.endpoints.insert("a".into(), isolated_endpoint(1, 1));
    old.endpoints.insert("b".into(), isolated_endpoint(2, 3));
    old.exact.extend([
        allow_entry(1, 500),
        allow_entry(3, 500),
        allow_entry(3, 401),
    ]);
    old.ipcache
        .insert("10.9.0.0/24".parse().unwrap(), address(500));
    old.ipcache
        .insert("10.9.1.5/32".parse().unwrap(), address(401));
    let mut new = old.clone();
    new.endpoints.insert("a".into(), isolated_endpoint(1, 2));
    let mut b = isolated_endpoint(2, 3);
    b.flags = 0;
    new.endpoints.insert("b".into(), b);
    new.exact.extend([allow_entry(2, 401), allow_entry(2, 500)]);
    new.ipcache
        .insert("10.9.0.9/32".parse().unwrap(), address(401));
    new.ipcache.remove(&"10.9.1.5/32".parse().unwrap());
    assert_transition_invariant(&old, &new, &["10.9.0.9", "10.9.0.10", "10.9.1.5"]);
}

/// Old and new entries coexist while endpoints switch: a change that fits when done but not
/// half-way is found before anything is written.
#[test]
fn a_batch_that_overflows_half_way_is_refused_before_it_starts() {
    let per_subject = moat_common::capacity::POLICY_EXACT as usize * 3 / 5;
    let mut old = moat::compiler::Maps::default();
    old.endpoints.insert("a".into(), isolated_endpoint(1, 1));
    old.exact
        .extend((0..per_subject as u32).map(|i| allow_entry(1, 1000 + i)));
    let mut new = moat::compiler::Maps::default();
    new.endpoints.insert("a".into(), isolated_endpoint(1, 2));
    new.exact
        .extend((0..per_subject as u32).map(|i| allow_entry(2, 1000 + i)));
    let realized = RealizedState {
        maps: old.clone(),
        revision: 1,
    };
    let ops = diff(&new, &realized);
    let o = transition_overflow(&ops, &realized).expect("overflow found");
    assert_eq!(o.map, "policy exact");
    assert_eq!(o.needed, 2 * per_subject);
    assert_eq!(
        o.to_string(),
        format!(
            "map policy exact would need {} entries, capacity {}",
            2 * per_subject,
            moat_common::capacity::POLICY_EXACT
        )
    );
    // Done, it fits.
    assert!(new.exact.len() <= moat_common::capacity::POLICY_EXACT as usize);
}
