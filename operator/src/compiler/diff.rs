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
//! An address changing identity (a pod relabelled, a new pod, a new policy CIDR) is judged by
//! a second write, its ipcache entry. When no endpoint switches, that write comes first and
//! is itself the atomic jump. When endpoints switch too, no single order works: written
//! before the switch, the address is judged by the old policy under its new identity; after,
//! by the new policy under its old one. So the batch moves it through a *transition identity*
//! `T` for each (old, new) identity pair: `T`'s entries are the new identity's in every
//! subject an endpoint holds in the new state, and the old identity's in subjects only the
//! old state holds; the address moves to `T` before any endpoint switches and to its new
//! identity after all have. A subject that switching endpoints leave while others use it in
//! the new state would need both meanings of `T`: the leaving endpoints first move to a
//! *transition subject*, a copy of it with the old meaning (their decisions do not change).
//! Transition entries go at the end of the batch. Addresses moving to or from the host
//! identity are the one exception (the datapath treats `HOST` apart): they are written
//! after the switch. The revision bump comes last, so established flows are only re-judged
//! against the finished state.
//!
//! Old and new entries coexist during a batch; [`transition_overflow`] finds a batch whose
//! intermediate state would not fit a map, so the reconciler can refuse it before it starts
//! instead of failing half-way.

use super::{Maps, Overflow, first_overflow, map_fill};
use ipnet::IpNet;
use moat_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, identity};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Subject numbers from here on are transition subjects; rule sets are numbered below.
pub const FIRST_TRANSITION_SUBJECT: u32 = 0xffff_0000;

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

/// Upserts (new or changed keys, with their new value) and deletes (vanished keys) of one
/// map, in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes<K, V> {
    pub ups: Vec<(K, V)>,
    pub dels: Vec<K>,
}

