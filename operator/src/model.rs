//! The compiler's input: everything the sources (kube watch or standalone files) know about the
//! cluster, in a shape that does not depend on where it came from.

use crate::api::{MoatClusterNetworkPolicy, MoatNetworkPolicy, Protocol};
use crate::selector::Labels;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Cluster state as one node's agent sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Model {
    /// The node this agent runs on: its endpoints get endpoint entries and its addresses are
    /// `host`.
    pub local_node: String,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub endpoints: Vec<Endpoint>,
    pub policies: Vec<Policy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Lifecycle of a pod as far as policy cares: finished pods leave the ipcache because their
/// addresses get reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Pending or Running: the pod owns its addresses.
    #[default]
    Running,
    /// Succeeded or Failed.
    Finished,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: Labels,
    /// Its IPv4 and IPv6 addresses.
    pub addresses: Vec<IpAddr>,
    /// Named container ports (unnamed ones do not matter to policy).
    pub ports: Vec<ContainerPort>,
    /// Host-side interface (the `lxc…` veth end) for pods of the local node.
    pub interface: Option<String>,
    /// A hostNetwork pod has its node's addresses and identity, and no endpoint of its own.
    pub host_network: bool,
    pub phase: Phase,
    /// The pod's `resourceVersion`, when it comes from the API server (which changes it with
    /// every change of the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

impl Endpoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `other` is the same endpoint: by revision and interface (the only part that
    /// does not come from the pod object) when both have a revision, field by field otherwise.
    pub fn same(&self, other: &Endpoint) -> bool {
        match (&self.revision, &other.revision) {
            (Some(a), Some(b)) => a == b && self.interface == other.interface,
            _ => self == other,
        }
    }

    /// The port number a (name, protocol) resolves to on this pod.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// Any of the three policy kinds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Policy {
    NetworkPolicy(NetworkPolicy),
    MoatNetworkPolicy(MoatNetworkPolicy),
    MoatClusterNetworkPolicy(MoatClusterNetworkPolicy),
}

/// Which kind a policy is (also the `kind` label of per-rule metrics).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum PolicyKind {
    #[default]
    NetworkPolicy,
    MoatNetworkPolicy,
    MoatClusterNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::MoatNetworkPolicy => "MoatNetworkPolicy",
            PolicyKind::MoatClusterNetworkPolicy => "MoatClusterNetworkPolicy",
        }
    }
}

/// A policy's identity: kind, namespace (empty for cluster-scoped) and name. (The default,
/// an unnamed NetworkPolicy, stands for "not reported": see `AgentStatus`.)
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

impl Policy {
    /// Reads a policy object of any of the three kinds, dispatching on `kind`.
    pub fn from_value(v: serde_json::Value) -> Result<Policy, String> {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let r = match kind.as_str() {
            "NetworkPolicy" => serde_json::from_value(v).map(Policy::NetworkPolicy),
            "MoatNetworkPolicy" => serde_json::from_value(v).map(Policy::MoatNetworkPolicy),
            "MoatClusterNetworkPolicy" => {
                serde_json::from_value(v).map(Policy::MoatClusterNetworkPolicy)
            }
            other => return Err(format!("unknown policy kind {other:?}")),
        };
        r.map_err(|e| format!("{kind}: {e}"))
    }

    /// Reads a policy from YAML text.
    pub fn from_yaml(text: &str) -> Result<Policy, String> {
        let v: serde_json::Value =
            serde_saphyr::from_str_with_options(text, crate::scenario::yaml_options())
                .map_err(|e| e.to_string())?;
        Policy::from_value(v)
    }

    /// Its kind and metadata.
    fn kind_and_meta(&self) -> (PolicyKind, &ObjectMeta) {
        match self {
            Policy::NetworkPolicy(p) => (PolicyKind::NetworkPolicy, &p.metadata),
            Policy::MoatNetworkPolicy(p) => (PolicyKind::MoatNetworkPolicy, &p.metadata),
            Policy::MoatClusterNetworkPolicy(p) => {
                (PolicyKind::MoatClusterNetworkPolicy, &p.metadata)
            }
        }
    }

    pub fn reference(&self) -> PolicyRef {
        let (kind, meta) = self.kind_and_meta();
        PolicyRef {
            kind,
            namespace: if kind == PolicyKind::MoatClusterNetworkPolicy {
                String::new()
            } else {
                meta.namespace.clone().unwrap_or_else(|| "default".into())
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// Whether `other` has the same kind, namespace and name (as spelled).
    pub fn same_ref(&self, other: &Policy) -> bool {
        let ((ka, a), (kb, b)) = (self.kind_and_meta(), other.kind_and_meta());
        ka == kb && a.namespace == b.namespace && a.name == b.name
    }

    /// Whether `other` normalizes to the same policy as `self`: same kind, name, namespace,
    /// creation time and spec (status, labels and other metadata are not read by the
    /// compiler). Lets a compiler keep its work on an unchanged policy.
    pub fn same_input(&self, other: &Policy) -> bool {
        fn meta_eq(a: &ObjectMeta, b: &ObjectMeta) -> bool {
            (&a.name, &a.namespace, &a.creation_timestamp)
                == (&b.name, &b.namespace, &b.creation_timestamp)
        }
        // Objects of the API server: the same uid and resourceVersion are the same object.
        let ((ka, a), (kb, b)) = (self.kind_and_meta(), other.kind_and_meta());
        if let (Some(_), Some(_)) = (&a.uid, &a.resource_version)
            && ka == kb
            && (&a.uid, &a.resource_version) == (&b.uid, &b.resource_version)
        {
            return true;
        }
        match (self, other) {
            (Policy::NetworkPolicy(a), Policy::NetworkPolicy(b)) => {
                meta_eq(&a.metadata, &b.metadata) && a.spec == b.spec
            }
            (Policy::MoatNetworkPolicy(a), Policy::MoatNetworkPolicy(b)) => {
                meta_eq(&a.metadata, &b.metadata) && a.spec == b.spec
            }
            (Policy::MoatClusterNetworkPolicy(a), Policy::MoatClusterNetworkPolicy(b)) => {
                meta_eq(&a.metadata, &b.metadata) && a.spec == b.spec
            }
            _ => false,
        }
    }

    /// metadata.generation, for status.observedGeneration.
    pub fn generation(&self) -> Option<i64> {
        self.kind_and_meta().1.generation
    }

    /// Creation time as RFC 3339 text (empty when unknown); older policies keep their place
    /// when a map would overflow.
    pub fn created(&self) -> String {
        self.kind_and_meta()
            .1
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}
