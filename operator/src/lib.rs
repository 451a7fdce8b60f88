//! moat: Kubernetes network policy enforced by eBPF.
//!
//! This library holds the agent's pure parts: the policy API types ([`api`]), the cluster
//! [`model`], [`identity`] allocation, the [`compiler`] with its diff, and the conformance
//! [`scenario`] loader the lab and the tests share.

pub mod agent;
pub mod api;
pub mod compiler;
pub mod control;
pub mod flows;
pub mod identity;
pub mod l7;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod scenario;
pub mod selector;
pub mod source;
