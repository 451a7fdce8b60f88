//! The kube source against a mocked API server: the exact list/watch requests per resource,
//! the model it publishes (local vs remote endpoints by node, hostNetwork and finished pods,
//! named ports, policies stripped of volatile fields), interface resolution behind the
//! injectable resolver (and its loud failure), coalescing, and the relist after `410 Gone`.
mod kube_fixture;

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Method;
use kube_fixture::*;
use moat::{
    model::{Endpoint, PolicyKind},
    source::{
        SourceState,
        digest::digest_of,
        kube::{InterfaceResolver, KubeSource, Settle},
    },
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Resolves from a fixed table and records every lookup.
#[derive(Default)]
struct FakeResolver {
    table: Vec<(IpAddr, Result<String, String>)>,
    calls: Mutex<Vec<Vec<IpAddr>>>,
}

impl FakeResolver {
    fn new(table: &[(&str, Result<&str, &str>)]) -> Arc<Self> {
        Arc::new(FakeResolver {
            table: table
                .iter()
                .map(|(ip, r)| {
                    (
                        ip.parse().unwrap(),
                        r.map(str::to_owned).map_err(str::to_owned),
                    )
                })
                .collect(),
            calls: Mutex::default(),
        })
    }
    fn calls(&self) -> Vec<Vec<IpAddr>> {
        self.calls.lock().unwrap().clone()
    }
}

impl InterfaceResolver for FakeResolver {
    fn resolve<'a>(
        &'a self,
        ips: &'a [IpAddr],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        self.calls.lock().unwrap().push(ips.to_vec());
        let r = self
            .table
            .iter()
            .find(|(ip, _)| ips.contains(ip))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Err("no route".into()));
        Box::pin(async move { r })
    }
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": "1", "labels": labels}})
}

fn node(name: &str, internal: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "resourceVersion": "1"},
           "status": {"addresses": [
               {"type": "InternalIP", "address": internal},
               {"type": "Hostname", "address": name}]}})
}

fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, phase: &str, extra: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                     "resourceVersion": "10", "labels": {"pod": name},
                     "annotations": {"noise": "x"},
                     "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "moat",
                 "ports": [{"name": "serve-80-tcp", "containerPort": 80},
                           {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
                           {"containerPort": 82}]}]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}]},
    });
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{"ip": ip}]);
    }
    merge(&mut p, extra);
    p
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn network_policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns, "uid": "uid-np", "generation": 1,
                        "resourceVersion": "7",
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
}

fn moat_policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy",
           "metadata": {"name": name, "namespace": ns, "uid": "uid-mnp", "generation": 3,
                        "resourceVersion": "8",
                        "managedFields": [{"manager": "moat-agent", "operation": "Apply"}]},
           "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"action": "Deny", "from": [{"entities": ["world"]}]}]},
           "status": {"observedGeneration": 2, "selectedEndpoints": 1}})
}

fn cluster_policy(name: &str) -> Value {
    json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatClusterNetworkPolicy",
           "metadata": {"name": name, "uid": "uid-mcnp", "generation": 1, "resourceVersion": "9"},
           "spec": {"egress": [{"action": "Deny", "to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}]}]}})
}

const LIST: &str = "limit=500";
fn watch_uri(path: &str, rv: &str) -> String {
    format!("{path}?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={rv}")
}
fn list_uri(path: &str) -> String {
    format!("{path}?&{LIST}")
}

const NS: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const NPS: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const MNPS: &str = "/apis/moat.dev/v1alpha1/moatnetworkpolicies";
const MCNPS: &str = "/apis/moat.dev/v1alpha1/moatclusternetworkpolicies";

/// Every kind but pods: listed once, then a watch that says nothing.
fn quiet_kinds(r: Routed) -> Routed {
    r.script(
        NS,
        vec![
            step(
                Method::GET,
                list_uri(NS),
                list(
                    "v1",
                    "Namespace",
                    "50",
                    vec![
                        namespace("x", json!({"ns": "x"})),
                        namespace("y", json!({"ns": "y"})),
                    ],
                ),
            ),
            step(Method::GET, watch_uri(NS, "50"), Reply::Park),
        ],
    )
    .script(
        NODES,
        vec![
            step(
                Method::GET,
                list_uri(NODES),
                list(
                    "v1",
                    "Node",
                    "51",
                    vec![node("node-1", "172.18.0.2"), node("node-2", "172.18.0.3")],
                ),
            ),
            step(Method::GET, watch_uri(NODES, "51"), Reply::Park),
        ],
    )
    .script(
        NPS,
        vec![
            step(
                Method::GET,
                list_uri(NPS),
                list(
                    "networking.k8s.io/v1",
                    "NetworkPolicy",
                    "52",
                    vec![network_policy("x", "np")],
                ),
            ),
            step(Method::GET, watch_uri(NPS, "52"), Reply::Park),
        ],
    )
    .script(
        MNPS,
        vec![
            step(
                Method::GET,
                list_uri(MNPS),
                list(
                    "moat.dev/v1alpha1",
                    "MoatNetworkPolicy",
                    "53",
                    vec![moat_policy("x", "mnp")],
                ),
            ),
            step(Method::GET, watch_uri(MNPS, "53"), Reply::Park),
        ],
    )
    .script(
        MCNPS,
        vec![
            step(
                Method::GET,
                list_uri(MCNPS),
                list(
                    "moat.dev/v1alpha1",
                    "MoatClusterNetworkPolicy",
                    "54",
                    vec![cluster_policy("no-metadata")],
                ),
            ),
            step(Method::GET, watch_uri(MCNPS, "54"), Reply::Park),
        ],
    )
}

fn settle() -> Settle {
    Settle {
        quiet: Duration::from_millis(20),
        max: Duration::from_millis(100),
        retry: Duration::from_secs(3600),
    }
}

async fn next_state(rx: &mut watch::Receiver<Arc<SourceState>>) -> Arc<SourceState> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a source state within 10 s")
        .expect("source alive");
    rx.borrow_and_update().clone()
}

fn ep<'a>(s: &'a SourceState, key: &str) -> Option<&'a Endpoint> {
    s.model.endpoints.iter().find(|e| e.key() == key)
}

