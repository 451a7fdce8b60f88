//! Every semantic validation error, with the message a user reads in the Invalid condition.

mod common;

use common::{model, node, ns, pod, policy};
use moat::compiler::{CompileConfig, compile};
use moat::identity::Allocations;

/// The Invalid message the compiler reports for a policy (empty when accepted).
fn message(yaml: &str) -> String {
    let m = model(
        vec![ns("x", &[])],
        vec![node("n1", "10.0.0.1")],
        vec![pod("x", "a", "n1", &[], "10.244.0.1")],
        vec![policy(yaml)],
    );
    let (s, _) = compile(&m, &Allocations::default(), &CompileConfig::default()).unwrap();
    let o = s.policies.values().next().unwrap();
    assert_eq!(o.accepted, o.message.is_empty());
    o.message.clone()
}

fn mnp(spec: &str) -> String {
    message(&format!(
        "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}"
    ))
}

fn np(spec: &str) -> String {
    message(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}"
    ))
}

#[track_caller]
fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} lacks {p:?}");
    }
}

#[test]
fn valid_policy_is_accepted() {
    assert_eq!(
        mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n"),
        ""
    );
}

#[test]
fn regex_that_does_not_compile() {
    has(
        &mnp(
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n    http: [{pathRegex: '/v1/(unclosed'}]\n",
        ),
        &[
            "spec.ingress[0].http[0].pathRegex",
            "does not compile",
            "fix the expression",
        ],
    );
}

#[test]
fn end_port_below_port() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 79}]\n"),
        &[
            "spec.ingress[0].ports[0].endPort",
            "endPort 79 is below port 80",
            "set endPort >= port",
        ],
    );
    has(
        &np("  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 79}]\n"),
        &["endPort 79 is below port 80"],
    );
}

#[test]
fn except_outside_cidr() {
    has(
        &mnp(
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]\n",
        ),
        &[
            "spec.egress[0].to[0].ipBlock.except[0]",
            "192.168.0.0/16 is not inside cidr 10.0.0.0/8",
        ],
    );
    has(
        &np(
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]\n",
        ),
        &["strict sub-range"],
    );
}

#[test]
fn bad_cidr() {
    has(
        &mnp("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0/8}}]\n"),
        &["is not a CIDR"],
    );
}

#[test]
fn named_port_with_end_port() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 90}]\n"),
        &[
            "spec.ingress[0].ports[0].endPort",
            "named port (\"http\") cannot start a range",
        ],
    );
}

#[test]
fn end_port_without_port() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{endPort: 90}]\n"),
        &["endPort needs a numeric port"],
    );
}

#[test]
fn deny_with_http() {
    has(
        &mnp(
            "  podSelector: {}\n  ingress:\n  - action: Deny\n    ports: [{port: 80}]\n    http: [{method: GET}]\n",
        ),
        &[
            "spec.ingress[0]",
            "a Deny rule cannot have http rules",
            "remove http or make the rule an Allow",
        ],
    );
}

#[test]
fn http_on_udp() {
    has(
        &mnp(
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 53, protocol: UDP}]\n    http: [{method: GET}]\n",
        ),
        &["http rules need TCP ports"],
    );
}

#[test]
fn icmp_with_port() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: 8, protocol: ICMP}]\n"),
        &["spec.ingress[0].ports[0]", "ICMP has no ports"],
    );
}

#[test]
fn icmp_in_upstream_policy() {
    has(
        &np("  podSelector: {}\n  ingress:\n  - ports: [{protocol: ICMP}]\n"),
        &["not supported by NetworkPolicy"],
    );
}

#[test]
fn port_out_of_range_and_bad_names() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: 70000}]\n"),
        &["70000 is not a port"],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: Not_A_Name}]\n"),
        &["not a valid port name"],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - ports: [{port: '80'}]\n"),
        &["number written as a string"],
    );
}

#[test]
fn peers() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - from: [{}]\n"),
        &["empty peer"],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}, entities: [world]}]\n"),
        &["a peer takes one of", "split it into separate peers"],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - from: [{entities: []}]\n"),
        &["entities: empty list"],
    );
    has(
        &np(
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]\n",
        ),
        &["ipBlock cannot be combined"],
    );
}

#[test]
fn selector_operators() {
    has(
        &mnp("  podSelector: {matchExpressions: [{key: a, operator: In}]}\n"),
        &[
            "spec.podSelector.matchExpressions[0]",
            "operator In needs at least one value",
        ],
    );
    has(
        &mnp("  podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n"),
        &["takes no values"],
    );
    has(
        &mnp("  podSelector: {matchExpressions: [{key: a, operator: Equals, values: [x]}]}\n"),
        &["unknown operator \"Equals\""],
    );
}

#[test]
fn http_fields() {
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - http: [{path: v1}]\n"),
        &["http[0].path", "must start with \"/\""],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - http: [{method: 'GE T'}]\n"),
        &["is not an HTTP method"],
    );
    has(
        &mnp("  podSelector: {}\n  ingress:\n  - http: [{headers: [{name: 'x y'}]}]\n"),
        &["is not an HTTP header name"],
    );
}

#[test]
fn policy_types() {
    has(
        &np("  podSelector: {}\n  policyTypes: [Inbound]\n"),
        &["\"Inbound\" is not a policy type"],
    );
}

#[test]
fn prefilter_cidr() {
    let msg = message(
        "apiVersion: moat.dev/v1alpha1\nkind: MoatClusterNetworkPolicy\nmetadata: {name: p}\nspec:\n  prefilter: {denySources: [not-a-cidr]}\n",
    );
    has(&msg, &["spec.prefilter.denySources[0]", "is not a CIDR"]);
}

#[test]
fn invalid_policy_status_conditions() {
    let m = model(
        vec![ns("x", &[])],
        vec![node("n1", "10.0.0.1")],
        vec![],
        vec![policy(
            "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {name: p, namespace: x, generation: 3}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 79}]\n",
        )],
    );
    let (s, _) = compile(&m, &Allocations::default(), &CompileConfig::default()).unwrap();
    let (r, o) = s.policies.iter().next().unwrap();
    let st = o.status(m.policies[0].generation());
    assert_eq!(r.name, "p");
    assert_eq!(st.observed_generation, Some(3));
    let invalid = st.conditions.iter().find(|c| c.type_ == "Invalid").unwrap();
    assert_eq!(invalid.status, "True");
    assert_eq!(invalid.reason, "InvalidSpec");
    assert!(invalid.message.contains("endPort 79 is below port 80"));
    assert_eq!(
        st.conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .unwrap()
            .status,
        "False"
    );
    assert!(s.rules.is_empty(), "an invalid policy gets no rule ids");
}