impl<K, V> Default for Changes<K, V> {
    fn default() -> Self {
        Changes {
            ups: Vec::new(),
            dels: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> Changes<K, V> {
    /// One merge pass over both maps (they are sorted alike), so a state of 200,000 entries
    /// is compared without a lookup per entry.
    pub fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        use std::cmp::Ordering::*;
        let mut c = Changes::default();
        let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
        loop {
            match (o.peek(), n.peek()) {
                (None, None) => break,
                (Some((ok, _)), None) => {
                    c.dels.push((*ok).clone());
                    o.next();
                }
                (None, Some((nk, nv))) => {
                    c.ups.push(((*nk).clone(), (*nv).clone()));
                    n.next();
                }
                (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                    Less => {
                        c.dels.push((*ok).clone());
                        o.next();
                    }
                    Greater => {
                        c.ups.push(((*nk).clone(), (*nv).clone()));
                        n.next();
                    }
                    Equal => {
                        if ov != nv {
                            c.ups.push(((*nk).clone(), (*nv).clone()));
                        }
                        o.next();
                        n.next();
                    }
                },
            }
        }
        c
    }
}

/// What changed from one state of the maps to another: the input of [`plan`]. Computed by
/// [`Delta::between`], or kept up to date by a compiler that knows what it changed
/// ([`super::incremental::Compiler`]), which spares the comparison of everything else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub prefilter: Changes<IpNet, u32>,
    pub endpoints: Changes<String, EndpointInfo>,
    pub ipcache: Changes<IpNet, IpcacheValue>,
    pub exact: Changes<PolicyKey, PolicyValue>,
    pub prefixes: Changes<(PolicyKey, u32), PolicyValue>,
}

impl Delta {
    pub fn between(old: &Maps, new: &Maps) -> Delta {
        Delta {
            prefilter: Changes::between(&old.prefilter, &new.prefilter),
            endpoints: Changes::between(&old.endpoints, &new.endpoints),
            ipcache: Changes::between(&old.ipcache, &new.ipcache),
            exact: Changes::between(&old.exact, &new.exact),
            prefixes: Changes::between(&old.prefixes, &new.prefixes),
        }
    }
}

/// The ordered batch that takes `realized` to `desired`; empty when they agree.
pub fn diff(desired: &Maps, realized: &RealizedState) -> Vec<MapOp> {
    plan(&Delta::between(&realized.maps, desired), desired, realized)
}

/// The ordered batch that makes `delta` (from `realized` to `desired`) happen.
pub fn plan(delta: &Delta, desired: &Maps, realized: &RealizedState) -> Vec<MapOp> {
    let old = &realized.maps;
    let mut ops = Vec::new();

    // 1. Blocklist additions first, removals last: the blocklist only ever drops.
    let pf = &delta.prefilter;
    ops.extend(pf.ups.iter().map(|&(k, v)| MapOp::PrefilterUpsert(k, v)));

    // 2. Endpoints that go away: their interface is gone or going; a missing entry fails
    //    closed, which the new state (no endpoint) agrees with.
    let ep = &delta.endpoints;
    ops.extend(ep.dels.iter().cloned().map(MapOp::EndpointDelete));

    // 3. Addresses. With no endpoint switching, every new identity takes effect in one write:
    //    new and changed entries, then removals (a more specific entry is never removed before
    //    its replacement exists). Otherwise they wait for step 6, the moving ones parked on
    //    transition identities meanwhile.
    let ip = &delta.ipcache;
    let switching = ep.ups.iter().any(|(k, _)| old.endpoints.contains_key(k));
    let ipcache_ops = ip
        .ups
        .iter()
        .map(|&(k, v)| MapOp::IpcacheUpsert(k, v))
        .chain(ip.dels.iter().copied().map(MapOp::IpcacheDelete));
    let mut ipcache_ops: Vec<MapOp> = ipcache_ops.collect();
    if !switching {
        ops.append(&mut ipcache_ops);
    }
    let transition = if switching {
        Transition::plan(old, desired, delta)
    } else {
        Transition::default()
    };
    ops.extend(transition.setup());

    // 4. Policy entries. Entries of subjects no old endpoint references are inert until an
    //    endpoint switches to them; entries of live subjects only change if the allocations
    //    were lost (content addressing keeps them stable otherwise): then new keys before
    //    changed ones, removals at the end, which keeps each lookup at its old or new value.
    let live: BTreeSet<u32> = old.endpoints.values().map(|e| e.ruleset_id).collect();
    let inert_first = |subject: u32, is_new: bool| (live.contains(&subject), !is_new);
    let mut policy_ups: Vec<((bool, bool), MapOp)> = Vec::new();
    for &(k, v) in &delta.exact.ups {
        let is_new = !old.exact.contains_key(&k);
        policy_ups.push((
            inert_first(k.subject, is_new),
            MapOp::PolicyExactUpsert(k, v),
        ));
    }
    for &((k, l), v) in &delta.prefixes.ups {
        let is_new = !old.prefixes.contains_key(&(k, l));
        policy_ups.push((
            inert_first(k.subject, is_new),
            MapOp::PolicyPrefixUpsert(k, l, v),
        ));
    }
    policy_ups.sort_by_key(|(rank, _)| *rank);
    ops.extend(policy_ups.into_iter().map(|(_, op)| op));

    // 5. Endpoints switch (new endpoints start here): subject, flags and isolating rules in
    //    one write.
    ops.extend(
        ep.ups
            .iter()
            .map(|(k, v)| MapOp::EndpointUpsert(k.clone(), *v)),
    );

    // 6. Addresses, when endpoints switched: moving ones leave their transition identity.
    ops.append(&mut ipcache_ops);

    // 7. Entries nothing references any more.
    ops.extend(transition.teardown());
    ops.extend(
        delta
            .exact
            .dels
            .iter()
            .copied()
            .map(MapOp::PolicyExactDelete),
    );
    ops.extend(
        delta
            .prefixes
            .dels
            .iter()
            .map(|&(k, l)| MapOp::PolicyPrefixDelete(k, l)),
    );
    ops.extend(pf.dels.iter().copied().map(MapOp::PrefilterDelete));

    // 8. Established flows are re-judged only against the finished state.
    if !ops.is_empty() {
        ops.push(MapOp::SetRevision(realized.revision.wrapping_add(1).max(1)));
    }
    ops
}

/// The identity that decides for the addresses of `net` in `maps`: its own entry, else the
/// longest shorter prefix holding it (what the datapath's trie finds), else `WORLD`.
fn identity_of(maps: &Maps, net: &IpNet) -> u32 {
    if let Some(v) = maps.ipcache.get(net) {
        return v.identity;
    }
    (0..net.prefix_len())
        .rev()
        .find_map(|len| {
            let cover = IpNet::new(net.addr(), len).ok()?.trunc();
            maps.ipcache.get(&cover)
        })
        .map_or(identity::WORLD, |v| v.identity)
}

/// A policy entry of either map, keyed without its subject and peer (what a peer's entries
/// in one subject look like, whatever the numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Exact(PolicyKey, PolicyValue),
    Prefix(PolicyKey, u32, PolicyValue),
}

impl Entry {
    fn with(self, subject: u32, peer: u32) -> Entry {
        let renumber = |k: PolicyKey| PolicyKey { subject, peer, ..k };
        match self {
            Entry::Exact(k, v) => Entry::Exact(renumber(k), v),
            Entry::Prefix(k, l, v) => Entry::Prefix(renumber(k), l, v),
        }
    }

    fn key(&self) -> &PolicyKey {
        match self {
            Entry::Exact(k, _) | Entry::Prefix(k, _, _) => k,
        }
    }

