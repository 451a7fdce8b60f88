//! The agent's control socket: a Unix socket on the host filesystem (reachable from any
//! network namespace) serving health, readiness and the agent's status as HTTP/1.1, and the
//! client `moat status`, the lab and the demo use to read it.
pub mod client;
pub mod server;
