//! The policy compiler: a pure, deterministic function from the [`Model`] and the persisted
//! [`Allocations`] to the [`DesiredState`] of one node's maps.
//!
//! Same input, same output, byte for byte: every collection is ordered, every number comes from
//! the allocations, and nothing reads a clock or the environment. That is what lets the
//! reconciler diff states, the tests use the compiler as a function, and a restarted agent
//! arrive at the maps it left.

pub mod diff;
pub mod incremental;
pub mod normalize;
pub mod peers;
pub mod ports;
pub mod subject;

use crate::api::{HeaderMatch, HttpRule, PolicyStatus};
use crate::identity::{Allocations, Exhausted, NumberPool};
use crate::model::{Model, PolicyKind, PolicyRef};
pub use incremental::Compiler;
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use moat_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, capacity, direction};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use subject::RuleSetContent;

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
    pub(super) pool: &'a NumberPool,
}

pub(super) fn dir_name(dir: u8) -> &'static str {
    if dir == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

pub(super) fn rule_key(p: &PolicyRef, dir: &str, rule: &str) -> String {
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
    pub(super) fn get(&self, key: &str) -> u32 {
        self.pool.get(key).unwrap_or(0)
    }
}

/// Compiles the model. Invalid policies and policies that would overflow a map are left out
/// and reported in [`DesiredState::policies`]; everything else is compiled. The agent keeps a
/// [`Compiler`] instead, which computes the same from what changed.
pub fn compile(
    model: &Model,
    alloc: &Allocations,
    cfg: &CompileConfig,
) -> Result<(DesiredState, Allocations), CompileError> {
    let mut c = Compiler::new(cfg.clone(), alloc.clone());
    c.compile(model)?;
    Ok(c.into_parts())
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
pub(super) fn digest(c: &RuleSetContent) -> u64 {
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
