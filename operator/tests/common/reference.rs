//! The oracle: DESIGN.md's semantic rules read directly off the policy objects, one decision
//! at a time, with no identities, keys or folding. Slow and obvious on purpose.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use moat::api::validate;
use moat::api::{Action, EnforcementMode, Entity, Peer, PolicyPort, Protocol};
use moat::model::{Endpoint, Model, Phase, Policy};
use moat::selector::{Labels, matches};
use std::net::IpAddr;

/// What is at an address.
#[derive(Clone, Copy, Debug)]
pub enum Who<'a> {
    Pod(&'a Endpoint),
    Node(&'a str),
    External,
}

pub fn who(model: &Model, addr: IpAddr) -> Who<'_> {
    for n in &model.nodes {
        if n.addresses.contains(&addr) {
            return Who::Node(&n.name);
        }
    }
    let mut pods: Vec<&Endpoint> = model
        .endpoints
        .iter()
        .filter(|e| e.phase == Phase::Running)
        .collect();
    pods.sort_by_key(|e| e.key());
    for e in &pods {
        if e.host_network && e.addresses.contains(&addr) {
            return Who::Node(&e.node);
        }
    }
    for e in pods {
        if !e.host_network && e.addresses.contains(&addr) {
            return Who::Pod(e);
        }
    }
    Who::External
}

fn ns_labels(model: &Model, ns: &str) -> Labels {
    model
        .namespaces
        .iter()
        .find(|n| n.name == ns)
        .map(|n| n.labels.clone())
        .unwrap_or_default()
}

/// One port rule in neutral form.
struct PortRule {
    protocol: Protocol,
    port: Option<IntOrString>,
    end: Option<i32>,
}

/// One rule in neutral form.
struct RuleView {
    deny: bool,
    /// None: every address.
    peers: Option<Vec<PeerView>>,
    ports: Option<Vec<PortRule>>,
}

enum PeerView {
    Pods {
        ns: Option<LabelSelector>,
        same_ns: Option<String>,
        pods: Option<LabelSelector>,
    },
    Block {
        cidr: String,
        except: Vec<String>,
    },
    Entities(Vec<Entity>),
}

/// Whether a policy selects an endpoint, given the endpoint's namespace labels.
type Selects = Box<dyn Fn(&Endpoint, &Labels) -> bool>;

struct PolicyView {
    audit: bool,
    selects: Selects,
    applies: [bool; 2],
    isolates: [bool; 2],
    rules: [Vec<RuleView>; 2],
}

fn moat_peer(p: &Peer, own_ns: Option<&str>) -> PeerView {
    if let Some(b) = &p.ip_block {
        return PeerView::Block {
            cidr: b.cidr.clone(),
            except: b.except.clone().unwrap_or_default(),
        };
    }
    if let Some(e) = &p.entities {
        return PeerView::Entities(e.clone());
    }
    PeerView::Pods {
        ns: p.namespace_selector.clone(),
        same_ns: if p.namespace_selector.is_none() {
            own_ns.map(str::to_string)
        } else {
            None
        },
        pods: p.pod_selector.clone(),
    }
}

fn moat_ports(ports: &[PolicyPort]) -> Option<Vec<PortRule>> {
    (!ports.is_empty()).then(|| {
        ports
            .iter()
            .map(|p| PortRule {
                protocol: p.protocol.unwrap_or_default(),
                port: p.port.clone(),
                end: p.end_port,
            })
            .collect()
    })
}

