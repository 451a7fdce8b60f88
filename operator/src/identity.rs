//! Identities (DESIGN.md "Identities", semantic rules 4 and 5) and the number pools that keep
//! every id the datapath sees stable.
//!
//! An address's identity is its pod's label set (pod labels, namespace name and namespace
//! labels), split further only where a policy CIDR (or `except`) or an egress named port cuts
//! between equal-label pods. Numbers come from [`NumberPool`]s whose state is a plain serde
//! value: the agent persists it next to the pins and hands it back after a restart, so the same
//! model always yields the same numbers and a restart never rewrites the maps. The compiler
//! stays a pure function of (model, allocations).

use crate::api::Protocol;
use crate::model::{Endpoint, Model};
use crate::selector::Labels;
use ipnet::IpNet;
use moat_common::{capacity, identity as reserved};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// A range of numbers handed out by key. A number freed in one compile is not reused until
/// the next one, so one batch of map operations never gives an old number a new meaning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberPool {
    /// First number of the range.
    pub first: u32,
    /// One past the last number.
    pub end: u32,
    /// Live keys and their numbers.
    pub assigned: BTreeMap<String, u32>,
    /// Numbers freed by the last compile (reusable from the next one on).
    pub released: BTreeSet<u32>,
}

/// The pool ran dry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no free number left in {first}..{end} for {key}")]
pub struct Exhausted {
    pub first: u32,
    pub end: u32,
    pub key: String,
}

impl NumberPool {
    pub fn new(first: u32, end: u32) -> Self {
        NumberPool {
            first,
            end,
            assigned: BTreeMap::new(),
            released: BTreeSet::new(),
        }
    }

    /// Makes `keys` the live set: keeps the numbers of surviving keys, quarantines the numbers
    /// of vanished keys, and gives new keys the lowest free numbers (dense ids stay dense).
    pub fn assign<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a String>,
    ) -> Result<NumberPool, Exhausted> {
        let live: BTreeSet<&String> = keys.into_iter().collect();
        let mut assigned = BTreeMap::new();
        let mut released = BTreeSet::new();
        for (k, &n) in &self.assigned {
            if live.contains(k) {
                assigned.insert(k.clone(), n);
            } else {
                released.insert(n);
            }
        }
        let new: Vec<&String> = live
            .into_iter()
            .filter(|k| !assigned.contains_key(*k))
            .collect();
        self.numbered(assigned, released, new)
    }

    /// What [`NumberPool::assign`] makes of the live keys less `vanished` (all live) plus
    /// `new` (none live), without going over the keys that stay: for a caller that knows
    /// what changed.
    pub fn update(
        &self,
        vanished: &BTreeSet<String>,
        new: &BTreeSet<String>,
    ) -> Result<NumberPool, Exhausted> {
        let mut assigned = self.assigned.clone();
        let mut released = BTreeSet::new();
        for k in vanished {
            released.extend(assigned.remove(k));
        }
        self.numbered(assigned, released, new.iter().collect())
    }

    /// The pool of `assigned` and `released` with `new` (in key order) given the lowest
    /// numbers neither holds.
    fn numbered(
        &self,
        mut assigned: BTreeMap<String, u32>,
        released: BTreeSet<u32>,
        new: Vec<&String>,
    ) -> Result<NumberPool, Exhausted> {
        if !new.is_empty() {
            let mut used: BTreeSet<u32> = assigned.values().copied().collect();
            used.extend(released.iter().copied());
            let mut cursor = self.first;
            for k in new {
                while used.contains(&cursor) {
                    cursor += 1;
                }
                if cursor >= self.end {
                    return Err(Exhausted {
                        first: self.first,
                        end: self.end,
                        key: k.clone(),
                    });
                }
                assigned.insert(k.clone(), cursor);
                used.insert(cursor);
            }
        }
        Ok(NumberPool {
            first: self.first,
            end: self.end,
            assigned,
            released,
        })
    }

    pub fn get(&self, key: &str) -> Option<u32> {
        self.assigned.get(key).copied()
    }
}

