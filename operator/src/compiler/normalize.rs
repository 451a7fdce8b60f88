//! One internal form for all three policy kinds, so the compiler implements each semantic rule
//! once. Upstream defaulting (policyTypes, TCP) and moat defaulting (defaultDeny, Enforce)
//! happen here and nowhere else.

use crate::api::validate::{self, parse_cidr};
use crate::api::{Action, EnforcementMode, Entity, HttpRule, Peer, PolicyPort, Protocol};
use crate::model::{Policy, PolicyRef};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use moat_common::direction::{EGRESS, INGRESS};

/// A policy in the compiler's terms.
#[derive(Clone, Debug)]
pub struct NormPolicy {
    pub reference: PolicyRef,
    /// Sort key: creation time, then reference. Older policies win map space.
    pub order: (String, PolicyRef),
    pub audit: bool,
    pub subject: Subject,
    /// Whether selecting an endpoint takes part in each direction (indexed by direction).
    pub applies: [bool; 2],
    /// Whether selecting an endpoint isolates it in each direction.
    pub isolates: [bool; 2],
    /// Rules per direction.
    pub rules: [Vec<NormRule>; 2],
    pub prefilter: Vec<IpNet>,
}

/// Which endpoints a policy selects.
#[derive(Clone, Debug)]
pub enum Subject {
    Namespaced {
        namespace: String,
        pods: LabelSelector,
    },
    Cluster {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
}

#[derive(Clone, Debug)]
pub struct NormRule {
    pub index: usize,
    pub deny: bool,
    /// `None`: every address.
    pub peers: Option<Vec<NormPeer>>,
    /// `None`: every port and protocol.
    pub ports: Option<Vec<NormPort>>,
    pub http: Vec<HttpRule>,
}

#[derive(Clone, Debug)]
pub enum NormPeer {
    Pods {
        namespaces: NsMatch,
        pods: Option<LabelSelector>,
    },
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    Entity(Entity),
}

#[derive(Clone, Debug)]
pub enum NsMatch {
    Named(String),
    Selector(LabelSelector),
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormPort {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    All,
    Range(u16, u16),
    Named(String),
}

/// Validates and normalizes a policy; `Err` carries the problems for the Invalid condition.
pub fn normalize(policy: &Policy) -> Result<NormPolicy, Vec<String>> {
    let reference = policy.reference();
    let order = (policy.created(), reference.clone());
    match policy {
        Policy::NetworkPolicy(np) => {
            let spec = np.spec.clone().unwrap_or_default();
            let problems = validate::network_policy(&spec);
            if !problems.is_empty() {
                return Err(problems);
            }
            let namespace = reference.namespace.clone();
            let ingress: Vec<_> = spec.ingress.unwrap_or_default();
            let egress: Vec<_> = spec.egress.unwrap_or_default();
            // Upstream defaulting: Ingress always, Egress when the policy has egress rules.
            let types = spec.policy_types.unwrap_or_else(|| {
                let mut t = vec!["Ingress".to_string()];
                if !egress.is_empty() {
                    t.push("Egress".into());
                }
                t
            });
            let applies = [
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ];
            let up_rule =
                |index: usize,
                 peers: Option<Vec<NetworkPolicyPeer>>,
                 ports: Option<Vec<NetworkPolicyPort>>| NormRule {
                    index,
                    deny: false,
                    peers: peers
                        .filter(|p| !p.is_empty())
                        .map(|p| p.iter().map(|p| upstream_peer(p, &namespace)).collect()),
                    ports: ports
                        .filter(|p| !p.is_empty())
                        .map(|p| p.iter().map(upstream_port).collect()),
                    http: Vec::new(),
                };
            let mut rules: [Vec<NormRule>; 2] = [Vec::new(), Vec::new()];
            if applies[INGRESS as usize] {
                rules[INGRESS as usize] = ingress
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| up_rule(i, r.from, r.ports))
                    .collect();
            }
            if applies[EGRESS as usize] {
                rules[EGRESS as usize] = egress
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| up_rule(i, r.to, r.ports))
                    .collect();
            }
            Ok(NormPolicy {
                subject: Subject::Namespaced {
                    namespace,
                    pods: spec.pod_selector.unwrap_or_default(),
                },
                reference,
                order,
                audit: false,
                applies,
                isolates: applies,
                rules,
                prefilter: Vec::new(),
            })
        }
        Policy::MoatNetworkPolicy(p) => {
            let problems = validate::moat_policy(&p.spec);
            if !problems.is_empty() {
                return Err(problems);
            }
            let s = &p.spec;
            let namespace = reference.namespace.clone();
            let ns = NsMatch::Named(namespace.clone());
            let rules = moat_rules(s, &ns);
            let isolates = default_deny(s.default_deny.as_ref(), &rules);
            Ok(NormPolicy {
                subject: Subject::Namespaced {
                    namespace,
                    pods: s.pod_selector.clone(),
                },
                reference,
                order,
                audit: s.enforcement_mode == Some(EnforcementMode::Audit),
                applies: [
                    isolates[0] || !rules[0].is_empty(),
                    isolates[1] || !rules[1].is_empty(),
                ],
                isolates,
                rules,
                prefilter: Vec::new(),
            })
        }
        Policy::MoatClusterNetworkPolicy(p) => {
            let problems = validate::moat_cluster_policy(&p.spec);
            if !problems.is_empty() {
                return Err(problems);
            }
            let s = &p.spec;
            let rules = moat_rules(s, &NsMatch::Any);
            let isolates = default_deny(s.default_deny.as_ref(), &rules);
            Ok(NormPolicy {
                subject: Subject::Cluster {
                    namespaces: s.namespace_selector.clone(),
                    pods: s.pod_selector.clone(),
                },
                reference,
                order,
                audit: s.enforcement_mode == Some(EnforcementMode::Audit),
                applies: [
                    isolates[0] || !rules[0].is_empty(),
                    isolates[1] || !rules[1].is_empty(),
                ],
                isolates,
                rules,
                prefilter: s
                    .prefilter
                    .iter()
                    .flat_map(|p| p.deny_sources.iter())
                    .filter_map(|c| parse_cidr(c))
                    .collect(),
            })
        }
    }
}

