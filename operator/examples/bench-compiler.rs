//! `make bench-compiler`: the compiler on a cluster of 10,000 pods in 100 namespaces over 10
//! nodes with 1,000 policies of all three kinds — a full compile from empty allocations
//! (`moat::compiler::compile`), and the incremental case the agent meets on every watch
//! event: one pod relabelled, or one policy edited, compiled by the agent's
//! `moat::compiler::Compiler` (which compiled the base model before) and its delta ordered
//! into a batch (`compiler::diff::plan`) against the realized base state. Pods and policies
//! carry a resourceVersion, as the API server's do, and every change bumps it. Writes
//! `target/bench/compiler.json` (shared notes, benchmarks.md).
//!
//! The process is pinned to one CPU, so the figures are one core's. Every measured compile is
//! checked to have produced the state it should (endpoints, policy entries, ipcache, L7
//! rules, every policy accepted), every incremental one to have changed the maps and its
//! batch to take the realized maps exactly to the compiler's, so the bench cannot time a
//! compile that did nothing or a delta that misses something.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Instant};

use moat::compiler::diff::{RealizedState, plan};
use moat::compiler::{CompileConfig, Compiler, DesiredState, compile};
use moat::identity::Allocations;
use moat::model::{ContainerPort, Endpoint, Model, Namespace, Node, Phase, Policy};
use moat::{api::Protocol, selector::Labels};
use serde_json::{Value, json};

const NAMESPACES: usize = 100;
const APPS: usize = 10;
const REPLICAS: usize = 10;
const NODES: usize = 10;
const LOCAL_NODE: &str = "node-0";
const FULL_RUNS: usize = 7;
const EDITS: usize = 24;
const TIERS: [&str; 5] = ["web", "api", "db", "cache", "worker"];

fn ns_name(i: usize) -> String {
    match i {
        0 => "kube-system".into(),
        1 => "monitoring".into(),
        _ => format!("ns-{i:02}"),
    }
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn port(name: &str, protocol: Protocol, port: u16) -> ContainerPort {
    ContainerPort {
        name: name.into(),
        protocol,
        port,
    }
}

/// 100 pods per namespace: 10 apps of 10 replicas, each replica of an app on another node (so
/// one in ten pods is local), replicas 7..=9 a `v2` canary. Every fourth pod is dual-stack,
/// about one in 200 has finished, and kube-system's app-9 is a hostNetwork daemon set.
/// Replica 9 of app-3 numbers its `http` port differently (a rollout), which splits its
/// identity under an egress named-port rule (semantic rule 5).
fn model() -> Model {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            let name = ns_name(i);
            Namespace {
                labels: labels(&[
                    ("kubernetes.io/metadata.name", &name),
                    ("team", &format!("team-{}", i % 10)),
                    ("env", ["prod", "staging", "dev"][i % 3]),
                ]),
                name,
            }
        })
        .collect();
    let node_addr = |n: usize| -> IpAddr { format!("10.0.0.{}", n + 1).parse().unwrap() };
    let nodes = (0..NODES)
        .map(|n| Node {
            name: format!("node-{n}"),
            addresses: vec![node_addr(n), format!("fd00::{}", n + 1).parse().unwrap()],
        })
        .collect();
    let mut per_node = [0usize; NODES];
    let mut endpoints = Vec::with_capacity(NAMESPACES * APPS * REPLICAS);
    for ns in 0..NAMESPACES {
        for app in 0..APPS {
            for r in 0..REPLICAS {
                let g = endpoints.len();
                let node = (ns + app + r) % NODES;
                let j = per_node[node];
                per_node[node] += 1;
                let mut l = labels(&[
                    ("app", &format!("app-{app}")),
                    ("tier", TIERS[app % TIERS.len()]),
                    ("version", if r < 7 { "v1" } else { "v2" }),
                ]);
                let mut ports = vec![
                    port(
                        "http",
                        Protocol::Tcp,
                        match (app, r) {
                            (3, 9) => 8443,
                            _ if app.is_multiple_of(2) => 8080,
                            _ => 80,
                        },
                    ),
                    port("metrics", Protocol::Tcp, 9090),
                ];
                if app % TIERS.len() == 1 {
                    ports.push(port("grpc", Protocol::Tcp, 50051));
                }
                if ns == 0 && app == 0 {
                    l.insert("k8s-app".into(), "kube-dns".into());
                    ports.push(port("dns", Protocol::Udp, 53));
                    ports.push(port("dns-tcp", Protocol::Tcp, 53));
                }
                if ns == 1 && app == 0 {
                    l.insert("role".into(), "scraper".into());
                }
                let host_network = ns == 0 && app == 9;
                let mut addresses: Vec<IpAddr> = if host_network {
                    vec![node_addr(node)]
                } else {
                    vec![
                        format!("10.244.{}.{}", 4 * node + j / 256, j % 256)
                            .parse()
                            .unwrap(),
                    ]
                };
                if g.is_multiple_of(4) && !host_network {
                    addresses.push(format!("fd00:10:244:{node}::{j:x}").parse().unwrap());
                }
                let node = format!("node-{node}");
                endpoints.push(Endpoint {
                    name: format!("app-{app}-{r}"),
                    namespace: ns_name(ns),
                    interface: (node == LOCAL_NODE).then(|| format!("lxc{g}")),
                    node,
                    labels: l,
                    addresses,
                    ports,
                    host_network,
                    phase: if g % 211 == 5 {
                        Phase::Finished
                    } else {
                        Phase::Running
                    },
                    revision: Some("1".into()),
                });
            }
        }
    }
    let policies = (0..NAMESPACES)
        .flat_map(|i| (0..10).map(move |k| policy(i, k, 0)))
        .collect();
    Model {
        local_node: LOCAL_NODE.into(),
        namespaces,
        nodes,
        endpoints,
        policies,
    }
}