/// Everything numbered, persisted by the agent between restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// Label identities (and split remote-node identities): 256 up to `1 << 24`.
    pub identities: NumberPool,
    /// CIDR identities, one per policy CIDR: `1 << 24` up to the transition identities.
    pub cidr_identities: NumberPool,
    /// Local endpoint ids, by `namespace/pod`.
    pub endpoints: NumberPool,
    /// Rule-set (policy subject) ids, by content digest, below the transition subjects.
    pub rulesets: NumberPool,
    /// Rule ids, dense in `1..MAX_RULE_IDS`, by `kind/namespace/name/direction/index`.
    pub rules: NumberPool,
}

impl Default for Allocations {
    fn default() -> Self {
        Allocations {
            identities: NumberPool::new(reserved::FIRST_LABEL, reserved::FIRST_CIDR),
            cidr_identities: NumberPool::new(reserved::FIRST_CIDR, reserved::FIRST_TRANSITION),
            endpoints: NumberPool::new(1, 1 << 16),
            rulesets: NumberPool::new(1, crate::compiler::diff::FIRST_TRANSITION_SUBJECT),
            rules: NumberPool::new(1, capacity::MAX_RULE_IDS),
        }
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// The local node (and hostNetwork pods on it).
    Host,
    /// Other nodes (and hostNetwork pods on them).
    RemoteNode,
    /// Addresses of no pod, node or policy CIDR.
    World,
    /// Addresses whose longest matching policy CIDR is this one (and that are no pod or node).
    Cidr(IpNet),
    /// Pods with equal labels in one namespace (`pods` index `Model::endpoints`).
    Pods {
        namespace: String,
        labels: Labels,
        pods: Vec<usize>,
    },
}

/// One identity and the addresses that carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    pub kind: IdentityKind,
    /// Member addresses (pods and nodes), sorted. Empty for world and CIDR identities.
    pub addresses: Vec<IpAddr>,
}

impl IdentityInfo {
    /// Whether all of this identity's addresses lie in `net` (by construction they all lie on
    /// the same side of every policy CIDR, so one representative answers for all).
    pub fn inside(&self, net: &IpNet) -> bool {
        match &self.kind {
            IdentityKind::Cidr(p) => net.contains(p),
            IdentityKind::World => false,
            _ => self.addresses.first().is_some_and(|a| net.contains(a)),
        }
    }
}

/// The identity of every address of the cluster.
#[derive(Clone, Debug, Default)]
pub struct IdentityTable {
    /// Pod and node addresses.
    pub by_address: BTreeMap<IpAddr, u32>,
    /// Policy CIDRs and their CIDR identities.
    pub by_cidr: BTreeMap<IpNet, u32>,
    pub info: BTreeMap<u32, IdentityInfo>,
}

/// Who owns an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Pod(usize),
    LocalNode,
    RemoteNode,
}

