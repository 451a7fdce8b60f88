//! Semantic validation: what the OpenAPI schema cannot say. Each problem names the field
//! (`spec.ingress[0].ports[1]`) and says what to change, because it ends up verbatim in the
//! policy's `Invalid` condition where the user reads it.

use super::cluster::MoatClusterNetworkPolicySpec;
use super::common::{
    Action, EgressRule, HttpRule, IngressRule, IpBlock, Peer, PolicyPort, Protocol,
};
use super::namespaced::MoatNetworkPolicySpec;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock as UpstreamIpBlock, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Checks a MoatNetworkPolicy spec; empty when valid.
pub fn moat_policy(spec: &MoatNetworkPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    selector("spec.podSelector", &spec.pod_selector, &mut out);
    rules(&spec.ingress, &spec.egress, &mut out);
    out
}

/// Checks a MoatClusterNetworkPolicy spec; empty when valid.
pub fn moat_cluster_policy(spec: &MoatClusterNetworkPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = &spec.pod_selector {
        selector("spec.podSelector", s, &mut out);
    }
    if let Some(s) = &spec.namespace_selector {
        selector("spec.namespaceSelector", s, &mut out);
    }
    rules(&spec.ingress, &spec.egress, &mut out);
    if let Some(p) = &spec.prefilter {
        for (i, c) in p.deny_sources.iter().enumerate() {
            if parse_cidr(c).is_none() {
                out.push(format!(
                    "spec.prefilter.denySources[{i}]: {c:?} is not a CIDR; write it like \"192.0.2.0/24\" or \"2001:db8::/32\""
                ));
            }
        }
    }
    out
}

/// Checks an upstream NetworkPolicy spec for what the API server would have refused, so that
/// files given to a standalone agent fail the same way.
pub fn network_policy(spec: &NetworkPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = &spec.pod_selector {
        selector("spec.podSelector", s, &mut out);
    }
    for t in spec.policy_types.iter().flatten() {
        if t != "Ingress" && t != "Egress" {
            out.push(format!(
                "spec.policyTypes: {t:?} is not a policy type; use \"Ingress\" and/or \"Egress\""
            ));
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        upstream_peers(
            &format!("{at}.from"),
            r.from.as_deref().unwrap_or_default(),
            &mut out,
        );
        upstream_ports(
            &format!("{at}.ports"),
            r.ports.as_deref().unwrap_or_default(),
            &mut out,
        );
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        upstream_peers(
            &format!("{at}.to"),
            r.to.as_deref().unwrap_or_default(),
            &mut out,
        );
        upstream_ports(
            &format!("{at}.ports"),
            r.ports.as_deref().unwrap_or_default(),
            &mut out,
        );
    }
    out
}

fn upstream_peers(at: &str, peers: &[NetworkPolicyPeer], out: &mut Vec<String>) {
    for (j, p) in peers.iter().enumerate() {
        let at = format!("{at}[{j}]");
        if let Some(s) = &p.pod_selector {
            selector(&format!("{at}.podSelector"), s, out);
        }
        if let Some(s) = &p.namespace_selector {
            selector(&format!("{at}.namespaceSelector"), s, out);
        }
        match (&p.ip_block, p.pod_selector.is_some() || p.namespace_selector.is_some()) {
            (Some(_), true) => out.push(format!(
                "{at}: ipBlock cannot be combined with podSelector or namespaceSelector; put it in a peer of its own"
            )),
            (None, false) => out.push(format!(
                "{at}: empty peer; give podSelector, namespaceSelector or ipBlock"
            )),
            _ => {}
        }
        if let Some(b) = &p.ip_block {
            let UpstreamIpBlock { cidr, except } = b;
            ip_block(
                &format!("{at}.ipBlock"),
                cidr,
                except.as_deref().unwrap_or_default(),
                out,
            );
        }
    }
}

fn upstream_ports(at: &str, ports: &[NetworkPolicyPort], out: &mut Vec<String>) {
    for (j, p) in ports.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => match Protocol::parse(s) {
                Some(Protocol::Icmp) | None => {
                    out.push(format!(
                        "{at}.protocol: {s:?} is not supported by NetworkPolicy; use TCP, UDP or SCTP"
                    ));
                    continue;
                }
                Some(p) => p,
            },
        };
        port(&at, protocol, p.port.as_ref(), p.end_port, out);
    }
}

