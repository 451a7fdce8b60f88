//! The compiler as the agent runs it: one [`Compiler`] per node, fed every new model, keeping
//! what it worked out last time so that a change costs in proportion to what it touches.
//!
//! The model comes whole every time, so what changed is found by comparing it with the last
//! one: policies and pods by uid/resourceVersion when they come from the API server
//! ([`Policy::same_input`], [`Endpoint::same`]), field by field otherwise. What is kept, and
//! when it is reused (everything else is recomputed):
//! - a policy's normal form, while its input is the same;
//! - rule ids and the CIDR and named-port cuts, while the accepted policies are the same (the
//!   ids of policies that came and went are allocated or released, the others stay);
//! - the identities, while pods, nodes, namespaces and cuts are the same; when only some
//!   pods' labels or named ports changed, only the label sets they leave and join are grouped
//!   and numbered again ([`identity::relabel`]), and only their addresses rewritten;
//! - the local endpoints and the policies that can select their namespaces, while no local
//!   endpoint came or went and the policies kept their places;
//! - a policy's resolved peers, while the policy and its rule ids are the same and no
//!   identity its peers could name has changed meaning ([`changed_identities`]);
//! - an endpoint's compiled policy, while the resolved policies selecting it and its named
//!   ports are the same;
//! - the policy entries of a rule set, while its subject number names the same content: the
//!   state's policy maps are patched subject by subject, and the [`Delta`] of the patch is
//!   recorded on the way, so nothing compares 200,000 entries to find the few that changed.
//!
//! The result is the one [`super::compile`] computes from scratch, byte for byte (it runs
//! this code with nothing kept); `operator/tests/properties.rs` checks that over random
//! sequences of changes.

use super::diff::{Changes, Delta};
use super::normalize::{self, NormPeer, NormPolicy, PortSpec};
use super::peers::{self, PeerIndex};
use super::subject::{self, EndpointPolicy, Resolved, RuleSetContent};
use super::{
    CompileConfig, CompileError, DesiredState, L7Key, Overflow, PolicyOutcome, RuleIds, RuleInfo,
    dir_name, first_overflow, rule_key,
};
use crate::api::Protocol;
use crate::identity::{self, Allocations, IdentityInfo, IdentityKind, IdentityTable, NumberPool};
use crate::model::{Endpoint, Model, Namespace, Node, Phase, Policy, PolicyRef};
use crate::selector::Labels;
use ipnet::IpNet;
use moat_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, capacity, direction};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A compiler that remembers its last compile (module doc).
pub struct Compiler {
    cfg: CompileConfig,
    alloc: Allocations,
    state: DesiredState,
    memo: Memo,
}

/// Work of the last compile, kept for the next.
#[derive(Default)]
struct Memo {
    /// Normal forms of the model's policies, in its order.
    norm: Vec<Normalized>,
    /// The accepted policies, in creation order.
    accepted: Vec<Arc<NormPolicy>>,
    cuts: Arc<Cuts>,
    /// The cluster as last compiled.
    seen: Option<Seen>,
    /// The identities of the last compile.
    identity: Option<IdentityMemo>,
    /// Local endpoints (indexes into the model's, in key order) and their keys.
    local: Option<(Vec<usize>, Vec<String>)>,
    /// Per namespace of local endpoints, the policies (indexes into the accepted ones) that
    /// can select its pods.
    candidates: BTreeMap<String, Vec<usize>>,
    /// Endpoints of the cluster each accepted policy selects, by [`ptr`] (`accepted` holds
    /// them alive).
    selected: HashMap<usize, usize>,
    /// Resolved peers by policy (its normal form's address: the entry holds it alive).
    resolved: HashMap<usize, Arc<Resolved>>,
    /// Compiled endpoint policies by endpoint key.
    endpoints: HashMap<String, CompiledEndpoint>,
    /// Rule-set contents by subject number.
    subjects: BTreeMap<u32, Arc<Content>>,
}

/// A policy and its normal form (or what is wrong with it).
type Normalized = (Box<Policy>, Result<Arc<NormPolicy>, String>);

/// A policy's memo key: the address of its normal form.
fn ptr(p: &Arc<NormPolicy>) -> usize {
    Arc::as_ptr(p) as usize
}

/// What identities are cut by (semantic rules 4 and 5).
#[derive(Default, PartialEq, Eq)]
struct Cuts {
    cidrs: BTreeSet<IpNet>,
    port_names: BTreeSet<(String, Protocol)>,
}

/// The cluster part of a model, to tell what changed.
struct Seen {
    endpoints: Vec<Endpoint>,
    nodes: Vec<Node>,
    namespaces: Vec<Namespace>,
    local_node: String,
}

/// What changed in the cluster since the last compile.
struct ModelChanges {
    /// Endpoints (indexes) that differ; `None`: any may (no last compile, or another count).
    endpoints: Option<Vec<usize>>,
    /// Namespaces, nodes and the local node are as last time.
    rest_same: bool,
}

impl ModelChanges {
    fn of(seen: Option<&Seen>, model: &Model) -> ModelChanges {
        let Some(seen) = seen else {
            return ModelChanges {
                endpoints: None,
                rest_same: false,
            };
        };
        let endpoints = (seen.endpoints.len() == model.endpoints.len()).then(|| {
            (0..model.endpoints.len())
                .filter(|&i| !seen.endpoints[i].same(&model.endpoints[i]))
                .collect()
        });
        ModelChanges {
            endpoints,
            rest_same: seen.local_node == model.local_node
                && seen.nodes == model.nodes
                && seen.namespaces == model.namespaces,
        }
    }

    /// Nothing in the cluster changed.
    fn none(&self) -> bool {
        self.rest_same && self.endpoints.as_ref().is_some_and(|e| e.is_empty())
    }
}

struct IdentityMemo {
    cuts: Arc<Cuts>,
    table: Arc<IdentityTable>,
    /// What each identity means to a peer.
    views: BTreeMap<u32, PeerView>,
}

/// An endpoint's compiled policy and what it was compiled from.
struct CompiledEndpoint {
    /// The accepted policies (indexes) selecting it.
    selection: Vec<usize>,
    selecting: Vec<Arc<Resolved>>,
    ports: Vec<crate::model::ContainerPort>,
    compiled: Arc<Content>,
}

/// A compiled endpoint policy with its content digest (rule-set keys are digests).
#[derive(Debug)]
struct Content {
    policy: EndpointPolicy,
    digest: u64,
}

