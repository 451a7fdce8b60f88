//! Which identities a rule's peers name.

use super::normalize::{NormPeer, NsMatch};
use crate::api::Entity;
use crate::identity::{IdentityKind, IdentityTable};
use crate::model::Model;
use crate::selector::{self, Labels};
use moat_common::identity::{ANY, HOST};
use std::collections::{BTreeMap, BTreeSet};

/// Expands `peers` (`None` = every address) to identity numbers, `ANY` (0) for a wildcard.
///
/// The own node is named only by a Deny rule's explicit `host` entity (rule 3): it is allowed
/// anyway, and nothing else may restrict it.
pub fn resolve(
    peers: Option<&[NormPeer]>,
    deny: bool,
    ids: &IdentityTable,
    ns_labels: &BTreeMap<&str, &Labels>,
) -> BTreeSet<u32> {
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
            NormPeer::Entity(Entity::World) => {
                out.extend(ids.info.iter().filter_map(|(id, i)| {
                    matches!(i.kind, IdentityKind::World | IdentityKind::Cidr(_)).then_some(*id)
                }));
            }
            NormPeer::Entity(Entity::Cluster) => {
                out.extend(ids.info.iter().filter_map(|(id, i)| {
                    matches!(i.kind, IdentityKind::Pods { .. } | IdentityKind::RemoteNode)
                        .then_some(*id)
                }));
            }
            NormPeer::Block { cidr, except } => {
                out.extend(ids.info.iter().filter_map(|(id, i)| {
                    (!matches!(i.kind, IdentityKind::Host)
                        && i.inside(cidr)
                        && !except.iter().any(|e| i.inside(e)))
                    .then_some(*id)
                }));
            }
            NormPeer::Pods { namespaces, pods } => {
                let empty = Labels::new();
                out.extend(ids.info.iter().filter_map(|(id, i)| {
                    let IdentityKind::Pods {
                        namespace, labels, ..
                    } = &i.kind
                    else {
                        return None;
                    };
                    let ns_ok = match namespaces {
                        NsMatch::Any => true,
                        NsMatch::Named(n) => n == namespace,
                        NsMatch::Selector(s) => selector::matches(
                            s,
                            ns_labels.get(namespace.as_str()).copied().unwrap_or(&empty),
                        ),
                    };
                    let pods_ok = pods.as_ref().is_none_or(|s| selector::matches(s, labels));
                    (ns_ok && pods_ok).then_some(*id)
                }));
            }
        }
    }
    out
}

/// The namespace labels of the model, by name.
pub fn namespace_labels(model: &Model) -> BTreeMap<&str, &Labels> {
    model
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect()
}