#[tokio::test]
async fn publishes_the_cluster_with_local_endpoints_resolved_and_follows_watch_events() {
    let (client, handle) = mock_client();
    let pods = vec![
        pod("x", "a", "node-1", Some("10.244.1.5"), "Running", json!({})),
        pod("x", "b", "node-2", Some("10.244.2.7"), "Running", json!({})),
        pod(
            "y",
            "hostnet",
            "node-1",
            Some("172.18.0.2"),
            "Running",
            json!({"spec": {"hostNetwork": true}}),
        ),
        pod(
            "x",
            "done",
            "node-1",
            Some("10.244.1.6"),
            "Succeeded",
            json!({}),
        ),
        pod(
            "x",
            "failed",
            "node-2",
            Some("10.244.2.8"),
            "Failed",
            json!({}),
        ),
        pod("x", "no-ip-yet", "node-1", None, "Pending", json!({})),
        pod(
            "x",
            "bridged",
            "node-1",
            Some("10.244.1.9"),
            "Running",
            json!({}),
        ),
    ];
    let added = pod(
        "x",
        "d",
        "node-1",
        Some("10.244.1.10"),
        "Running",
        json!({"metadata": {"resourceVersion": "101"}}),
    );
    // Only the pod's status changes (what kubelet does all the time): nothing to publish.
    let mut churn = pod(
        "x",
        "b",
        "node-2",
        Some("10.244.2.7"),
        "Running",
        json!({"metadata": {"resourceVersion": "102"}}),
    );
    churn["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    let routed = quiet_kinds(Routed::new()).script(
        PODS,
        vec![
            step(Method::GET, list_uri(PODS), list("v1", "Pod", "100", pods)),
            step(
                Method::GET,
                watch_uri(PODS, "100"),
                Reply::Events(vec![watch_event("ADDED", added)]),
            ),
            step(
                Method::GET,
                watch_uri(PODS, "101"),
                Reply::Events(vec![watch_event("MODIFIED", churn)]),
            ),
            step(Method::GET, watch_uri(PODS, "102"), Reply::Park),
        ],
    );
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let server = routed.serve(handle, done_tx);

    let resolver = FakeResolver::new(&[
        ("10.244.1.5", Ok("veth-a")),
        ("10.244.1.10", Ok("veth-d")),
        (
            "10.244.1.9",
            Err("the route to 10.244.1.9 is a /24 network route to cni0 (bridge)"),
        ),
    ]);
    let (tx, mut rx) = watch::channel(Arc::new(SourceState::default()));
    let src = KubeSource::with_resolver(client, "node-1".into(), resolver.clone()).settle(settle());
    let task = tokio::spawn(src.run(tx));

    // The watch events arrive right after the lists, within one burst or two: wait until the
    // added pod is in.
    let mut s = next_state(&mut rx).await;
    while ep(&s, "x/d").is_none() {
        s = next_state(&mut rx).await;
    }
    let log = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .unwrap()
        .unwrap();

    // Exactly one list and the watches, per resource, in order.
    let pod_requests: Vec<String> = log
        .iter()
        .filter(|r| r.path() == PODS)
        .map(Recorded::line)
        .collect();
    assert_eq!(
        pod_requests,
        [
            format!("GET {}", list_uri(PODS)),
            format!("GET {}", watch_uri(PODS, "100")),
            format!("GET {}", watch_uri(PODS, "101")),
            format!("GET {}", watch_uri(PODS, "102")),
        ]
    );
    assert!(log.iter().all(|r| r.method == Method::GET));

    let m = &s.model;
    assert_eq!(m.local_node, "node-1");
    assert_eq!(
        m.namespaces
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["x", "y"]
    );
    assert_eq!(m.namespaces[0].labels["ns"], "x");
    assert_eq!(m.nodes.len(), 2);
    assert_eq!(
        m.nodes[0].addresses,
        ["172.18.0.2".parse::<IpAddr>().unwrap()]
    );

    // Local vs remote, by node.
    let a = ep(&s, "x/a").unwrap();
    assert_eq!(
        (a.node.as_str(), a.interface.as_deref()),
        ("node-1", Some("veth-a"))
    );
    let d = ep(&s, "x/d").unwrap();
    assert_eq!(d.interface.as_deref(), Some("veth-d"));
    let b = ep(&s, "x/b").unwrap();
    assert_eq!(
        (b.node.as_str(), b.interface.as_deref()),
        ("node-2", None),
        "remote: no interface"
    );
    let h = ep(&s, "y/hostnet").unwrap();
    assert!(h.host_network && h.interface.is_none());
    assert!(
        ep(&s, "x/done").is_none() && ep(&s, "x/failed").is_none(),
        "finished pods are left out"
    );
    assert!(
        ep(&s, "x/no-ip-yet").is_none(),
        "no address, nothing to enforce yet"
    );
    assert_eq!(ep(&s, "x/bridged").unwrap().interface, None);
    // Named ports (by name and protocol); the unnamed one does not matter.
    assert_eq!(
        a.named_port("serve-80-tcp", moat::api::Protocol::Tcp),
        Some(80)
    );
    assert_eq!(
        a.named_port("serve-81-udp", moat::api::Protocol::Udp),
        Some(81)
    );
    assert_eq!(a.ports.len(), 2);
    assert_eq!(a.labels["pod"], "a");

    // The resolver was asked about local, non-hostNetwork pods only; a pod that resolved is
    // not asked about again (a failed one is, at every rebuild).
    let calls = resolver.calls();
    let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
    let mut distinct = calls.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        [ip("10.244.1.5"), ip("10.244.1.9"), ip("10.244.1.10")]
    );
    assert_eq!(calls.iter().filter(|c| **c == ip("10.244.1.5")).count(), 1);

    // The failure is loud: the pod, its node, its address and what the lookup found.
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    let e = &s.errors[0];
    for want in ["x/bridged", "node-1", "10.244.1.9", "cni0", "not enforced"] {
        assert!(e.contains(want), "{want:?} missing from {e}");
    }

    // Policies of all three kinds, without what changes without changing the policy.
    let kinds: Vec<PolicyKind> = m.policies.iter().map(|p| p.reference().kind).collect();
    assert_eq!(
        kinds,
        [
            PolicyKind::NetworkPolicy,
            PolicyKind::MoatNetworkPolicy,
            PolicyKind::MoatClusterNetworkPolicy
        ]
    );
    let json = serde_json::to_value(m).unwrap();
    let text = json.to_string();
    for volatile in [
        "managedFields",
        "resourceVersion",
        "last-applied",
        "observedGeneration",
    ] {
        assert!(!text.contains(volatile), "{volatile} reached the model");
    }
    assert!(text.contains("uid-mnp"), "uids stay (events need them)");

    // The digest is the agreed function of the model.
    let bytes = serde_json::to_vec(m).unwrap();
    assert_eq!(s.digest, digest_of([("model", bytes.as_slice())]));

    // The status-only pod change published nothing new.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err(),
        "a change that does not reach the model publishes nothing"
    );
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    server.abort();
}

