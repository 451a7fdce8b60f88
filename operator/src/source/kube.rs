//! The operator's source: the Kubernetes API, through kube-runtime reflectors (a watcher plus a
//! store per kind, with the default backoff) for Pods, Namespaces, Nodes, NetworkPolicies,
//! MoatNetworkPolicies and MoatClusterNetworkPolicies.
//!
//! Every running pod of the cluster goes into the model with its IPs, labels and named ports;
//! hostNetwork pods are marked (they are their node); finished pods (Succeeded, Failed) are
//! left out, their IPs get reused. The pods of this node (`--node-name`) are the local
//! endpoints: their host-side interface is found by a route lookup ([`resolve`]; which CNIs
//! that covers is documented there), and a pod whose interface cannot be found is reported in
//! [`SourceState::errors`] by name, with what the lookup found.
//!
//! Nothing is published before every kind has been listed once: a model with pods but without
//! the policies would open what is enforced. After that, a new [`SourceState`] is published
//! when the stores change, bursts coalesced (50 ms of quiet, at most 250 ms after the first
//! change), and only when the model (its digest) or the errors differ from the last published.
//! Status writes, pod status churn and other fields that do not reach the model therefore
//! publish nothing.
pub mod resolve;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use ::kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace as KNamespace, Node as KNode, Pod},
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, time::Instant};

pub use resolve::InterfaceResolver;

use super::{SourceState, digest::digest_of};
use crate::{
    api::{MoatClusterNetworkPolicy, MoatNetworkPolicy, Protocol},
    model::{ContainerPort, Endpoint, Model, Namespace, Node, Phase, Policy},
};

/// Why the kube source stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the netlink socket for route lookups: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("every watch stream ended")]
    StreamsEnded,
}

/// How bursts of changes are coalesced into one publication.
#[derive(Clone, Copy, Debug)]
pub struct Settle {
    /// Publish once nothing changed for this long...
    pub quiet: Duration,
    /// ...but never later than this after the first change of a burst.
    pub max: Duration,
    /// Retry local pods whose interface could not be found after this long (the CNI may not
    /// have installed the route yet).
    pub retry: Duration,
}

impl Default for Settle {
    fn default() -> Self {
        Settle {
            quiet: Duration::from_millis(50),
            max: Duration::from_millis(250),
            retry: Duration::from_secs(2),
        }
    }
}

/// The reflector stores of the policy kinds, shared with the status writer, which reads the
/// objects' uids (for Events) and their current status (to write only what differs).
#[derive(Clone)]
pub struct PolicyStores {
    pub network_policies: Store<NetworkPolicy>,
    pub moat_policies: Store<MoatNetworkPolicy>,
    pub moat_cluster_policies: Store<MoatClusterNetworkPolicy>,
}

/// The kube source: reflectors, model building, interface resolution.
pub struct KubeSource {
    client: Client,
    node_name: String,
    resolver: Arc<dyn InterfaceResolver>,
    settle: Settle,
    pods: (Store<Pod>, Option<reflector::store::Writer<Pod>>),
    namespaces: (
        Store<KNamespace>,
        Option<reflector::store::Writer<KNamespace>>,
    ),
    nodes: (Store<KNode>, Option<reflector::store::Writer<KNode>>),
    nps: (
        Store<NetworkPolicy>,
        Option<reflector::store::Writer<NetworkPolicy>>,
    ),
    mnps: (
        Store<MoatNetworkPolicy>,
        Option<reflector::store::Writer<MoatNetworkPolicy>>,
    ),
    mcnps: (
        Store<MoatClusterNetworkPolicy>,
        Option<reflector::store::Writer<MoatClusterNetworkPolicy>>,
    ),
}

fn store<K>() -> (Store<K>, Option<reflector::store::Writer<K>>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (r, w) = reflector::store();
    (r, Some(w))
}

/// Runs the kube source with the netlink resolver and default settling until `tx` has no
/// receiver left.
#[cfg(target_os = "linux")]
pub async fn run(
    client: Client,
    node_name: String,
    tx: watch::Sender<Arc<SourceState>>,
) -> Result<(), Error> {
    KubeSource::new(client, node_name)?.run(tx).await
}

