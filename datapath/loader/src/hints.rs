//! Hints in endpoint flags, derived from the policy entries of the endpoint's rule set:
//! `ep_flags::NO_TRIE` / `NO_ANY_PEER` (no trie entries / no any-peer entries in a direction:
//! the kernel skips those probes, most of the cost of a lookup at scale) and `ep_flags::L7`
//! (redirect entries exist: steering hooks must look the destination's policy up).
//!
//! The loader owns the hints so that no caller can get them wrong. Endpoints are rewritten
//! *before* the first entry of a class is written and *after* the last one is removed, so no
//! intermediate state skips a live entry or misses a redirect.
use std::collections::{BTreeMap, BTreeSet};

use moat_common::{EndpointInfo, PolicyValue, action, ep_flag, ep_flags, identity, policy_prefix};

use crate::PolicyEntryKey;

#[derive(Default)]
pub(crate) struct Hints {
    /// Trie entries per (rule set, direction).
    trie: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Any-peer entries per (rule set, direction).
    any_peer: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Redirect entries per (rule set, direction).
    redirect: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Endpoints as the caller set them (hint bits clear), by ifindex.
    endpoints: BTreeMap<u32, EndpointInfo>,
}

fn is_redirect(v: &PolicyValue) -> bool {
    v.action == action::REDIRECT
}

fn class(k: &PolicyEntryKey) -> ((u32, u8), bool, bool) {
    (
        (k.key.subject, k.key.direction),
        k.prefix_len != policy_prefix::FULL,
        k.key.peer == identity::ANY,
    )
}

impl Hints {
    /// Rebuild from what the maps hold (after adoption).
    pub(crate) fn new(
        policy: &BTreeMap<PolicyEntryKey, PolicyValue>,
        endpoints: &BTreeMap<u32, EndpointInfo>,
    ) -> Self {
        let mut h = Hints::default();
        for (k, v) in policy {
            h.add(k, v);
        }
        for (&ifindex, info) in endpoints {
            h.endpoints.insert(ifindex, strip(*info));
        }
        h
    }

    /// Record `k`; true when it is the first of a class in its rule set and direction.
    fn add(&mut self, k: &PolicyEntryKey, v: &PolicyValue) -> bool {
        let (sd, trie, any) = class(k);
        let redirect = is_redirect(v);
        let mut first = false;
        for (hit, sets) in [
            (trie, &mut self.trie),
            (any, &mut self.any_peer),
            (redirect, &mut self.redirect),
        ] {
            if hit {
                let set = sets.entry(sd).or_default();
                first |= set.is_empty();
                set.insert(*k);
            }
        }
        first
    }

    /// Forget `k` in the classes listed; true when a class became empty.
    fn remove(&mut self, k: &PolicyEntryKey, classes: [bool; 3]) -> bool {
        let (sd, _, _) = class(k);
        let mut last = false;
        for (hit, sets) in
            classes
                .into_iter()
                .zip([&mut self.trie, &mut self.any_peer, &mut self.redirect])
        {
            if hit && let Some(set) = sets.get_mut(&sd) {
                last |= set.remove(k) && set.is_empty();
            }
        }
        last
    }

    /// `info` with the hints its rule set allows.
    pub(crate) fn with_hints(&self, info: EndpointInfo) -> EndpointInfo {
        let mut flags = info.flags & !ep_flags::HINTS;
        for dir in [0u8, 1] {
            let sd = (info.ruleset_id, dir);
            if self.trie.get(&sd).is_none_or(BTreeSet::is_empty) {
                flags |= ep_flag(ep_flags::NO_TRIE, dir);
            }
            if self.any_peer.get(&sd).is_none_or(BTreeSet::is_empty) {
                flags |= ep_flag(ep_flags::NO_ANY_PEER, dir);
            }
            if self.redirect.get(&sd).is_some_and(|s| !s.is_empty()) {
                flags |= ep_flag(ep_flags::L7, dir);
            }
        }
        EndpointInfo { flags, ..info }
    }

    /// Record an endpoint; returns what to write.
    pub(crate) fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> EndpointInfo {
        self.endpoints.insert(ifindex, strip(info));
        self.with_hints(info)
    }

    pub(crate) fn remove_endpoint(&mut self, ifindex: u32) {
        self.endpoints.remove(&ifindex);
    }

    /// Record an entry about to be written; returns endpoints to rewrite first.
    pub(crate) fn before_upsert(
        &mut self,
        k: &PolicyEntryKey,
        v: &PolicyValue,
    ) -> Vec<(u32, EndpointInfo)> {
        if self.add(k, v) {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
    }

    /// After an entry was written: an entry that stopped being a redirect may end its class.
    pub(crate) fn after_upsert(
        &mut self,
        k: &PolicyEntryKey,
        v: &PolicyValue,
    ) -> Vec<(u32, EndpointInfo)> {
        if !is_redirect(v) && self.remove(k, [false, false, true]) {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
    }

    /// Record an entry just removed; returns endpoints to rewrite now.
    pub(crate) fn after_remove(&mut self, k: &PolicyEntryKey) -> Vec<(u32, EndpointInfo)> {
        if self.remove(k, [true, true, true]) {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
    }

    /// The endpoint id of the endpoint at `ifindex`, if one is recorded.
    pub(crate) fn endpoint_id(&self, ifindex: u32) -> Option<u32> {
        self.endpoints.get(&ifindex).map(|i| i.endpoint_id)
    }

    fn rewrites(&self, ruleset: u32) -> Vec<(u32, EndpointInfo)> {
        self.endpoints
            .iter()
            .filter(|(_, i)| i.ruleset_id == ruleset)
            .map(|(&ifindex, &i)| (ifindex, self.with_hints(i)))
            .collect()
    }
}

/// The endpoint as the caller sees it: hint bits are the loader's business.
pub(crate) fn strip(info: EndpointInfo) -> EndpointInfo {
    EndpointInfo {
        flags: info.flags & !ep_flags::HINTS,
        ..info
    }
}
