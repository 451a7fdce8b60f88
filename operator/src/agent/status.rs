//! What the agent reports about itself: published by the reconciler on a watch channel and
//! read by the control socket, `moat status`, the kube status writer and the metrics.
use serde::Serialize;

use crate::model::PolicyRef;

/// One policy as this agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overflow {
    pub reference: String,
    #[serde(skip)]
    pub policy: PolicyRef,
    pub message: String,
}

/// The agent's state, replaced as a whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
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
