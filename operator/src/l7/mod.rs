//! moat's L7 proxy: a transparent per-node HTTP/1.1 proxy that enforces the HTTP rules of
//! `MoatNetworkPolicy` / `MoatClusterNetworkPolicy` request by request.
//!
//! The datapath steers flows whose policy entry says redirect to the proxy's listener with
//! `bpf_sk_assign` (`shared/notes/l7-steering.md`), so the accepted socket's own address is
//! the original destination. For every request on the connection — keep-alive and pipelined
//! alike — the proxy checks the source's egress HTTP rules and the destination's ingress
//! HTTP rules ([`policy`]), forwards allowed requests to the original destination from a
//! socket marked [`moat_common::mark::PROXY_UPSTREAM`] and streams the response back, and
//! answers denied ones `403 Forbidden` / `Access denied\r\n` while keeping the connection.
//!
//! - [`framing`]: request and response heads and bodies, smuggling-safe (hyper's rules, made
//!   stricter where a proxy must be), sans I/O so the fuzz target drives the same code.
//! - [`path`]: the documented path normalisation rules match against, and forward.
//! - [`policy`]: [`L7Policy`], built from the compiler's `DesiredState`.
//! - [`proxy`]: the listener and the per-connection loop.
//! - [`events`]: [`L7Event`]s and [`L7Stats`] counters.

pub mod events;
pub mod framing;
pub mod path;
pub mod policy;
pub mod proxy;

pub use events::{EventLimit, L7Event, L7Stats, L7Verdict, RequestKey};
pub use policy::{Direction, L7Policy};
pub use proxy::{FixedUpstream, Flow, FlowResolver, Proxy, ProxyConfig, SourceMode, Transparent};