fn view(p: &Policy) -> Option<PolicyView> {
    match p {
        Policy::NetworkPolicy(np) => {
            let spec = np.spec.clone().unwrap_or_default();
            if !validate::network_policy(&spec).is_empty() {
                return None;
            }
            let ns = np
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let ingress = spec.ingress.clone().unwrap_or_default();
            let egress = spec.egress.clone().unwrap_or_default();
            let types = spec.policy_types.clone().unwrap_or_else(|| {
                if egress.is_empty() {
                    vec!["Ingress".into()]
                } else {
                    vec!["Ingress".into(), "Egress".into()]
                }
            });
            let applies = [
                types.contains(&"Ingress".to_string()),
                types.contains(&"Egress".to_string()),
            ];
            let peer = |p: &k8s_openapi::api::networking::v1::NetworkPolicyPeer| match &p.ip_block {
                Some(b) => PeerView::Block {
                    cidr: b.cidr.clone(),
                    except: b.except.clone().unwrap_or_default(),
                },
                None => PeerView::Pods {
                    ns: p.namespace_selector.clone(),
                    same_ns: if p.namespace_selector.is_none() {
                        Some(ns.clone())
                    } else {
                        None
                    },
                    pods: p.pod_selector.clone(),
                },
            };
            let ports = |ps: &Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>>| {
                ps.as_ref().filter(|v| !v.is_empty()).map(|v| {
                    v.iter()
                        .map(|p| PortRule {
                            protocol: p
                                .protocol
                                .as_deref()
                                .and_then(Protocol::parse)
                                .unwrap_or(Protocol::Tcp),
                            port: p.port.clone(),
                            end: p.end_port,
                        })
                        .collect()
                })
            };
            let rules = [
                ingress
                    .iter()
                    .map(|r| RuleView {
                        deny: false,
                        peers: r
                            .from
                            .as_ref()
                            .filter(|v| !v.is_empty())
                            .map(|v| v.iter().map(peer).collect()),
                        ports: ports(&r.ports),
                    })
                    .collect(),
                egress
                    .iter()
                    .map(|r| RuleView {
                        deny: false,
                        peers: r
                            .to
                            .as_ref()
                            .filter(|v| !v.is_empty())
                            .map(|v| v.iter().map(peer).collect()),
                        ports: ports(&r.ports),
                    })
                    .collect(),
            ];
            let sel = spec.pod_selector.clone().unwrap_or_default();
            Some(PolicyView {
                audit: false,
                selects: Box::new(move |e, _| e.namespace == ns && matches(&sel, &e.labels)),
                applies,
                isolates: applies,
                rules,
            })
        }
        Policy::MoatNetworkPolicy(mp) => {
            if !validate::moat_policy(&mp.spec).is_empty() {
                return None;
            }
            let ns = mp
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let s = mp.spec.clone();
            let rules = [
                s.ingress
                    .iter()
                    .map(|r| RuleView {
                        deny: r.action == Action::Deny,
                        peers: (!r.from.is_empty())
                            .then(|| r.from.iter().map(|p| moat_peer(p, Some(&ns))).collect()),
                        ports: http_ports(moat_ports(&r.ports), !r.http.is_empty()),
                    })
                    .collect(),
                s.egress
                    .iter()
                    .map(|r| RuleView {
                        deny: r.action == Action::Deny,
                        peers: (!r.to.is_empty())
                            .then(|| r.to.iter().map(|p| moat_peer(p, Some(&ns))).collect()),
                        ports: http_ports(moat_ports(&r.ports), !r.http.is_empty()),
                    })
                    .collect(),
            ];
            let isolates = moat_isolates(s.default_deny, &rules);
            let sel = s.pod_selector.clone();
            Some(PolicyView {
                audit: s.enforcement_mode == Some(EnforcementMode::Audit),
                selects: Box::new(move |e, _| e.namespace == ns && matches(&sel, &e.labels)),
                applies: [
                    isolates[0] || !rules[0].is_empty(),
                    isolates[1] || !rules[1].is_empty(),
                ],
                isolates,
                rules,
            })
        }
        Policy::MoatClusterNetworkPolicy(cp) => {
            if !validate::moat_cluster_policy(&cp.spec).is_empty() {
                return None;
            }
            let s = cp.spec.clone();
            let rules = [
                s.ingress
                    .iter()
                    .map(|r| RuleView {
                        deny: r.action == Action::Deny,
                        peers: (!r.from.is_empty())
                            .then(|| r.from.iter().map(|p| moat_peer(p, None)).collect()),
                        ports: http_ports(moat_ports(&r.ports), !r.http.is_empty()),
                    })
                    .collect(),
                s.egress
                    .iter()
                    .map(|r| RuleView {
                        deny: r.action == Action::Deny,
                        peers: (!r.to.is_empty())
                            .then(|| r.to.iter().map(|p| moat_peer(p, None)).collect()),
                        ports: http_ports(moat_ports(&r.ports), !r.http.is_empty()),
                    })
                    .collect(),
            ];
            let isolates = moat_isolates(s.default_deny, &rules);
            let (nsel, psel) = (s.namespace_selector.clone(), s.pod_selector.clone());
            Some(PolicyView {
                audit: s.enforcement_mode == Some(EnforcementMode::Audit),
                selects: Box::new(move |e, nsl| {
                    nsel.as_ref().is_none_or(|s| matches(s, nsl))
                        && psel.as_ref().is_none_or(|s| matches(s, &e.labels))
                }),
                applies: [
                    isolates[0] || !rules[0].is_empty(),
                    isolates[1] || !rules[1].is_empty(),
                ],
                isolates,
                rules,
            })
        }
    }
}

