//! The proxy's view of the compiled policy: who a flow's ends are, which HTTP rules govern the
//! flow in each direction, and the per-request verdict.
//!
//! Built from the compiler's [`DesiredState`]: the ipcache gives each address its identity and
//! local endpoint id (longest prefix; host routes first), the endpoints table gives a local
//! endpoint's rule-set id, and the L7 table gives the matchers of a (rule set, peer, direction,
//! port range) slot. A flow is governed in egress when its source is a local endpoint with a
//! slot for (peer = destination identity or any, port), and in ingress when its destination is
//! a local endpoint with a slot for (peer = source identity or any, port). Both governing
//! sides must allow a request. A flow that neither side governs was steered here by mistake or
//! by a stale map: every request on it is denied (fail closed).

use super::framing::RequestHead;
use crate::compiler::{DesiredState, HttpMatcher};
use ipnet::IpNet;
use moat_common::{IpcacheValue, direction, identity};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Direction of a verdict, from the point of view of the endpoint whose rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The destination's ingress rules.
    Ingress,
    /// The source's egress rules.
    Egress,
}

impl Direction {
    fn code(self) -> u8 {
        match self {
            Direction::Ingress => direction::INGRESS,
            Direction::Egress => direction::EGRESS,
        }
    }

    /// `ingress` / `egress`, as in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// One HTTP matcher, compiled.
#[derive(Debug)]
pub struct Matcher {
    pub rule_id: u32,
    method: Option<String>,
    path: Option<String>,
    path_prefix: Option<String>,
    /// `Some(None)`: a regex that does not compile (the compiler validates them, so this is a
    /// bug elsewhere); it matches nothing, so the policy fails closed.
    path_regex: Option<Option<regex::Regex>>,
    /// Lower-case names; `None`: present.
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Matcher {
    fn compile(m: &HttpMatcher, regexes: &mut HashMap<String, Option<regex::Regex>>) -> Self {
        let path_regex = m.path_regex.as_ref().map(|r| {
            regexes
                .entry(r.clone())
                .or_insert_with(|| crate::api::validate::anchored_regex(r).ok())
                .clone()
        });
        Matcher {
            rule_id: m.rule_id,
            method: m.method.clone(),
            path: m.path.clone(),
            path_prefix: m.path_prefix.clone(),
            path_regex,
            headers: m
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        h.value.as_ref().map(|v| v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        }
    }

    /// Whether the request matches: method exactly (case-sensitive), the normalised path
    /// exactly / by prefix / by the anchored regex, and every header: present, or some field
    /// of that name whose value (without surrounding whitespace) equals the value exactly.
    pub fn matches(&self, req: &RequestHead) -> bool {
        if self.method.as_deref().is_some_and(|m| m != req.method) {
            return false;
        }
        let path = req.target.path.as_str();
        if self.path.as_deref().is_some_and(|p| p != path) {
            return false;
        }
        if self
            .path_prefix
            .as_deref()
            .is_some_and(|p| !path.starts_with(p))
        {
            return false;
        }
        match &self.path_regex {
            Some(Some(re)) if !re.is_match(path) => return false,
            Some(None) => return false,
            _ => {}
        }
        self.headers.iter().all(|(name, want)| {
            let mut values = req.header_values(name);
            match want {
                None => values.next().is_some(),
                Some(w) => values.any(|v| v == w.as_slice()),
            }
        })
    }
}

#[derive(Debug)]
struct Slot {
    peer: u32,
    first_port: u16,
    last_port: u16,
    matchers: Vec<Arc<Matcher>>,
}

/// The compiled policy the proxy reads on every request (through a `watch` channel, so a
/// new policy applies to requests on connections that are already open).
#[derive(Debug, Default)]
pub struct L7Policy {
    exact: HashMap<IpAddr, IpcacheValue>,
    /// Prefix length -> prefixes of that length, longest first.
    prefixes: Vec<(u8, HashMap<IpNet, IpcacheValue>)>,
    rulesets: HashMap<u32, u32>,
    slots: HashMap<(u32, u8), Vec<Slot>>,
    /// Matchers whose regex did not compile (counted so a test or metric can see it).
    pub invalid_regexes: usize,
}

/// What one side's rules say about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideVerdict {
    Allowed {
        rule_id: u32,
    },
    /// No rule of the side matched. `rule_id`: the side's first HTTP rule (lowest id), whose
    /// policy the denial is charged to, as default-deny drops are charged to the isolating
    /// policy; `None` when the side has no HTTP rule for the flow at all.
    Denied {
        rule_id: Option<u32>,
    },
}

/// The HTTP rules that govern one flow, resolved once per connection and policy revision.
#[derive(Clone, Debug, Default)]
pub struct FlowRules {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The destination is an endpoint of this node.
    pub dst_local: bool,
    /// The source's egress matchers, if its rules govern this flow.
    pub egress: Option<Vec<Arc<Matcher>>>,
    /// The destination's ingress matchers, if its rules govern this flow.
    pub ingress: Option<Vec<Arc<Matcher>>>,
}

/// The verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Per governing side, egress first; a side that denies ends the evaluation. Empty: no
    /// side governs the flow and the request is denied.
    pub sides: Vec<(Direction, SideVerdict)>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        !self.sides.is_empty()
            && self
                .sides
                .iter()
                .all(|(_, v)| matches!(v, SideVerdict::Allowed { .. }))
    }
}

