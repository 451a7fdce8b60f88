//! Writing what the agents learned back to the Kubernetes API: policy status and Events.
//!
//! # One writer
//!
//! Policy status holds only what does not depend on a node (validity conditions,
//! `observedGeneration`, selected endpoints of the whole cluster), so every agent would write
//! the same thing: one of them is enough, and a thousand would be a write storm. The writer is
//! elected with a `coordination.k8s.io/v1` Lease (`moat-status-writer` in the agent's
//! namespace), the way client-go's leader election does it:
//! - no Lease: create it naming this agent (a `409 Conflict` means another agent won);
//! - held by this agent: renew it (`renewTime`) every `renew_every` with a replace carrying the
//!   `resourceVersion` read, so two writers can never both succeed;
//! - held by another agent: take it over only once its `resourceVersion` has not changed for
//!   `leaseDurationSeconds` *as measured on this agent's clock* (no trust in the other node's
//!   clock), or at once if it was released (empty holder);
//! - the leader stops writing as soon as its last successful renewal is older than the lease
//!   duration (it may have been taken over), and releases the Lease when it stops.
//!
//! # No write storms
//!
//! Status is written by server-side apply (`PATCH …/status`, `application/apply-patch+yaml`,
//! field manager `moat-agent`, `force`) only when the status computed differs both from the
//! status on the object (read from the kube source's reflector store) and from what this
//! writer last wrote; `lastTransitionTime` is kept from the object while a condition's status
//! does not change, so an unchanged policy computes an identical status. Writes (patches and
//! Events) are spaced by at least `min_write_interval`. What was written is forgotten every
//! `resync_every`, so drift made by hand is corrected (if the store shows it).
//!
//! # Events
//!
//! - An invalid policy gets one Warning Event `InvalidPolicy` per generation, from the leader
//!   (for moat kinds only when the object does not already show `Invalid` for that generation,
//!   so a new leader does not repeat its predecessor's Events; upstream NetworkPolicies have no
//!   status, so a leadership change repeats their Event once).
//! - A valid policy that does not fit this node's maps gets a Warning Event `PolicyOverflow`
//!   from every agent concerned, naming its node, once per distinct message.
//!
//! Upstream NetworkPolicies (`networking.k8s.io/v1`) have no status field: they get Events only.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::ObjectReference},
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
    },
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use super::status::{AgentStatus, PolicyReport};
use crate::{
    api::{MoatClusterNetworkPolicy, MoatNetworkPolicy, PolicyStatus},
    compiler::PolicyOutcome,
    model::{PolicyKind, PolicyRef},
    source::kube::PolicyStores,
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "moat-agent";
/// The Lease that elects the status writer.
pub const LEASE_NAME: &str = "moat-status-writer";
/// `reportingController` of the Events.
pub const REPORTER: &str = "moat-agent";

/// A clock for the timestamps written (tests fix it).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// How the status writer elects itself and paces its writes.
#[derive(Clone)]
pub struct StatusConfig {
    /// Namespace of the Lease: the agent's own.
    pub lease_namespace: String,
    pub lease_name: String,
    /// `holderIdentity`: the node name by default (unique per agent of a DaemonSet).
    pub identity: Option<String>,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// At least this long between two writes (status patches and Events).
    pub min_write_interval: Duration,
    /// Forget what was written this often, so the next status is compared with the objects.
    pub resync_every: Duration,
    /// The kube source's policy stores: current status on the objects and their uids.
    pub stores: Option<PolicyStores>,
    pub clock: Clock,
}

impl StatusConfig {
    pub fn new(lease_namespace: impl Into<String>) -> Self {
        StatusConfig {
            lease_namespace: lease_namespace.into(),
            lease_name: LEASE_NAME.into(),
            identity: None,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            min_write_interval: Duration::from_millis(100),
            resync_every: Duration::from_secs(600),
            stores: None,
            clock: Arc::new(Timestamp::now),
        }
    }

    /// The Lease in the agent's namespace ([`agent_namespace`]).
    pub fn from_env() -> Self {
        Self::new(agent_namespace())
    }

    pub fn with_stores(mut self, stores: PolicyStores) -> Self {
        self.stores = Some(stores);
        self
    }
}

/// The agent's namespace: `$POD_NAMESPACE` (downward API), else the service account's
/// namespace file, else `moat-system`.
pub fn agent_namespace() -> String {
    if let Ok(ns) = std::env::var("POD_NAMESPACE")
        && !ns.is_empty()
    {
        return ns;
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "moat-system".into())
}

/// Why the status writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Writes policy status (when elected) and Events from the reconciler's [`AgentStatus`] until
/// its sender is dropped; then releases the Lease if held.
pub async fn run(
    client: Client,
    node_name: String,
    mut rx: watch::Receiver<Arc<AgentStatus>>,
    config: StatusConfig,
) -> Result<(), Error> {
    let identity = config.identity.clone().unwrap_or_else(|| node_name.clone());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance: Some(node_name.clone()),
        },
    );
    let mut w = Writer {
        client: client.clone(),
        node: node_name,
        recorder,
        config: config.clone(),
        lease: LeaseElector::new(
            Api::namespaced(client.clone(), &config.lease_namespace),
            config.lease_name.clone(),
            identity,
            config.lease_duration,
            config.clock.clone(),
        ),
        written: HashMap::new(),
        invalid_events: HashSet::new(),
        overflow_events: HashSet::new(),
        last_write: None,
    };
    let mut next_lease = Instant::now();
    let mut next_resync = Instant::now() + config.resync_every;
    loop {
        let now = Instant::now();
        if now >= next_resync {
            w.written.clear();
            next_resync = now + config.resync_every;
        }
        if now >= next_lease {
            let was = w.lease.is_leader();
            if let Err(e) = w.lease.step().await {
                warn!(error = %e, lease = %config.lease_name, "status writer lease");
            }
            let is = w.lease.is_leader();
            if is && !was {
                info!(lease = %config.lease_name, "this agent writes policy status");
                w.written.clear();
            } else if was && !is {
                info!(lease = %config.lease_name, "no longer the policy status writer");
            }
            next_lease = Instant::now() + config.renew_every;
        }
        let status = rx.borrow_and_update().clone();
        w.overflow_events(&status).await;
        if w.lease.is_leader() {
            w.policies(&status).await;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(next_lease.min(next_resync)) => {}
        }
    }
    w.lease.release().await;
    Ok(())
}

