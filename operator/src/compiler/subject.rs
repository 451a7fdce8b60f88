//! One endpoint's compiled policy: which rules apply in each direction, the policy entries they
//! become (with broader values folded onto narrower keys), its flags, and its L7 rules.

use super::normalize::{NormPolicy, NormPort, NormRule, PortSpec, Subject};
use super::peers;
use super::ports;
use super::{HttpMatcher, RuleIds};
use crate::api::Protocol;
use crate::identity::{IdentityKind, IdentityTable};
use crate::model::{Endpoint, Model};
use crate::selector::{self, Labels};
use moat_common::direction::{EGRESS, INGRESS};
use moat_common::identity::ANY;
use moat_common::{PolicyValue, action, ep_flag, ep_flags, policy_prefix};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The protocol/port part of a policy key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// IP protocol, `None` for every protocol (and then every port).
    pub protocol: Option<u8>,
    /// Port prefix value (host order), only the leading `bits` count.
    pub port: u16,
    /// Leading port bits fixed, 0..=16.
    pub bits: u8,
}

impl PortKey {
    pub const ANY: PortKey = PortKey {
        protocol: None,
        port: 0,
        bits: 0,
    };

    /// Prefix length in the policy trie (72, 80, or 80 + port bits).
    pub fn prefix_len(&self) -> u32 {
        match self.protocol {
            None => policy_prefix::ANY,
            Some(_) => policy_prefix::PROTOCOL + u32::from(self.bits),
        }
    }

    /// Whether every packet this key matches is also matched by `self`.
    pub fn covers(&self, other: &PortKey) -> bool {
        match (self.protocol, other.protocol) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => {
                a == b
                    && self.bits <= other.bits
                    && ports::contains(self.port, self.bits, other.port)
            }
        }
    }
}

/// A policy entry of one subject, without the subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub direction: u8,
    pub peer: u32,
    pub port: PortKey,
}

/// Port range of an L7 entry, per (direction, peer).
pub type L7Slot = (u8, u32, u16, u16);

/// Everything keyed by a rule-set id: endpoints with equal content share one.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleSetContent {
    pub entries: BTreeMap<EntryKey, PolicyValueOrd>,
    pub l7: BTreeMap<L7Slot, BTreeSet<HttpMatcher>>,
}

/// `PolicyValue` with an order, so contents can be compared and grouped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValueOrd {
    pub action: u8,
    pub audit_action: u8,
    pub proxy_port: u16,
    pub rule_id: u32,
    pub audit_rule_id: u32,
}

impl From<PolicyValueOrd> for PolicyValue {
    fn from(v: PolicyValueOrd) -> Self {
        PolicyValue {
            action: v.action,
            audit_action: v.audit_action,
            proxy_port: v.proxy_port,
            rule_id: v.rule_id,
            audit_rule_id: v.audit_rule_id,
        }
    }
}

impl PolicyValueOrd {
    /// Folds `other` in: the higher action wins (deny > redirect > allow > none), ties go to
    /// the lower rule id so that the result does not depend on the order of folding.
    pub fn merge(&mut self, other: &PolicyValueOrd) {
        let better = |a: u8, r: u32, b: u8, s: u32| b > a || (b == a && b != action::NONE && s < r);
        if better(self.action, self.rule_id, other.action, other.rule_id) {
            self.action = other.action;
            self.rule_id = other.rule_id;
            self.proxy_port = other.proxy_port;
        }
        if better(
            self.audit_action,
            self.audit_rule_id,
            other.audit_action,
            other.audit_rule_id,
        ) {
            self.audit_action = other.audit_action;
            self.audit_rule_id = other.audit_rule_id;
        }
    }
}

/// One endpoint's compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub flags: u32,
    pub isolating_rule: [u32; 2],
    pub audit_isolating_rule: [u32; 2],
    pub content: RuleSetContent,
}

/// Whether `p` can select pods of namespace `ns` (the namespace half of selection).
pub fn selects_namespace(p: &NormPolicy, ns: &str, ns_labels: &BTreeMap<&str, &Labels>) -> bool {
    match &p.subject {
        Subject::Namespaced { namespace, .. } => namespace == ns,
        Subject::Cluster { namespaces, .. } => namespaces.as_ref().is_none_or(|s| {
            let empty = Labels::new();
            selector::matches(s, ns_labels.get(ns).copied().unwrap_or(&empty))
        }),
    }
}