/// What an identity means to a peer: everything [`PeerIndex`] and named-port resolution read
/// of it (not its member addresses, which only the ipcache holds).
#[derive(Clone, Debug, PartialEq, Eq)]
enum PeerView {
    Pods {
        namespace: String,
        labels: Labels,
        /// Policy CIDRs holding its addresses, and its named ports (alike for all members).
        within: Vec<IpNet>,
        ports: Vec<Option<u16>>,
    },
    Other(IdentityInfo),
}

/// A compiler with the default settings and nothing allocated yet.
impl Default for Compiler {
    fn default() -> Self {
        Compiler::new(CompileConfig::default(), Allocations::default())
    }
}

impl Compiler {
    pub fn new(cfg: CompileConfig, alloc: Allocations) -> Self {
        Compiler {
            cfg,
            alloc,
            state: DesiredState::default(),
            memo: Memo::default(),
        }
    }

    /// The state of the last successful compile.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The allocations of the last successful compile.
    pub fn allocations(&self) -> &Allocations {
        &self.alloc
    }

    pub fn into_parts(self) -> (DesiredState, Allocations) {
        (self.state, self.alloc)
    }

    /// Compiles `model`; the delta takes the maps of the previous state to the new one. On
    /// error the previous state stays.
    pub fn compile(&mut self, model: &Model) -> Result<Delta, CompileError> {
        let (mut outcomes, accepted) = self.normalize(model);
        let changes = ModelChanges::of(self.memo.seen.as_ref(), model);
        match self.build(model, &accepted, &changes)? {
            Ok(built) => Ok(self.commit(model, built, &accepted, outcomes, &changes)),
            Err(overflow) => {
                // Rare: find the policy to refuse from scratch, each attempt on its own.
                let (cfg, alloc) = (self.cfg.clone(), self.alloc.clone());
                let everything = ModelChanges::of(None, model);
                let fresh = |policies: &[Arc<NormPolicy>]| {
                    Compiler::new(cfg.clone(), alloc.clone()).build(model, policies, &everything)
                };
                if fresh(&[])?.is_err() {
                    return Err(CompileError::Capacity(overflow));
                }
                let (mut accepted, mut overflow) = (accepted, overflow);
                loop {
                    let (mut fits, mut overflows) = (0, accepted.len());
                    while overflows - fits > 1 {
                        let mid = (fits + overflows) / 2;
                        if fresh(&accepted[..mid])?.is_ok() {
                            fits = mid;
                        } else {
                            overflows = mid;
                        }
                    }
                    let culprit = accepted.remove(overflows - 1);
                    outcomes.insert(
                        culprit.reference.clone(),
                        PolicyOutcome {
                            accepted: false,
                            message: format!(
                                "not enforced: {overflow} (over capacity with this policy added); shrink this policy (fewer peers, ports or CIDRs) or remove others"
                            ),
                            selected_endpoints: 0,
                        },
                    );
                    match self.build(model, &accepted, &changes)? {
                        Ok(built) => {
                            return Ok(self.commit(model, built, &accepted, outcomes, &changes));
                        }
                        Err(o) => overflow = o,
                    }
                }
            }
        }
    }

    /// Normal forms of the model's policies (the first of equal references counts): the
    /// outcomes of invalid ones, and the valid ones in creation order.
    fn normalize(
        &mut self,
        model: &Model,
    ) -> (BTreeMap<PolicyRef, PolicyOutcome>, Vec<Arc<NormPolicy>>) {
        let mut outcomes = BTreeMap::new();
        let mut accepted = Vec::new();
        let mut old: Vec<Option<Normalized>> = std::mem::take(&mut self.memo.norm)
            .into_iter()
            .map(Some)
            .collect();
        // Policies usually come in the same order: each is compared with the one at its
        // place last time, and looked up by reference only when another one is there. While
        // every policy is at its place, references are as unique as last time; from the first
        // that is not, they are checked.
        let mut by_ref: Option<HashMap<PolicyRef, usize>> = None;
        let mut seen: Option<std::collections::HashSet<PolicyRef>> = None;
        let mut norm: Vec<Normalized> = Vec::with_capacity(model.policies.len());
        for (i, p) in model.policies.iter().enumerate() {
            let in_place = seen.is_none()
                && old
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|o| o.0.same_ref(p));
            if !in_place {
                let seen =
                    seen.get_or_insert_with(|| norm.iter().map(|n| n.0.reference()).collect());
                if !seen.insert(p.reference()) {
                    continue;
                }
            }
            let at = if in_place {
                Some(i).filter(|&i| old[i].as_ref().is_some_and(|o| o.0.same_input(p)))
            } else {
                let refs = by_ref.get_or_insert_with(|| {
                    (old.iter().enumerate())
                        .filter_map(|(j, o)| Some((o.as_ref()?.0.reference(), j)))
                        .collect()
                });
                (refs.get(&p.reference()).copied())
                    .filter(|&j| old[j].as_ref().is_some_and(|o| o.0.same_input(p)))
            };
            let entry = match at.and_then(|j| old[j].take()) {
                Some(kept) => kept,
                None => {
                    let n = normalize::normalize(p)
                        .map(Arc::new)
                        .map_err(|problems| problems.join("; "));
                    (Box::new(p.clone()), n)
                }
            };
            match &entry.1 {
                Ok(n) => accepted.push(n.clone()),
                Err(message) => {
                    outcomes.insert(
                        p.reference(),
                        PolicyOutcome {
                            accepted: false,
                            message: message.clone(),
                            selected_endpoints: 0,
                        },
                    );
                }
            }
            norm.push(entry);
        }
        self.memo.norm = norm;
        accepted.sort_by(|a: &Arc<NormPolicy>, b| a.order.cmp(&b.order));
        (outcomes, accepted)
    }
}

/// The number pools a compile changed (`None`: as they were).
struct Pools {
    identities: Option<NumberPool>,
    cidr_identities: Option<NumberPool>,
    endpoints: Option<NumberPool>,
    rulesets: NumberPool,
    rules: Option<NumberPool>,
}

fn owned(pool: Cow<'_, NumberPool>) -> Option<NumberPool> {
    match pool {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    }
}