struct Writer {
    client: Client,
    node: String,
    recorder: Recorder,
    config: StatusConfig,
    lease: LeaseElector,
    /// What this writer last applied, per policy.
    written: HashMap<PolicyRef, PolicyStatus>,
    /// (policy, generation) of the InvalidPolicy Events published.
    invalid_events: HashSet<(PolicyRef, Option<i64>)>,
    /// (policy, message) of the PolicyOverflow Events published, for current overflows.
    overflow_events: HashSet<(PolicyRef, String)>,
    last_write: Option<Instant>,
}

impl Writer {
    async fn pace(&mut self) {
        if let Some(t) = self.last_write {
            tokio::time::sleep_until(t + self.config.min_write_interval).await;
        }
        self.last_write = Some(Instant::now());
    }

    async fn overflow_events(&mut self, status: &AgentStatus) {
        let current: HashSet<(PolicyRef, String)> = status
            .overflows
            .iter()
            .map(|o| (o.policy.clone(), o.message.clone()))
            .collect();
        self.overflow_events.retain(|k| current.contains(k));
        let mut todo: Vec<_> = current
            .into_iter()
            .filter(|k| !self.overflow_events.contains(k))
            .collect();
        todo.sort();
        for (policy, message) in todo {
            let ev = Event {
                type_: EventType::Warning,
                reason: "PolicyOverflow".into(),
                note: Some(truncate(&format!(
                    "node {}: {message}; what was enforced before stays",
                    self.node
                ))),
                action: "Enforce".into(),
                secondary: None,
            };
            self.pace().await;
            match self.recorder.publish(&ev, &self.reference(&policy)).await {
                Ok(()) => {
                    self.overflow_events.insert((policy, message));
                }
                Err(e) => warn!(%policy, error = %e, "publishing the overflow event"),
            }
        }
    }

