//! Which identities a rule's peers name.

use super::normalize::{NormPeer, NsMatch};
use crate::api::Entity;
use crate::identity::{IdentityKind, IdentityTable};
use crate::model::Model;
use crate::selector::{self, Labels};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use moat_common::identity::{ANY, HOST};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The identity table arranged for peer resolution, built once per compile: most peers name
/// pods of one namespace (or of the namespaces a selector picks), so pod identities are
/// grouped by namespace and a peer looks only at the namespaces it can match.
pub struct PeerIndex<'a> {
    ids: &'a IdentityTable,
    ns_labels: &'a BTreeMap<&'a str, &'a Labels>,
    /// Pod identities and their labels, by namespace.
    pods: BTreeMap<&'a str, Vec<(u32, &'a Labels)>>,
    /// What peers that look beyond one namespace resolved to, by their spelling: many
    /// policies name the same CIDRs, entities and namespace selectors. `None`: resolved every
    /// time (over a few identities that is cheaper than spelling the peer).
    memo: Option<RefCell<HashMap<String, Vec<u32>>>>,
}

impl<'a> PeerIndex<'a> {
    pub fn new(ids: &'a IdentityTable, ns_labels: &'a BTreeMap<&'a str, &'a Labels>) -> Self {
        PeerIndex {
            memo: Some(RefCell::default()),
            ..PeerIndex::few(ids, ns_labels)
        }
    }

    /// An index over a few identities (no memo).
    pub fn few(ids: &'a IdentityTable, ns_labels: &'a BTreeMap<&'a str, &'a Labels>) -> Self {
        let mut pods: BTreeMap<&str, Vec<(u32, &Labels)>> = BTreeMap::new();
        for (&id, i) in &ids.info {
            if let IdentityKind::Pods {
                namespace, labels, ..
            } = &i.kind
            {
                pods.entry(namespace.as_str())
                    .or_default()
                    .push((id, labels));
            }
        }
        PeerIndex {
            ids,
            ns_labels,
            pods,
            memo: None,
        }
    }

    /// Expands `peers` (`None` = every address) to identity numbers, `ANY` (0) for a wildcard.
    ///
    /// The own node is named only by a Deny rule's explicit `host` entity (rule 3): it is
    /// allowed anyway, and nothing else may restrict it.
    pub fn resolve(&self, peers: Option<&[NormPeer]>, deny: bool) -> BTreeSet<u32> {
        let Some(peers) = peers else {
            return BTreeSet::from([ANY]);
        };
        let mut out = BTreeSet::new();
        for p in peers {
            match p {
                NormPeer::Entity(Entity::All) => {
                    out.insert(ANY);
                }
                NormPeer::Entity(Entity::Host) => {
                    if deny {
                        out.insert(HOST);
                    }
                }
                NormPeer::Pods {
                    namespaces: NsMatch::Named(n),
                    pods,
                } => {
                    if let Some(members) = self.pods.get(n.as_str()) {
                        out.extend(pod_members(members, pods.as_ref()));
                    }
                }
                _ => match &self.memo {
                    Some(memo) => {
                        let mut memo = memo.borrow_mut();
                        let ids = memo.entry(spelling(p)).or_insert_with(|| self.wide(p));
                        out.extend(ids.iter().copied());
                    }
                    None => out.extend(self.wide(p)),
                },
            }
        }
        out
    }

    /// The identities of a peer that can name addresses of any namespace.
    fn wide(&self, p: &NormPeer) -> Vec<u32> {
        let ids = self.ids;
        match p {
            NormPeer::Entity(Entity::World) => ids
                .info
                .iter()
                .filter_map(|(id, i)| {
                    matches!(i.kind, IdentityKind::World | IdentityKind::Cidr(_)).then_some(*id)
                })
                .collect(),
            NormPeer::Entity(Entity::Cluster) => ids
                .info
                .iter()
                .filter_map(|(id, i)| {
                    matches!(i.kind, IdentityKind::Pods { .. } | IdentityKind::RemoteNode)
                        .then_some(*id)
                })
                .collect(),
            NormPeer::Block { cidr, except } => ids
                .info
                .iter()
                .filter_map(|(id, i)| {
                    (!matches!(i.kind, IdentityKind::Host)
                        && i.inside(cidr)
                        && !except.iter().any(|e| i.inside(e)))
                    .then_some(*id)
                })
                .collect(),
            NormPeer::Pods { namespaces, pods } => {
                let empty = Labels::new();
                self.pods
                    .iter()
                    .filter(|(ns, _)| match namespaces {
                        NsMatch::Selector(s) => {
                            selector::matches(s, self.ns_labels.get(*ns).copied().unwrap_or(&empty))
                        }
                        _ => true,
                    })
                    .flat_map(|(_, members)| pod_members(members, pods.as_ref()))
                    .collect()
            }
            // Answered by `resolve` itself.
            NormPeer::Entity(Entity::All | Entity::Host) => Vec::new(),
        }
    }
}

/// The pod identities among `members` that `pods` (`None`: all) selects.
fn pod_members<'m>(
    members: &'m [(u32, &Labels)],
    pods: Option<&'m LabelSelector>,
) -> impl Iterator<Item = u32> + 'm {
    members.iter().filter_map(move |&(id, labels)| {
        pods.is_none_or(|s| selector::matches(s, labels))
            .then_some(id)
    })
}

/// A peer's memo key: equal spellings name equal identities.
fn spelling(p: &NormPeer) -> String {
    let json = |s: Option<&LabelSelector>| serde_json::to_string(&s).unwrap_or_default();
    match p {
        NormPeer::Pods { namespaces, pods } => {
            let ns = match namespaces {
                NsMatch::Any => "*".to_string(),
                NsMatch::Named(n) => format!("={n}"),
                NsMatch::Selector(s) => json(Some(s)),
            };
            format!("pods {ns} {}", json(pods.as_ref()))
        }
        NormPeer::Block { cidr, except } => format!("block {cidr} {except:?}"),
        NormPeer::Entity(e) => format!("entity {e:?}"),
    }
}

/// The namespace labels of the model, by name.
pub fn namespace_labels(model: &Model) -> BTreeMap<&str, &Labels> {
    model
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect()
}