#[tokio::test]
async fn watch_gone_relists_and_the_store_is_replaced() {
    let (client, handle) = mock_client();
    let routed = quiet_kinds(Routed::new()).script(
        PODS,
        vec![
            step(
                Method::GET,
                list_uri(PODS),
                list(
                    "v1",
                    "Pod",
                    "100",
                    vec![
                        pod("x", "a", "node-1", Some("10.244.1.5"), "Running", json!({})),
                        pod("x", "b", "node-2", Some("10.244.2.7"), "Running", json!({})),
                    ],
                ),
            ),
            // The watch is too old: 410 Gone. The watcher must relist from scratch.
            step(
                Method::GET,
                watch_uri(PODS, "100"),
                Reply::Events(vec![gone()]),
            ),
            // Meanwhile x/a was deleted and x/e created: the relist is the truth.
            step(
                Method::GET,
                list_uri(PODS),
                list(
                    "v1",
                    "Pod",
                    "200",
                    vec![
                        pod("x", "b", "node-2", Some("10.244.2.7"), "Running", json!({})),
                        pod(
                            "x",
                            "e",
                            "node-1",
                            Some("10.244.1.11"),
                            "Running",
                            json!({}),
                        ),
                    ],
                ),
            ),
            step(Method::GET, watch_uri(PODS, "200"), Reply::Park),
        ],
    );
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let server = routed.serve(handle, done_tx);
    let resolver =
        FakeResolver::new(&[("10.244.1.5", Ok("veth-a")), ("10.244.1.11", Ok("veth-e"))]);
    let (tx, mut rx) = watch::channel(Arc::new(SourceState::default()));
    let src = KubeSource::with_resolver(client, "node-1".into(), resolver).settle(settle());
    let task = tokio::spawn(src.run(tx));

    let first = next_state(&mut rx).await;
    assert!(ep(&first, "x/a").is_some());
    let mut s = first.clone();
    while ep(&s, "x/e").is_none() {
        s = next_state(&mut rx).await;
        assert!(
            s.errors.is_empty(),
            "410 is routine, not an error: {:?}",
            s.errors
        );
    }
    assert!(
        ep(&s, "x/a").is_none(),
        "deleted during the gap: gone after the relist"
    );
    assert_eq!(ep(&s, "x/e").unwrap().interface.as_deref(), Some("veth-e"));
    assert_ne!(s.digest, first.digest);

    let log = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .unwrap()
        .unwrap();
    let pod_requests: Vec<String> = log
        .iter()
        .filter(|r| r.path() == PODS)
        .map(Recorded::line)
        .collect();
    assert_eq!(
        pod_requests,
        [
            format!("GET {}", list_uri(PODS)),
            format!("GET {}", watch_uri(PODS, "100")),
            format!("GET {}", list_uri(PODS)),
            format!("GET {}", watch_uri(PODS, "200")),
        ]
    );
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    server.abort();
}