/// One compile's result, not yet made the state.
struct Built {
    pools: Pools,
    rules: RuleChanges,
    cuts: Arc<Cuts>,
    identity: IdentityMemo,
    local: (Vec<usize>, Vec<String>),
    candidates: BTreeMap<String, Vec<usize>>,
    resolved: HashMap<usize, Arc<Resolved>>,
    endpoints: HashMap<String, CompiledEndpoint>,
    /// Local endpoints: interface, entry.
    endpoint_map: BTreeMap<String, EndpointInfo>,
    /// The whole ipcache, or (`None`) the entries that change.
    ipcache: Option<BTreeMap<IpNet, IpcacheValue>>,
    ipcache_patch: Vec<(IpNet, IpcacheValue)>,
    subjects: BTreeMap<u32, Arc<Content>>,
    /// How `subjects` differs from the last compile's.
    subject_changes: Vec<SubjectChange>,
    prefilter: BTreeMap<IpNet, u32>,
    /// Policy entries per map after the patch.
    fill: [usize; 6],
}

/// How the rule table changes.
enum RuleChanges {
    Same,
    Patch {
        gone: Vec<u32>,
        new: Vec<(u32, RuleInfo)>,
    },
    Whole(BTreeMap<u32, RuleInfo>),
}

/// The rule keys of `p` and what each stands for.
fn rule_keys(p: &NormPolicy) -> Vec<(String, RuleInfo)> {
    let r = &p.reference;
    let mut out = Vec::new();
    let mut add = |dir: &str, rule: String| {
        let info = RuleInfo {
            kind: r.kind,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            direction: dir.into(),
            rule: rule.clone(),
        };
        out.push((rule_key(r, dir, &rule), info));
    };
    for dir in [direction::INGRESS, direction::EGRESS] {
        let d = dir as usize;
        if p.applies[d] && p.isolates[d] {
            add(dir_name(dir), "default-deny".into());
        }
        for rule in &p.rules[d] {
            add(dir_name(dir), rule.index.to_string());
        }
    }
    for i in 0..p.prefilter.len() {
        add("prefilter", i.to_string());
    }
    out
}

/// Whether `e` is a local endpoint (of the node `local_node`).
fn is_local(e: &Endpoint, local_node: &str) -> bool {
    e.node == local_node && e.phase == Phase::Running && !e.host_network && e.interface.is_some()
}

/// Whether `a` and `b` (the same pod before and after) sit alike in the list of local
/// endpoints: both off it, or both on it under the same key.
fn same_place(a: &Endpoint, b: &Endpoint, local_node: &str) -> bool {
    match (is_local(a, local_node), is_local(b, local_node)) {
        (false, false) => true,
        (true, true) => (&a.namespace, &a.name) == (&b.namespace, &b.name),
        _ => false,
    }
}

impl Compiler {
    /// One compile attempt with exactly `policies`; nothing of `self` changes but the memo.
    fn build(
        &mut self,
        model: &Model,
        policies: &[Arc<NormPolicy>],
        changes: &ModelChanges,
    ) -> Result<Result<Built, Overflow>, CompileError> {
        let alloc = &self.alloc;
        let same_policies = self.memo.seen.is_some()
            && policies.len() == self.memo.accepted.len()
            && policies
                .iter()
                .zip(&self.memo.accepted)
                .all(|(a, b)| Arc::ptr_eq(a, b));

        // Rule ids: the keys of policies that came and went, or all of them.
        let known: std::collections::HashSet<*const NormPolicy> =
            self.memo.accepted.iter().map(Arc::as_ptr).collect();
        let (rules_pool, rules) = if same_policies && alloc.rules.released.is_empty() {
            (Cow::Borrowed(&alloc.rules), RuleChanges::Same)
        } else if !self.memo.accepted.is_empty() && !self.state.rules.is_empty() {
            let now: std::collections::HashSet<*const NormPolicy> =
                policies.iter().map(Arc::as_ptr).collect();
            let mut gone_keys = BTreeSet::new();
            for p in self
                .memo
                .accepted
                .iter()
                .filter(|p| !now.contains(&Arc::as_ptr(p)))
            {
                gone_keys.extend(rule_keys(p).into_iter().map(|(k, _)| k));
            }
            let mut new_keys = BTreeMap::new();
            for p in policies.iter().filter(|p| !known.contains(&Arc::as_ptr(p))) {
                new_keys.extend(rule_keys(p));
            }
            let vanished: BTreeSet<String> = gone_keys
                .iter()
                .filter(|k| !new_keys.contains_key(*k))
                .cloned()
                .collect();
            new_keys.retain(|k, _| !gone_keys.contains(k));
            let new: BTreeSet<String> = new_keys.keys().cloned().collect();
            let Ok(pool) = alloc.rules.update(&vanished, &new) else {
                return Ok(Err(Overflow {
                    map: "rule ids",
                    needed: alloc.rules.assigned.len() - vanished.len() + new.len(),
                    capacity: capacity::MAX_RULE_IDS - 1,
                }));
            };
            let gone = vanished
                .iter()
                .map(|k| alloc.rules.get(k).expect("was assigned"))
                .collect();
            let new = new_keys
                .into_iter()
                .map(|(k, v)| (pool.get(&k).expect("assigned above"), v))
                .collect();
            (Cow::Owned(pool), RuleChanges::Patch { gone, new })
        } else {
            let rule_info: BTreeMap<String, RuleInfo> =
                policies.iter().flat_map(|p| rule_keys(p)).collect();
            let Ok(pool) = alloc.rules.assign(rule_info.keys()) else {
                return Ok(Err(Overflow {
                    map: "rule ids",
                    needed: rule_info.len(),
                    capacity: capacity::MAX_RULE_IDS - 1,
                }));
            };
            let rules = rule_info
                .into_iter()
                .map(|(k, v)| (pool.get(&k).expect("assigned above"), v))
                .collect();
            (Cow::Owned(pool), RuleChanges::Whole(rules))
        };
        let rule_ids = RuleIds { pool: &rules_pool };

        // Identities: CIDRs of every rule and egress named ports cut them (rules 4, 5).
        let cuts = if same_policies {
            self.memo.cuts.clone()
        } else {
            let cuts = Arc::new(cuts(policies));
            if cuts == self.memo.cuts {
                self.memo.cuts.clone()
            } else {
                cuts
            }
        };
        let previous = self.memo.identity.take();
        let same_cuts = previous
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(&m.cuts, &cuts));
        let unchanged = changes.none()
            && same_cuts
            && alloc.identities.released.is_empty()
            && alloc.cidr_identities.released.is_empty();
        let relabelled: Option<&Vec<usize>> = match (&changes.endpoints, &previous, &self.memo.seen)
        {
            (Some(changed), Some(m), Some(seen))
                if !unchanged
                    && same_cuts
                    && changes.rest_same
                    && identity::relabel_applies(&m.table, &seen.endpoints, model, changed) =>
            {
                Some(changed)
            }
            _ => None,
        };
        // Which identities changed meaning since the last compile (`None`: no last compile),
        // what they were, and which addresses may have moved (`None`: any).
        let (changed, before, moved, id_pool, cidr_pool);
        if unchanged {
            self.memo.identity = previous;
            (changed, before, moved) = (Some(BTreeSet::new()), BTreeMap::new(), Some(Vec::new()));
            (id_pool, cidr_pool) = (
                Cow::Borrowed(&alloc.identities),
                Cow::Borrowed(&alloc.cidr_identities),
            );
        } else if let Some(pods) = relabelled {
            let seen = &self.memo.seen.as_ref().expect("matched above").endpoints;
            let m = previous.expect("matched above");
            let table = Arc::try_unwrap(m.table).unwrap_or_else(|t| (*t).clone());
            let r = identity::relabel(
                table,
                &alloc.identities,
                seen,
                model,
                pods,
                &cuts.cidrs,
                &cuts.port_names,
            )?;
            let mut views = m.views;
            let was: BTreeMap<u32, PeerView> = r
                .gone
                .keys()
                .filter_map(|id| Some((*id, views.remove(id)?)))
                .collect();
            let fresh = peer_views(&r.table, model, &cuts, r.made.iter().copied());
            let c: BTreeSet<u32> = r
                .gone
                .keys()
                .chain(&r.made)
                .filter(|id| was.get(id) != fresh.get(id))
                .copied()
                .collect();
            views.extend(fresh);
            self.memo.identity = Some(IdentityMemo {
                cuts: cuts.clone(),
                table: Arc::new(r.table),
                views,
            });
            (changed, before, moved) = (Some(c), r.gone, Some(r.moved));
            id_pool = Cow::Owned(r.pool);
            cidr_pool = if alloc.cidr_identities.released.is_empty() {
                Cow::Borrowed(&alloc.cidr_identities)
            } else {
                Cow::Owned(
                    alloc
                        .cidr_identities
                        .update(&BTreeSet::new(), &BTreeSet::new())?,
                )
            };
        } else {
            let (table, ids, cidr_ids) =
                identity::assign(model, &cuts.cidrs, &cuts.port_names, alloc)?;
            let views = peer_views(&table, model, &cuts, table.info.keys().copied());
            changed = previous
                .as_ref()
                .map(|p| changed_identities(&p.views, &views));
            before = match (&previous, &changed) {
                (Some(p), Some(c)) => c
                    .iter()
                    .filter_map(|id| Some((*id, p.table.info.get(id)?.clone())))
                    .collect(),
                _ => BTreeMap::new(),
            };
            moved = None;
            self.memo.identity = Some(IdentityMemo {
                cuts: cuts.clone(),
                table: Arc::new(table),
                views,
            });
            (id_pool, cidr_pool) = (Cow::Owned(ids), Cow::Owned(cidr_ids));
        }
        let identity = self.memo.identity.as_ref().expect("just set");
        let ids = identity.table.clone();

