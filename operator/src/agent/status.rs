//! What the agent reports about itself: published by the reconciler on a watch channel and
//! read by the control socket, `moat status`, the kube status writer and the metrics. The
//! control socket's `/status` is this, as JSON, and its client reads it back into the same
//! types (without the policy references, which the JSON leaves out: `reference` names them).
use serde::{Deserialize, Serialize};

use crate::model::PolicyRef;

/// One policy as this agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds).
    pub reference: String,
    #[serde(skip)]
    pub policy: PolicyRef,
    /// `metadata.generation` of the version compiled.
    pub generation: Option<i64>,
    pub accepted: bool,
    /// Empty when accepted; otherwise what is wrong and what to change.
    pub message: String,
    pub selected_endpoints: usize,
}

/// A policy that is valid but does not fit this node's maps: nothing already enforced
/// changed. Reported as a Kubernetes Event on the policy naming the node (standalone: the
/// log and `moat status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overflow {
    pub reference: String,
    #[serde(skip)]
    pub policy: PolicyRef,
    pub message: String,
}

/// The agent's state, replaced as a whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    pub node: String,
    /// Digest of the source state last read.
    pub source_digest: Option<String>,
    /// Digest of the source state whose compiled form is fully in the maps.
    pub programmed_digest: Option<String>,
    pub revision: u32,
    /// Every local endpoint is programmed and attached.
    pub ready: bool,
    pub local_endpoints: usize,
    pub identities: usize,
    /// Map writes since the agent started (a restart into an unchanged world makes none).
    pub map_writes: u64,
    pub policies: Vec<PolicyReport>,
    pub overflows: Vec<Overflow>,
    /// Source errors (file, line, reason) and reconcile errors.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;

    /// `moat status` reads back what `/status` serves: everything but the references, which
    /// `reference` spells out.
    #[test]
    fn the_status_json_reads_back_without_the_references() {
        let policy = PolicyRef {
            kind: PolicyKind::MoatNetworkPolicy,
            namespace: "default".into(),
            name: "web".into(),
        };
        let status = AgentStatus {
            node: "node-1".into(),
            programmed_digest: Some("abc".into()),
            revision: 7,
            ready: true,
            policies: vec![PolicyReport {
                reference: policy.to_string(),
                policy: policy.clone(),
                generation: Some(3),
                accepted: false,
                message: "spec.ingress[0]: bad port".into(),
                selected_endpoints: 2,
            }],
            overflows: vec![Overflow {
                reference: policy.to_string(),
                policy,
                message: "policy map full".into(),
            }],
            errors: vec!["x".into()],
            ..AgentStatus::default()
        };
        let json = serde_json::to_string(&status).unwrap();
        assert!(!json.contains("\"policy\""), "{json}");
        let read: AgentStatus = serde_json::from_str(&json).unwrap();
        let mut expected = status;
        expected.policies[0].policy = PolicyRef::default();
        expected.overflows[0].policy = PolicyRef::default();
        assert_eq!(read, expected);
        // An agent of an earlier version may leave fields out.
        let partial: AgentStatus = serde_json::from_str(r#"{"node":"n"}"#).unwrap();
        assert_eq!(partial.node, "n");
    }
}
