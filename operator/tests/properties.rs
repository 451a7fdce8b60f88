//! Property tests: random clusters and policies of all three kinds.
//! - The compiled maps, read through the lookup simulation, make the same decision as the
//!   reference evaluator for every endpoint, direction, peer address, protocol and port, in
//!   the Enforce view and in the Enforce+Audit view.
//! - Diff batches keep the transition invariant after every single operation.
//! - Compiling is deterministic and a recompile with the returned allocations is a no-op.

mod common;

use common::{reference, sim};
use ipnet::IpNet;
use moat::api::Protocol;
use moat::compiler::diff::{RealizedState, diff, plan};
use moat::compiler::{CompileConfig, Compiler, DesiredState, compile};
use moat::identity::Allocations;
use moat::model::{ContainerPort, Endpoint, Model, Namespace, Node, Phase, Policy};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::net::IpAddr;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const APPS: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
struct PodGen {
    ns: usize,
    app: usize,
    tier: Option<bool>,
    node: usize,
    http: Option<u16>,
    dns: bool,
    v6: bool,
    host_network: bool,
    finished: bool,
}

#[derive(Clone, Debug)]
enum PeerGen {
    Pods {
        ns: Option<Option<usize>>,
        app: Option<usize>,
        tier_exists: Option<bool>,
    },
    /// Around address `target` (pods then nodes), with an except around another.
    Block {
        target: usize,
        len: u8,
        except: Option<(usize, u8)>,
    },
    Entity(usize),
}

#[derive(Clone, Debug)]
struct PortGen {
    proto: usize,
    kind: usize,
}

#[derive(Clone, Debug)]
struct RuleGen {
    deny: bool,
    peers: Vec<PeerGen>,
    ports: Vec<PortGen>,
}

#[derive(Clone, Debug)]
struct PolicyGen {
    kind: usize,
    ns: usize,
    app: Option<usize>,
    audit: bool,
    default_deny: (Option<bool>, Option<bool>),
    types: usize,
    ingress: Vec<RuleGen>,
    egress: Vec<RuleGen>,
}

fn pod_gen() -> impl Strategy<Value = PodGen> {
    (
        0..3usize,
        0..3usize,
        proptest::option::of(any::<bool>()),
        0..2usize,
        proptest::option::of(prop_oneof![Just(80u16), Just(81u16)]),
        any::<bool>(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.08),
        prop::bool::weighted(0.08),
    )
        .prop_map(
            |(ns, app, tier, node, http, dns, v6, host_network, finished)| PodGen {
                ns,
                app,
                tier,
                node,
                http,
                dns,
                v6,
                host_network,
                finished,
            },
        )
}

fn peer_gen() -> impl Strategy<Value = PeerGen> {
    prop_oneof![
        4 => (proptest::option::of(proptest::option::of(0..3usize)), proptest::option::of(0..3usize), proptest::option::of(any::<bool>()))
            .prop_map(|(ns, app, tier_exists)| PeerGen::Pods { ns, app, tier_exists }),
        2 => (0..10usize, prop_oneof![Just(8u8), Just(16), Just(24), Just(28), Just(32)], proptest::option::of((0..10usize, prop_oneof![Just(30u8), Just(32)])))
            .prop_map(|(target, len, except)| PeerGen::Block { target, len, except }),
        1 => (0..4usize).prop_map(PeerGen::Entity),
    ]
}

fn rule_gen() -> impl Strategy<Value = RuleGen> {
    (
        prop::bool::weighted(0.3),
        proptest::collection::vec(peer_gen(), 0..3),
        proptest::collection::vec(
            (0..3usize, 0..6usize).prop_map(|(proto, kind)| PortGen { proto, kind }),
            0..3,
        ),
    )
        .prop_map(|(deny, peers, ports)| RuleGen { deny, peers, ports })
}

fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    (
        0..3usize,
        0..3usize,
        proptest::option::of(0..3usize),
        prop::bool::weighted(0.25),
        (
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
        ),
        0..4usize,
        proptest::collection::vec(rule_gen(), 0..3),
        proptest::collection::vec(rule_gen(), 0..3),
    )
        .prop_map(
            |(kind, ns, app, audit, default_deny, types, ingress, egress)| PolicyGen {
                kind,
                ns,
                app,
                audit,
                default_deny,
                types,
                ingress,
                egress,
            },
        )
}