/// Whether `p` selects a pod with `labels` of a namespace it can select.
pub fn selects_pod(p: &NormPolicy, labels: &Labels) -> bool {
    match &p.subject {
        Subject::Namespaced { pods, .. } => selector::matches(pods, labels),
        Subject::Cluster { pods, .. } => pods.as_ref().is_none_or(|s| selector::matches(s, labels)),
    }
}

/// For each of `namespaces`, the positions in `policies` of the policies that can select its
/// pods, in `policies` order. Selection is then a pod-selector test against this short list
/// instead of every policy.
pub fn by_namespace<'n>(
    policies: &[Arc<NormPolicy>],
    namespaces: impl IntoIterator<Item = &'n str>,
    ns_labels: &BTreeMap<&str, &Labels>,
) -> BTreeMap<&'n str, Vec<usize>> {
    namespaces
        .into_iter()
        .map(|ns| {
            let ps = (0..policies.len())
                .filter(|&i| selects_namespace(&policies[i], ns, ns_labels))
                .collect();
            (ns, ps)
        })
        .collect()
}

/// A policy with its rules' peers and ids resolved: once per compile for every endpoint it
/// selects, and kept across compiles while neither the policy, its rule ids nor the
/// identities its peers name change.
#[derive(Debug)]
pub struct Resolved {
    pub policy: Arc<NormPolicy>,
    /// Peer identities per direction, per rule (in `policy.rules` order).
    pub peers: [Vec<BTreeSet<u32>>; 2],
    /// Rule ids per direction, per rule.
    pub rule_ids: [Vec<u32>; 2],
    /// The default-deny rule id per direction.
    pub default_deny: [u32; 2],
}

impl Resolved {
    pub fn new(policy: &Arc<NormPolicy>, index: &peers::PeerIndex, ids: &RuleIds<'_>) -> Self {
        let (rule_ids, default_deny) = Resolved::ids(policy, ids);
        Resolved {
            policy: policy.clone(),
            peers: per_rule(policy, |_, r| index.resolve(r.peers.as_deref(), r.deny)),
            rule_ids,
            default_deny,
        }
    }

    /// The rule ids of `policy`'s rules and its default-deny ids, per direction.
    pub fn ids(policy: &NormPolicy, ids: &RuleIds<'_>) -> ([Vec<u32>; 2], [u32; 2]) {
        (
            per_rule(policy, |dir, r| ids.rule(&policy.reference, dir, r.index)),
            [INGRESS, EGRESS].map(|dir| ids.default_deny(&policy.reference, dir)),
        )
    }
}

fn per_rule<T>(p: &NormPolicy, f: impl Fn(u8, &NormRule) -> T) -> [Vec<T>; 2] {
    [INGRESS, EGRESS].map(|dir| p.rules[dir as usize].iter().map(|r| f(dir, r)).collect())
}

/// Enforce/audit class of a contribution.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Deny,
    Allow,
    Redirect,
}

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// One rule's effect on one peer and port range, before it becomes keys.
struct Contribution<'a> {
    direction: u8,
    peer: u32,
    /// `None`: every protocol.
    protocol: Option<Protocol>,
    /// Inclusive port range; `None`: every port.
    range: Option<(u16, u16)>,
    class: Class,
    audit: bool,
    rule_id: u32,
    http: &'a [crate::api::HttpRule],
}

pub struct Context<'a> {
    pub model: &'a Model,
    pub ids: &'a IdentityTable,
    pub proxy_port: u16,
}

