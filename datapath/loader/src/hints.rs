//! Hints in endpoint flags, derived from the policy entries of the endpoint's rule set:
//! `ep_flags::NO_TRIE` / `NO_ANY_PEER` (no trie entries / no any-peer entries in a direction:
//! the kernel skips those probes, most of the cost of a lookup at scale),
//! `ep_flags::ANY_PEER_ALLOWS` (no any-peer entry redirects or denies: an exact-peer allow
//! decides alone) and `ep_flags::L7` (redirect entries exist: steering hooks must look the
//! destination's policy up).
//!
//! The loader owns the hints so that no caller can get them wrong. Endpoints are rewritten
//! *before* the first entry of a class is written and *after* the last one is removed (or
//! rewritten out of it), so no intermediate state skips a live entry or misses a redirect.
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
    /// Any-peer entries that redirect or deny, in either view, per (rule set, direction).
    any_peer_above_allow: BTreeMap<(u32, u8), BTreeSet<PolicyEntryKey>>,
    /// Endpoints as the caller set them (hint bits clear), by ifindex.
    endpoints: BTreeMap<u32, EndpointInfo>,
}

fn is_redirect(v: &PolicyValue) -> bool {
    v.action == action::REDIRECT
}

fn above_allow(v: &PolicyValue) -> bool {
    v.action > action::ALLOW || v.audit_action > action::ALLOW
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
            (any && above_allow(v), &mut self.any_peer_above_allow),
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
    fn remove(&mut self, k: &PolicyEntryKey, classes: [bool; 4]) -> bool {
        let (sd, _, _) = class(k);
        let mut last = false;
        for (hit, sets) in classes.into_iter().zip([
            &mut self.trie,
            &mut self.any_peer,
            &mut self.redirect,
            &mut self.any_peer_above_allow,
        ]) {
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
            if self
                .any_peer_above_allow
                .get(&sd)
                .is_none_or(BTreeSet::is_empty)
            {
                flags |= ep_flag(ep_flags::ANY_PEER_ALLOWS, dir);
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

    /// After an entry was written: an entry that stopped being a redirect, or an any-peer
    /// entry that went down to allow, may end its class.
    pub(crate) fn after_upsert(
        &mut self,
        k: &PolicyEntryKey,
        v: &PolicyValue,
    ) -> Vec<(u32, EndpointInfo)> {
        if self.remove(k, [false, false, !is_redirect(v), !above_allow(v)]) {
            self.rewrites(k.key.subject)
        } else {
            Vec::new()
        }
    }

    /// Record an entry just removed; returns endpoints to rewrite now.
    pub(crate) fn after_remove(&mut self, k: &PolicyEntryKey) -> Vec<(u32, EndpointInfo)> {
        if self.remove(k, [true; 4]) {
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

#[cfg(test)]
mod tests {
    use moat_common::{PolicyKey, direction};

    use super::*;

    const RULESET: u32 = 5;
    const IFINDEX: u32 = 3;
    const PEER: u32 = 400;

    fn key(peer: u32) -> PolicyEntryKey {
        PolicyEntryKey {
            key: PolicyKey {
                subject: RULESET,
                peer,
                direction: direction::INGRESS,
                protocol: 6,
                dport: 80u16.to_be_bytes(),
            },
            prefix_len: policy_prefix::FULL,
        }
    }

    fn value(action: u8, audit_action: u8) -> PolicyValue {
        PolicyValue {
            action,
            audit_action,
            ..PolicyValue::default()
        }
    }

    fn with_endpoint() -> Hints {
        let mut h = Hints::default();
        let info = EndpointInfo {
            endpoint_id: 1,
            ruleset_id: RULESET,
            ..EndpointInfo::default()
        };
        h.set_endpoint(IFINDEX, info);
        h
    }

    /// The endpoint's ANY_PEER_ALLOWS hint for ingress, as it would be written now.
    fn allows_only(h: &Hints) -> bool {
        let info = h.endpoints[&IFINDEX];
        h.with_hints(info).flags & ep_flag(ep_flags::ANY_PEER_ALLOWS, direction::INGRESS) != 0
    }

    /// Applies an upsert the way `Datapath::apply_one` does; returns the hint the kernel
    /// sees while the entry is written, and after.
    fn upsert(h: &mut Hints, k: PolicyEntryKey, v: PolicyValue) -> (bool, bool) {
        let before = h.before_upsert(&k, &v);
        let during = before.last().map_or(allows_only(h), |(_, i)| {
            i.flags & ep_flag(ep_flags::ANY_PEER_ALLOWS, direction::INGRESS) != 0
        });
        h.after_upsert(&k, &v);
        (during, allows_only(h))
    }

    #[test]
    fn any_peer_allows_is_cleared_before_a_stronger_any_peer_entry_lands() {
        let mut h = with_endpoint();
        assert!(allows_only(&h), "no any-peer entry at all");
        // Exact-peer entries of any action leave the hint alone.
        assert_eq!(
            upsert(&mut h, key(PEER), value(action::DENY, action::DENY)),
            (true, true)
        );
        // An any-peer allow keeps it.
        let any = key(identity::ANY);
        assert_eq!(
            upsert(&mut h, any, value(action::ALLOW, action::ALLOW)),
            (true, true)
        );
        // The same entry turned into a deny: the hint goes before the write.
        let before = h.before_upsert(&any, &value(action::DENY, action::DENY));
        assert_eq!(before.len(), 1, "the endpoint is rewritten first");
        assert_eq!(
            before[0].1.flags & ep_flag(ep_flags::ANY_PEER_ALLOWS, direction::INGRESS),
            0
        );
        h.after_upsert(&any, &value(action::DENY, action::DENY));
        assert!(!allows_only(&h));
        // Back to allow: the hint returns only after the write.
        assert_eq!(
            upsert(&mut h, any, value(action::ALLOW, action::ALLOW)),
            (false, true)
        );
        // Only the audit view redirects or denies: that counts too.
        assert_eq!(
            upsert(&mut h, any, value(action::ALLOW, action::DENY)),
            (false, false)
        );
        assert_eq!(
            upsert(&mut h, any, value(action::NONE, action::REDIRECT)),
            (false, false)
        );
        // Removed: the hint returns.
        h.after_remove(&any);
        assert!(allows_only(&h));
    }
}