#[tokio::test]
async fn nothing_is_published_before_every_kind_is_listed() {
    let (client, handle) = mock_client();
    // Everything lists except the cluster policies, whose list fails (CRD not installed).
    let mut routed = quiet_kinds(Routed::new()).script(
        PODS,
        vec![
            step(
                Method::GET,
                list_uri(PODS),
                list(
                    "v1",
                    "Pod",
                    "100",
                    vec![pod(
                        "x",
                        "a",
                        "node-1",
                        Some("10.244.1.5"),
                        "Running",
                        json!({}),
                    )],
                ),
            ),
            step(Method::GET, watch_uri(PODS, "100"), Reply::Park),
        ],
    );
    routed = routed.script(
        MCNPS,
        vec![
            step(Method::GET, list_uri(MCNPS), Reply::status(404, "NotFound")),
            step(
                Method::GET,
                list_uri(MCNPS),
                list(
                    "moat.dev/v1alpha1",
                    "MoatClusterNetworkPolicy",
                    "54",
                    vec![],
                ),
            ),
            step(Method::GET, watch_uri(MCNPS, "54"), Reply::Park),
        ],
    );
    let (done_tx, _done_rx) = tokio::sync::oneshot::channel();
    let server = routed.serve(handle, done_tx);
    let resolver = FakeResolver::new(&[("10.244.1.5", Ok("veth-a"))]);
    let (tx, mut rx) = watch::channel(Arc::new(SourceState::default()));
    let src = KubeSource::with_resolver(client, "node-1".into(), resolver).settle(settle());
    let task = tokio::spawn(src.run(tx));
    // The failed list is retried after the default backoff (~1 s); until then nothing.
    let t0 = tokio::time::Instant::now();
    let s = next_state(&mut rx).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "published before every kind was listed"
    );
    assert!(ep(&s, "x/a").is_some());
    assert!(
        s.model
            .policies
            .iter()
            .all(|p| p.reference().kind != PolicyKind::MoatClusterNetworkPolicy)
    );
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    server.abort();
}
