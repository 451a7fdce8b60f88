//! `MoatNetworkPolicy`: a namespaced policy, upstream NetworkPolicy plus Deny, HTTP rules,
//! entities, audit mode and explicit default-deny.

// Several `printcolumn(...)` entries each repeat `type_`; clippy reads that as a duplicated
// attribute although each belongs to a different column.
#![allow(clippy::duplicated_attributes)]

use super::common::{DefaultDeny, EgressRule, EnforcementMode, IngressRule, PolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A network policy for the pods of one namespace. Allowed traffic is the union of what every
/// policy selecting a pod allows; a Deny rule of any policy subtracts from it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "MoatNetworkPolicy",
    namespaced,
    shortname = "mnp",
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
pub struct MoatNetworkPolicySpec {
    /// The pods of this namespace the policy applies to. `{}` selects every pod of the namespace.
    pub pod_selector: LabelSelector,
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
}