impl KubeSource {
    /// With the netlink resolver (needs a tokio runtime; opens a netlink socket in the
    /// current network namespace).
    #[cfg(target_os = "linux")]
    pub fn new(client: Client, node_name: String) -> Result<Self, Error> {
        let resolver = resolve::NetlinkResolver::new().map_err(Error::Netlink)?;
        Ok(Self::with_resolver(client, node_name, Arc::new(resolver)))
    }

    pub fn with_resolver(
        client: Client,
        node_name: String,
        resolver: Arc<dyn InterfaceResolver>,
    ) -> Self {
        KubeSource {
            client,
            node_name,
            resolver,
            settle: Settle::default(),
            pods: store(),
            namespaces: store(),
            nodes: store(),
            nps: store(),
            mnps: store(),
            mcnps: store(),
        }
    }

    pub fn settle(mut self, settle: Settle) -> Self {
        self.settle = settle;
        self
    }

    /// Readers of the policy stores, for [`crate::agent::kube_status`].
    pub fn policy_stores(&self) -> PolicyStores {
        PolicyStores {
            network_policies: self.nps.0.clone(),
            moat_policies: self.mnps.0.clone(),
            moat_cluster_policies: self.mcnps.0.clone(),
        }
    }

    /// Watches until `tx` has no receiver left.
    pub async fn run(mut self, tx: watch::Sender<Arc<SourceState>>) -> Result<(), Error> {
        let c = &self.client;
        let streams: Vec<BoxStream<'static, Signal>> = vec![
            reflect(
                0,
                Api::<KNamespace>::all(c.clone()),
                self.namespaces.1.take(),
                |_| {},
            ),
            reflect(1, Api::<KNode>::all(c.clone()), self.nodes.1.take(), strip),
            reflect(2, Api::<Pod>::all(c.clone()), self.pods.1.take(), strip_pod),
            reflect(
                3,
                Api::<NetworkPolicy>::all(c.clone()),
                self.nps.1.take(),
                strip,
            ),
            reflect(
                4,
                Api::<MoatNetworkPolicy>::all(c.clone()),
                self.mnps.1.take(),
                strip,
            ),
            reflect(
                5,
                Api::<MoatClusterNetworkPolicy>::all(c.clone()),
                self.mcnps.1.take(),
                strip,
            ),
        ];
        let mut events = futures::stream::select_all(streams);
        let mut ready = [false; KINDS.len()];
        let mut watch_errors: [Option<String>; KINDS.len()] = Default::default();
        let mut resolved: HashMap<(String, String), Result<String, String>> = HashMap::new();
        let mut last: Option<(String, Vec<String>)> = None;
        // First change of the current burst, and the latest.
        let mut burst: Option<(Instant, Instant)> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            let deadline = burst
                .map(|(first, latest)| (latest + self.settle.quiet).min(first + self.settle.max))
                .or(retry_at);
            tokio::select! {
                ev = events.next() => {
                    let Some(Signal { kind, event }) = ev else { return Err(Error::StreamsEnded) };
                    match event {
                        Ok(done) => {
                            if done {
                                ready[kind] = true;
                            }
                            watch_errors[kind] = None;
                        }
                        // 410 Gone: the watcher relists by itself; the store keeps the last
                        // full list until the new one is complete. Not worth reporting.
                        Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                            tracing::debug!(kind = KINDS[kind], "watch expired (410 Gone); relisting");
                        }
                        Err(e) => {
                            tracing::warn!(kind = KINDS[kind], error = %e, "watch failed; retrying with backoff");
                            watch_errors[kind] = Some(format!("{} watch: {e}", KINDS[kind]));
                        }
                    }
                    let now = Instant::now();
                    burst = Some(burst.map_or((now, now), |(first, _)| (first, now)));
                }
                _ = sleep_until(deadline) => {
                    burst = None;
                    retry_at = None;
                    if !ready.iter().all(|r| *r) {
                        let missing: Vec<&str> = KINDS.iter().zip(ready).filter(|(_, r)| !r).map(|(k, _)| *k).collect();
                        tracing::info!(?missing, "waiting for the first list of every kind before publishing");
                        continue;
                    }
                    let state = self.build(&mut resolved).await;
                    let mut errors = state.errors.clone();
                    errors.extend(watch_errors.iter().flatten().cloned());
                    if resolved.values().any(|r| r.is_err()) {
                        retry_at = Some(Instant::now() + self.settle.retry);
                        // Forget failures so that the retry looks again.
                        resolved.retain(|_, r| r.is_ok());
                    }
                    let key = (state.digest.clone(), errors.clone());
                    if last.as_ref() == Some(&key) {
                        continue;
                    }
                    last = Some(key);
                    let state = SourceState { errors, ..state };
                    tracing::debug!(digest = %state.digest, errors = state.errors.len(), "publishing source state");
                    if tx.send(Arc::new(state)).is_err() {
                        return Ok(());
                    }
                }
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    /// The model from the stores, local pods' interfaces resolved (cached per pod uid and
    /// resourceVersion in `resolved`).
    async fn build(
        &self,
        resolved: &mut HashMap<(String, String), Result<String, String>>,
    ) -> SourceState {
        let pods = self.pods.0.state();
        let mut model = build_model(
            &self.node_name,
            &self.namespaces.0.state(),
            &self.nodes.0.state(),
            &pods,
            &self.nps.0.state(),
            &self.mnps.0.state(),
            &self.mcnps.0.state(),
        );
        let by_key: HashMap<String, &Arc<Pod>> = pods
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                    p,
                )
            })
            .collect();
        let mut errors = Vec::new();
        let mut live = std::collections::HashSet::new();
        for ep in &mut model.endpoints {
            if ep.node != self.node_name || ep.host_network {
                continue;
            }
            let Some(pod) = by_key.get(&ep.key()) else {
                continue;
            };
            let cache_key = (
                pod.uid().unwrap_or_else(|| ep.key()),
                format!(
                    "{}|{:?}",
                    pod.resource_version().unwrap_or_default(),
                    ep.addresses
                ),
            );
            live.insert(cache_key.clone());
            let r = match resolved.get(&cache_key) {
                Some(r) => r.clone(),
                None => {
                    let r = self.resolver.resolve(&ep.addresses).await;
                    resolved.insert(cache_key, r.clone());
                    r
                }
            };
            match r {
                Ok(ifname) => ep.interface = Some(ifname),
                Err(e) => {
                    let ips: Vec<String> = ep.addresses.iter().map(|a| a.to_string()).collect();
                    errors.push(format!(
                        "pod {} on node {} ({}): host-side interface not found, not enforced: {e}",
                        ep.key(),
                        ep.node,
                        ips.join(", ")
                    ));
                }
            }
        }
        resolved.retain(|k, _| live.contains(k));
        let json = serde_json::to_vec(&model).expect("the model serializes");
        SourceState {
            digest: digest_of([("model", json.as_slice())]),
            model,
            uplinks: Vec::new(),
            errors,
            observed: Some(std::time::Instant::now()),
        }
    }
}