        // Local endpoints: the same as last time unless a local one (before or now) changed.
        let local_same = changes.rest_same
            && changes.endpoints.as_ref().is_some_and(|changed| {
                let seen = &self.memo.seen.as_ref().expect("compared with").endpoints;
                (changed.iter())
                    .all(|&i| same_place(&seen[i], &model.endpoints[i], &model.local_node))
            });
        let (local, ep_keys) = match self.memo.local.take() {
            Some(l) if local_same => l,
            _ => {
                let mut local: Vec<usize> = (0..model.endpoints.len())
                    .filter(|&i| is_local(&model.endpoints[i], &model.local_node))
                    .collect();
                local.sort_by_cached_key(|&i| model.endpoints[i].key());
                let keys = local.iter().map(|&i| model.endpoints[i].key()).collect();
                (local, keys)
            }
        };
        let ep_pool = if local_same && alloc.endpoints.released.is_empty() {
            Cow::Borrowed(&alloc.endpoints)
        } else {
            Cow::Owned(alloc.endpoints.assign(ep_keys.iter())?)
        };

        let ns_labels = peers::namespace_labels(model);
        // The policies that took another's place (same reference, same position, another
        // normal form): `None` when the list changed otherwise (or the local endpoints did).
        let replaced: Option<BTreeSet<usize>> =
            (self.memo.seen.is_some() && local_same && policies.len() == self.memo.accepted.len())
                .then(|| {
                    let mut replaced = BTreeSet::new();
                    for (i, (a, b)) in policies.iter().zip(&self.memo.accepted).enumerate() {
                        if Arc::ptr_eq(a, b) {
                            continue;
                        }
                        if a.reference != b.reference {
                            return None;
                        }
                        replaced.insert(i);
                    }
                    Some(replaced)
                })
                .flatten();
        let candidates = match &replaced {
            Some(replaced) => {
                let mut candidates = std::mem::take(&mut self.memo.candidates);
                for (ns, ps) in candidates.iter_mut() {
                    for &i in replaced {
                        let can = subject::selects_namespace(&policies[i], ns, &ns_labels);
                        match (ps.binary_search(&i), can) {
                            (Ok(at), false) => {
                                ps.remove(at);
                            }
                            (Err(at), true) => ps.insert(at, i),
                            _ => {}
                        }
                    }
                }
                candidates
            }
            None => {
                let local_ns: BTreeSet<&str> = local
                    .iter()
                    .map(|&i| model.endpoints[i].namespace.as_str())
                    .collect();
                subject::by_namespace(policies, local_ns, &ns_labels)
                    .into_iter()
                    .map(|(ns, ps)| (ns.to_owned(), ps))
                    .collect()
            }
        };
        // Endpoints whose selection may differ from last time beyond the replaced policies.
        let relabelled: BTreeSet<usize> = match (&changes.endpoints, &replaced) {
            (Some(changed), Some(_)) => changed.iter().copied().collect(),
            _ => BTreeSet::new(),
        };