/// Assigns identities to every pod and node address and to every policy CIDR.
///
/// `cidrs` are all CIDRs (and excepts) of valid policies; `port_names` are the (name, protocol)
/// pairs that egress rules name, which must resolve alike within an identity (rule 5).
pub fn assign(
    model: &Model,
    cidrs: &BTreeSet<IpNet>,
    port_names: &BTreeSet<(String, Protocol)>,
    alloc: &Allocations,
) -> Result<(IdentityTable, NumberPool, NumberPool), Exhausted> {
    let owners = address_owners(model);
    let keys = LabelKeys::new(model);

    // Group addresses by label key, with the discriminator each would need. Pods with equal
    // labels in one namespace share their key, which is made once per such group.
    type Members = Vec<(IpAddr, Owner, Sig)>;
    let mut groups: Vec<(String, Members)> = vec![
        ("reserved:host".into(), Vec::new()),
        ("reserved:remote-node".into(), Vec::new()),
    ];
    let label_key = |ep: &Endpoint| keys.key(&ep.namespace, &ep.labels);
    let mut pod_groups: HashMap<(&str, &Labels), usize> = HashMap::new();
    // Group and named ports of each pod, for its second address.
    let mut pod_sig: Vec<Option<(usize, Vec<Option<u16>>)>> = vec![None; model.endpoints.len()];
    for (&addr, &owner) in &owners {
        let within: Vec<IpNet> = cidrs
            .iter()
            .filter(|c| c.contains(&addr))
            .copied()
            .collect();
        let (group, ports) = match owner {
            Owner::LocalNode => (0, Vec::new()),
            Owner::RemoteNode => (1, Vec::new()),
            Owner::Pod(i) => pod_sig[i]
                .get_or_insert_with(|| {
                    let ep = &model.endpoints[i];
                    let group = *pod_groups
                        .entry((ep.namespace.as_str(), &ep.labels))
                        .or_insert_with(|| {
                            groups.push((label_key(ep), Vec::new()));
                            groups.len() - 1
                        });
                    let ports = port_names
                        .iter()
                        .map(|(n, p)| ep.named_port(n, *p))
                        .collect();
                    (group, ports)
                })
                .clone(),
        };
        groups[group].1.push((addr, owner, (within, ports)));
    }

    let mut table = IdentityTable::default();
    let mut keyed: Vec<(String, Vec<(IpAddr, Owner)>)> = Vec::new();
    for (key, members) in groups {
        if members.is_empty() {
            continue;
        }
        let uniform = members.windows(2).all(|w| w[0].2 == w[1].2);
        if key == "reserved:host" {
            // The own node is always HOST: traffic with it is allowed by rule 3 whatever CIDRs
            // say, so no CIDR ever needs to split it.
            let addrs: Vec<IpAddr> = members.iter().map(|m| m.0).collect();
            for a in &addrs {
                table.by_address.insert(*a, reserved::HOST);
            }
            table.info.insert(
                reserved::HOST,
                IdentityInfo {
                    kind: IdentityKind::Host,
                    addresses: addrs,
                },
            );
            continue;
        }
        if key == "reserved:remote-node" && uniform {
            let addrs: Vec<IpAddr> = members.iter().map(|m| m.0).collect();
            for a in &addrs {
                table.by_address.insert(*a, reserved::REMOTE_NODE);
            }
            table.info.insert(
                reserved::REMOTE_NODE,
                IdentityInfo {
                    kind: IdentityKind::RemoteNode,
                    addresses: addrs,
                },
            );
            continue;
        }
        keyed.extend(parts(key, members));
    }
    let ids = alloc.identities.assign(keyed.iter().map(|(k, _)| k))?;
    for (key, members) in keyed {
        let id = ids.get(&key).expect("assigned above");
        let addresses: Vec<IpAddr> = members.iter().map(|m| m.0).collect();
        let kind = match members[0].1 {
            Owner::Pod(_) => {
                let mut pods: Vec<usize> = members
                    .iter()
                    .filter_map(|m| {
                        if let Owner::Pod(i) = m.1 {
                            Some(i)
                        } else {
                            None
                        }
                    })
                    .collect();
                pods.dedup();
                let ep = &model.endpoints[pods[0]];
                IdentityKind::Pods {
                    namespace: ep.namespace.clone(),
                    labels: ep.labels.clone(),
                    pods,
                }
            }
            _ => IdentityKind::RemoteNode,
        };
        for a in &addresses {
            table.by_address.insert(*a, id);
        }
        table.info.insert(id, IdentityInfo { kind, addresses });
    }

    let cidr_keys: Vec<String> = cidrs.iter().map(|c| format!("cidr:{c}")).collect();
    let cidr_ids = alloc.cidr_identities.assign(cidr_keys.iter())?;
    for c in cidrs {
        let id = cidr_ids.get(&format!("cidr:{c}")).expect("assigned above");
        table.by_cidr.insert(*c, id);
        table.info.insert(
            id,
            IdentityInfo {
                kind: IdentityKind::Cidr(*c),
                addresses: Vec::new(),
            },
        );
    }
    table.info.insert(
        reserved::WORLD,
        IdentityInfo {
            kind: IdentityKind::World,
            addresses: Vec::new(),
        },
    );
    table.info.entry(reserved::HOST).or_insert(IdentityInfo {
        kind: IdentityKind::Host,
        addresses: Vec::new(),
    });
    Ok((table, ids, cidr_ids))
}

