//! Every scenario of e2e/scenarios (the upstream NetworkPolicy e2e cases) at compiler level:
//! the compiled maps, read through the lookup simulation on both ends of each flow, agree with
//! the expected matrices (the diagonal is never asserted upstream and is skipped). The
//! reference evaluator is held to the same matrices, so the oracle itself is checked.

mod common;

use common::{compile_for, node, reference_flow};
use moat::model::{Endpoint, Model, Namespace, Phase};
use moat::scenario::Scenario;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// The scenario's cluster on one node, pods at 10.244.0.1.. in file order.
fn build(s: &Scenario) -> Model {
    let ips: BTreeMap<String, IpAddr> = s
        .pods
        .keys()
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("10.244.0.{}", i + 1).parse().unwrap()))
        .collect();
    let endpoints = s
        .pods
        .iter()
        .map(|(k, labels)| {
            let (ns, name) = k.split_once('/').unwrap();
            Endpoint {
                name: name.into(),
                namespace: ns.into(),
                node: "node-1".into(),
                labels: labels.clone(),
                addresses: vec![ips[k]],
                ports: s.container_ports(k),
                interface: Some(common::iface(ns, name)),
                host_network: false,
                phase: Phase::Running,
                revision: None,
            }
        })
        .collect();
    let policies = s.policies(&|p| ips.get(p).copied()).unwrap();
    Model {
        local_node: "node-1".into(),
        namespaces: s
            .namespaces
            .iter()
            .map(|(n, l)| Namespace {
                name: n.clone(),
                labels: l.clone(),
            })
            .collect(),
        nodes: vec![node("node-1", "172.18.0.2")],
        endpoints,
        policies,
    }
}

#[test]
fn conformance_scenarios_agree_with_expectations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/scenarios");
    let scenarios = Scenario::load_dir(&dir).unwrap();
    assert!(
        scenarios.len() >= 20,
        "scenarios missing from {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for (file, s) in &scenarios {
        let m = build(s);
        let state = compile_for(&m, "node-1");
        for (r, o) in &state.policies {
            assert!(o.accepted, "{file}: {r} refused: {}", o.message);
        }
        let by_key: BTreeMap<String, &Endpoint> =
            m.endpoints.iter().map(|e| (e.key(), e)).collect();
        for probe in &s.probes {
            for (from, src) in &by_key {
                for (to, dst) in &by_key {
                    if from == to {
                        continue;
                    }
                    let want = probe.reachable(from, to);
                    let got =
                        common::flow(&m, &|_| state.clone(), src, dst, probe.protocol, probe.port);
                    let oracle = reference_flow(&m, src, dst, probe.protocol, probe.port);
                    if got != want || oracle != want {
                        failures.push(format!(
                            "{file} {}/{} {from} -> {to}: expected {want}, compiled {got}, reference {oracle}",
                            probe.protocol.as_str(),
                            probe.port
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn placeholders_resolve_to_canonical_networks() {
    let ip_of = |p: &str| (p == "x/b").then(|| "10.244.0.7".parse().unwrap());
    assert_eq!(
        moat::scenario::substitute("${x/b.ip}/4", &ip_of).unwrap(),
        "0.0.0.0/4"
    );
    assert_eq!(
        moat::scenario::substitute("${x/b.ip}/32", &ip_of).unwrap(),
        "10.244.0.7/32"
    );
    assert_eq!(
        moat::scenario::substitute("${x/b.ip}", &ip_of).unwrap(),
        "10.244.0.7"
    );
    assert!(moat::scenario::substitute("${q/q.ip}/32", &ip_of).is_err());
}
