//! The policy objects users apply: moat's own CRDs (`moat.dev/v1alpha1`) and their semantic
//! validation. Upstream `networking.k8s.io/v1 NetworkPolicy` comes from `k8s_openapi`.

pub mod cluster;
pub mod common;
pub mod namespaced;
pub mod validate;

pub use cluster::{MoatClusterNetworkPolicy, MoatClusterNetworkPolicySpec, Prefilter};
pub use common::{
    Action, DefaultDeny, EgressRule, EnforcementMode, Entity, HeaderMatch, HttpRule, IngressRule,
    IpBlock, Peer, PolicyPort, PolicyStatus, Protocol,
};
pub use namespaced::{MoatNetworkPolicy, MoatNetworkPolicySpec};
