//! The proxy's sans-I/O framing code, compiled from the operator's own source files so the
//! fuzz build does not pull in the whole agent (kube, k8s-openapi) under a sanitizer.
#![allow(dead_code)]

#[path = "../../src/l7/path.rs"]
pub mod path;

#[path = "../../src/l7/framing.rs"]
pub mod framing;
