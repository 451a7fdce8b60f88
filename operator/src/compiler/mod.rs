//! The policy compiler: a pure, deterministic function from the [`Model`] and the persisted
//! [`Allocations`] to the [`DesiredState`] of one node's maps.
//!
//! Same input, same output, byte for byte: every collection is ordered, every number comes from
//! the allocations, and nothing reads a clock or the environment. That is what lets the
//! reconciler diff states, the tests use the compiler as a function, and a restarted agent
//! arrive at the maps it left.

pub mod diff;
pub mod normalize;
pub mod peers;
pub mod ports;
pub mod subject;

use crate::api::{HeaderMatch, HttpRule, PolicyStatus};
use crate::identity::{self, Allocations, Exhausted, NumberPool};
use crate::model::{Model, Phase, PolicyKind, PolicyRef};
use crate::selector::Labels;
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use moat_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, capacity, direction};
use normalize::NormPolicy;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use subject::{EndpointPolicy, Resolved, RuleSetContent};

/// Settings of the node that are not part of the cluster model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileConfig {
    /// Port of the node's L7 proxy, written into redirect entries.
    pub proxy_port: u16,
}

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig { proxy_port: 15001 }
    }
}

/// The contents of the pinned maps the compiler decides. Desired and realized state share it,
/// so that the diff compares like with like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    /// Every pod and node address (/32, /128: the loader may put these in the exact hash) and
    /// every policy CIDR.
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    /// Local endpoints by host-side interface name (the loader resolves the ifindex).
    pub endpoints: BTreeMap<String, EndpointInfo>,
    /// Policy entries at prefix 96 (one protocol, one port): the exact hash.
    pub exact: BTreeMap<PolicyKey, PolicyValue>,
    /// Policy entries with a shorter prefix (72, 80, 81..=95): the trie. The key's port bits
    /// beyond the prefix are zero.
    pub prefixes: BTreeMap<(PolicyKey, u32), PolicyValue>,
    /// Uplink blocklist: source CIDR -> rule id.
    pub prefilter: BTreeMap<IpNet, u32>,
}

/// Key of the L7 rule table: the proxy looks up the subject of the endpoint whose policy
/// redirected the flow, the peer's identity and the destination port, and takes the union of
/// the matchers of every slot whose peer is that identity or `ANY` (not for the host) and whose
/// port range holds the port. No matcher: every request is answered 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct L7Key {
    pub subject: u32,
    pub peer: u32,
    pub direction: u8,
    pub first_port: u16,
    pub last_port: u16,
}

/// One HTTP request pattern, ready for the proxy. All `None`/empty: matches every request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpMatcher {
    /// The rule to count and report the request under.
    pub rule_id: u32,
    pub method: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    /// Unanchored source; the proxy anchors it with [`crate::api::validate::anchored_regex`].
    pub path_regex: Option<String>,
    /// Header names lower-cased; value `None`: present.
    pub headers: Vec<HeaderMatch>,
}

impl HttpMatcher {
    pub fn from_rule(h: &HttpRule, rule_id: u32) -> Self {
        HttpMatcher {
            rule_id,
            method: h.method.clone(),
            path: h.path.clone(),
            path_prefix: h.path_prefix.clone(),
            path_regex: h.path_regex.clone(),
            headers: h
                .headers
                .iter()
                .map(|x| HeaderMatch {
                    name: x.name.to_ascii_lowercase(),
                    value: x.value.clone(),
                })
                .collect(),
        }
    }

    /// The match-all a plain Allow contributes where it overlaps an HTTP rule (rule 7).
    pub fn match_all(rule_id: u32) -> Self {
        HttpMatcher {
            rule_id,
            method: None,
            path: None,
            path_prefix: None,
            path_regex: None,
            headers: Vec::new(),
        }
    }
}

/// What a rule id stands for (metrics labels, flow attribution).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// `ingress`, `egress` or `prefilter`.
    pub direction: String,
    /// Rule index in its list, `default-deny` (the policy isolated the endpoint), or the
    /// prefilter entry index.
    pub rule: String,
}

/// What became of one policy: its status in the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyOutcome {
    pub accepted: bool,
    /// Empty when accepted; otherwise what is wrong and what to change.
    pub message: String,
    /// Endpoints of the whole cluster the policy selects.
    pub selected_endpoints: usize,
}