        // Peers, resolved once per policy for all the endpoints it selects, and kept while
        // nothing they depend on changed.
        let index = std::cell::LazyCell::new(|| PeerIndex::new(&ids, &ns_labels));
        let subtables = changed.as_ref().map(|c| {
            let now = c
                .iter()
                .filter_map(|id| Some((*id, ids.info.get(id)?.clone())))
                .collect();
            [before, now].map(|info| IdentityTable {
                info,
                ..IdentityTable::default()
            })
        });
        let dirty = match (&changed, &subtables) {
            (Some(c), _) if c.is_empty() => Dirty::Nothing,
            (Some(c), Some([old, new])) => Dirty::Some {
                changed: c,
                views: Box::new([
                    PeerIndex::few(old, &ns_labels),
                    PeerIndex::few(new, &ns_labels),
                ]),
            },
            _ => Dirty::All,
        };
        // Per accepted policy, its resolved peers when kept from last time (`None`: to
        // resolve, if an endpoint needs them).
        let mut old_resolved = std::mem::take(&mut self.memo.resolved);
        let mut resolved: Vec<Option<Arc<Resolved>>> = policies
            .iter()
            .map(|p| {
                old_resolved.remove(&ptr(p)).filter(|r| {
                    !dirty.touches(p)
                        // A policy of the last compile keeps its rule keys, hence its ids.
                        && (known.contains(&Arc::as_ptr(p))
                            || Resolved::ids(p, &rule_ids) == (r.rule_ids.clone(), r.default_deny))
                })
            })
            .collect();
        let kept: Vec<bool> = resolved.iter().map(Option::is_some).collect();

        // Endpoints, compiled again only when what they were compiled from changed. Equal
        // contents share one allocation, so that later compiles compare them by address.
        let ctx = subject::Context {
            model,
            ids: &ids,
            proxy_port: self.cfg.proxy_port,
        };
        let mut interned: HashMap<u64, Vec<Arc<Content>>> = HashMap::new();
        for c in self.memo.subjects.values() {
            interned.entry(c.digest).or_default().push(c.clone());
        }
        let mut old_endpoints = std::mem::take(&mut self.memo.endpoints);
        let mut endpoints: HashMap<String, CompiledEndpoint> = HashMap::with_capacity(local.len());
        let mut compiled: Vec<Arc<Content>> = Vec::with_capacity(local.len());
        for (&i, key) in local.iter().zip(&ep_keys) {
            let ep = &model.endpoints[i];
            let old = old_endpoints.remove(key);
            let selects = |p: usize| subject::selects_pod(&policies[p], &ep.labels);
            // As last time, but for the replaced policies.
            let kept_selection = match (&old, &replaced) {
                (Some(c), Some(replaced)) if !relabelled.contains(&i) => {
                    if replaced.is_empty() {
                        Some(c.selection.clone())
                    } else {
                        let can = &candidates[ep.namespace.as_str()];
                        let mut sel: Vec<usize> = (c.selection.iter().copied())
                            .filter(|p| !replaced.contains(p))
                            .chain(
                                (replaced.iter().copied())
                                    .filter(|p| can.binary_search(p).is_ok() && selects(*p)),
                            )
                            .collect();
                        sel.sort_unstable();
                        Some(sel)
                    }
                }
                _ => None,
            };
            let c = match old {
                Some(c)
                    if kept_selection.as_ref() == Some(&c.selection)
                        && c.ports == ep.ports
                        && c.selection.iter().all(|&p| kept[p]) =>
                {
                    c
                }
                old => {
                    let selection: Vec<usize> = kept_selection.unwrap_or_else(|| {
                        candidates[ep.namespace.as_str()]
                            .iter()
                            .copied()
                            .filter(|&p| selects(p))
                            .collect()
                    });
                    let selecting: Vec<Arc<Resolved>> = selection
                        .iter()
                        .map(|&p| {
                            resolved[p]
                                .get_or_insert_with(|| {
                                    Arc::new(Resolved::new(&policies[p], &index, &rule_ids))
                                })
                                .clone()
                        })
                        .collect();
                    match old {
                        Some(c)
                            if c.ports == ep.ports
                                && c.selecting.len() == selecting.len()
                                && c.selecting
                                    .iter()
                                    .zip(&selecting)
                                    .all(|(a, b)| Arc::ptr_eq(a, b)) =>
                        {
                            CompiledEndpoint { selection, ..c }
                        }
                        _ => {
                            let refs: Vec<&Resolved> = selecting.iter().map(|r| &**r).collect();
                            let policy = subject::compile_endpoint(&ctx, ep, &refs);
                            let digest = super::digest(&policy.content);
                            let same = interned.entry(digest).or_default();
                            let compiled = match same.iter().find(|c| c.policy == policy) {
                                Some(c) => c.clone(),
                                None => {
                                    let c = Arc::new(Content { policy, digest });
                                    same.push(c.clone());
                                    c
                                }
                            };
                            CompiledEndpoint {
                                selection,
                                selecting,
                                ports: ep.ports.clone(),
                                compiled,
                            }
                        }
                    }
                }
            };
            compiled.push(c.compiled.clone());
            endpoints.insert(key.clone(), c);
        }
        let resolved: HashMap<usize, Arc<Resolved>> = resolved
            .into_iter()
            .zip(policies)
            .filter_map(|(r, p)| Some((ptr(p), r?)))
            .collect();

        // Rule sets: endpoints with equal content share a subject, numbered by content digest
        // (`#2`, `#3`, ... after the digest for different contents with equal digests, in
        // endpoint order).
        let mut by_digest: HashMap<u64, Vec<(Arc<Content>, usize)>> = HashMap::new();
        let mut keys: Vec<String> = Vec::new();
        let mut ruleset_of: Vec<Option<usize>> = Vec::with_capacity(compiled.len());
        let mut contents: Vec<Arc<Content>> = Vec::new();
        for c in &compiled {
            if c.policy.content == RuleSetContent::default() {
                ruleset_of.push(None);
                continue;
            }
            let same = by_digest.entry(c.digest).or_default();
            let k = match same
                .iter()
                .find(|(o, _)| Arc::ptr_eq(o, c) || o.policy.content == c.policy.content)
            {
                Some(&(_, k)) => k,
                None => {
                    let base = format!("{:016x}", c.digest);
                    keys.push(match same.len() {
                        0 => base,
                        n => format!("{base}#{}", n + 1),
                    });
                    contents.push(c.clone());
                    same.push((c.clone(), keys.len() - 1));
                    keys.len() - 1
                }
            };
            ruleset_of.push(Some(k));
        }
        let ruleset_pool = alloc.rulesets.assign(keys.iter())?;
        let subjects: BTreeMap<u32, Arc<Content>> = keys
            .iter()
            .zip(contents)
            .map(|(k, c)| (ruleset_pool.get(k).expect("assigned above"), c))
            .collect();