/// Compiles the policy of endpoint `ep` from the (accepted, ordered) policies selecting it.
pub fn compile_endpoint(ctx: &Context, ep: &Endpoint, selecting: &[&Resolved]) -> EndpointPolicy {
    let mut out = EndpointPolicy::default();
    let mut contributions = Vec::new();
    for dir in [INGRESS, EGRESS] {
        let d = dir as usize;
        for resolved in selecting.iter().filter(|p| p.policy.applies[d]) {
            let p = &*resolved.policy;
            out.flags |= ep_flag(ep_flags::POLICY, dir);
            if p.isolates[d] {
                let rid = resolved.default_deny[d];
                if !p.audit && out.flags & ep_flag(ep_flags::ISOLATED, dir) == 0 {
                    out.flags |= ep_flag(ep_flags::ISOLATED, dir);
                    out.isolating_rule[d] = rid;
                }
                if out.flags & ep_flag(ep_flags::AUDIT_ISOLATED, dir) == 0 {
                    out.flags |= ep_flag(ep_flags::AUDIT_ISOLATED, dir);
                    out.audit_isolating_rule[d] = rid;
                }
            }
            for (i, r) in p.rules[d].iter().enumerate() {
                let (peer_set, rule_id) = (&resolved.peers[d][i], resolved.rule_ids[d][i]);
                rule_contributions(ctx, ep, p, (dir, rule_id), r, peer_set, &mut contributions);
            }
        }
    }
    // An Enforce isolation also isolates the audit view, even when an Audit policy came first.
    for d in 0..2 {
        if out.isolating_rule[d] != 0 {
            out.audit_isolating_rule[d] = out.isolating_rule[d];
        }
    }
    out.content.entries = fold(&contributions, ctx.proxy_port);
    out.content.l7 = l7(&contributions);
    out
}

fn rule_contributions<'a>(
    ctx: &Context,
    ep: &Endpoint,
    p: &NormPolicy,
    (dir, rule_id): (u8, u32),
    r: &'a NormRule,
    peer_set: &BTreeSet<u32>,
    out: &mut Vec<Contribution<'a>>,
) {
    let class = if r.deny {
        Class::Deny
    } else if !r.http.is_empty() {
        Class::Redirect
    } else {
        Class::Allow
    };
    let tcp_all = [NormPort {
        protocol: Protocol::Tcp,
        port: PortSpec::All,
    }];
    let ports: Option<&[NormPort]> = match (&r.ports, class) {
        (Some(ports), _) => Some(ports),
        // HTTP rules without ports cover every TCP port, never other protocols.
        (None, Class::Redirect) => Some(&tcp_all),
        (None, _) => None,
    };
    let mut push = |peer: u32, protocol: Option<Protocol>, range: Option<(u16, u16)>| {
        out.push(Contribution {
            direction: dir,
            peer,
            protocol,
            range,
            class,
            audit: p.audit,
            rule_id,
            http: &r.http,
        })
    };
    let Some(ports) = ports else {
        for &peer in peer_set {
            push(peer, None, None);
        }
        return;
    };
    for port in ports {
        let proto = Some(port.protocol);
        match &port.port {
            PortSpec::All => peer_set.iter().for_each(|&peer| push(peer, proto, None)),
            PortSpec::Range(a, b) => peer_set
                .iter()
                .for_each(|&peer| push(peer, proto, Some((*a, *b)))),
            PortSpec::Named(name) if dir == INGRESS => {
                // Rule 5: an ingress named port is the selected pod's own container port.
                if let Some(n) = ep.named_port(name, port.protocol) {
                    peer_set
                        .iter()
                        .for_each(|&peer| push(peer, proto, Some((n, n))));
                }
            }
            PortSpec::Named(name) => {
                // Egress: the destination pod's port. Identities are split so that every member
                // resolves the name alike; a wildcard peer means every pod that has the name.
                let pod_ids: Vec<u32> = if peer_set.contains(&ANY) {
                    ctx.ids.info.keys().copied().collect()
                } else {
                    peer_set.iter().copied().collect()
                };
                for id in pod_ids {
                    let Some(IdentityKind::Pods { pods, .. }) =
                        ctx.ids.info.get(&id).map(|i| &i.kind)
                    else {
                        continue;
                    };
                    if let Some(n) = ctx.model.endpoints[pods[0]].named_port(name, port.protocol) {
                        push(id, proto, Some((n, n)));
                    }
                }
            }
        }
    }
}