fn pod_v4(i: usize, node: usize) -> IpAddr {
    format!("10.244.{node}.{}", i + 10).parse().unwrap()
}

fn node_addr(n: usize) -> IpAddr {
    format!("10.0.0.{}", n + 1).parse().unwrap()
}

fn build_model(pods: &[PodGen], policies: &[PolicyGen]) -> Model {
    let namespaces = NAMESPACES
        .iter()
        .enumerate()
        .map(|(i, n)| Namespace {
            name: n.to_string(),
            labels: [
                ("kubernetes.io/metadata.name".to_string(), n.to_string()),
                ("team".into(), (i % 2).to_string()),
            ]
            .into_iter()
            .collect(),
        })
        .collect();
    let nodes = (0..2)
        .map(|n| Node {
            name: format!("n{n}"),
            addresses: vec![node_addr(n)],
        })
        .collect();
    let endpoints = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut labels = common::labels(&[("app", APPS[p.app])]);
            if let Some(t) = p.tier {
                labels.insert("tier".into(), if t { "front" } else { "back" }.into());
            }
            let mut ports = Vec::new();
            if let Some(h) = p.http {
                ports.push(ContainerPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: h,
                });
            }
            if p.dns {
                ports.push(ContainerPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                });
            }
            let mut addresses = vec![if p.host_network {
                node_addr(p.node)
            } else {
                pod_v4(i, p.node)
            }];
            if p.v6 && !p.host_network {
                addresses.push(format!("fd00::{}", i + 10).parse().unwrap());
            }
            Endpoint {
                name: format!("p{i}"),
                namespace: NAMESPACES[p.ns].into(),
                node: format!("n{}", p.node),
                labels,
                addresses,
                ports,
                interface: Some(format!("lxc{i}")),
                host_network: p.host_network,
                phase: if p.finished {
                    Phase::Finished
                } else {
                    Phase::Running
                },
                // Changes with everything the pod is made of, as an API server's would.
                revision: Some(format!("{p:?}")),
            }
        })
        .collect::<Vec<_>>();
    let targets: Vec<IpAddr> = endpoints
        .iter()
        .map(|e| e.addresses[0])
        .chain([node_addr(0), node_addr(1)])
        .collect();
    let policies = policies
        .iter()
        .enumerate()
        .map(|(i, p)| policy_json(i, p, &targets))
        .collect();
    Model {
        local_node: "n0".into(),
        namespaces,
        nodes,
        endpoints,
        policies,
    }
}