fn rules(ingress: &[IngressRule], egress: &[EgressRule], out: &mut Vec<String>) {
    for (i, r) in ingress.iter().enumerate() {
        rule(
            &format!("spec.ingress[{i}]"),
            "from",
            r.action,
            &r.from,
            &r.ports,
            &r.http,
            out,
        );
    }
    for (i, r) in egress.iter().enumerate() {
        rule(
            &format!("spec.egress[{i}]"),
            "to",
            r.action,
            &r.to,
            &r.ports,
            &r.http,
            out,
        );
    }
}

fn rule(
    at: &str,
    peers_field: &str,
    action: Action,
    peers: &[Peer],
    ports: &[PolicyPort],
    http: &[HttpRule],
    out: &mut Vec<String>,
) {
    for (j, p) in peers.iter().enumerate() {
        peer(&format!("{at}.{peers_field}[{j}]"), p, out);
    }
    for (j, p) in ports.iter().enumerate() {
        let at = format!("{at}.ports[{j}]");
        let protocol = p.protocol.unwrap_or_default();
        port(&at, protocol, p.port.as_ref(), p.end_port, out);
        if !http.is_empty() && protocol != Protocol::Tcp {
            out.push(format!(
                "{at}.protocol: http rules need TCP ports, this port is {}; move the http rules to a rule whose ports are TCP",
                protocol.as_str()
            ));
        }
    }
    if !http.is_empty() && action == Action::Deny {
        out.push(format!(
            "{at}: a Deny rule cannot have http rules (HTTP filtering narrows an Allow); remove http or make the rule an Allow"
        ));
    }
    for (j, h) in http.iter().enumerate() {
        http_rule(&format!("{at}.http[{j}]"), h, out);
    }
}

fn peer(at: &str, p: &Peer, out: &mut Vec<String>) {
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    let kinds = usize::from(selectors)
        + usize::from(p.ip_block.is_some())
        + usize::from(p.entities.is_some());
    if kinds == 0 {
        out.push(format!(
            "{at}: empty peer; give podSelector/namespaceSelector, ipBlock or entities (or leave the peer list empty to match every address)"
        ));
    } else if kinds > 1 {
        out.push(format!(
            "{at}: a peer takes one of podSelector/namespaceSelector, ipBlock or entities; split it into separate peers"
        ));
    }
    if let Some(s) = &p.pod_selector {
        selector(&format!("{at}.podSelector"), s, out);
    }
    if let Some(s) = &p.namespace_selector {
        selector(&format!("{at}.namespaceSelector"), s, out);
    }
    if let Some(IpBlock { cidr, except }) = &p.ip_block {
        ip_block(
            &format!("{at}.ipBlock"),
            cidr,
            except.as_deref().unwrap_or_default(),
            out,
        );
    }
    if let Some(e) = &p.entities
        && e.is_empty()
    {
        out.push(format!(
            "{at}.entities: empty list; name at least one of world, host, cluster, all"
        ));
    }
}

/// Parses a CIDR the way the API server does (host bits allowed) and returns the network.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.trim().parse::<IpNet>().ok().map(|n| n.trunc())
}

fn ip_block(at: &str, cidr: &str, except: &[String], out: &mut Vec<String>) {
    let Some(net) = parse_cidr(cidr) else {
        out.push(format!(
            "{at}.cidr: {cidr:?} is not a CIDR; write it like \"10.0.0.0/8\" or \"2001:db8::/32\""
        ));
        return;
    };
    for (k, e) in except.iter().enumerate() {
        match parse_cidr(e) {
            None => out.push(format!(
                "{at}.except[{k}]: {e:?} is not a CIDR; write it like \"10.1.0.0/16\""
            )),
            Some(x) if !(net.contains(&x) && x.prefix_len() > net.prefix_len()) => out.push(format!(
                "{at}.except[{k}]: {e} is not inside cidr {net}; an except must be a strict sub-range of cidr"
            )),
            Some(_) => {}
        }
    }
}

