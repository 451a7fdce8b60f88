//! `MoatClusterNetworkPolicy`: a cluster-scoped policy for pods of many namespaces, and the
//! node prefilter blocklist.

// Several `printcolumn(...)` entries each repeat `type_`; clippy reads that as a duplicated
// attribute although each belongs to a different column.
#![allow(clippy::duplicated_attributes)]

use super::common::{DefaultDeny, EgressRule, EnforcementMode, IngressRule, PolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A network policy for pods of any namespace. Same rules as MoatNetworkPolicy, except that a
/// peer podSelector without a namespaceSelector matches pods of every namespace.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "MoatClusterNetworkPolicy",
    shortname = "mcnp",
    category = "moat",
    status = "PolicyStatus",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.enforcementMode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.selectedEndpoints"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MoatClusterNetworkPolicySpec {
    /// The pods the policy applies to, in the namespaces namespaceSelector picks. Omitted or
    /// `{}`: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The namespaces whose pods the policy applies to. Omitted or `{}`: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Enforce (default) or Audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement_mode: Option<EnforcementMode>,
    /// Whether selected pods are isolated per direction. See each field for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_deny: Option<DefaultDeny>,
    /// Rules for traffic entering the selected pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    /// Rules for traffic leaving the selected pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    /// A stateless blocklist dropped on the nodes' uplinks before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefilter: Option<Prefilter>,
}

/// The node uplink blocklist: a DDoS tool, not a policy rule. Packets from these sources are
/// dropped by XDP on every node before conntrack or policy, replies to pod traffic included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Prefilter {
    /// Source CIDRs to drop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_sources: Vec<String>,
}