    async fn policies(&mut self, status: &AgentStatus) {
        let overflowed: BTreeSet<&PolicyRef> = status.overflows.iter().map(|o| &o.policy).collect();
        let mut reports: Vec<&PolicyReport> = status.policies.iter().collect();
        reports.sort_by(|a, b| a.policy.cmp(&b.policy));
        let live: HashSet<&PolicyRef> = reports.iter().map(|r| &r.policy).collect();
        self.written.retain(|k, _| live.contains(k));
        self.invalid_events.retain(|(k, _)| live.contains(k));
        for r in reports {
            // A policy that does not fit this node is valid: status says what does not depend
            // on the node; the node's overflow is its Event.
            let valid = r.accepted || overflowed.contains(&r.policy);
            let outcome = PolicyOutcome {
                accepted: valid,
                message: if valid {
                    String::new()
                } else {
                    r.message.clone()
                },
                selected_endpoints: r.selected_endpoints,
            };
            let observed = self.observed_status(&r.policy);
            let already_invalid = observed.as_ref().is_some_and(|s| {
                s.observed_generation == r.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Invalid" && c.status == "True")
            });
            if r.policy.kind != PolicyKind::NetworkPolicy {
                let previous = self.written.get(&r.policy).cloned().or(observed.clone());
                let desired = with_transition_times(
                    outcome.status(r.generation),
                    previous.as_ref(),
                    (self.config.clock)(),
                );
                let unchanged = observed.as_ref() == Some(&desired)
                    || self.written.get(&r.policy) == Some(&desired);
                if !unchanged {
                    self.pace().await;
                    match self.apply_status(&r.policy, &desired).await {
                        Ok(()) => {
                            debug!(policy = %r.policy, "status written");
                            self.written.insert(r.policy.clone(), desired);
                        }
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => warn!(policy = %r.policy, error = %e, "writing policy status"),
                    }
                }
            }
            if !valid
                && !already_invalid
                && !self
                    .invalid_events
                    .contains(&(r.policy.clone(), r.generation))
            {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "InvalidPolicy".into(),
                    note: Some(truncate(&r.message)),
                    action: "Compile".into(),
                    secondary: None,
                };
                self.pace().await;
                match self.recorder.publish(&ev, &self.reference(&r.policy)).await {
                    Ok(()) => {
                        self.invalid_events.insert((r.policy.clone(), r.generation));
                    }
                    Err(e) => {
                        warn!(policy = %r.policy, error = %e, "publishing the invalid-policy event")
                    }
                }
            }
        }
    }

    /// The status on the object, as the kube source's store last saw it.
    fn observed_status(&self, p: &PolicyRef) -> Option<PolicyStatus> {
        let stores = self.config.stores.as_ref()?;
        match p.kind {
            PolicyKind::NetworkPolicy => None,
            PolicyKind::MoatNetworkPolicy => stores
                .moat_policies
                .get(&ObjectRef::new(&p.name).within(&p.namespace))
                .and_then(|o| o.status.clone()),
            PolicyKind::MoatClusterNetworkPolicy => stores
                .moat_cluster_policies
                .get(&ObjectRef::new(&p.name))
                .and_then(|o| o.status.clone()),
        }
    }

    async fn apply_status(&self, p: &PolicyRef, status: &PolicyStatus) -> Result<(), kube::Error> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match p.kind {
            PolicyKind::NetworkPolicy => Ok(()),
            PolicyKind::MoatNetworkPolicy => {
                let api: Api<MoatNetworkPolicy> =
                    Api::namespaced(self.client.clone(), &p.namespace);
                let patch = Patch::Apply(apply_body::<MoatNetworkPolicy>(status));
                api.patch_status(&p.name, &pp, &patch).await.map(drop)
            }
            PolicyKind::MoatClusterNetworkPolicy => {
                let api: Api<MoatClusterNetworkPolicy> = Api::all(self.client.clone());
                let patch = Patch::Apply(apply_body::<MoatClusterNetworkPolicy>(status));
                api.patch_status(&p.name, &pp, &patch).await.map(drop)
            }
        }
    }

    /// The object an Event is about: kind, name, namespace and, when the store has it, uid
    /// (`kubectl describe` matches Events by uid).
    fn reference(&self, p: &PolicyRef) -> ObjectReference {
        let (api_version, uid) = match p.kind {
            PolicyKind::NetworkPolicy => (
                "networking.k8s.io/v1",
                self.config.stores.as_ref().and_then(|s| {
                    s.network_policies
                        .get(&ObjectRef::new(&p.name).within(&p.namespace))
                        .and_then(|o| o.uid())
                }),
            ),
            PolicyKind::MoatNetworkPolicy => (
                "moat.dev/v1alpha1",
                self.config.stores.as_ref().and_then(|s| {
                    s.moat_policies
                        .get(&ObjectRef::new(&p.name).within(&p.namespace))
                        .and_then(|o| o.uid())
                }),
            ),
            PolicyKind::MoatClusterNetworkPolicy => (
                "moat.dev/v1alpha1",
                self.config.stores.as_ref().and_then(|s| {
                    s.moat_cluster_policies
                        .get(&ObjectRef::new(&p.name))
                        .and_then(|o| o.uid())
                }),
            ),
        };
        ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(p.kind.as_str().into()),
            name: Some(p.name.clone()),
            namespace: (!p.namespace.is_empty()).then(|| p.namespace.clone()),
            uid,
            ..ObjectReference::default()
        }
    }
}

