//! Shared test support: model builders, the datapath lookup simulation and the reference
//! evaluator.
#![allow(dead_code)]

pub mod reference;
pub mod sim;

use moat::api::Protocol;
use moat::compiler::{self, CompileConfig, DesiredState};
use moat::identity::Allocations;
use moat::model::{ContainerPort, Endpoint, Model, Namespace, Node, Phase, Policy};
use moat::selector::Labels;
use std::net::IpAddr;

pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ns(name: &str, kv: &[(&str, &str)]) -> Namespace {
    let mut l = labels(kv);
    l.insert("kubernetes.io/metadata.name".into(), name.into());
    Namespace {
        name: name.into(),
        labels: l,
    }
}

pub fn node(name: &str, addr: &str) -> Node {
    Node {
        name: name.into(),
        addresses: vec![addr.parse().unwrap()],
    }
}

/// A running pod with a host-side interface `lxc-<ns>-<name>`.
pub fn pod(namespace: &str, name: &str, node: &str, kv: &[(&str, &str)], ip: &str) -> Endpoint {
    Endpoint {
        name: name.into(),
        namespace: namespace.into(),
        node: node.into(),
        labels: labels(kv),
        addresses: vec![ip.parse().unwrap()],
        ports: Vec::new(),
        interface: Some(iface(namespace, name)),
        host_network: false,
        phase: Phase::Running,
        revision: None,
    }
}

pub fn iface(namespace: &str, name: &str) -> String {
    format!("lxc-{namespace}-{name}")
}

pub fn port(name: &str, protocol: Protocol, n: u16) -> ContainerPort {
    ContainerPort {
        name: name.into(),
        protocol,
        port: n,
    }
}

pub fn policy(yaml: &str) -> Policy {
    Policy::from_yaml(yaml).unwrap()
}

/// Compiles for `node` from fresh allocations.
pub fn compile_for(model: &Model, node: &str) -> DesiredState {
    let mut m = model.clone();
    m.local_node = node.into();
    compiler::compile(&m, &Allocations::default(), &CompileConfig::default())
        .unwrap()
        .0
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether a flow from pod `src` to `dst` passes both ends (rule 2) in the compiled states of
/// their nodes (`states` returns the state of a node).
pub fn flow(
    model: &Model,
    states: &dyn Fn(&str) -> DesiredState,
    src: &Endpoint,
    dst: &Endpoint,
    proto: Protocol,
    port: u16,
) -> bool {
    let s = states(&src.node);
    let d = states(&dst.node);
    let _ = model;
    sim::decide(
        &s.maps,
        src.interface.as_deref().unwrap(),
        1,
        dst.addresses[0],
        proto.number(),
        port,
    )
    .allow
        && sim::decide(
            &d.maps,
            dst.interface.as_deref().unwrap(),
            0,
            src.addresses[0],
            proto.number(),
            port,
        )
        .allow
}

/// Whether the reference evaluator lets the flow through both ends.
pub fn reference_flow(
    model: &Model,
    src: &Endpoint,
    dst: &Endpoint,
    proto: Protocol,
    port: u16,
) -> bool {
    reference::endpoint_allows(model, src, 1, dst.addresses[0], proto, port, false)
        && reference::endpoint_allows(model, dst, 0, src.addresses[0], proto, port, false)
}

pub fn model(
    namespaces: Vec<Namespace>,
    nodes: Vec<Node>,
    endpoints: Vec<Endpoint>,
    policies: Vec<Policy>,
) -> Model {
    Model {
        local_node: nodes.first().map(|n| n.name.clone()).unwrap_or_default(),
        namespaces,
        nodes,
        endpoints,
        policies,
    }
}