impl PolicyOutcome {
    /// The status to write back to the policy object.
    pub fn status(&self, generation: Option<i64>) -> PolicyStatus {
        let cond = |type_: &str, ok: bool, reason: &str, message: &str| Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: Time(Default::default()),
        };
        let conditions = if self.accepted {
            vec![
                cond("Accepted", true, "Compiled", "enforced as written"),
                cond("Invalid", false, "Compiled", ""),
            ]
        } else {
            let reason = if self.message.contains("capacity") {
                "MapCapacity"
            } else {
                "InvalidSpec"
            };
            vec![
                cond("Accepted", false, reason, &self.message),
                cond("Invalid", true, reason, &self.message),
            ]
        };
        PolicyStatus {
            conditions,
            observed_generation: generation,
            selected_endpoints: Some(self.selected_endpoints as i64),
        }
    }
}

/// Everything the reconciler programs and the proxy and metrics read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub maps: Maps,
    /// L7 rules by (subject, peer, direction, port range).
    pub l7: BTreeMap<L7Key, Vec<HttpMatcher>>,
    /// Rule id -> what it is.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Every policy of the model and what became of it.
    pub policies: BTreeMap<PolicyRef, PolicyOutcome>,
}

/// A compile that cannot produce any state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Even without any policy the cluster does not fit (too many pods or endpoints).
    #[error("{0} even without policies")]
    Capacity(Overflow),
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

/// A map (or id space) that would overflow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("map {map} would need {needed} entries, capacity {capacity}")]
pub struct Overflow {
    pub map: &'static str,
    pub needed: usize,
    pub capacity: u32,
}

/// Rule ids by (policy, direction, rule), read from the compile's rule-id pool.
#[derive(Clone, Copy, Debug)]
pub struct RuleIds<'a> {
    pool: &'a NumberPool,
}

fn dir_name(dir: u8) -> &'static str {
    if dir == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn rule_key(p: &PolicyRef, dir: &str, rule: &str) -> String {
    format!(
        "{}/{}/{}/{dir}/{rule}",
        p.kind.as_str(),
        p.namespace,
        p.name
    )
}

impl RuleIds<'_> {
    pub fn rule(&self, p: &PolicyRef, dir: u8, index: usize) -> u32 {
        self.get(&rule_key(p, dir_name(dir), &index.to_string()))
    }
    pub fn default_deny(&self, p: &PolicyRef, dir: u8) -> u32 {
        self.get(&rule_key(p, dir_name(dir), "default-deny"))
    }
    fn get(&self, key: &str) -> u32 {
        self.pool.get(key).unwrap_or(0)
    }
}