/// The server-side apply body of a status: apiVersion, kind and the status, nothing else (the
/// name comes from the URL; fields left out are not claimed).
pub fn apply_body<K: Resource<DynamicType = ()>>(status: &PolicyStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

/// Sets every condition's `lastTransitionTime`: kept from `previous` while the condition's
/// status is unchanged, `now` (whole seconds, as the API server stores it) otherwise.
pub fn with_transition_times(
    mut status: PolicyStatus,
    previous: Option<&PolicyStatus>,
    now: Timestamp,
) -> PolicyStatus {
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    for c in &mut status.conditions {
        let prev: Option<&Condition> = previous
            .into_iter()
            .flat_map(|p| p.conditions.iter())
            .find(|p| p.type_ == c.type_);
        c.last_transition_time = match prev {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => Time(now),
        };
    }
    status
}

/// Event notes are limited to 1 kB.
fn truncate(s: &str) -> String {
    if s.len() <= 1000 {
        return s.to_owned();
    }
    let mut end = 1000;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Lease-based election of the single status writer.
struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    clock: Clock,
    /// resourceVersion of another holder's Lease and when this agent first saw it.
    observed: Option<(String, Instant)>,
    /// Leader until then (last successful acquire/renew, measured from before the request).
    leader_until: Option<Instant>,
}

impl LeaseElector {
    fn new(
        api: Api<Lease>,
        name: String,
        identity: String,
        duration: Duration,
        clock: Clock,
    ) -> Self {
        LeaseElector {
            api,
            name,
            identity,
            duration,
            clock,
            observed: None,
            leader_until: None,
        }
    }

    fn is_leader(&self) -> bool {
        self.leader_until.is_some_and(|t| Instant::now() < t)
    }

    fn lease(&self, mut base: Lease, acquire: bool) -> Lease {
        let now = MicroTime((self.clock)());
        let spec = base.spec.get_or_insert_with(Default::default);
        if acquire {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.map_or(0, |t| t + 1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.duration.as_secs().max(1) as i32);
        spec.renew_time = Some(now);
        base
    }

    /// One round of acquire / renew / take over.
    async fn step(&mut self) -> Result<(), kube::Error> {
        let start = Instant::now();
        let current = match self.api.get_opt(&self.name).await {
            Ok(c) => c,
            Err(e) => {
                return Err(e);
            }
        };
        let result = match current {
            None => {
                let fresh = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                let mut l = self.lease(fresh, true);
                if let Some(s) = l.spec.as_mut() {
                    s.lease_transitions = Some(0);
                }
                self.api.create(&PostParams::default(), &l).await
            }
            Some(l) => {
                let holder = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone())
                    .unwrap_or_default();
                if holder == self.identity {
                    let l = self.lease(l, false);
                    self.api
                        .replace(&self.name, &PostParams::default(), &l)
                        .await
                } else {
                    let rv = l.resource_version().unwrap_or_default();
                    let seen_at = match &self.observed {
                        Some((seen, at)) if *seen == rv => *at,
                        _ => {
                            self.observed = Some((rv, start));
                            start
                        }
                    };
                    let their = l
                        .spec
                        .as_ref()
                        .and_then(|s| s.lease_duration_seconds)
                        .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
                    if holder.is_empty() || start.duration_since(seen_at) >= their {
                        info!(previous = %holder, "taking over the status writer lease");
                        let l = self.lease(l, true);
                        self.api
                            .replace(&self.name, &PostParams::default(), &l)
                            .await
                    } else {
                        self.leader_until = None;
                        return Ok(());
                    }
                }
            }
        };
        match result {
            Ok(_) => {
                self.observed = None;
                self.leader_until = Some(start + self.duration);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Someone else created, renewed or took it first.
                self.leader_until = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (empty holder) so another agent takes over at once.
    async fn release(&mut self) {
        if !self.is_leader() {
            return;
        }
        self.leader_until = None;
        let Ok(Some(mut l)) = self.api.get_opt(&self.name).await else {
            return;
        };
        if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(&self.identity) {
            return;
        }
        if let Some(s) = l.spec.as_mut() {
            s.holder_identity = None;
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &l)
            .await
        {
            warn!(error = %e, "releasing the status writer lease");
        }
    }
}