    fn upsert(self) -> MapOp {
        match self {
            Entry::Exact(k, v) => MapOp::PolicyExactUpsert(k, v),
            Entry::Prefix(k, l, v) => MapOp::PolicyPrefixUpsert(k, l, v),
        }
    }

    fn delete(self) -> MapOp {
        match self {
            Entry::Exact(k, _) => MapOp::PolicyExactDelete(k),
            Entry::Prefix(k, l, _) => MapOp::PolicyPrefixDelete(k, l),
        }
    }
}

/// The entries of `subject` whose peer is in `first..=last` (exact ones, then prefixes, each
/// in key order): two range reads, as keys order by subject, then peer.
fn entries_of(
    maps: &Maps,
    subject: u32,
    first: u32,
    last: u32,
) -> impl Iterator<Item = Entry> + '_ {
    let lo = PolicyKey {
        subject,
        peer: first,
        ..PolicyKey::default()
    };
    let hi = PolicyKey {
        subject,
        peer: last,
        direction: u8::MAX,
        protocol: u8::MAX,
        dport: [u8::MAX; 2],
    };
    let exact = maps.exact.range(lo..=hi).map(|(k, v)| Entry::Exact(*k, *v));
    let prefixes = maps
        .prefixes
        .range((lo, 0)..=(hi, u32::MAX))
        .map(|((k, l), v)| Entry::Prefix(*k, *l, *v));
    exact.chain(prefixes)
}

/// The entries of `peer` in `subject`, renumbered to (0, 0): what they decide, comparable
/// across peers and subjects.
fn view(maps: &Maps, subject: u32, peer: u32) -> impl Iterator<Item = Entry> + '_ {
    entries_of(maps, subject, peer, peer).map(|e| e.with(0, 0))
}

/// The lowest numbers from `first` on that `used` does not hold.
fn fresh(first: u32, used: &BTreeSet<u32>) -> impl Iterator<Item = u32> + '_ {
    (first..=u32::MAX).filter(move |n| !used.contains(n))
}

/// The extra state of a batch in which addresses change identity while endpoints switch
/// (module doc): written before the switch, removed after it.
#[derive(Debug, Default)]
struct Transition {
    /// Entries of the transition identities and subjects.
    entries: Vec<Entry>,
    /// Endpoints moved to a transition subject before the switch, with that entry.
    parked: Vec<(String, EndpointInfo)>,
    /// Moving addresses on their transition identity.
    addresses: Vec<(IpNet, IpcacheValue)>,
}

impl Transition {
    fn plan(old: &Maps, new: &Maps, delta: &Delta) -> Transition {
        // Addresses whose deciding identity changes, by (old, new) identity.
        let ip = &delta.ipcache;
        let changed = ip.ups.iter().map(|(k, _)| k).chain(&ip.dels);
        let mut moving: BTreeMap<(u32, u32), Vec<IpNet>> = BTreeMap::new();
        for net in changed {
            let (a, b) = (identity_of(old, net), identity_of(new, net));
            if a != b && a != identity::HOST && b != identity::HOST {
                moving.entry((a, b)).or_default().push(*net);
            }
        }
        if moving.is_empty() {
            return Transition::default();
        }

        // Numbers no entry of either state holds. The compiler never makes transition numbers,
        // so old entries that hold some (left by an interrupted batch) are all being deleted.
        let deleted = delta.exact.dels.iter();
        let deleted = deleted.chain(delta.prefixes.dels.iter().map(|(k, _)| k));
        let mut used_ids: BTreeSet<u32> = deleted.clone().map(|k| k.peer).collect();
        used_ids.extend(old.ipcache.values().map(|v| v.identity));
        let mut used_subjects: BTreeSet<u32> = deleted.map(|k| k.subject).collect();
        used_subjects.extend(old.endpoints.values().map(|e| e.ruleset_id));
        let mut ids = fresh(identity::FIRST_TRANSITION, &used_ids);
        let mut subjects = fresh(FIRST_TRANSITION_SUBJECT, &used_subjects);
        let pairs: Vec<((u32, u32), u32)> = moving
            .keys()
            .map(|&pair| (pair, ids.next().expect("transition identities left")))
            .collect();

        // Who needs which meaning of a transition identity.
        let in_new: BTreeSet<u32> = new.endpoints.values().map(|e| e.ruleset_id).collect();
        let mut leaving: BTreeMap<u32, Vec<(&String, &EndpointInfo)>> = BTreeMap::new();
        for (name, was) in &old.endpoints {
            if new.endpoints.get(name).is_some_and(|now| now != was) {
                leaving.entry(was.ruleset_id).or_default().push((name, was));
            }
        }
        let same_meaning = |subject: u32| {
            pairs
                .iter()
                .all(|((a, b), _)| view(old, subject, *a).eq(view(new, subject, *b)))
        };

        let mut t = Transition::default();
        for &subject in &in_new {
            for &((_, b), tid) in &pairs {
                t.entries
                    .extend(view(new, subject, b).map(|e| e.with(subject, tid)));
            }
        }
        let mut copies = Vec::new();
        for (&subject, endpoints) in &leaving {
            let target = if !in_new.contains(&subject) {
                subject
            } else if same_meaning(subject) {
                continue;
            } else {
                let copy = subjects.next().expect("transition subjects left");
                copies.push((subject, copy));
                t.parked.extend(endpoints.iter().map(|(name, was)| {
                    let parked = EndpointInfo {
                        ruleset_id: copy,
                        ..**was
                    };
                    ((*name).clone(), parked)
                }));
                copy
            };
            for &((a, _), tid) in &pairs {
                t.entries
                    .extend(view(old, subject, a).map(|e| e.with(target, tid)));
            }
        }
        for (subject, copy) in copies {
            let whole = entries_of(old, subject, 0, u32::MAX);
            t.entries.extend(whole.map(|e| e.with(copy, e.key().peer)));
        }
        for (&(_, tid), nets) in pairs.iter().zip(moving.values()) {
            for net in nets {
                let base = old.ipcache.get(net).or_else(|| new.ipcache.get(net));
                let base = base.copied().expect("a moving address is in one state");
                t.addresses.push((
                    *net,
                    IpcacheValue {
                        identity: tid,
                        ..base
                    },
                ));
            }
        }
        t
    }