fn policy_json(i: usize, p: &PolicyGen, targets: &[IpAddr]) -> Policy {
    let upstream = p.kind == 0;
    let peer = |g: &PeerGen| -> Value {
        match g {
            PeerGen::Pods {
                ns,
                app,
                tier_exists,
            } => {
                let mut v = json!({});
                if let Some(ns) = ns {
                    v["namespaceSelector"] = match ns {
                        None => json!({}),
                        Some(t) => json!({"matchLabels": {"team": (t % 2).to_string()}}),
                    };
                }
                let mut ps = json!({});
                if let Some(a) = app {
                    ps["matchLabels"] = json!({"app": APPS[*a]});
                }
                if let Some(e) = tier_exists {
                    ps["matchExpressions"] = json!([{"key": "tier", "operator": if *e { "Exists" } else { "DoesNotExist" }}]);
                }
                if app.is_some() || tier_exists.is_some() || ns.is_none() {
                    v["podSelector"] = ps;
                }
                v
            }
            PeerGen::Block {
                target,
                len,
                except,
            } => {
                let t = targets[target % targets.len()];
                let cidr = IpNet::new(t, *len).unwrap().trunc();
                let mut b = json!({"cidr": cidr.to_string()});
                if let Some((x, xl)) = except {
                    let e = IpNet::new(targets[x % targets.len()], *xl).unwrap().trunc();
                    if cidr.contains(&e) && e.prefix_len() > cidr.prefix_len() {
                        b["except"] = json!([e.to_string()]);
                    }
                }
                json!({"ipBlock": b})
            }
            PeerGen::Entity(e) => {
                if upstream {
                    json!({"podSelector": {}})
                } else {
                    {
                        let entity = ["world", "host", "cluster", "all"][*e];
                        json!({"entities": [entity]})
                    }
                }
            }
        }
    };
    let port = |g: &PortGen| -> Value {
        let proto = ["TCP", "UDP", if upstream { "SCTP" } else { "ICMP" }][g.proto];
        if proto == "ICMP" {
            return json!({"protocol": "ICMP"});
        }
        match g.kind {
            0 => json!({"protocol": proto}),
            1 => json!({"protocol": proto, "port": 80}),
            2 => json!({"protocol": proto, "port": 81}),
            3 => json!({"protocol": proto, "port": 80, "endPort": 81}),
            4 => json!({"protocol": proto, "port": "http"}),
            _ => json!({"protocol": proto, "port": "dns"}),
        }
    };
    let rule = |r: &RuleGen, field: &str| -> Value {
        let mut v = json!({});
        if !r.peers.is_empty() {
            v[field] = Value::Array(r.peers.iter().map(peer).collect());
        }
        if !r.ports.is_empty() {
            v["ports"] = Value::Array(r.ports.iter().map(port).collect());
        }
        if !upstream && r.deny {
            v["action"] = json!("Deny");
        }
        v
    };
    let ingress: Vec<Value> = p.ingress.iter().map(|r| rule(r, "from")).collect();
    let egress: Vec<Value> = p.egress.iter().map(|r| rule(r, "to")).collect();
    let mut sel = json!({});
    if let Some(a) = p.app {
        sel["matchLabels"] = json!({"app": APPS[a]});
    }
    let name = format!("p{i}");
    let v = match p.kind {
        0 => {
            let mut spec = json!({"podSelector": sel, "ingress": ingress, "egress": egress});
            match p.types {
                0 => {}
                1 => spec["policyTypes"] = json!(["Ingress"]),
                2 => spec["policyTypes"] = json!(["Egress"]),
                _ => spec["policyTypes"] = json!(["Ingress", "Egress"]),
            }
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": name, "namespace": NAMESPACES[p.ns]}, "spec": spec})
        }
        k => {
            let mut spec = json!({"ingress": ingress, "egress": egress});
            let mut dd = json!({});
            if let Some(b) = p.default_deny.0 {
                dd["ingress"] = json!(b);
            }
            if let Some(b) = p.default_deny.1 {
                dd["egress"] = json!(b);
            }
            spec["defaultDeny"] = dd;
            if p.audit {
                spec["enforcementMode"] = json!("Audit");
            }
            if k == 1 {
                spec["podSelector"] = sel;
                json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy",
                       "metadata": {"name": name, "namespace": NAMESPACES[p.ns]}, "spec": spec})
            } else {
                if p.app.is_some() {
                    spec["podSelector"] = sel;
                }
                if p.types == 3 {
                    spec["namespaceSelector"] = json!({"matchLabels": {"team": "0"}});
                }
                json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatClusterNetworkPolicy",
                       "metadata": {"name": name}, "spec": spec})
            }
        }
    };
    Policy::from_value(v).unwrap()
}

/// Every address a decision is probed with.
fn probe_addresses(m: &Model) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = m
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter().copied())
        .collect();
    out.extend(m.nodes.iter().flat_map(|n| n.addresses.iter().copied()));
    out.extend(
        ["192.0.2.1", "10.244.9.9", "10.244.0.200", "2001:db8::1"]
            .iter()
            .map(|s| s.parse::<IpAddr>().unwrap()),
    );
    out.sort();
    out.dedup();
    out
}

const PROTOS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];
const PORTS: [u16; 4] = [80, 81, 53, 8080];

fn compile_node(m: &Model, node: &str, alloc: &Allocations) -> (DesiredState, Allocations) {
    let mut m = m.clone();
    m.local_node = node.into();
    compile(&m, alloc, &CompileConfig::default()).unwrap()
}

/// What decides a flow in a check: (state, interface, direction, peer, IP protocol number,
/// port) -> (Enforce view allows, Enforce+Audit view allows).
type Decider<'a> = dyn FnMut(&DesiredState, &str, u8, IpAddr, u8, u16) -> (bool, bool) + 'a;