        // Addresses (as they are unless identities or local endpoints changed) and endpoints.
        // Addresses that moved get their new identity; their endpoint ids stay if no local
        // endpoint got another.
        let ipcache_patch = moved
            .filter(|_| ep_pool.assigned == alloc.endpoints.assigned)
            .map(|moved| {
                let current = &self.state.maps.ipcache;
                let patch: Vec<(IpNet, IpcacheValue)> = moved
                    .iter()
                    .filter_map(|a| {
                        let net = IpNet::from(*a);
                        let v = current.get(&net)?;
                        let identity = *ids.by_address.get(a)?;
                        (v.identity != identity).then_some((net, IpcacheValue { identity, ..*v }))
                    })
                    .collect();
                patch
            });
        let mut ipcache = ipcache_patch.is_none().then(|| {
            let mut ipcache = BTreeMap::new();
            for (&addr, &identity) in &ids.by_address {
                ipcache.insert(
                    IpNet::from(addr),
                    IpcacheValue {
                        identity,
                        endpoint_id: 0,
                        flags: 0,
                    },
                );
            }
            for (&net, &identity) in &ids.by_cidr {
                ipcache.entry(net).or_insert(IpcacheValue {
                    identity,
                    endpoint_id: 0,
                    flags: 0,
                });
            }
            ipcache
        });
        let subject_of: Vec<u32> = keys
            .iter()
            .map(|k| ruleset_pool.get(k).expect("assigned above"))
            .collect();
        let mut endpoint_map = BTreeMap::new();
        for (((&i, key), ruleset), c) in local.iter().zip(&ep_keys).zip(&ruleset_of).zip(&compiled)
        {
            let ep = &model.endpoints[i];
            let c = &c.policy;
            let endpoint_id = ep_pool.get(key).expect("assigned above");
            for a in ipcache
                .is_some()
                .then_some(&ep.addresses)
                .into_iter()
                .flatten()
            {
                if let Some(v) = ipcache.as_mut().and_then(|m| m.get_mut(&IpNet::from(*a)))
                    && ids.by_address.get(a).is_some_and(|id| {
                        ids.info
                            .get(id)
                            .is_some_and(|info| matches!(info.kind, IdentityKind::Pods { .. }))
                    })
                {
                    v.endpoint_id = endpoint_id;
                }
            }
            let ruleset_id = ruleset.map_or(0, |k| subject_of[k]);
            let identity = ep
                .addresses
                .iter()
                .find_map(|a| ids.by_address.get(a))
                .copied()
                .unwrap_or(0);
            let Some(ifname) = ep.interface.clone() else {
                continue;
            };
            endpoint_map.insert(
                ifname,
                EndpointInfo {
                    endpoint_id,
                    identity,
                    ruleset_id,
                    flags: c.flags,
                    isolating_rule: c.isolating_rule,
                    audit_isolating_rule: c.audit_isolating_rule,
                },
            );
        }
        let mut prefilter = BTreeMap::new();
        for p in policies {
            for (i, net) in p.prefilter.iter().enumerate() {
                let id = rule_ids.get(&rule_key(&p.reference, "prefilter", &i.to_string()));
                prefilter.entry(*net).or_insert(id);
            }
        }