/// The rule lists of a moat spec (both kinds have the same rule fields).
trait MoatSpec {
    fn ingress(&self) -> &[crate::api::IngressRule];
    fn egress(&self) -> &[crate::api::EgressRule];
}
impl MoatSpec for crate::api::MoatNetworkPolicySpec {
    fn ingress(&self) -> &[crate::api::IngressRule] {
        &self.ingress
    }
    fn egress(&self) -> &[crate::api::EgressRule] {
        &self.egress
    }
}
impl MoatSpec for crate::api::MoatClusterNetworkPolicySpec {
    fn ingress(&self) -> &[crate::api::IngressRule] {
        &self.ingress
    }
    fn egress(&self) -> &[crate::api::EgressRule] {
        &self.egress
    }
}

fn moat_rules(s: &impl MoatSpec, lone_pod_selector_ns: &NsMatch) -> [Vec<NormRule>; 2] {
    let rule =
        |index: usize, action: Action, peers: &[Peer], ports: &[PolicyPort], http: &[HttpRule]| {
            NormRule {
                index,
                deny: action == Action::Deny,
                peers: (!peers.is_empty()).then(|| {
                    peers
                        .iter()
                        .flat_map(|p| moat_peer(p, lone_pod_selector_ns))
                        .collect()
                }),
                ports: (!ports.is_empty()).then(|| ports.iter().map(moat_port).collect()),
                http: http.to_vec(),
            }
        };
    [
        s.ingress()
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r.action, &r.from, &r.ports, &r.http))
            .collect(),
        s.egress()
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r.action, &r.to, &r.ports, &r.http))
            .collect(),
    ]
}

/// DESIGN.md defaulting: isolate a direction that has an Allow rule, not one with only Denies.
fn default_deny(d: Option<&crate::api::DefaultDeny>, rules: &[Vec<NormRule>; 2]) -> [bool; 2] {
    let has_allow = |dir: u8| rules[dir as usize].iter().any(|r| !r.deny);
    [
        d.and_then(|d| d.ingress)
            .unwrap_or_else(|| has_allow(INGRESS)),
        d.and_then(|d| d.egress)
            .unwrap_or_else(|| has_allow(EGRESS)),
    ]
}

fn upstream_peer(p: &NetworkPolicyPeer, namespace: &str) -> NormPeer {
    if let Some(b) = &p.ip_block {
        return block(&b.cidr, b.except.as_deref().unwrap_or_default());
    }
    NormPeer::Pods {
        namespaces: match &p.namespace_selector {
            Some(s) => NsMatch::Selector(s.clone()),
            None => NsMatch::Named(namespace.to_string()),
        },
        pods: p.pod_selector.clone(),
    }
}

fn moat_peer(p: &Peer, lone_pod_selector_ns: &NsMatch) -> Vec<NormPeer> {
    if let Some(b) = &p.ip_block {
        return vec![block(&b.cidr, b.except.as_deref().unwrap_or_default())];
    }
    if let Some(e) = &p.entities {
        return e.iter().map(|e| NormPeer::Entity(*e)).collect();
    }
    vec![NormPeer::Pods {
        namespaces: match &p.namespace_selector {
            Some(s) => NsMatch::Selector(s.clone()),
            None => lone_pod_selector_ns.clone(),
        },
        pods: p.pod_selector.clone(),
    }]
}

fn block(cidr: &str, except: &[String]) -> NormPeer {
    NormPeer::Block {
        // Validation has parsed these already; an unparsable one cannot reach this point.
        cidr: parse_cidr(cidr).unwrap_or_else(|| IpNet::V4(ipnet::Ipv4Net::default())),
        except: except.iter().filter_map(|e| parse_cidr(e)).collect(),
    }
}

fn port_spec(port: Option<&IntOrString>, end: Option<i32>) -> PortSpec {
    match port {
        None => PortSpec::All,
        Some(IntOrString::Int(n)) => {
            let first = (*n).clamp(1, 65535) as u16;
            PortSpec::Range(
                first,
                end.map_or(first, |e| e.clamp(first.into(), 65535) as u16),
            )
        }
        Some(IntOrString::String(s)) => PortSpec::Named(s.clone()),
    }
}

fn upstream_port(p: &NetworkPolicyPort) -> NormPort {
    NormPort {
        protocol: p
            .protocol
            .as_deref()
            .and_then(Protocol::parse)
            .unwrap_or(Protocol::Tcp),
        port: port_spec(p.port.as_ref(), p.end_port),
    }
}

fn moat_port(p: &PolicyPort) -> NormPort {
    let protocol = p.protocol.unwrap_or_default();
    NormPort {
        protocol,
        port: if protocol == Protocol::Icmp {
            PortSpec::All
        } else {
            port_spec(p.port.as_ref(), p.end_port)
        },
    }
}
