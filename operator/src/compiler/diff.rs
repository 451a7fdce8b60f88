//! From realized to desired map contents in an order the datapath can take one operation at a
//! time.
//!
//! The invariant (DESIGN.md, "Compiler and reconciler"): after every single operation, no
//! endpoint decision allows a flow that neither the old nor the new state allows, and none
//! drops a flow that both allow. The compiler makes this cheap: rule sets are addressed by
//! content, so a changed policy never rewrites a live subject's entries; it writes a new
//! subject (unreferenced, hence inert), then switches each endpoint with one `EndpointInfo`
//! write (subject, flags and isolating rules change together, atomically), then removes what
//! no endpoint references any more. Each endpoint's decisions thus jump from exactly old to
//! exactly new in one step.
//!
//! What one write cannot make atomic is a peer address changing identity (a pod relabelled, a
//! new pod, a new policy CIDR) together with the endpoints that judge it: its ipcache entry is
//! written after the endpoints switch, so for the span of the batch it is judged by the new
//! policy under its old identity. The revision bump comes last, so established flows are only
//! re-judged against the finished state.

use super::Maps;
use ipnet::IpNet;
use moat_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue};
use std::collections::{BTreeMap, BTreeSet};

/// What the datapath holds now (read back from the pins, or remembered from the last batch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RealizedState {
    pub maps: Maps,
    pub revision: u32,
}

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PrefilterUpsert(IpNet, u32),
    PrefilterDelete(IpNet),
    IpcacheUpsert(IpNet, IpcacheValue),
    IpcacheDelete(IpNet),
    EndpointUpsert(String, EndpointInfo),
    EndpointDelete(String),
    PolicyExactUpsert(PolicyKey, PolicyValue),
    PolicyExactDelete(PolicyKey),
    PolicyPrefixUpsert(PolicyKey, u32, PolicyValue),
    PolicyPrefixDelete(PolicyKey, u32),
    /// Always the last operation of a non-empty batch.
    SetRevision(u32),
}

impl MapOp {
    /// Applies the operation to an in-memory copy of the maps (what a reconciler that
    /// remembers its realized state does after the kernel write succeeded).
    pub fn apply(&self, r: &mut RealizedState) {
        let m = &mut r.maps;
        match self {
            MapOp::PrefilterUpsert(k, v) => {
                m.prefilter.insert(*k, *v);
            }
            MapOp::PrefilterDelete(k) => {
                m.prefilter.remove(k);
            }
            MapOp::IpcacheUpsert(k, v) => {
                m.ipcache.insert(*k, *v);
            }
            MapOp::IpcacheDelete(k) => {
                m.ipcache.remove(k);
            }
            MapOp::EndpointUpsert(k, v) => {
                m.endpoints.insert(k.clone(), *v);
            }
            MapOp::EndpointDelete(k) => {
                m.endpoints.remove(k);
            }
            MapOp::PolicyExactUpsert(k, v) => {
                m.exact.insert(*k, *v);
            }
            MapOp::PolicyExactDelete(k) => {
                m.exact.remove(k);
            }
            MapOp::PolicyPrefixUpsert(k, l, v) => {
                m.prefixes.insert((*k, *l), *v);
            }
            MapOp::PolicyPrefixDelete(k, l) => {
                m.prefixes.remove(&(*k, *l));
            }
            MapOp::SetRevision(n) => r.revision = *n,
        }
    }
}

/// Upserts (new or changed keys) and deletes (vanished keys) of one map.
fn changes<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let ups = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let dels = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (ups, dels)
}

/// The ordered batch that takes `realized` to `desired`; empty when they agree.
pub fn diff(desired: &Maps, realized: &RealizedState) -> Vec<MapOp> {
    let old = &realized.maps;
    let mut ops = Vec::new();

    // 1. Blocklist additions first, removals last: the blocklist only ever drops.
    let (pf_up, pf_del) = changes(&old.prefilter, &desired.prefilter);
    ops.extend(pf_up.into_iter().map(|(k, v)| MapOp::PrefilterUpsert(k, v)));

    // 2. Endpoints that go away: their interface is gone or going; a missing entry fails
    //    closed, which the new state (no endpoint) agrees with.
    let (ep_up, ep_del) = changes(&old.endpoints, &desired.endpoints);
    ops.extend(ep_del.into_iter().map(MapOp::EndpointDelete));

    // 3. Policy entries. Entries of subjects no old endpoint references are inert until an
    //    endpoint switches to them; entries of live subjects only change if the allocations
    //    were lost (content addressing keeps them stable otherwise): then new keys before
    //    changed ones, removals at the end, which keeps each lookup at its old or new value.
    let live: BTreeSet<u32> = old.endpoints.values().map(|e| e.ruleset_id).collect();
    let (ex_up, ex_del) = changes(&old.exact, &desired.exact);
    let (px_up, px_del) = changes(&old.prefixes, &desired.prefixes);
    let inert_first = |subject: u32, is_new: bool| (live.contains(&subject), !is_new);
    let mut policy_ups: Vec<((bool, bool), MapOp)> = Vec::new();
    for (k, v) in ex_up {
        let is_new = !old.exact.contains_key(&k);
        policy_ups.push((
            inert_first(k.subject, is_new),
            MapOp::PolicyExactUpsert(k, v),
        ));
    }
    for ((k, l), v) in px_up {
        let is_new = !old.prefixes.contains_key(&(k, l));
        policy_ups.push((
            inert_first(k.subject, is_new),
            MapOp::PolicyPrefixUpsert(k, l, v),
        ));
    }
    policy_ups.sort_by_key(|(rank, _)| *rank);
    ops.extend(policy_ups.into_iter().map(|(_, op)| op));

    // 4. Endpoints switch (new endpoints start here): subject, flags and isolating rules in
    //    one write.
    ops.extend(ep_up.into_iter().map(|(k, v)| MapOp::EndpointUpsert(k, v)));

    // 5. Addresses: new and changed entries, then removals (a more specific entry is never
    //    removed before its replacement exists).
    let (ip_up, ip_del) = changes(&old.ipcache, &desired.ipcache);
    ops.extend(ip_up.into_iter().map(|(k, v)| MapOp::IpcacheUpsert(k, v)));
    ops.extend(ip_del.into_iter().map(MapOp::IpcacheDelete));

    // 6. Entries nothing references any more.
    ops.extend(ex_del.into_iter().map(MapOp::PolicyExactDelete));
    ops.extend(
        px_del
            .into_iter()
            .map(|(k, l)| MapOp::PolicyPrefixDelete(k, l)),
    );
    ops.extend(pf_del.into_iter().map(MapOp::PrefilterDelete));

    // 7. Established flows are re-judged only against the finished state.
    if !ops.is_empty() {
        ops.push(MapOp::SetRevision(realized.revision.wrapping_add(1).max(1)));
    }
    ops
}