        // Capacity, counted before anything is written: the policy maps as patched.
        let mut fill = [0; 6];
        let current = &self.state.maps.ipcache;
        let cache = ipcache.as_ref().unwrap_or(current);
        fill[0] = cache
            .keys()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .count();
        fill[1] = cache.len() - fill[0];
        fill[2] = endpoint_map.len();
        let (mut exact, mut prefixes) =
            (self.state.maps.exact.len(), self.state.maps.prefixes.len());
        let subject_changes = subject_changes(&self.memo.subjects, &subjects);
        for c in &subject_changes {
            let (e, p) = entry_counts(&c.content.policy.content);
            if c.added {
                exact += e;
                prefixes += p;
            } else {
                exact -= e;
                prefixes -= p;
            }
        }
        fill[3] = exact;
        fill[4] = prefixes;
        fill[5] = prefilter.len();
        self.memo.resolved = resolved;
        self.memo.endpoints = endpoints;
        if let Some(o) = first_overflow(&fill) {
            return Ok(Err(o));
        }
        let resolved = std::mem::take(&mut self.memo.resolved);
        let endpoints = std::mem::take(&mut self.memo.endpoints);
        let identity = self.memo.identity.take().expect("set above");
        Ok(Ok(Built {
            pools: Pools {
                identities: owned(id_pool),
                cidr_identities: owned(cidr_pool),
                endpoints: owned(ep_pool),
                rulesets: ruleset_pool,
                rules: owned(rules_pool),
            },
            rules,
            cuts,
            identity,
            local: (local, ep_keys),
            candidates,
            resolved,
            endpoints,
            endpoint_map,
            ipcache,
            ipcache_patch: ipcache_patch.unwrap_or_default(),
            subjects,
            subject_changes,
            prefilter,
            fill,
        }))
    }

    /// Makes `built` the state, patching the policy maps subject by subject, and returns
    /// what changed.
    fn commit(
        &mut self,
        model: &Model,
        built: Built,
        accepted: &[Arc<NormPolicy>],
        outcomes: BTreeMap<PolicyRef, PolicyOutcome>,
        changes: &ModelChanges,
    ) -> Delta {
        let selected = self.selected_counts(model, accepted, changes);
        let state = &mut self.state;
        let maps = &mut state.maps;
        let mut delta = Delta {
            prefilter: Changes::between(&maps.prefilter, &built.prefilter),
            endpoints: Changes::between(&maps.endpoints, &built.endpoint_map),
            ..Delta::default()
        };
        maps.prefilter = built.prefilter;
        maps.endpoints = built.endpoint_map;
        if let Some(ipcache) = built.ipcache {
            delta.ipcache = Changes::between(&maps.ipcache, &ipcache);
            maps.ipcache = ipcache;
        }
        for (net, v) in built.ipcache_patch {
            maps.ipcache.insert(net, v);
            delta.ipcache.ups.push((net, v));
        }
        delta.ipcache.ups.sort_by_key(|(net, _)| *net);

        let mut exact: BTreeMap<PolicyKey, Option<PolicyValue>> = BTreeMap::new();
        let mut prefixes: BTreeMap<(PolicyKey, u32), Option<PolicyValue>> = BTreeMap::new();
        for c in &built.subject_changes {
            let (subject, added) = (c.subject, c.added);
            for (k, v, len) in entries(subject, &c.content.policy.content) {
                let v = added.then_some(v);
                if len == moat_common::policy_prefix::FULL {
                    // A key both removed (old content) and added (new) keeps the added value.
                    let slot = exact.entry(k).or_insert(v);
                    if added {
                        *slot = v;
                    }
                } else {
                    let slot = prefixes.entry((k, len)).or_insert(v);
                    if added {
                        *slot = v;
                    }
                }
            }
        }
        patch(&mut maps.exact, exact, &mut delta.exact);
        patch(&mut maps.prefixes, prefixes, &mut delta.prefixes);
        debug_assert_eq!(maps.exact.len(), built.fill[3]);
        debug_assert_eq!(maps.prefixes.len(), built.fill[4]);

        // L7 rules of the subjects that went (removals come first), then of those that came
        // (keys order by subject first).
        for SubjectChange {
            content: c,
            subject,
            added,
        } in &built.subject_changes
        {
            if *added {
                for (&(direction, peer, first_port, last_port), matchers) in &c.policy.content.l7 {
                    state.l7.insert(
                        L7Key {
                            subject: *subject,
                            peer,
                            direction,
                            first_port,
                            last_port,
                        },
                        matchers.iter().cloned().collect(),
                    );
                }
            } else {
                let first = L7Key {
                    subject: *subject,
                    peer: 0,
                    direction: 0,
                    first_port: 0,
                    last_port: 0,
                };
                let gone: Vec<L7Key> = state
                    .l7
                    .range(first..)
                    .take_while(|(k, _)| k.subject == *subject)
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    state.l7.remove(&k);
                }
            }
        }
        match built.rules {
            RuleChanges::Same => {}
            RuleChanges::Patch { gone, new } => {
                for id in gone {
                    state.rules.remove(&id);
                }
                state.rules.extend(new);
            }
            RuleChanges::Whole(rules) => state.rules = rules,
        }
        // Outcomes, written where they changed.
        self.memo.selected.clear();
        let live = accepted.len() + outcomes.len();
        for (p, selected) in accepted.iter().zip(selected) {
            let outcome = PolicyOutcome {
                accepted: true,
                message: String::new(),
                selected_endpoints: selected,
            };
            match state.policies.get_mut(&p.reference) {
                Some(o) => *o = outcome,
                None => {
                    state.policies.insert(p.reference.clone(), outcome);
                }
            }
            self.memo.selected.insert(ptr(p), selected);
        }
        if state.policies.len() + outcomes.len() != live {
            // Policies gone from the model (references are unique among the live ones, so
            // a count that adds up means there is none).
            let refs: std::collections::HashSet<&PolicyRef> = (accepted.iter())
                .map(|p| &p.reference)
                .chain(outcomes.keys())
                .collect();
            state.policies.retain(|r, _| refs.contains(r));
        }
        state.policies.extend(outcomes);
        let (a, p) = (&mut self.alloc, built.pools);
        a.rulesets = p.rulesets;
        for (slot, pool) in [
            (&mut a.identities, p.identities),
            (&mut a.cidr_identities, p.cidr_identities),
            (&mut a.endpoints, p.endpoints),
            (&mut a.rules, p.rules),
        ] {
            if let Some(pool) = pool {
                *slot = pool;
            }
        }
        self.memo.accepted = accepted.to_vec();
        self.memo.cuts = built.cuts;
        self.memo.identity = Some(built.identity);
        self.memo.local = Some(built.local);
        self.memo.candidates = built.candidates;
        match (&mut self.memo.seen, &changes.endpoints) {
            (Some(seen), Some(changed)) if changes.rest_same => {
                for &i in changed {
                    seen.endpoints[i] = model.endpoints[i].clone();
                }
            }
            (seen, _) => {
                *seen = Some(Seen {
                    endpoints: model.endpoints.clone(),
                    nodes: model.nodes.clone(),
                    namespaces: model.namespaces.clone(),
                    local_node: model.local_node.clone(),
                })
            }
        }
        self.memo.resolved = built.resolved;
        self.memo.endpoints = built.endpoints;
        self.memo.subjects = built.subjects;
        delta
    }
}

/// The CIDRs (and excepts) of every rule and the named ports of egress rules.
fn cuts(policies: &[Arc<NormPolicy>]) -> Cuts {
    let mut c = Cuts::default();
    for p in policies {
        for (d, rules) in p.rules.iter().enumerate() {
            for r in rules {
                for peer in r.peers.iter().flatten() {
                    if let NormPeer::Block { cidr, except } = peer {
                        c.cidrs.insert(*cidr);
                        c.cidrs.extend(except.iter().copied());
                    }
                }
                if d == direction::EGRESS as usize {
                    for port in r.ports.iter().flatten() {
                        if let PortSpec::Named(n) = &port.port {
                            c.port_names.insert((n.clone(), port.protocol));
                        }
                    }
                }
            }
        }
    }
    c
}

/// What identities `ids` of `table` mean to a peer.
fn peer_views(
    table: &IdentityTable,
    model: &Model,
    cuts: &Cuts,
    ids: impl Iterator<Item = u32>,
) -> BTreeMap<u32, PeerView> {
    ids.filter_map(|id| Some((id, table.info.get(&id)?)))
        .map(|(id, info)| {
            let view = match &info.kind {
                IdentityKind::Pods {
                    namespace,
                    labels,
                    pods,
                } => {
                    let first = info.addresses.first();
                    let ep = &model.endpoints[pods[0]];
                    PeerView::Pods {
                        namespace: namespace.clone(),
                        labels: labels.clone(),
                        within: cuts
                            .cidrs
                            .iter()
                            .filter(|c| first.is_some_and(|a| c.contains(a)))
                            .copied()
                            .collect(),
                        ports: cuts
                            .port_names
                            .iter()
                            .map(|(n, p)| ep.named_port(n, *p))
                            .collect(),
                    }
                }
                _ => PeerView::Other(info.clone()),
            };
            (id, view)
        })
        .collect()
}