impl Contribution<'_> {
    fn value(&self, proxy_port: u16) -> PolicyValueOrd {
        let enforce_action = match self.class {
            Class::Deny => action::DENY,
            Class::Allow => action::ALLOW,
            // The audit view never steers to the proxy: an Audit HTTP rule counts as an allow.
            Class::Redirect if self.audit => action::ALLOW,
            Class::Redirect => action::REDIRECT,
        };
        if self.audit {
            PolicyValueOrd {
                audit_action: enforce_action,
                audit_rule_id: self.rule_id,
                ..Default::default()
            }
        } else {
            PolicyValueOrd {
                action: enforce_action,
                rule_id: self.rule_id,
                audit_action: enforce_action,
                audit_rule_id: self.rule_id,
                proxy_port: if enforce_action == action::REDIRECT {
                    proxy_port
                } else {
                    0
                },
            }
        }
    }

    /// Hands each policy key of the contribution to `f`.
    fn keys(&self, mut f: impl FnMut(PortKey)) {
        let key = |protocol: u8, port: u16, bits: u8| PortKey {
            protocol: Some(protocol),
            port,
            bits,
        };
        match (self.protocol, self.range) {
            (None, _) => f(PortKey::ANY),
            // ICMP is looked up with port 0 under the packet's own protocol number: one
            // protocol-wide key each for ICMP and ICMPv6.
            (Some(Protocol::Icmp), _) => {
                f(key(ICMP, 0, 0));
                f(key(ICMPV6, 0, 0));
            }
            (Some(p), None) => f(key(p.number(), 0, 0)),
            // The common single port, without building a cover.
            (Some(p), Some((a, b))) if a == b => f(key(p.number(), a, 16)),
            (Some(p), Some((a, b))) => {
                for (port, bits) in ports::cover(a, b) {
                    f(key(p.number(), port, bits));
                }
            }
        }
    }
}

/// Turns contributions into keys, each folding in every broader key of the same direction and
/// peer: the datapath reads only the exact hash on a hit and only the longest prefix otherwise,
/// so longest-prefix-wins must already be deny-wins. Values merge in any order
/// ([`PolicyValueOrd::merge`]), so sorting keys and merging neighbours gives the same result as
/// folding contribution by contribution, without a map per (direction, peer).
fn fold(contributions: &[Contribution], proxy_port: u16) -> BTreeMap<EntryKey, PolicyValueOrd> {
    let mut raw: Vec<(EntryKey, PolicyValueOrd)> = Vec::with_capacity(contributions.len());
    for c in contributions {
        let v = c.value(proxy_port);
        c.keys(|port| {
            let key = EntryKey {
                direction: c.direction,
                peer: c.peer,
                port,
            };
            raw.push((key, v))
        });
    }
    raw.sort_unstable_by_key(|&(k, _)| k);
    raw.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1.merge(&later.1);
        }
        same
    });
    let mut out = Vec::with_capacity(raw.len());
    for group in raw.chunk_by(|a, b| (a.0.direction, a.0.peer) == (b.0.direction, b.0.peer)) {
        for (k, v) in group {
            let mut folded = *v;
            for (broader, bv) in group {
                if broader.port != k.port && broader.port.covers(&k.port) {
                    folded.merge(bv);
                }
            }
            out.push((*k, folded));
        }
    }
    out.into_iter().collect()
}

/// L7 rules of the endpoint (Enforce policies only: the audit view never redirects). Each HTTP
/// rule lists its matchers for its peer and ports; a plain Allow overlapping it adds a
/// match-all for the overlap (semantic rule 7), so the proxy never narrows another policy.
fn l7(contributions: &[Contribution]) -> BTreeMap<L7Slot, BTreeSet<HttpMatcher>> {
    let tcp_range = |c: &Contribution| -> Option<(u16, u16)> {
        match c.protocol {
            None | Some(Protocol::Tcp) => Some(c.range.unwrap_or((0, u16::MAX))),
            _ => None,
        }
    };
    let mut out: BTreeMap<L7Slot, BTreeSet<HttpMatcher>> = BTreeMap::new();
    let redirects = contributions
        .iter()
        .filter(|c| c.class == Class::Redirect && !c.audit);
    for r in redirects {
        let Some((a, b)) = tcp_range(r) else { continue };
        let slot = out.entry((r.direction, r.peer, a, b)).or_default();
        slot.extend(r.http.iter().map(|h| HttpMatcher::from_rule(h, r.rule_id)));
        for p in contributions
            .iter()
            .filter(|c| c.class == Class::Allow && !c.audit && c.direction == r.direction)
        {
            if !(p.peer == r.peer || p.peer == ANY || r.peer == ANY) {
                continue;
            }
            let Some((pa, pb)) = tcp_range(p) else {
                continue;
            };
            let (lo, hi) = (a.max(pa), b.min(pb));
            if lo > hi {
                continue;
            }
            let peer = if r.peer == ANY { p.peer } else { r.peer };
            out.entry((r.direction, peer, lo, hi))
                .or_default()
                .insert(HttpMatcher::match_all(p.rule_id));
        }
    }
    out
}