/// The identities of a model from those of the model before, when all that changed is the
/// labels or named ports of some pods (see [`relabel_applies`]): only the label sets those
/// pods leave and join are grouped and numbered again.
pub struct Relabelled {
    pub table: IdentityTable,
    pub pool: NumberPool,
    /// Identities that were taken apart, as they were.
    pub gone: BTreeMap<u32, IdentityInfo>,
    /// Identities made instead (some may have their old number).
    pub made: BTreeSet<u32>,
    /// Addresses of the label sets grouped again.
    pub moved: Vec<IpAddr>,
}

/// Whether `model` differs from `before` (same pods, in the same order) in nothing that
/// decides who owns an address: the `changed` pods kept their names, nodes, addresses, phases
/// and host networking, and each running pod among them owns its addresses in `table`.
pub fn relabel_applies(
    table: &IdentityTable,
    before: &[Endpoint],
    model: &Model,
    changed: &[usize],
) -> bool {
    changed.iter().all(|&i| {
        let (o, n) = (&before[i], &model.endpoints[i]);
        let same = (&o.name, &o.namespace, &o.node, &o.addresses, o.phase, o.host_network)
            == (&n.name, &n.namespace, &n.node, &n.addresses, n.phase, n.host_network);
        same && (!grouped(n)
            || n.addresses.iter().all(|a| {
                table
                    .by_address
                    .get(a)
                    .and_then(|id| table.info.get(id))
                    .is_some_and(|info| matches!(&info.kind, IdentityKind::Pods { pods, .. } if pods.contains(&i)))
            }))
    })
}

/// A pod whose addresses carry its labels' identity.
fn grouped(e: &Endpoint) -> bool {
    e.phase == crate::model::Phase::Running && !e.host_network
}

