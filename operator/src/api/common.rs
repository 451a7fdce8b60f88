//! The vocabulary both moat policy kinds share: peers, ports, HTTP rules, actions, modes and
//! the status they report.
//!
//! The field names follow `networking.k8s.io/v1 NetworkPolicy` wherever the meaning is the same,
//! so a user who knows upstream policies can read a moat policy without a manual.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a rule does with the traffic it matches.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum Action {
    /// Let the traffic through (subject to any Deny rule, which always wins).
    #[default]
    Allow,
    /// Drop the traffic, whatever any Allow rule of any policy says.
    Deny,
}

/// Whether a policy's verdicts are applied or only reported.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum EnforcementMode {
    /// Packets are allowed or dropped as the policy says.
    #[default]
    Enforce,
    /// Nothing is dropped because of this policy; packets it would decide differently are
    /// counted and reported with verdict AUDIT. Use it to try a policy before enforcing it.
    Audit,
}

/// Transport protocol of a port rule.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    /// ICMP and ICMPv6: matches the whole protocol; a rule with ICMP must not name a port.
    #[serde(rename = "ICMP")]
    Icmp,
}

impl Protocol {
    /// IP protocol number (ICMP: the IPv4 one, 1; the compiler also writes an ICMPv6 (58) key
    /// for every ICMP rule, so one rule covers both families).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
        }
    }

    /// Parses the upstream spelling (`TCP`, `UDP`, `SCTP`, `ICMP`).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            "ICMP" => Some(Protocol::Icmp),
            _ => None,
        }
    }

    /// The upstream spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
        }
    }
}

/// A class of addresses that no label selector can name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// Every address outside the cluster: neither a pod nor a node.
    World,
    /// The node the endpoint runs on (and hostNetwork pods on it). Traffic with the own node
    /// is always allowed; only a Deny rule naming `host` restricts it.
    Host,
    /// Every pod and node of the cluster.
    Cluster,
    /// Every address.
    All,
}

/// A set of IP addresses, as in upstream NetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// The addresses, in CIDR notation ("10.0.0.0/8", "2001:db8::/32"). Matches any address in
    /// it, pods' and nodes' included.
    #[schemars(length(min = 1))]
    pub cidr: String,
    /// Sub-ranges of `cidr` to leave out. Each must lie inside `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// Who is on the other end of the traffic. Name pods by labels (podSelector, namespaceSelector,
/// both = AND), addresses by `ipBlock`, or classes of addresses by `entities`; use one kind per
/// peer and list several peers for OR.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Pods with these labels. In a MoatNetworkPolicy alone it means pods of the policy's own
    /// namespace; in a MoatClusterNetworkPolicy alone it means pods of every namespace. With
    /// namespaceSelector beside it, pods matching both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces with these labels (`{}`: every namespace); all their pods unless podSelector
    /// narrows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses by CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
    /// Classes of addresses: world, host, cluster, all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<Entity>>,
}

/// A port (or range) and protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    /// Protocol; TCP when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// A port number or a container port name (resolved on each pod by name and protocol).
    /// Omitted: every port of the protocol. Must be omitted for ICMP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// Last port of a range starting at `port` (a number, not a name). Must be >= port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

/// A header condition of an HTTP rule.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The exact value required. Omitted: the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// One HTTP request pattern. All given conditions must hold; a request matching any rule of the
/// list is allowed, any other request on the connection is answered 403 Forbidden.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// Request method, e.g. GET (exact, case-sensitive as HTTP says). Omitted: any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request path must equal this (query string excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The request path must start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The whole request path must match this regular expression (Rust `regex` syntax; it is
    /// anchored at both ends for you).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Headers that must be present, or equal a value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// One ingress rule: an action for traffic from some peers to some ports of the selected pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Allow (default) or Deny. A Deny always wins over any Allow of any policy.
    #[serde(default)]
    pub action: Action,
    /// The sources. Empty or omitted: every address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    /// Destination ports on the selected pods. Empty or omitted: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
    /// HTTP request patterns (Allow rules on TCP ports only). When given, the matching traffic
    /// goes through the node's L7 proxy and only requests matching one of them pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

/// One egress rule: an action for traffic from the selected pods to some peers and ports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Allow (default) or Deny. A Deny always wins over any Allow of any policy.
    #[serde(default)]
    pub action: Action,
    /// The destinations. Empty or omitted: every address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    /// Destination ports (named ports resolve on the destination pod). Empty or omitted: every
    /// port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
    /// HTTP request patterns (Allow rules on TCP ports only). When given, the matching traffic
    /// goes through the node's L7 proxy and only requests matching one of them pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

/// Whether selecting an endpoint isolates it in a direction (traffic no rule allows is dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDeny {
    /// Isolate selected endpoints for ingress. Default: true if the policy has an ingress Allow
    /// rule, false if its ingress rules are all Deny (so a deny-only policy blocks just that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    /// Isolate selected endpoints for egress. Default as for ingress, from the egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// What the agent made of a policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted` (True: enforced as written) or `Invalid` (True: refused, see its message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The metadata.generation these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many endpoints the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_endpoints: Option<i64>,
}