/// Identities that appeared, vanished or changed meaning between two compiles.
fn changed_identities(
    old: &BTreeMap<u32, PeerView>,
    new: &BTreeMap<u32, PeerView>,
) -> BTreeSet<u32> {
    let mut out: BTreeSet<u32> = old
        .iter()
        .filter(|(id, v)| new.get(id) != Some(v))
        .map(|(id, _)| *id)
        .collect();
    out.extend(new.keys().filter(|id| !old.contains_key(id)));
    out
}

/// Which policies' resolved peers the changed identities make stale.
enum Dirty<'a> {
    /// Nothing to compare with: every policy.
    All,
    Nothing,
    /// Policies whose peers name one of `changed`, in its old or new meaning (peer indexes
    /// over those identities alone), or that resolve egress named ports over every identity.
    Some {
        changed: &'a BTreeSet<u32>,
        views: Box<[PeerIndex<'a>; 2]>,
    },
}

impl Dirty<'_> {
    fn touches(&self, p: &NormPolicy) -> bool {
        let (changed, views) = match self {
            Dirty::All => return true,
            Dirty::Nothing => return false,
            Dirty::Some { changed, views } => (changed, views),
        };
        p.rules.iter().enumerate().any(|(d, rules)| {
            rules.iter().any(|r| {
                let wildcard = r.peers.as_ref().is_none_or(|ps| {
                    ps.iter()
                        .any(|p| matches!(p, NormPeer::Entity(crate::api::Entity::All)))
                });
                let named = r
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.port, PortSpec::Named(_)));
                (d == direction::EGRESS as usize && named && wildcard)
                    || views.iter().any(|v| {
                        v.resolve(r.peers.as_deref(), r.deny)
                            .iter()
                            .any(|id| changed.contains(id))
                    })
            })
        })
    }
}

/// A rule set that goes (its old content) or comes (its new content).
struct SubjectChange {
    content: Arc<Content>,
    subject: u32,
    added: bool,
}

/// Old contents that go (false) and new ones that come (true), with their subject numbers:
/// a subject whose number names the same content in both is left alone.
fn subject_changes(
    old: &BTreeMap<u32, Arc<Content>>,
    new: &BTreeMap<u32, Arc<Content>>,
) -> Vec<SubjectChange> {
    let same = |a: &Arc<Content>, b: &Arc<Content>| {
        Arc::ptr_eq(a, b) || a.policy.content == b.policy.content
    };
    let mut out = Vec::new();
    for (from, to, added) in [(old, new, false), (new, old, true)] {
        for (s, c) in from {
            if !to.get(s).is_some_and(|t| same(c, t)) {
                out.push(SubjectChange {
                    content: c.clone(),
                    subject: *s,
                    added,
                });
            }
        }
    }
    out
}

/// Exact and prefix entries of a content.
fn entry_counts(c: &RuleSetContent) -> (usize, usize) {
    let exact = c
        .entries
        .keys()
        .filter(|k| k.port.prefix_len() == moat_common::policy_prefix::FULL)
        .count();
    (exact, c.entries.len() - exact)
}

/// The policy entries of `content` as subject `subject`: key, value, prefix length.
fn entries(
    subject: u32,
    content: &RuleSetContent,
) -> impl Iterator<Item = (PolicyKey, PolicyValue, u32)> + '_ {
    content.entries.iter().map(move |(k, v)| {
        (
            PolicyKey {
                subject,
                peer: k.peer,
                direction: k.direction,
                protocol: k.port.protocol.unwrap_or(0),
                dport: k.port.port.to_be_bytes(),
            },
            PolicyValue::from(*v),
            k.port.prefix_len(),
        )
    })
}

/// Applies `writes` (a value: upsert; `None`: delete) to `map`, recording what changed.
fn patch<K: Ord + Clone, V: PartialEq + Copy>(
    map: &mut BTreeMap<K, V>,
    writes: BTreeMap<K, Option<V>>,
    changes: &mut Changes<K, V>,
) {
    for (k, v) in writes {
        match v {
            Some(v) => {
                if map.insert(k.clone(), v) != Some(v) {
                    changes.ups.push((k, v));
                }
            }
            None => {
                if map.remove(&k).is_some() {
                    changes.dels.push(k);
                }
            }
        }
    }
}

impl Compiler {
    /// How many endpoints of the whole cluster each policy selects: last compile's counts,
    /// corrected for the endpoints that changed, where there are some.
    fn selected_counts(
        &self,
        model: &Model,
        policies: &[Arc<NormPolicy>],
        changes: &ModelChanges,
    ) -> Vec<usize> {
        let (Some(seen), Some(changed), true) =
            (&self.memo.seen, &changes.endpoints, changes.rest_same)
        else {
            return selected_endpoints(model, policies);
        };
        let ns_labels = peers::namespace_labels(model);
        let selects = |p: &NormPolicy, e: &Endpoint| {
            e.phase == Phase::Running
                && !e.host_network
                && subject::selects_namespace(p, &e.namespace, &ns_labels)
                && subject::selects_pod(p, &e.labels)
        };
        policies
            .iter()
            .map(|p| match self.memo.selected.get(&ptr(p)) {
                Some(n) => {
                    let lost = changed.iter().filter(|&&i| selects(p, &seen.endpoints[i]));
                    let won = changed.iter().filter(|&&i| selects(p, &model.endpoints[i]));
                    n + won.count() - lost.count()
                }
                _ => model.endpoints.iter().filter(|e| selects(p, e)).count(),
            })
            .collect()
    }
}

/// How many endpoints of the whole cluster each policy selects.
fn selected_endpoints(model: &Model, policies: &[Arc<NormPolicy>]) -> Vec<usize> {
    let ns_labels = peers::namespace_labels(model);
    // Pods with equal labels in a namespace are selected alike: each label set is tried once,
    // against the policies that can select pods of its namespace.
    let mut pods: BTreeMap<&str, HashMap<&Labels, usize>> = BTreeMap::new();
    for e in &model.endpoints {
        if e.phase == Phase::Running && !e.host_network {
            *pods
                .entry(&e.namespace)
                .or_default()
                .entry(&e.labels)
                .or_default() += 1;
        }
    }
    let mut selected = vec![0; policies.len()];
    let candidates = subject::by_namespace(policies, pods.keys().copied(), &ns_labels);
    for (ns, ps) in candidates {
        for (labels, &n) in &pods[ns] {
            for &i in &ps {
                if subject::selects_pod(&policies[i], labels) {
                    selected[i] += n;
                }
            }
        }
    }
    selected
}