/// [`assign`]'s result for `model` from `table` and `pool`, its result for `before`, where
/// [`relabel_applies`] holds.
pub fn relabel(
    mut table: IdentityTable,
    pool: &NumberPool,
    before: &[Endpoint],
    model: &Model,
    changed: &[usize],
    cidrs: &BTreeSet<IpNet>,
    port_names: &BTreeSet<(String, Protocol)>,
) -> Result<Relabelled, Exhausted> {
    let sig = |a: &IpAddr, ep: &Endpoint| -> Sig {
        (
            cidrs.iter().filter(|c| c.contains(a)).copied().collect(),
            port_names
                .iter()
                .map(|(n, p)| ep.named_port(n, *p))
                .collect(),
        )
    };
    let moving: BTreeSet<usize> = changed
        .iter()
        .copied()
        .filter(|&i| grouped(&model.endpoints[i]))
        .collect();
    let mut touched: BTreeSet<(&str, &Labels)> = BTreeSet::new();
    for &i in &moving {
        touched.insert((&before[i].namespace, &before[i].labels));
        touched.insert((&model.endpoints[i].namespace, &model.endpoints[i].labels));
    }
    let old_ids: Vec<u32> = table
        .info
        .iter()
        .filter(|(_, info)| match &info.kind {
            IdentityKind::Pods {
                namespace, labels, ..
            } => touched.contains(&(namespace.as_str(), labels)),
            _ => false,
        })
        .map(|(id, _)| *id)
        .collect();

    // The members of the touched label sets now: the pods that stay, and those that came.
    // (namespace, labels) -> (address, pod, sig) of each member.
    type Groups<'m> = BTreeMap<(&'m str, &'m Labels), Vec<(IpAddr, usize, Sig)>>;
    let mut groups: Groups = BTreeMap::new();
    let mut gone = BTreeMap::new();
    for id in &old_ids {
        let info = table.info.remove(id).expect("listed above");
        if let IdentityKind::Pods { pods, .. } = &info.kind {
            let staying: BTreeSet<usize> = pods
                .iter()
                .copied()
                .filter(|p| !moving.contains(p))
                .collect();
            for p in staying {
                let ep = &model.endpoints[p];
                for a in ep
                    .addresses
                    .iter()
                    .filter(|a| table.by_address.get(a) == Some(id))
                {
                    let group = (ep.namespace.as_str(), &ep.labels);
                    groups.entry(group).or_default().push((*a, p, sig(a, ep)));
                }
            }
        }
        gone.insert(*id, info);
    }
    for &i in &moving {
        let ep = &model.endpoints[i];
        let group = (ep.namespace.as_str(), &ep.labels);
        for a in &ep.addresses {
            groups.entry(group).or_default().push((*a, i, sig(a, ep)));
        }
    }

    // Keyed as `assign` keys them.
    let keys = LabelKeys::new(model);
    let mut keyed: Vec<(String, Vec<(IpAddr, usize)>)> = Vec::new();
    for ((ns, labels), mut members) in groups {
        members.sort_by_key(|m| m.0);
        let key = keys.key(ns, labels);
        keyed.extend(parts(key, members));
    }
    let old_keys: BTreeSet<String> = pool
        .assigned
        .iter()
        .filter(|(_, n)| gone.contains_key(n))
        .map(|(k, _)| k.clone())
        .collect();
    let new_keys: BTreeSet<String> = keyed.iter().map(|(k, _)| k.clone()).collect();
    let pool = pool.update(
        &old_keys.difference(&new_keys).cloned().collect(),
        &new_keys.difference(&old_keys).cloned().collect(),
    )?;

    let mut made = BTreeSet::new();
    let mut moved = Vec::new();
    for (key, members) in keyed {
        let id = pool.get(&key).expect("assigned above");
        let addresses: Vec<IpAddr> = members.iter().map(|m| m.0).collect();
        let mut pods: Vec<usize> = members.iter().map(|m| m.1).collect();
        pods.dedup();
        let ep = &model.endpoints[pods[0]];
        for a in &addresses {
            table.by_address.insert(*a, id);
        }
        moved.extend(addresses.iter().copied());
        table.info.insert(
            id,
            IdentityInfo {
                kind: IdentityKind::Pods {
                    namespace: ep.namespace.clone(),
                    labels: ep.labels.clone(),
                    pods,
                },
                addresses,
            },
        );
        made.insert(id);
    }
    Ok(Relabelled {
        table,
        pool,
        gone,
        made,
        moved,
    })
}

/// What splits equal-label pods (rules 4, 5): the policy CIDRs holding an address, and the
/// pod's numbers for the named ports egress rules use.
pub type Sig = (Vec<IpNet>, Vec<Option<u16>>);

/// Pool keys of label sets: pods with equal labels in one namespace share one. A key is made
/// of the namespace's name and labels (looked up in the model; a namespace it does not list
/// has none) and the pod's labels.
struct LabelKeys<'a> {
    namespaces: BTreeMap<&'a str, &'a Labels>,
    none: Labels,
}

impl<'a> LabelKeys<'a> {
    fn new(model: &'a Model) -> Self {
        LabelKeys {
            namespaces: model
                .namespaces
                .iter()
                .map(|n| (n.name.as_str(), &n.labels))
                .collect(),
            none: Labels::new(),
        }
    }

    fn key(&self, namespace: &str, labels: &Labels) -> String {
        let ns_labels = self
            .namespaces
            .get(namespace)
            .copied()
            .unwrap_or(&self.none);
        serde_json::json!({"ns": namespace, "nsLabels": ns_labels, "labels": labels}).to_string()
    }
}