fn app(a: usize) -> String {
    format!("app-{}", a % APPS)
}

fn np(ns: &str, name: &str, spec: Value) -> Policy {
    Policy::from_value(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

fn mnp(ns: &str, name: &str, spec: Value) -> Policy {
    Policy::from_value(
        json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

/// Policy `k` (0..10) of namespace `i`: six upstream NetworkPolicies, three
/// MoatNetworkPolicies and one MoatClusterNetworkPolicy per namespace. `edit` > 0 changes
/// policy 2 (a port for odd edits, a peer selector for even ones), so that edits differ.
fn policy(i: usize, k: usize, edit: usize) -> Policy {
    // As from an API server: a uid, and a resourceVersion that every edit changes.
    let mut p = policy_object(i, k, edit);
    let meta = match &mut p {
        Policy::NetworkPolicy(x) => &mut x.metadata,
        Policy::MoatNetworkPolicy(x) => &mut x.metadata,
        Policy::MoatClusterNetworkPolicy(x) => &mut x.metadata,
    };
    meta.uid = Some(format!("uid-{i}-{k}"));
    meta.resource_version = Some((edit + 1).to_string());
    p
}

fn policy_object(i: usize, k: usize, edit: usize) -> Policy {
    let ns = ns_name(i);
    let ns = ns.as_str();
    let team = |t: usize| format!("team-{}", t % 10);
    match k {
        0 => np(
            ns,
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
        1 => np(
            ns,
            "allow-dns",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": "dns-tcp"}]}]}),
        ),
        2 => {
            let peer_app = if edit > 0 && edit.is_multiple_of(2) {
                i + 2 + edit / 2 % 8
            } else {
                i + 1
            };
            let metrics = if edit % 2 == 1 { 9090 + edit } else { 9090 };
            np(
                ns,
                &format!("{}-ingress", app(i)),
                json!({"podSelector": {"matchLabels": {"app": app(i)}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": app(peer_app)}}},
                             {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]}}],
                    "ports": [{"port": "http"}, {"protocol": "TCP", "port": metrics}]}],
                "egress": [{
                    "to": [{"podSelector": {"matchLabels": {"app": app(peer_app)}}}],
                    "ports": [{"port": "http"}]}]}),
            )
        }
        3 => np(
            ns,
            "from-teams",
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": [team(i), team(i + 3)]}]},
                          "podSelector": {"matchLabels": {"tier": "web"},
                                          "matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v2"]}]}}],
                "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}]}]}),
        ),
        4 => {
            let (db, v6) = (4 * (i % 4), i % 4);
            let mut spec = json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [app(i), app(i + 5)]}]},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                 "ports": [{"port": 443}]},
                {"to": [{"ipBlock": {"cidr": format!("172.20.{db}.0/22"), "except": [format!("172.20.{db}.0/26")]}},
                        {"ipBlock": {"cidr": format!("198.51.100.{}/29", 8 * (i % 8))}},
                        {"ipBlock": {"cidr": format!("2001:db8:{v6}::/48"), "except": [format!("2001:db8:{v6}:ff::/64")]}}],
                 "ports": [{"port": 5432}, {"protocol": "UDP", "port": 30000, "endPort": 32767}]}]});
            if i % 25 == 1 {
                // One pod's own address (rule 4: it splits that pod's identity).
                let pod = format!("10.244.{}.{i}/32", 4 * (i % NODES));
                spec["egress"][1]["to"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"ipBlock": {"cidr": pod}}));
            }
            np(ns, "egress-external", spec)
        }
        5 => np(
            ns,
            "allow-monitoring",
            json!({"podSelector": {}, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                          "podSelector": {"matchLabels": {"role": "scraper"}}}],
                "ports": [{"port": "metrics"}]}]}),
        ),
        6 => mnp(
            ns,
            "deny-legacy",
            json!({"podSelector": {"matchLabels": {"app": app(i + 2)}},
            "ingress": [
                {"action": "Deny",
                 "from": [{"namespaceSelector": {"matchLabels": {"env": "dev"}},
                           "podSelector": {"matchLabels": {"tier": "db", "version": "v1"}}}],
                 "ports": [{"port": 22}, {"port": 23}, {"protocol": "UDP", "port": 161, "endPort": 162}]},
                {"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}],
                 "ports": [{"port": "grpc"}, {"port": 8080}]}]}),
        ),
        7 => {
            let mut spec = json!({"podSelector": {}, "defaultDeny": {"egress": false},
            "egress": [
                {"action": "Deny", "to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}]},
                {"to": [{"entities": ["world"]}], "ports": [{"port": 80}, {"port": 443}]}]});
            if i.is_multiple_of(4) {
                spec["enforcementMode"] = json!("Audit");
            }
            mnp(ns, "egress-guard", spec)
        }
        8 if i.is_multiple_of(5) => mnp(
            ns,
            "api-http",
            json!({"podSelector": {"matchLabels": {"tier": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "api"}}}],
                         "ports": [{"port": 8080}],
                         "http": [{"method": "GET", "pathPrefix": "/api/"},
                                  {"method": "POST", "path": "/login", "headers": [{"name": "X-Token"}]}]}]}),
        ),
        8 => mnp(
            ns,
            "udp-nodeports",
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns_name((i + 1) % NAMESPACES)}},
                                   "podSelector": {"matchLabels": {"tier": "web"}}}],
                         "ports": [{"protocol": "UDP", "port": 30000, "endPort": 32767}, {"protocol": "SCTP", "port": 9999}]}]}),
        ),
        _ => {
            let mut spec = json!({
                "namespaceSelector": {"matchLabels": {"team": team(i)}},
                "podSelector": {"matchLabels": {"tier": TIERS[i % TIERS.len()]}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                             "ports": [{"port": 9100}]}],
                "egress": [{"action": "Deny", "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]});
            if i % 20 == 7 {
                spec["egress"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"action": "Deny", "to": [{"entities": ["host"]}], "ports": [{"port": 22}]}));
            }
            if i.is_multiple_of(10) {
                spec["prefilter"] = json!({"denySources": [format!("192.0.2.{i}/32")]});
            }
            Policy::from_value(json!({"apiVersion": "moat.dev/v1alpha1",
                "kind": "MoatClusterNetworkPolicy", "metadata": {"name": format!("cluster-{i}")},
                "spec": spec}))
            .unwrap()
        }
    }
}