/// The lookup simulation of the tests.
fn simulated(
    state: &DesiredState,
    iface: &str,
    dir: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> (bool, bool) {
    let d = sim::decide(&state.maps, iface, dir, peer, proto, port);
    (d.allow, d.audit_allow)
}

/// Compares every decision of every local endpoint of `node` with the reference evaluator.
fn check_node(m: &Model, node: &str) -> Result<(), TestCaseError> {
    check_node_with(m, node, &mut simulated, &mut |_| {})
}

/// Same, with `decide` making the decisions after `load` put the compiled state in place.
fn check_node_with(
    m: &Model,
    node: &str,
    decide: &mut Decider,
    load: &mut dyn FnMut(&DesiredState),
) -> Result<(), TestCaseError> {
    let (state, alloc) = compile_node(m, node, &Allocations::default());
    load(&state);
    let mut m = m.clone();
    m.local_node = node.into();
    let peers = probe_addresses(&m);
    for ep in m
        .endpoints
        .iter()
        .filter(|e| e.node == node && e.phase == Phase::Running && !e.host_network)
    {
        let iface = ep.interface.as_deref().unwrap();
        for dir in 0..2u8 {
            for &peer in &peers {
                for proto in PROTOS {
                    for port in PORTS {
                        // ICMP over IPv6 is ICMPv6 on the wire.
                        let number = if proto == Protocol::Icmp && peer.is_ipv6() {
                            58
                        } else {
                            proto.number()
                        };
                        let (allow, audit_allow) = decide(&state, iface, dir, peer, number, port);
                        let want = reference::endpoint_allows(
                            &m,
                            ep,
                            dir as usize,
                            peer,
                            proto,
                            port,
                            false,
                        );
                        let want_audit = reference::endpoint_allows(
                            &m,
                            ep,
                            dir as usize,
                            peer,
                            proto,
                            port,
                            true,
                        );
                        prop_assert_eq!(
                            allow,
                            want,
                            "enforce: {} dir {} peer {} {:?}/{}",
                            ep.key(),
                            dir,
                            peer,
                            proto,
                            port
                        );
                        prop_assert_eq!(
                            audit_allow,
                            want_audit,
                            "audit view: {} dir {} peer {} {:?}/{}",
                            ep.key(),
                            dir,
                            peer,
                            proto,
                            port
                        );
                    }
                }
            }
        }
    }
    // Determinism and stability: the same model with the returned allocations compiles to the
    // same state and allocations.
    let (again, alloc2) = compile(&m, &alloc, &CompileConfig::default()).unwrap();
    prop_assert_eq!(&again, &state);
    prop_assert_eq!(alloc2.identities.assigned, alloc.identities.assigned);
    prop_assert_eq!(alloc2.rules.assigned, alloc.rules.assigned);
    prop_assert_eq!(alloc2.rulesets.assigned, alloc.rulesets.assigned);
    Ok(())
}

/// The compiled state in real maps, decided by the real programs with BPF_PROG_TEST_RUN:
/// each batch goes in through the compiler's diff, as the reconciler applies it.
struct RealDatapath {
    root: String,
    dp: moat_datapath::Datapath,
    events: moat_datapath::EventStream,
    realized: RealizedState,
    /// Stand-in ifindexes for the endpoints' interfaces (map keys only: runs use loopback).
    ifindex: std::collections::BTreeMap<String, u32>,
    /// Source port / ICMP id of the next run, so no run rides an earlier run's conntrack entry.
    next_port: u16,
}

impl RealDatapath {
    fn new() -> Self {
        let root = format!("/sys/fs/bpf/moat-test-{}-proptest", std::process::id());
        let _ = moat_datapath::Datapath::reset(&root);
        let mut dp = moat_datapath::Datapath::open(&root).expect("open the datapath");
        let events = dp.take_events().expect("event stream");
        let mut cfg = dp.config().unwrap();
        cfg.event_rate = 1_000_000;
        cfg.event_burst = 1_000_000;
        dp.set_config(cfg).unwrap();
        RealDatapath {
            root,
            dp,
            events,
            realized: RealizedState::default(),
            ifindex: Default::default(),
            next_port: 1024,
        }
    }

    fn load(&mut self, state: &DesiredState) {
        use moat::compiler::diff::MapOp as C;
        use moat_datapath::{MapOp as D, PolicyEntryKey};
        for name in state.maps.endpoints.keys() {
            let n = 100_000 + self.ifindex.len() as u32;
            self.ifindex.entry(name.clone()).or_insert(n);
        }
        let entry = |key, prefix_len| PolicyEntryKey { key, prefix_len };
        for op in diff(&state.maps, &self.realized) {
            let d = match &op {
                C::PrefilterUpsert(n, r) => D::PrefilterUpsert(*n, *r),
                C::PrefilterDelete(n) => D::PrefilterRemove(*n),
                C::IpcacheUpsert(n, v) => D::IpcacheUpsert(*n, *v),
                C::IpcacheDelete(n) => D::IpcacheRemove(*n),
                C::EndpointUpsert(name, info) => D::EndpointSet(self.ifindex[name], *info),
                C::EndpointDelete(name) => D::EndpointRemove(self.ifindex[name]),
                C::PolicyExactUpsert(k, v) => D::PolicyUpsert(entry(*k, 96), *v),
                C::PolicyExactDelete(k) => D::PolicyRemove(entry(*k, 96)),
                C::PolicyPrefixUpsert(k, l, v) => D::PolicyUpsert(entry(*k, *l), *v),
                C::PolicyPrefixDelete(k, l) => D::PolicyRemove(entry(*k, *l)),
                C::SetRevision(r) => D::SetRevision(*r),
            };
            self.dp.apply(&[d]).expect("apply");
            op.apply(&mut self.realized);
        }
    }

    /// Run one new flow through the endpoint's hook. A flow the policy sends to the L7 proxy
    /// is allowed at L3/L4 (no proxy runs here, so the kernel drops it with `no-proxy`).
    fn decide(
        &mut self,
        state: &DesiredState,
        iface: &str,
        dir: u8,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> (bool, bool) {
        use moat_datapath::packet::{L4, SYN, packet};
        let info = state.maps.endpoints[iface];
        self.dp
            .apply(&[moat_datapath::MapOp::EndpointSet(1, info)])
            .unwrap();
        let me: IpAddr = if peer.is_ipv4() {
            "10.255.255.254"
        } else {
            "fd00:ffff::fe"
        }
        .parse()
        .unwrap();
        let (src, dst) = if dir == 0 { (peer, me) } else { (me, peer) };
        self.next_port = self.next_port.wrapping_add(1).max(1024);
        let sport = self.next_port;
        let l4 = match proto {
            6 => L4::Tcp {
                sport,
                dport: port,
                flags: SYN,
            },
            17 => L4::Udp { sport, dport: port },
            _ => L4::Echo {
                id: sport,
                reply: false,
            },
        };
        let hook = if dir == 0 {
            moat_datapath::Hook::ToEndpoint
        } else {
            moat_datapath::Hook::FromEndpoint
        };
        let r = self
            .dp
            .test_run(hook, &packet(src, dst, l4), 1, 0, 1)
            .expect("test_run");
        let events = self.events.drain();
        let redirected = events
            .iter()
            .any(|e| e.reason == moat_common::reason::NO_PROXY);
        let audit = events
            .iter()
            .any(|e| e.kind == moat_common::event_kind::AUDIT);
        let allow = r.action == 0 || redirected;
        (allow, allow != audit)
    }
}

impl Drop for RealDatapath {
    fn drop(&mut self) {
        let _ = moat_datapath::Datapath::reset(&self.root);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The same comparison as below, through real maps and the real programs.
    #[test]
    fn the_real_datapath_agrees_with_reference(
        pods in proptest::collection::vec(pod_gen(), 1..7),
        policies in proptest::collection::vec(policy_gen(), 0..5),
    ) {
        let m = build_model(&pods, &policies);
        let real = std::cell::RefCell::new(RealDatapath::new());
        for node in ["n0", "n1"] {
            check_node_with(
                &m,
                node,
                &mut |s, i, d, p, pr, po| real.borrow_mut().decide(s, i, d, p, pr, po),
                &mut |s| real.borrow_mut().load(s),
            )?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compiled_state_agrees_with_reference(
        pods in proptest::collection::vec(pod_gen(), 1..7),
        policies in proptest::collection::vec(policy_gen(), 0..5),
    ) {
        let m = build_model(&pods, &policies);
        check_node(&m, "n0")?;
        check_node(&m, "n1")?;
    }

    /// The agent's compiler, fed one model after another (pods relabelled or given another
    /// named port, policies kept, edited, added or removed), computes what `compile` computes
    /// from scratch with the same allocations, and its delta takes the maps it had to the
    /// ones it has.
    #[test]
    fn the_incremental_compiler_agrees_with_compile(
        pods in proptest::collection::vec(pod_gen(), 1..7),
        first in proptest::collection::vec(policy_gen(), 0..4),
        steps in proptest::collection::vec(
            (
                proptest::option::of(proptest::collection::vec(policy_gen(), 0..4)),
                proptest::collection::vec((0..7usize, 0..3usize, proptest::option::of(prop_oneof![Just(80u16), Just(81u16)])), 0..3),
            ),
            1..5,
        ),
    ) {
        let mut compiler = Compiler::new(CompileConfig::default(), Allocations::default());
        let mut realized = RealizedState::default();
        let (mut pods, mut policies) = (pods, first);
        for (n, (new_policies, relabels)) in std::iter::once((None, Vec::new())).chain(steps).enumerate() {
            if let Some(p) = new_policies {
                policies = p;
            }
            for (i, app, http) in relabels {
                if let Some(pod) = pods.get_mut(i) {
                    pod.app = app;
                    pod.http = http;
                }
            }
            let mut m = build_model(&pods, &policies);
            m.local_node = "n0".into();
            let (expect, expect_alloc) =
                compile(&m, compiler.allocations(), &CompileConfig::default()).unwrap();
            let delta = compiler.compile(&m).unwrap();
            prop_assert_eq!(compiler.state(), &expect, "step {}", n);
            prop_assert_eq!(compiler.allocations(), &expect_alloc, "step {}", n);
            for op in plan(&delta, &compiler.state().maps, &realized) {
                op.apply(&mut realized);
            }
            prop_assert_eq!(&realized.maps, &expect.maps, "step {}: the delta", n);
        }
    }

    #[test]
    fn every_operation_of_a_batch_keeps_the_transition_invariant(
        pods in proptest::collection::vec(pod_gen(), 1..6),
        old_policies in proptest::collection::vec(policy_gen(), 0..3),
        new_policies in proptest::collection::vec(policy_gen(), 0..3),
        relabel in proptest::option::of((0..6usize, 0..3usize)),
    ) {
        let old_model = build_model(&pods, &old_policies);
        let mut new_pods = pods.clone();
        if let Some((i, app)) = relabel && i < new_pods.len() {
            new_pods[i].app = app;
        }
        let new_model = build_model(&new_pods, &new_policies);
        let (old, alloc) = compile_node(&old_model, "n0", &Allocations::default());
        let (new, _) = compile_node(&new_model, "n0", &alloc);
        let mut cur = RealizedState { maps: old.maps.clone(), revision: 7 };
        let ops = diff(&new.maps, &cur);
        let mut ifaces: Vec<String> = old.maps.endpoints.keys().chain(new.maps.endpoints.keys()).cloned().collect();
        ifaces.sort();
        ifaces.dedup();
        let mut peers = probe_addresses(&old_model);
        peers.extend(probe_addresses(&new_model));
        peers.sort();
        peers.dedup();
        for (n, op) in ops.iter().enumerate() {
            op.apply(&mut cur);
            for iface in &ifaces {
                for dir in 0..2u8 {
                    for &peer in &peers {
                        for proto in [Protocol::Tcp, Protocol::Udp] {
                            for port in [80u16, 53] {
                                let was = sim::decide(&old.maps, iface, dir, peer, proto.number(), port).allow;
                                let will = sim::decide(&new.maps, iface, dir, peer, proto.number(), port).allow;
                                let now = sim::decide(&cur.maps, iface, dir, peer, proto.number(), port).allow;
                                prop_assert!(
                                    !(was && will) || now,
                                    "op {} ({:?}) drops a flow both allow: {} dir {} peer {} {:?}/{}", n, op, iface, dir, peer, proto, port
                                );
                                prop_assert!(
                                    was || will || !now,
                                    "op {} ({:?}) allows a flow neither allows: {} dir {} peer {} {:?}/{}", n, op, iface, dir, peer, proto, port
                                );
                            }
                        }
                    }
                }
            }
        }
        prop_assert_eq!(&cur.maps, &new.maps);
        if !ops.is_empty() {
            prop_assert_eq!(ops.last(), Some(&moat::compiler::diff::MapOp::SetRevision(8)));
        }
        prop_assert!(diff(&new.maps, &cur).is_empty());
    }
}