impl FlowRules {
    /// Evaluates `req`: each governing side's first matching matcher (lowest rule id) allows.
    pub fn decide(&self, req: &RequestHead) -> Decision {
        let mut sides = Vec::with_capacity(2);
        for (dir, ms) in [
            (Direction::Egress, &self.egress),
            (Direction::Ingress, &self.ingress),
        ] {
            let Some(ms) = ms else { continue };
            let v = ms.iter().find(|m| m.matches(req)).map_or(
                SideVerdict::Denied {
                    rule_id: ms.first().map(|m| m.rule_id),
                },
                |m| SideVerdict::Allowed { rule_id: m.rule_id },
            );
            sides.push((dir, v));
            if matches!(v, SideVerdict::Denied { .. }) {
                break;
            }
        }
        Decision { sides }
    }
}

impl L7Policy {
    /// A policy that governs nothing: every steered request is denied.
    pub fn empty() -> Self {
        L7Policy::default()
    }

    /// Builds the proxy's view of a compiled state.
    pub fn from_state(state: &DesiredState) -> Self {
        let mut exact = HashMap::new();
        let mut by_len: BTreeMap<u8, HashMap<IpNet, IpcacheValue>> = BTreeMap::new();
        for (net, v) in &state.maps.ipcache {
            if net.prefix_len() == net.max_prefix_len() {
                exact.insert(net.addr(), *v);
            } else {
                // Prefix lengths of v4 and v6 share a table: the key (a truncated network of
                // one family) never collides across families.
                by_len
                    .entry(net.prefix_len())
                    .or_default()
                    .insert(net.trunc(), *v);
            }
        }
        let prefixes = by_len.into_iter().rev().collect();
        let rulesets = state
            .maps
            .endpoints
            .values()
            .filter(|e| e.endpoint_id != 0)
            .map(|e| (e.endpoint_id, e.ruleset_id))
            .collect();
        let mut regexes = HashMap::new();
        let mut slots: HashMap<(u32, u8), Vec<Slot>> = HashMap::new();
        let mut invalid_regexes = 0;
        for (k, ms) in &state.l7 {
            let matchers: Vec<Arc<Matcher>> = ms
                .iter()
                .map(|m| {
                    let c = Matcher::compile(m, &mut regexes);
                    if matches!(c.path_regex, Some(None)) {
                        invalid_regexes += 1;
                    }
                    Arc::new(c)
                })
                .collect();
            slots
                .entry((k.subject, k.direction))
                .or_default()
                .push(Slot {
                    peer: k.peer,
                    first_port: k.first_port,
                    last_port: k.last_port,
                    matchers,
                });
        }
        L7Policy {
            exact,
            prefixes,
            rulesets,
            slots,
            invalid_regexes,
        }
    }

