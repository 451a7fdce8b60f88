//! Where the agent learns the world: the Kubernetes API (the operator) or a directory of YAML
//! (standalone: the lab, the demo, a single host). Both produce the same [`SourceState`], so
//! the compiler and the reconciler never know which one is running.
pub mod digest;
pub mod file;
pub mod kube;

use crate::model::Model;

/// One complete view of the cluster as a source sees it.
#[derive(Clone, Debug, Default)]
pub struct SourceState {
    /// Namespaces, nodes, endpoints and policies; `local_node` is this agent's node.
    pub model: Model,
    /// Uplink interfaces named by the source for this node (standalone). Empty: the agent's
    /// own `--uplink` flags (or the default route's interface) decide.
    pub uplinks: Vec<String>,
    /// What the tools compare against the agent's "programmed" report: for the file source
    /// the digest of the directory ([`digest::dir_digest`]), for the kube source a digest of
    /// the model.
    pub digest: String,
    /// Input that could not be used (file, line, reason), while everything else is.
    pub errors: Vec<String>,
    /// When the change that produced this state was first noticed (policy-apply latency is
    /// measured from here to the maps holding it).
    pub observed: Option<std::time::Instant>,
}