/// The identities of one label set (pool key `key`), each with its members: one when all
/// members have the same `Sig`, else one per distinct `Sig`, keyed `key|<sig>`.
fn parts<O>(key: String, members: Vec<(IpAddr, O, Sig)>) -> Vec<(String, Vec<(IpAddr, O)>)> {
    if members.windows(2).all(|w| w[0].2 == w[1].2) {
        return vec![(key, members.into_iter().map(|m| (m.0, m.1)).collect())];
    }
    let mut parts: BTreeMap<Sig, Vec<(IpAddr, O)>> = BTreeMap::new();
    for (a, o, sig) in members {
        parts.entry(sig).or_default().push((a, o));
    }
    parts
        .into_iter()
        .map(|(sig, part)| {
            let cidrs: Vec<String> = sig.0.iter().map(|c| c.to_string()).collect();
            let split = serde_json::json!({"cidrs": cidrs, "ports": sig.1}).to_string();
            (format!("{key}|{split}"), part)
        })
        .collect()
}

/// Who owns each address: nodes first (hostNetwork pods are their node), then running pods in
/// `namespace/name` order (a duplicate address keeps its first owner).
fn address_owners(model: &Model) -> BTreeMap<IpAddr, Owner> {
    let mut owners = BTreeMap::new();
    let node_owner = |node: &str| {
        if node == model.local_node {
            Owner::LocalNode
        } else {
            Owner::RemoteNode
        }
    };
    for n in &model.nodes {
        for a in &n.addresses {
            owners.entry(*a).or_insert(node_owner(&n.name));
        }
    }
    let mut pods: Vec<usize> = (0..model.endpoints.len()).collect();
    pods.sort_by_cached_key(|&i| model.endpoints[i].key());
    for &i in &pods {
        let ep = &model.endpoints[i];
        if ep.phase != crate::model::Phase::Running || !ep.host_network {
            continue;
        }
        for a in &ep.addresses {
            owners.entry(*a).or_insert(node_owner(&ep.node));
        }
    }
    for &i in &pods {
        let ep = &model.endpoints[i];
        if ep.phase != crate::model::Phase::Running || ep.host_network {
            continue;
        }
        for a in &ep.addresses {
            owners.entry(*a).or_insert(Owner::Pod(i));
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keeps_numbers_and_quarantines_freed_ones() {
        let p = NumberPool::new(10, 20);
        let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p1 = p.assign(keys(&["a", "b", "c"]).iter()).unwrap();
        assert_eq!(
            (p1.get("a"), p1.get("b"), p1.get("c")),
            (Some(10), Some(11), Some(12))
        );
        let p2 = p1.assign(keys(&["a", "c", "d"]).iter()).unwrap();
        assert_eq!((p2.get("a"), p2.get("c")), (Some(10), Some(12)));
        assert_eq!(
            p2.get("d"),
            Some(13),
            "11 was freed in this compile: not reused yet"
        );
        let p3 = p2.assign(keys(&["a", "c", "d", "e"]).iter()).unwrap();
        assert_eq!(
            p3.get("e"),
            Some(11),
            "reused one compile later, ids stay dense"
        );
        let json = serde_json::to_string(&p3).unwrap();
        assert_eq!(serde_json::from_str::<NumberPool>(&json).unwrap(), p3);
    }

    #[test]
    fn update_is_assign_of_the_keys_that_stay_and_come() {
        let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let p = NumberPool::new(10, 20)
            .assign(keys(&["a", "b", "c", "d"]).iter())
            .unwrap()
            .assign(keys(&["a", "c", "d"]).iter())
            .unwrap();
        let (vanished, new) = (keys(&["c"]), keys(&["e", "f"]));
        let live = keys(&["a", "d", "e", "f"]);
        assert_eq!(
            p.update(&vanished, &new).unwrap(),
            p.assign(live.iter()).unwrap()
        );
        assert_eq!(
            p.update(&BTreeSet::new(), &BTreeSet::new()).unwrap(),
            p.assign(keys(&["a", "c", "d"]).iter()).unwrap(),
            "nothing changed: the quarantine ends all the same"
        );
        assert!(
            NumberPool::new(1, 2)
                .update(&BTreeSet::new(), &new)
                .is_err()
        );
    }

    #[test]
    fn pool_reports_exhaustion() {
        let p = NumberPool::new(1, 3);
        let keys: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(p.assign(keys.iter()).is_err());
    }
}