    /// The ipcache entry for `ip` (IPv4-mapped IPv6 is treated as IPv4): host route first,
    /// then the longest prefix; unknown addresses are `world`.
    pub fn lookup(&self, ip: IpAddr) -> IpcacheValue {
        let ip = ip.to_canonical();
        if let Some(v) = self.exact.get(&ip) {
            return *v;
        }
        for (len, nets) in &self.prefixes {
            let Ok(net) = IpNet::new(ip, *len) else {
                continue;
            };
            if let Some(v) = nets.get(&net.trunc()) {
                return *v;
            }
        }
        IpcacheValue {
            identity: identity::WORLD,
            endpoint_id: 0,
            flags: 0,
        }
    }

    fn side(
        &self,
        endpoint_id: u32,
        dir: Direction,
        peer: u32,
        port: u16,
    ) -> Option<Vec<Arc<Matcher>>> {
        if endpoint_id == 0 {
            return None;
        }
        let ruleset = *self.rulesets.get(&endpoint_id)?;
        let slots = self.slots.get(&(ruleset, dir.code()))?;
        let mut found = false;
        let mut out: Vec<Arc<Matcher>> = Vec::new();
        for s in slots {
            let peer_ok = s.peer == peer || (s.peer == identity::ANY && peer != identity::HOST);
            if peer_ok && (s.first_port..=s.last_port).contains(&port) {
                found = true;
                out.extend(s.matchers.iter().cloned());
            }
        }
        if !found {
            return None;
        }
        out.sort_by_key(|m| m.rule_id);
        Some(out)
    }

