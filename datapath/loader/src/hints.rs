//! Skip hints in endpoint flags (`ep_flags::NO_TRIE`, `NO_ANY_PEER`): a rule set without
//! trie entries (wildcards, port ranges) or without any-peer entries in a direction lets the
//! kernel skip those probes, which is most of the cost of a lookup at scale.
//!
//! The loader owns the hints so that no caller can get them wrong: a hint is cleared on the
//! rule set's endpoints *before* the first entry it would hide is written, and set *after* the
//! last one is removed, so no intermediate state ever skips a live entry.
use std::collections::{BTreeMap, BTreeSet};

use moat_common::{EndpointInfo, PolicyValue, ep_flag, ep_flags, identity, policy_prefix};

use crate::PolicyEntryKey;

#[derive(Default)]
pub(crate) struct Hints {
    /// Trie entries per (rule set, direction).
    trie: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Any-peer entries per (rule set, direction).
    any_peer: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Endpoints as the caller set them (hint bits clear), by ifindex.
    endpoints: BTreeMap<u32, EndpointInfo>,
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
        for k in policy.keys() {
            h.add(k);
        }
        for (&ifindex, info) in endpoints {
            h.endpoints.insert(ifindex, strip(*info));
        }
        h
    }

    fn add(&mut self, k: &PolicyEntryKey) -> bool {
        let (sd, trie, any) = class(k);
        let mut first = false;
        if trie {
            let set = self.trie.entry(sd).or_default();
            first |= set.is_empty();
            set.insert(*k);
        }
        if any {
            let set = self.any_peer.entry(sd).or_default();
            first |= set.is_empty();
            set.insert(*k);
        }
        first
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
    pub(crate) fn before_upsert(&mut self, k: &PolicyEntryKey) -> Vec<(u32, EndpointInfo)> {
        if self.add(k) {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
    }

    /// Record an entry just removed; returns endpoints to rewrite now.
    pub(crate) fn after_remove(&mut self, k: &PolicyEntryKey) -> Vec<(u32, EndpointInfo)> {
        let (sd, trie, any) = class(k);
        let mut last = false;
        for (hit, sets) in [(trie, &mut self.trie), (any, &mut self.any_peer)] {
            if hit && let Some(set) = sets.get_mut(&sd) {
                last |= set.remove(k) && set.is_empty();
            }
        }
        if last {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
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