/// Compiles the model. Invalid policies and policies that would overflow a map are left out
/// and reported in [`DesiredState::policies`]; everything else is compiled.
pub fn compile(
    model: &Model,
    alloc: &Allocations,
    cfg: &CompileConfig,
) -> Result<(DesiredState, Allocations), CompileError> {
    let mut outcomes = BTreeMap::new();
    let mut accepted: Vec<NormPolicy> = Vec::new();
    let mut seen = BTreeSet::new();
    for p in &model.policies {
        let r = p.reference();
        if !seen.insert(r.clone()) {
            continue;
        }
        match normalize::normalize(p) {
            Ok(n) => accepted.push(n),
            Err(problems) => {
                outcomes.insert(
                    r,
                    PolicyOutcome {
                        accepted: false,
                        message: problems.join("; "),
                        selected_endpoints: 0,
                    },
                );
            }
        }
    }
    accepted.sort_by(|a, b| a.order.cmp(&b.order));
    loop {
        match build(model, alloc, cfg, &accepted)? {
            Ok((mut state, alloc)) => {
                let ns_labels = peers::namespace_labels(model);
                // Pods with equal labels in a namespace are selected alike: each label set is
                // tried once, against the policies that can select pods of its namespace.
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
                let mut selected = vec![0; accepted.len()];
                let candidates = subject::by_namespace(&accepted, pods.keys().copied(), &ns_labels);
                for (ns, ps) in candidates {
                    for (labels, &n) in &pods[ns] {
                        for &i in &ps {
                            if subject::selects_pod(&accepted[i], labels) {
                                selected[i] += n;
                            }
                        }
                    }
                }
                for (p, selected) in accepted.iter().zip(selected) {
                    outcomes.insert(
                        p.reference.clone(),
                        PolicyOutcome {
                            accepted: true,
                            message: String::new(),
                            selected_endpoints: selected,
                        },
                    );
                }
                state.policies = outcomes;
                return Ok((state, alloc));
            }
            Err(overflow) => {
                if build(model, alloc, cfg, &[])?.is_err() {
                    return Err(CompileError::Capacity(overflow));
                }
                // The first policy (in creation order) whose addition overflows is refused.
                let (mut fits, mut overflows) = (0, accepted.len());
                while overflows - fits > 1 {
                    let mid = (fits + overflows) / 2;
                    if build(model, alloc, cfg, &accepted[..mid])?.is_ok() {
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
            }
        }
    }
}

type Built = Result<(DesiredState, Allocations), Overflow>;

/// One compile attempt with exactly `policies`.
fn build(
    model: &Model,
    alloc: &Allocations,
    cfg: &CompileConfig,
    policies: &[NormPolicy],
) -> Result<Built, CompileError> {
    // Rule ids.
    let mut rule_info: BTreeMap<String, RuleInfo> = BTreeMap::new();
    for p in policies {
        let r = &p.reference;
        let mut add = |dir: &str, rule: String| {
            let info = RuleInfo {
                kind: r.kind,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                direction: dir.into(),
                rule: rule.clone(),
            };
            rule_info.insert(rule_key(r, dir, &rule), info);
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
    }
    let rules_pool = match alloc.rules.assign(rule_info.keys()) {
        Ok(p) => p,
        Err(_) => {
            return Ok(Err(Overflow {
                map: "rule ids",
                needed: rule_info.len(),
                capacity: capacity::MAX_RULE_IDS - 1,
            }));
        }
    };
    let rule_ids = RuleIds { pool: &rules_pool };
    let rules: BTreeMap<u32, RuleInfo> = rule_info
        .into_iter()
        .map(|(k, v)| (rules_pool.get(&k).expect("assigned above"), v))
        .collect();

    // Identities: CIDRs of every rule and egress named ports cut identities (rules 4, 5).
    let mut cidrs = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    for p in policies {
        for (d, rules) in p.rules.iter().enumerate() {
            for r in rules {
                for peer in r.peers.iter().flatten() {
                    if let normalize::NormPeer::Block { cidr, except } = peer {
                        cidrs.insert(*cidr);
                        cidrs.extend(except.iter().copied());
                    }
                }
                if d == direction::EGRESS as usize {
                    for port in r.ports.iter().flatten() {
                        if let normalize::PortSpec::Named(n) = &port.port {
                            port_names.insert((n.clone(), port.protocol));
                        }
                    }
                }
            }
        }
    }
    let (ids, id_pool, cidr_pool) = identity::assign(model, &cidrs, &port_names, alloc)?;

    // Local endpoints.
    let mut local: Vec<usize> = (0..model.endpoints.len())
        .filter(|&i| {
            let e = &model.endpoints[i];
            e.node == model.local_node
                && e.phase == Phase::Running
                && !e.host_network
                && e.interface.is_some()
        })
        .collect();
    local.sort_by_cached_key(|&i| model.endpoints[i].key());
    let ep_keys: Vec<String> = local.iter().map(|&i| model.endpoints[i].key()).collect();
    let ep_pool = alloc.endpoints.assign(ep_keys.iter())?;

    let ns_labels = peers::namespace_labels(model);
    let ctx = subject::Context {
        model,
        ids: &ids,
        proxy_port: cfg.proxy_port,
    };
    let local_ns: BTreeSet<&str> = local
        .iter()
        .map(|&i| model.endpoints[i].namespace.as_str())
        .collect();
    let candidates = subject::by_namespace(policies, local_ns, &ns_labels);
    let selecting: Vec<Vec<usize>> = local
        .iter()
        .map(|&i| {
            let ep = &model.endpoints[i];
            candidates[ep.namespace.as_str()]
                .iter()
                .copied()
                .filter(|&p| subject::selects_pod(&policies[p], &ep.labels))
                .collect()
        })
        .collect();
    // Peers are resolved once per policy, for all the endpoints it selects.
    let index = peers::PeerIndex::new(&ids, &ns_labels);
    let mut resolved: Vec<Option<Resolved>> = policies.iter().map(|_| None).collect();
    for &p in selecting.iter().flatten() {
        if resolved[p].is_none() {
            resolved[p] = Some(Resolved::new(&policies[p], &index, &rule_ids));
        }
    }
    let compiled: Vec<(usize, EndpointPolicy)> = local
        .iter()
        .zip(&selecting)
        .map(|(&i, sel)| {
            let selecting: Vec<&Resolved> = sel
                .iter()
                .map(|&p| resolved[p].as_ref().expect("resolved above"))
                .collect();
            (
                i,
                subject::compile_endpoint(&ctx, &model.endpoints[i], &selecting),
            )
        })
        .collect();

    // Rule sets: endpoints with equal content share a subject, numbered by content digest.
    // `ruleset_of` holds each compiled endpoint's rule set (an index into `keys`), so that
    // contents are looked up once.
    let mut contents: BTreeMap<&RuleSetContent, usize> = BTreeMap::new();
    let mut keys: Vec<String> = Vec::new();
    let mut ruleset_of: Vec<Option<usize>> = Vec::with_capacity(compiled.len());
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for (_, c) in &compiled {
        if c.content == RuleSetContent::default() {
            ruleset_of.push(None);
            continue;
        }
        let k = *contents.entry(&c.content).or_insert_with(|| {
            let base = format!("{:016x}", digest(&c.content));
            let mut key = base.clone();
            let mut n = 1;
            while taken.contains(&key) {
                n += 1;
                key = format!("{base}#{n}");
            }
            taken.insert(key.clone());
            keys.push(key);
            keys.len() - 1
        });
        ruleset_of.push(Some(k));
    }
    let ruleset_pool = alloc.rulesets.assign(keys.iter())?;

    let mut state = DesiredState {
        rules,
        ..Default::default()
    };
    let maps = &mut state.maps;
    for (&addr, &identity) in &ids.by_address {
        maps.ipcache.insert(
            IpNet::from(addr),
            IpcacheValue {
                identity,
                endpoint_id: 0,
                flags: 0,
            },
        );
    }
    for (&net, &identity) in &ids.by_cidr {
        maps.ipcache.entry(net).or_insert(IpcacheValue {
            identity,
            endpoint_id: 0,
            flags: 0,
        });
    }
    for (((i, c), key), ruleset) in compiled.iter().zip(&ep_keys).zip(&ruleset_of) {
        let ep = &model.endpoints[*i];
        let endpoint_id = ep_pool.get(key).expect("assigned above");
        for a in &ep.addresses {
            if let Some(v) = maps.ipcache.get_mut(&IpNet::from(*a))
                && ids.by_address.get(a).is_some_and(|id| {
                    ids.info.get(id).is_some_and(|info| {
                        matches!(info.kind, identity::IdentityKind::Pods { .. })
                    })
                })
            {
                v.endpoint_id = endpoint_id;
            }
        }
        let ruleset_id = ruleset
            .and_then(|k| ruleset_pool.get(&keys[k]))
            .unwrap_or(0);
        let identity = ep
            .addresses
            .iter()
            .find_map(|a| ids.by_address.get(a))
            .copied()
            .unwrap_or(0);
        let Some(ifname) = ep.interface.clone() else {
            continue;
        };
        maps.endpoints.insert(
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
    // Each subject's entries are unique; collected, sorted and built in bulk rather than
    // inserted one by one.
    let entries = contents.keys().map(|c| c.entries.len()).sum();
    let (mut exact, mut prefixes) = (Vec::with_capacity(entries), Vec::new());
    for (content, &k) in &contents {
        let subject = ruleset_pool.get(&keys[k]).expect("assigned above");
        for (k, v) in &content.entries {
            let len = k.port.prefix_len();
            let pk = PolicyKey {
                subject,
                peer: k.peer,
                direction: k.direction,
                protocol: k.port.protocol.unwrap_or(0),
                dport: k.port.port.to_be_bytes(),
            };
            if len == moat_common::policy_prefix::FULL {
                exact.push((pk, PolicyValue::from(*v)));
            } else {
                prefixes.push(((pk, len), PolicyValue::from(*v)));
            }
        }
        for (&(direction, peer, first_port, last_port), matchers) in &content.l7 {
            state.l7.insert(
                L7Key {
                    subject,
                    peer,
                    direction,
                    first_port,
                    last_port,
                },
                matchers.iter().cloned().collect(),
            );
        }
    }
    exact.sort_unstable_by_key(|&(k, _)| k);
    prefixes.sort_unstable_by_key(|&(k, _)| k);
    maps.exact = exact.into_iter().collect();
    maps.prefixes = prefixes.into_iter().collect();
    for p in policies {
        for (i, net) in p.prefilter.iter().enumerate() {
            let id = rule_ids.get(&rule_key(&p.reference, "prefilter", &i.to_string()));
            maps.prefilter.entry(*net).or_insert(id);
        }
    }

    if let Some(o) = over_capacity(maps) {
        return Ok(Err(o));
    }
    let next = Allocations {
        identities: id_pool,
        cidr_identities: cidr_pool,
        endpoints: ep_pool,
        rulesets: ruleset_pool,
        rules: rules_pool,
    };
    Ok(Ok((state, next)))
}

fn over_capacity(m: &Maps) -> Option<Overflow> {
    first_overflow(&map_fill(m))
}

/// The maps [`map_fill`] counts, with their capacities, in its order.
const MAP_CAPACITIES: [(&str, u32); 6] = [
    ("ipcache exact", capacity::IPCACHE_EXACT),
    ("ipcache prefixes", capacity::IPCACHE_PREFIXES),
    ("endpoints", capacity::ENDPOINTS),
    ("policy exact", capacity::POLICY_EXACT),
    ("policy prefixes", capacity::POLICY_PREFIXES),
    ("prefilter", capacity::PREFILTER),
];

/// Entries per kernel map, in the order of [`MAP_CAPACITIES`] (host routes go to the exact
/// ipcache hash, the other prefixes to its trie).
pub(crate) fn map_fill(m: &Maps) -> [usize; 6] {
    let host_routes = m
        .ipcache
        .keys()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .count();
    [
        host_routes,
        m.ipcache.len() - host_routes,
        m.endpoints.len(),
        m.exact.len(),
        m.prefixes.len(),
        m.prefilter.len(),
    ]
}

/// The first map whose count in `fill` exceeds its capacity.
pub(crate) fn first_overflow(fill: &[usize; 6]) -> Option<Overflow> {
    MAP_CAPACITIES
        .iter()
        .zip(fill)
        .find(|((_, cap), n)| **n > *cap as usize)
        .map(|(&(map, capacity), &needed)| Overflow {
            map,
            needed,
            capacity,
        })
}

/// FNV-1a over the content's fields: a digest that does not depend on any library's
/// formatting, so rule-set ids survive an agent upgrade.
fn digest(c: &RuleSetContent) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (k, v) in &c.entries {
        eat(&[
            k.direction,
            k.port.protocol.unwrap_or(0),
            k.port.protocol.is_some() as u8,
            k.port.bits,
        ]);
        eat(&k.peer.to_le_bytes());
        eat(&k.port.port.to_le_bytes());
        eat(&[v.action, v.audit_action]);
        eat(&v.proxy_port.to_le_bytes());
        eat(&v.rule_id.to_le_bytes());
        eat(&v.audit_rule_id.to_le_bytes());
    }
    eat(b"|l7|");
    for (slot, ms) in &c.l7 {
        eat(&[slot.0]);
        eat(&slot.1.to_le_bytes());
        eat(&slot.2.to_le_bytes());
        eat(&slot.3.to_le_bytes());
        for m in ms {
            eat(&m.rule_id.to_le_bytes());
            for s in [&m.method, &m.path, &m.path_prefix, &m.path_regex] {
                eat(s.as_deref().unwrap_or("\u{0}").as_bytes());
                eat(&[0xff]);
            }
            for hd in &m.headers {
                eat(hd.name.as_bytes());
                eat(&[0xfe]);
                eat(hd.value.as_deref().unwrap_or("\u{0}").as_bytes());
                eat(&[0xff]);
            }
        }
    }
    h
}