/// Lower bounds a compile of the bench model must reach; computed from the model so that a
/// change of the generator cannot silently weaken them.
struct Expect {
    endpoints: usize,
    addresses: usize,
    policies: usize,
}

impl Expect {
    fn of(m: &Model) -> Self {
        let running = m.endpoints.iter().filter(|e| e.phase == Phase::Running);
        Expect {
            endpoints: running
                .clone()
                .filter(|e| e.node == m.local_node && !e.host_network)
                .count(),
            addresses: running
                .filter(|e| !e.host_network)
                .map(|e| e.addresses.len())
                .sum(),
            policies: m.policies.len(),
        }
    }

    /// Panics unless `s` is the full state of the bench model.
    fn check(&self, s: &DesiredState) {
        let m = &s.maps;
        assert_eq!(m.endpoints.len(), self.endpoints, "local endpoints");
        assert!(
            m.ipcache.len() > self.addresses,
            "ipcache {}",
            m.ipcache.len()
        );
        assert!(
            m.exact.len() + m.prefixes.len() > 50 * self.endpoints,
            "policy entries {} + {}",
            m.exact.len(),
            m.prefixes.len()
        );
        assert!(!s.l7.is_empty() && !m.prefilter.is_empty());
        assert_eq!(s.policies.len(), self.policies);
        let refused: Vec<_> = s.policies.iter().filter(|(_, o)| !o.accepted).collect();
        assert!(refused.is_empty(), "refused: {refused:?}");
    }
}