    /// Entries, then parking, then addresses: each write is inert until the next refers to it.
    fn setup(&self) -> impl Iterator<Item = MapOp> + '_ {
        let entries = self.entries.iter().map(|e| e.upsert());
        let parked = self
            .parked
            .iter()
            .map(|(k, v)| MapOp::EndpointUpsert(k.clone(), *v));
        let addresses = self
            .addresses
            .iter()
            .map(|(k, v)| MapOp::IpcacheUpsert(*k, *v));
        entries.chain(parked).chain(addresses)
    }

    /// Once no address and no endpoint refers to them any more.
    fn teardown(&self) -> impl Iterator<Item = MapOp> + '_ {
        self.entries.iter().map(|e| e.delete())
    }
}

/// The first map a batch would overflow on its way, with the most entries it would need:
/// old and new rule sets coexist while endpoints switch, so a change that fits when done can
/// still overflow half-way.
pub fn transition_overflow(ops: &[MapOp], realized: &RealizedState) -> Option<Overflow> {
    /// A key of one of the maps.
    #[derive(PartialEq, Eq, Hash)]
    enum Key<'a> {
        Ipcache(IpNet),
        Endpoint(&'a str),
        Exact(PolicyKey),
        Prefix(PolicyKey, u32),
        Prefilter(IpNet),
    }
    let m = &realized.maps;
    // Whether each key the batch touched is present now; the others are as realized.
    let mut touched: HashMap<Key, bool> = HashMap::new();
    let mut fill = map_fill(m);
    let mut peak = fill;
    for op in ops {
        let (slot, key, was, adds) = match op {
            MapOp::IpcacheUpsert(k, _) | MapOp::IpcacheDelete(k) => (
                usize::from(k.prefix_len() != k.max_prefix_len()),
                Key::Ipcache(*k),
                m.ipcache.contains_key(k),
                matches!(op, MapOp::IpcacheUpsert(..)),
            ),
            MapOp::EndpointUpsert(k, _) | MapOp::EndpointDelete(k) => (
                2,
                Key::Endpoint(k),
                m.endpoints.contains_key(k),
                matches!(op, MapOp::EndpointUpsert(..)),
            ),
            MapOp::PolicyExactUpsert(k, _) | MapOp::PolicyExactDelete(k) => (
                3,
                Key::Exact(*k),
                m.exact.contains_key(k),
                matches!(op, MapOp::PolicyExactUpsert(..)),
            ),
            MapOp::PolicyPrefixUpsert(k, l, _) | MapOp::PolicyPrefixDelete(k, l) => (
                4,
                Key::Prefix(*k, *l),
                m.prefixes.contains_key(&(*k, *l)),
                matches!(op, MapOp::PolicyPrefixUpsert(..)),
            ),
            MapOp::PrefilterUpsert(k, _) | MapOp::PrefilterDelete(k) => (
                5,
                Key::Prefilter(*k),
                m.prefilter.contains_key(k),
                matches!(op, MapOp::PrefilterUpsert(..)),
            ),
            MapOp::SetRevision(_) => continue,
        };
        let present = touched.entry(key).or_insert(was);
        match (adds, *present) {
            (true, false) => fill[slot] += 1,
            (false, true) => fill[slot] -= 1,
            _ => {}
        }
        *present = adds;
        peak[slot] = peak[slot].max(fill[slot]);
    }
    first_overflow(&peak)
}