/// A valid container port name (IANA service name: at most 15 lowercase letters, digits and
/// dashes, with a letter, no leading/trailing or double dash).
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn port(
    at: &str,
    protocol: Protocol,
    p: Option<&IntOrString>,
    end: Option<i32>,
    out: &mut Vec<String>,
) {
    if protocol == Protocol::Icmp {
        if p.is_some() || end.is_some() {
            out.push(format!(
                "{at}: ICMP has no ports; remove port/endPort (the rule then matches all ICMP)"
            ));
        }
        return;
    }
    match p {
        None => {
            if end.is_some() {
                out.push(format!(
                    "{at}.endPort: endPort needs a numeric port to start the range; add port"
                ));
            }
        }
        Some(IntOrString::Int(n)) => {
            if !(1..=65535).contains(n) {
                out.push(format!("{at}.port: {n} is not a port; use 1-65535"));
            }
            if let Some(e) = end {
                if !(1..=65535).contains(&e) {
                    out.push(format!("{at}.endPort: {e} is not a port; use 1-65535"));
                } else if e < *n {
                    out.push(format!(
                        "{at}.endPort: endPort {e} is below port {n}; set endPort >= port or drop it"
                    ));
                }
            }
        }
        Some(IntOrString::String(name)) => {
            if end.is_some() {
                out.push(format!(
                    "{at}.endPort: a named port ({name:?}) cannot start a range; use a numeric port or drop endPort"
                ));
            }
            if let Ok(n) = name.parse::<i64>() {
                out.push(format!(
                    "{at}.port: {name:?} is a number written as a string; write port: {n} without quotes"
                ));
            } else if !is_port_name(name) {
                out.push(format!(
                    "{at}.port: {name:?} is not a valid port name (at most 15 lowercase letters, digits and single dashes); use a container port's name or a number"
                ));
            }
        }
    }
}

fn http_rule(at: &str, h: &HttpRule, out: &mut Vec<String>) {
    if let Some(m) = &h.method
        && (m.is_empty()
            || !m
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)))
    {
        out.push(format!(
            "{at}.method: {m:?} is not an HTTP method; use e.g. GET or POST"
        ));
    }
    for (field, v) in [("path", &h.path), ("pathPrefix", &h.path_prefix)] {
        if let Some(v) = v
            && !v.starts_with('/')
        {
            out.push(format!("{at}.{field}: {v:?} must start with \"/\""));
        }
    }
    if let Some(r) = &h.path_regex
        && let Err(e) = anchored_regex(r)
    {
        let first = e
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        out.push(format!(
            "{at}.pathRegex: {r:?} does not compile ({first}); fix the expression (Rust regex syntax)"
        ));
    }
    for (k, hd) in h.headers.iter().enumerate() {
        if hd.name.is_empty()
            || !hd
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            out.push(format!(
                "{at}.headers[{k}].name: {:?} is not an HTTP header name; use letters, digits and dashes",
                hd.name
            ));
        }
    }
}

/// Compiles a user path regex anchored at both ends, as the L7 proxy uses it.
pub fn anchored_regex(r: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{r})$"))
}

fn selector(at: &str, s: &LabelSelector, out: &mut Vec<String>) {
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => out.push(format!(
                "{at}.matchExpressions[{i}]: operator {} needs at least one value; add values",
                e.operator
            )),
            "Exists" | "DoesNotExist" if n > 0 => out.push(format!(
                "{at}.matchExpressions[{i}]: operator {} takes no values; remove values",
                e.operator
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push(format!(
                "{at}.matchExpressions[{i}]: unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
            )),
        }
    }
}