/// (median, min, max) of `xs`.
fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    (median, xs[0], xs[n - 1])
}

/// One incremental change: compile ms and diff ms.
type Split = (f64, f64);

/// Compiles `model` with the agent's compiler (which last compiled the base model) and
/// orders the delta against the realized base state; checks the state and that the maps
/// changed; then compiles the base model again (untimed), so every change starts from the
/// base.
fn incremental(
    compiler: &mut Compiler,
    model: &Model,
    base: &Model,
    realized: &mut RealizedState,
    expect: &Expect,
    what: &str,
) -> Split {
    let t = Instant::now();
    let delta = compiler.compile(model).expect("compile");
    let compiled = t.elapsed();
    let ops = plan(&delta, &compiler.state().maps, realized);
    let total = t.elapsed();
    expect.check(compiler.state());
    assert!(ops.len() > 1, "{what} changed no map");
    for op in &ops {
        op.apply(realized);
    }
    assert_eq!(realized.maps, compiler.state().maps, "{what}: the delta");
    let back = compiler.compile(base).expect("compile");
    for op in plan(&back, &compiler.state().maps, realized) {
        op.apply(realized);
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    (ms(compiled), ms(total - compiled))
}

/// Pins the process to the last CPU it may use, so every figure is one core's.
fn pin() -> usize {
    let me = nix::unistd::Pid::from_raw(0);
    let allowed = nix::sched::sched_getaffinity(me).expect("affinity");
    let cpu = (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&c| allowed.is_set(c).unwrap_or(false))
        .expect("an allowed CPU");
    let mut one = nix::sched::CpuSet::new();
    one.set(cpu).expect("cpu");
    nix::sched::sched_setaffinity(me, &one).expect("pin to one CPU");
    cpu
}

fn main() {
    let cpu = pin();
    let base = model();
    let expect = Expect::of(&base);
    let pods = base.endpoints.len();
    let local_share = expect.endpoints as f64 / pods as f64;
    println!(
        "model: {pods} pods ({} local endpoints, {:.0}% of the pods), {} namespaces, {} nodes, \
         {} policies; pinned to CPU {cpu}",
        expect.endpoints,
        local_share * 100.0,
        base.namespaces.len(),
        base.nodes.len(),
        base.policies.len()
    );

    // Full compile from empty allocations.
    let mut full = Vec::with_capacity(FULL_RUNS);
    let mut first = None;
    for _ in 0..FULL_RUNS {
        let t = Instant::now();
        let out =
            compile(&base, &Allocations::default(), &CompileConfig::default()).expect("compile");
        full.push(t.elapsed().as_secs_f64());
        expect.check(&out.0);
        match &first {
            Some(f) => assert_eq!(f, &out, "compile is not deterministic"),
            None => first = Some(out),
        }
    }
    let (state, alloc) = first.expect("one run");
    let mut realized = RealizedState {
        maps: state.maps.clone(),
        revision: 1,
    };
    // The agent's compiler, after its first compile of the base model.
    let mut compiler = Compiler::new(CompileConfig::default(), alloc.clone());
    compiler.compile(&base).expect("compile");
    assert_eq!(
        compiler.state(),
        &state,
        "the compiler's state is compile's"
    );
    let m = &state.maps;
    let size = json!({"ipcache": m.ipcache.len(), "policy_exact": m.exact.len(),
        "policy_prefixes": m.prefixes.len(), "rulesets": alloc.rulesets.assigned.len(),
        "l7_slots": state.l7.len()});
    println!("state: {size}");
    drop(state);

    // Every change is compiled by the agent's compiler, then the base model again.
    let mut measure =
        |m: &Model, what: &str| incremental(&mut compiler, m, &base, &mut realized, &expect, what);

    // One pod relabelled (a canary promoted or rolled back: `version` flips), over pods spread
    // across namespaces and nodes; every fourth is a local one.
    let mut pod = Vec::with_capacity(EDITS);
    let mut local_edits = 0;
    for e in 0..EDITS {
        let g = if e.is_multiple_of(4) {
            (0..pods)
                .map(|k| (k + e * 389) % pods)
                .find(|&k| base.endpoints[k].node == LOCAL_NODE)
                .expect("a local pod")
        } else {
            (e * 419 + 17) % pods
        };
        let mut m = base.clone();
        let ep = &mut m.endpoints[g];
        if ep.phase != Phase::Running || ep.host_network {
            continue;
        }
        local_edits += usize::from(ep.node == LOCAL_NODE);
        let v = ep.labels.get_mut("version").expect("version label");
        *v = if v == "v1" { "v2" } else { "v1" }.into();
        ep.revision = Some("2".into());
        let what = format!("relabelling pod {}", ep.key());
        pod.push(measure(&m, &what));
    }
    assert!(pod.len() >= 20, "{} pod changes", pod.len());

    // One policy edited: policy 2 of a namespace gets another port or another peer app.
    let mut policy_edits = Vec::with_capacity(EDITS);
    for e in 0..EDITS {
        let i = (e * 37 + 3) % NAMESPACES;
        let mut m = base.clone();
        m.policies[i * 10 + 2] = policy(i, 2, e + 1);
        let what = format!("edit {e} of {}", m.policies[i * 10 + 2].reference());
        policy_edits.push(measure(&m, &what));
    }

    // One pod created on another node (a replica more of an app): not taken apart
    // incrementally (the identities are computed whole), measured for the record.
    let mut added = Vec::with_capacity(EDITS / 3);
    for e in 0..EDITS / 3 {
        let g = (0..pods)
            .map(|k| (k + e * 613 + 5) % pods)
            .find(|&k| {
                let ep = &base.endpoints[k];
                ep.node != LOCAL_NODE && ep.phase == Phase::Running && !ep.host_network
            })
            .expect("a remote pod");
        let mut m = base.clone();
        let mut ep = m.endpoints[g].clone();
        ep.name = format!("{}-extra", ep.name);
        ep.addresses = vec![format!("10.250.0.{}", e + 1).parse().unwrap()];
        let what = format!("creating pod {}", ep.key());
        m.endpoints.push(ep);
        added.push(measure(&m, &what));
    }

    let mut kinds = BTreeMap::new();
    for p in &base.policies {
        *kinds.entry(p.reference().kind.as_str()).or_insert(0) += 1;
    }
    let params = json!({
        "pods": pods, "namespaces": NAMESPACES, "nodes": NODES, "policies": base.policies.len(),
        "policy_kinds": kinds,
        "local_endpoints": expect.endpoints, "local_share": local_share, "state": size,
    });
    let total = |xs: &[Split]| xs.iter().map(|(c, d)| c + d).collect::<Vec<_>>();
    let part = |xs: &[Split], f: fn(&Split) -> f64| xs.iter().map(f).collect::<Vec<_>>();
    // (name, metric, samples, target)
    let rows: Vec<(&str, &str, Vec<f64>, Option<f64>)> = vec![
        ("full_compile_s", "s", full, Some(1.0)),
        ("incremental_pod_ms", "ms", total(&pod), Some(10.0)),
        (
            "incremental_pod_compile_ms",
            "ms",
            part(&pod, |s| s.0),
            None,
        ),
        ("incremental_pod_diff_ms", "ms", part(&pod, |s| s.1), None),
        (
            "incremental_policy_ms",
            "ms",
            total(&policy_edits),
            Some(10.0),
        ),
        (
            "incremental_policy_compile_ms",
            "ms",
            part(&policy_edits, |s| s.0),
            None,
        ),
        (
            "incremental_policy_diff_ms",
            "ms",
            part(&policy_edits, |s| s.1),
            None,
        ),
        ("pod_created_ms", "ms", total(&added), None),
    ];
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>5}  target",
        "figure", "median", "min", "max", "runs"
    );
    let mut results = Vec::new();
    let mut targets = Vec::new();
    for (name, metric, samples, limit) in &rows {
        let (value, min, max) = stats(samples);
        let verdict = limit.map_or(String::new(), |l| {
            format!("<= {l} {}", if value <= l { "met" } else { "MISSED" })
        });
        println!(
            "{name:<30} {value:>9.3} {min:>9.3} {max:>9.3} {:>5}  {verdict}",
            samples.len()
        );
        let mut p = params.clone();
        if name.starts_with("incremental_pod") {
            p["local_pod_changes"] = json!(local_edits);
        }
        results.push(
            json!({"name": name, "metric": metric, "value": value, "min": min,
            "max": max, "runs": samples.len(), "params": p}),
        );
        if let Some(limit) = limit {
            targets.push(
                json!({"name": name, "value": value, "op": "<=", "limit": limit,
                "met": value <= *limit,
                "from": format!("median of {name} (compile + diff where incremental)")}),
            );
        }
    }
    let out = json!({
        "bench": "compiler",
        "measured_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "method": format!("one process pinned to one CPU, wall clock. Full: \
            moat::compiler::compile from empty allocations, median of {FULL_RUNS} runs. \
            Incremental: one pod's label changed ({} pods) or one policy's port or peer selector \
            changed ({} edits), resourceVersion bumped, each compiled by the agent's \
            moat::compiler::Compiler after the base model and its delta ordered \
            (compiler::diff::plan) against the realized base state, then the base model \
            compiled again untimed; _compile_ms and _diff_ms are the two parts. Every compile \
            checked for its endpoints, policy entries, ipcache, L7 rules and accepted policies, \
            every incremental one for a non-empty batch that takes the realized maps to the \
            compiler's. pod_created_ms: a pod more on another node ({} pods), compile + batch, \
            no target", pod.len(), policy_edits.len(), added.len()),
        "results": results,
        "targets": targets,
    });
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("compiler.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}