    /// Resolves which rules govern the flow `src` -> `dst` (the original destination).
    pub fn flow_rules(&self, src: SocketAddr, dst: SocketAddr) -> FlowRules {
        let s = self.lookup(src.ip());
        let d = self.lookup(dst.ip());
        FlowRules {
            src_identity: s.identity,
            dst_identity: d.identity,
            dst_local: d.endpoint_id != 0,
            egress: self.side(s.endpoint_id, Direction::Egress, d.identity, dst.port()),
            ingress: self.side(d.endpoint_id, Direction::Ingress, s.identity, dst.port()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::L7Key;
    use moat_common::EndpointInfo;

    fn entry(identity: u32, endpoint_id: u32) -> IpcacheValue {
        IpcacheValue {
            identity,
            endpoint_id,
            flags: 0,
        }
    }

    fn head(method: &str, target: &str, extra: &str) -> RequestHead {
        let raw = format!("{method} {target} HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
        super::super::framing::parse_request_head(raw.as_bytes(), &Default::default())
            .unwrap()
            .unwrap()
    }

    fn sample() -> DesiredState {
        let mut s = DesiredState::default();
        let ip = |a: &str| a.parse::<IpNet>().unwrap();
        s.maps.ipcache.insert(ip("10.0.0.0/8"), entry(1 << 24, 0));
        s.maps
            .ipcache
            .insert(ip("10.1.0.0/16"), entry((1 << 24) + 1, 0));
        s.maps.ipcache.insert(ip("10.1.2.3/32"), entry(400, 7));
        s.maps
            .ipcache
            .insert(ip("10.9.9.9/32"), entry(identity::HOST, 0));
        s.maps.ipcache.insert(ip("fd00::/64"), entry(500, 0));
        s.maps.endpoints.insert(
            "lxc7".into(),
            EndpointInfo {
                endpoint_id: 7,
                identity: 400,
                ruleset_id: 3,
                ..Default::default()
            },
        );
        let key = |peer, first_port, last_port| L7Key {
            subject: 3,
            peer,
            direction: direction::INGRESS,
            first_port,
            last_port,
        };
        let m = |rule_id, path: &str| HttpMatcher {
            path: Some(path.into()),
            ..HttpMatcher::match_all(rule_id)
        };
        s.l7.insert(key(identity::ANY, 80, 80), vec![m(8, "/any")]);
        s.l7.insert(key(1 << 24, 80, 90), vec![m(4, "/cidr")]);
        s.l7.insert(
            key(500, 80, 80),
            vec![HttpMatcher {
                path_regex: Some("(".into()),
                ..HttpMatcher::match_all(9)
            }],
        );
        s
    }

    #[test]
    fn ipcache_lookup_is_longest_prefix_with_host_routes_first() {
        let p = L7Policy::from_state(&sample());
        let id = |a: &str| p.lookup(a.parse().unwrap()).identity;
        assert_eq!(id("10.1.2.3"), 400);
        assert_eq!(id("::ffff:10.1.2.3"), 400);
        assert_eq!(id("10.1.2.4"), (1 << 24) + 1);
        assert_eq!(id("10.2.0.1"), 1 << 24);
        assert_eq!(id("11.0.0.1"), identity::WORLD);
        assert_eq!(id("fd00::1"), 500);
        assert_eq!(id("fd01::1"), identity::WORLD);
        assert_eq!(p.lookup("10.1.2.3".parse().unwrap()).endpoint_id, 7);
    }

    #[test]
    fn slots_by_peer_and_port() {
        let p = L7Policy::from_state(&sample());
        let dst: SocketAddr = "10.1.2.3:80".parse().unwrap();
        // A CIDR peer: its exact slot and the any-peer slot, lowest rule id first.
        let r = p.flow_rules("10.2.0.1:1000".parse().unwrap(), dst);
        assert!(r.egress.is_none());
        let ids: Vec<u32> = r
            .ingress
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.rule_id)
            .collect();
        assert_eq!(ids, [4, 8]);
        assert!(r.decide(&head("GET", "/cidr", "")).allowed());
        assert!(r.decide(&head("GET", "/any", "")).allowed());
        assert!(!r.decide(&head("GET", "/x", "")).allowed());
        // Port 85: only the CIDR slot covers it.
        let r = p.flow_rules(
            "10.2.0.1:1000".parse().unwrap(),
            "10.1.2.3:85".parse().unwrap(),
        );
        assert_eq!(r.ingress.as_ref().unwrap().len(), 1);
        // The host never falls under an any-peer slot: not governed.
        let r = p.flow_rules("10.9.9.9:1000".parse().unwrap(), dst);
        assert!(r.ingress.is_none());
        assert_eq!(r.decide(&head("GET", "/any", "")).sides, vec![]);
        // A destination that is not a local endpoint is governed by nobody.
        let r = p.flow_rules(
            "10.1.2.3:1000".parse().unwrap(),
            "10.2.0.1:80".parse().unwrap(),
        );
        assert!(r.ingress.is_none() && r.egress.is_none());
        assert!(!r.decide(&head("GET", "/", "")).allowed());
    }

    #[test]
    fn broken_regex_fails_closed() {
        let p = L7Policy::from_state(&sample());
        assert_eq!(p.invalid_regexes, 1);
        let r = p.flow_rules(
            "[fd00::5]:1000".parse().unwrap(),
            "10.1.2.3:80".parse().unwrap(),
        );
        let d = r.decide(&head("GET", "/cidr", ""));
        assert_eq!(
            d.sides,
            vec![(Direction::Ingress, SideVerdict::Denied { rule_id: Some(8) })],
            "charged to the first rule of the side"
        );
        assert!(r.decide(&head("GET", "/any", "")).allowed());
    }

    #[test]
    fn matcher_fields_combine() {
        let mut s = sample();
        s.l7.clear();
        s.l7.insert(
            L7Key {
                subject: 3,
                peer: identity::ANY,
                direction: direction::INGRESS,
                first_port: 80,
                last_port: 80,
            },
            vec![HttpMatcher {
                method: Some("PUT".into()),
                path_prefix: Some("/api/".into()),
                path_regex: Some("/api/v[0-9]+/.*".into()),
                headers: vec![crate::api::HeaderMatch {
                    name: "x-a".into(),
                    value: Some("1".into()),
                }],
                ..HttpMatcher::match_all(2)
            }],
        );
        let p = L7Policy::from_state(&s);
        let r = p.flow_rules(
            "10.2.0.1:1".parse().unwrap(),
            "10.1.2.3:80".parse().unwrap(),
        );
        assert!(r.decide(&head("PUT", "/api/v2/x", "X-A: 1\r\n")).allowed());
        assert!(!r.decide(&head("PUT", "/api/v2/x", "X-A: 2\r\n")).allowed());
        assert!(!r.decide(&head("PUT", "/api/vx/x", "X-A: 1\r\n")).allowed());
        assert!(!r.decide(&head("POST", "/api/v2/x", "X-A: 1\r\n")).allowed());
        assert!(!r.decide(&head("PUT", "/api/v2/x", "")).allowed());
    }
}