/// HTTP rules without ports mean every TCP port.
fn http_ports(ports: Option<Vec<PortRule>>, http: bool) -> Option<Vec<PortRule>> {
    match (ports, http) {
        (None, true) => Some(vec![PortRule {
            protocol: Protocol::Tcp,
            port: None,
            end: None,
        }]),
        (p, _) => p,
    }
}

fn moat_isolates(d: Option<moat::api::DefaultDeny>, rules: &[Vec<RuleView>; 2]) -> [bool; 2] {
    let allow = |i: usize| rules[i].iter().any(|r| !r.deny);
    [
        d.and_then(|d| d.ingress).unwrap_or(allow(0)),
        d.and_then(|d| d.egress).unwrap_or(allow(1)),
    ]
}

fn in_cidr(cidr: &str, addr: IpAddr) -> bool {
    validate::parse_cidr(cidr).is_some_and(|n| n.contains(&addr))
}

fn peer_matches(
    model: &Model,
    p: &PeerView,
    peer: IpAddr,
    peer_who: Who,
    own_node: &str,
    deny: bool,
) -> bool {
    let is_own_node = matches!(peer_who, Who::Node(n) if n == own_node);
    match p {
        PeerView::Pods { ns, same_ns, pods } => {
            let Who::Pod(e) = peer_who else { return false };
            let ns_ok = match (ns, same_ns) {
                (Some(s), _) => matches(s, &ns_labels(model, &e.namespace)),
                (None, Some(n)) => *n == e.namespace,
                (None, None) => true,
            };
            ns_ok && pods.as_ref().is_none_or(|s| matches(s, &e.labels))
        }
        // ipBlock matches any address (rule 4) but never restricts the own node (rule 3).
        PeerView::Block { cidr, except } => {
            !is_own_node && in_cidr(cidr, peer) && !except.iter().any(|x| in_cidr(x, peer))
        }
        PeerView::Entities(es) => es.iter().any(|e| match e {
            Entity::All => !is_own_node || !deny,
            Entity::Host => is_own_node,
            Entity::World => matches!(peer_who, Who::External),
            Entity::Cluster => !is_own_node && !matches!(peer_who, Who::External),
        }),
    }
}

fn port_matches(
    r: &PortRule,
    dir: usize,
    ep: &Endpoint,
    peer_who: Who,
    proto: Protocol,
    port: u16,
) -> bool {
    if r.protocol != proto {
        return false;
    }
    if proto == Protocol::Icmp {
        return true;
    }
    match &r.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let lo = *n as i64;
            let hi = r.end.map_or(lo, i64::from);
            (lo..=hi).contains(&i64::from(port))
        }
        Some(IntOrString::String(name)) => {
            let owner = if dir == 0 {
                Some(ep)
            } else if let Who::Pod(p) = peer_who {
                Some(p)
            } else {
                None
            };
            owner.and_then(|o| o.named_port(name, proto)) == Some(port)
        }
    }
}

/// Enforce view (`audit_view` false) or Enforce+Audit view of endpoint `ep`'s decision for a
/// new flow in `dir` (0 ingress, 1 egress) with `peer`.
pub fn endpoint_allows(
    model: &Model,
    ep: &Endpoint,
    dir: usize,
    peer: IpAddr,
    proto: Protocol,
    port: u16,
    audit_view: bool,
) -> bool {
    let peer_who = who(model, peer);
    // Rule 3: the pod itself.
    if ep.addresses.contains(&peer) {
        return true;
    }
    let nsl = ns_labels(model, &ep.namespace);
    let mut isolated = false;
    let mut allowed = false;
    let mut denied = false;
    for p in model.policies.iter().filter_map(view) {
        if p.audit && !audit_view {
            continue;
        }
        if !(p.applies[dir] && (p.selects)(ep, &nsl)) {
            continue;
        }
        isolated |= p.isolates[dir];
        for r in &p.rules[dir] {
            let peer_ok = match &r.peers {
                // "every address": the own node is allowed anyway and only `host` denies it.
                None => !(r.deny && matches!(peer_who, Who::Node(n) if n == ep.node)),
                Some(ps) => ps
                    .iter()
                    .any(|x| peer_matches(model, x, peer, peer_who, &ep.node, r.deny)),
            };
            let port_ok = match &r.ports {
                None => true,
                Some(ps) => ps
                    .iter()
                    .any(|x| port_matches(x, dir, ep, peer_who, proto, port)),
            };
            if peer_ok && port_ok {
                if r.deny {
                    denied = true;
                } else {
                    allowed = true;
                }
            }
        }
    }
    if denied {
        return false;
    }
    // Rule 3: the own node.
    if matches!(peer_who, Who::Node(n) if n == ep.node) {
        return true;
    }
    allowed || !isolated
}