/// Watched kinds, in the order of the `kind` index of [`Signal`].
const KINDS: [&str; 6] = [
    "Namespace",
    "Node",
    "Pod",
    "NetworkPolicy",
    "MoatNetworkPolicy",
    "MoatClusterNetworkPolicy",
];

/// A store changed (`Ok(true)`: a full list has been applied) or a watch failed.
struct Signal {
    kind: usize,
    event: Result<bool, watcher::Error>,
}

fn reflect<K>(
    kind: usize,
    api: Api<K>,
    writer: Option<reflector::store::Writer<K>>,
    modify: fn(&mut K),
) -> BoxStream<'static, Signal>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = writer.expect("KubeSource::run runs once");
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(modify);
    let stream: std::pin::Pin<Box<dyn Stream<Item = _> + Send>> =
        Box::pin(reflector::reflector(writer, stream));
    stream
        .filter_map(move |ev| async move {
            match ev {
                Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => None,
                Ok(watcher::Event::InitDone) => Some(Signal {
                    kind,
                    event: Ok(true),
                }),
                Ok(_) => Some(Signal {
                    kind,
                    event: Ok(false),
                }),
                Err(e) => Some(Signal {
                    kind,
                    event: Err(e),
                }),
            }
        })
        .boxed()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Drops what the agent never reads, before it reaches a store (memory: every agent holds
/// every pod of the cluster).
fn strip<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    if let Some(a) = o.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

fn strip_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(s) = p.status.as_mut() {
        s.conditions = None;
        s.container_statuses = None;
        s.init_container_statuses = None;
        s.ephemeral_container_statuses = None;
    }
}

/// The model from the objects of the stores, without interfaces (those need netlink).
/// Deterministic: everything sorted, policies stripped of fields that change without
/// changing the policy (status, resourceVersion, managedFields, annotations).
pub fn build_model(
    local_node: &str,
    namespaces: &[Arc<KNamespace>],
    nodes: &[Arc<KNode>],
    pods: &[Arc<Pod>],
    network_policies: &[Arc<NetworkPolicy>],
    moat_policies: &[Arc<MoatNetworkPolicy>],
    moat_cluster_policies: &[Arc<MoatClusterNetworkPolicy>],
) -> Model {
    let mut model = Model {
        local_node: local_node.to_owned(),
        ..Model::default()
    };
    model.namespaces = namespaces
        .iter()
        .map(|n| Namespace {
            name: n.name_any(),
            labels: n.labels().clone(),
        })
        .collect();
    model.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    model.nodes = nodes.iter().map(|n| node(n)).collect();
    model.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    model.endpoints = pods.iter().filter_map(|p| endpoint(p)).collect();
    model.endpoints.sort_by_key(|e| e.key());
    let mut policies: BTreeMap<_, Policy> = BTreeMap::new();
    for p in network_policies {
        let mut p = (**p).clone();
        clean_meta(&mut p.metadata);
        let p = Policy::NetworkPolicy(p);
        policies.insert(p.reference(), p);
    }
    for p in moat_policies {
        let mut p = (**p).clone();
        clean_meta(&mut p.metadata);
        p.status = None;
        let p = Policy::MoatNetworkPolicy(p);
        policies.insert(p.reference(), p);
    }
    for p in moat_cluster_policies {
        let mut p = (**p).clone();
        clean_meta(&mut p.metadata);
        p.status = None;
        let p = Policy::MoatClusterNetworkPolicy(p);
        policies.insert(p.reference(), p);
    }
    model.policies = policies.into_values().collect();
    model
}

fn clean_meta(m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    m.managed_fields = None;
    m.resource_version = None;
    m.annotations = None;
}

fn node(n: &KNode) -> Node {
    let mut addresses: Vec<IpAddr> = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.dedup();
    Node {
        name: n.name_any(),
        addresses,
    }
}

/// A pod as the model sees it; `None` for pods that own no address: finished, unscheduled or
/// not yet given an IP.
pub fn endpoint(p: &Pod) -> Option<Endpoint> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let node = spec.node_name.clone()?;
    let mut addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|a| a.ip.parse().ok())
        .collect();
    if addresses.is_empty() {
        addresses.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|a| a.parse::<IpAddr>().ok()),
        );
    }
    if addresses.is_empty() {
        return None;
    }
    // Named ports of the containers and of sidecars (restartable init containers), which
    // serve for the pod's whole life.
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut ports: Vec<ContainerPort> = spec
        .containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|cp| {
            let name = cp.name.clone()?;
            let protocol = Protocol::parse(cp.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(cp.container_port).ok()?;
            Some(ContainerPort {
                name,
                protocol,
                port,
            })
        })
        .collect();
    ports.sort();
    ports.dedup();
    Some(Endpoint {
        name: p.name_any(),
        namespace: p.namespace().unwrap_or_else(|| "default".into()),
        node,
        labels: p.labels().clone(),
        addresses,
        ports,
        interface: None,
        host_network: spec.host_network.unwrap_or(false),
        phase: Phase::Running,
        revision: p.resource_version(),
    })
}
