//! Identity and policy lookups: who the peer is, and what the endpoint's rule set says about it.
use aya_ebpf::maps::lpm_trie::Key;
use moat_common::{
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, action, ep_flag, ep_flags, family,
    identity, policy_prefix, reason,
};

use crate::{
    maps::{IPCACHE4, IPCACHE4_EXACT, IPCACHE6, IPCACHE6_EXACT, POLICY, POLICY_EXACT},
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, Packet},
};

/// The identity of an address: exact hash first, then the prefix trie, else `world`.
#[inline(always)]
pub fn peer_of(fam: u8, addr: &[u32; 4]) -> IpcacheValue {
    // SAFETY (all gets): values are plain data, copied out at once.
    let hit = if fam == family::V4 {
        match unsafe { IPCACHE4_EXACT.get(addr[0]) } {
            Some(v) => Some(*v),
            None => IPCACHE4.get(Key::new(32, addr[0])).copied(),
        }
    } else {
        match unsafe { IPCACHE6_EXACT.get(addr) } {
            Some(v) => Some(*v),
            None => IPCACHE6.get(Key::new(128, *addr)).copied(),
        }
    };
    hit.unwrap_or(IpcacheValue {
        identity: identity::WORLD,
        endpoint_id: 0,
        flags: 0,
    })
}

/// The outcome of evaluating policy for a new flow.
#[derive(Clone, Copy)]
pub struct Decision {
    /// `action::ALLOW`, `REDIRECT` or `DENY` (never `NONE`).
    pub action: u8,
    pub rule_id: u32,
    pub reason: u8,
    pub proxy_port: u16,
    /// Whether Enforce + Audit policies would deny.
    pub audit_deny: bool,
    pub audit_rule_id: u32,
}

impl Decision {
    #[inline(always)]
    const fn allow(reason: u8) -> Self {
        Decision {
            action: action::ALLOW,
            rule_id: 0,
            reason,
            proxy_port: 0,
            audit_deny: false,
            audit_rule_id: 0,
        }
    }

    /// Traffic the L7 proxy already decided.
    #[inline(always)]
    pub const fn proxied() -> Self {
        Self::allow(reason::PROXY)
    }

    /// Enforce and audit views disagree on deny.
    #[inline(always)]
    pub fn audit_differs(&self) -> bool {
        (self.action == action::DENY) != self.audit_deny
    }
}

#[inline(always)]
fn probe(key: &PolicyKey, trie: bool) -> Option<PolicyValue> {
    // SAFETY: plain data, copied out at once.
    if let Some(v) = unsafe { POLICY_EXACT.get(key) } {
        return Some(*v);
    }
    if !trie {
        return None;
    }
    POLICY.get(Key::new(policy_prefix::FULL, *key)).copied()
}

/// Policy for a new flow of `ep` in `dir` with `peer`. Deny beats redirect beats allow across
/// the exact-peer and any-peer entries. ICMP matches by protocol only (port 0).
#[inline(always)]
pub fn decide(ep: &EndpointInfo, dir: u8, peer: &IpcacheValue, pkt: &Packet) -> Decision {
    let dport = match pkt.protocol {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => 0,
        _ => pkt.dport,
    };
    if peer.endpoint_id != 0 && peer.endpoint_id == ep.endpoint_id {
        return Decision::allow(reason::SELF);
    }
    if ep.flags & ep_flag(ep_flags::POLICY, dir) == 0 {
        return Decision::allow(reason::NOT_ISOLATED);
    }
    let mut key = PolicyKey {
        subject: ep.ruleset_id,
        peer: peer.identity,
        direction: dir,
        protocol: pkt.protocol,
        dport: dport.to_ne_bytes(),
    };
    let trie = ep.flags & ep_flag(ep_flags::NO_TRIE, dir) == 0;
    let exact = probe(&key, trie).unwrap_or_default();
    // The node is always allowed to reach its endpoints (kubelet probes) unless a rule names
    // the host itself: wildcard-peer entries do not apply to it. An exact-peer entry that
    // allows in both views wins every tie, so when the any-peer entries only allow they
    // cannot change its decision or its rule.
    let decided = ep.flags & ep_flag(ep_flags::ANY_PEER_ALLOWS, dir) != 0
        && exact.action >= action::ALLOW
        && exact.audit_action >= action::ALLOW;
    let any = if decided
        || peer.identity == identity::HOST
        || ep.flags & ep_flag(ep_flags::NO_ANY_PEER, dir) != 0
    {
        PolicyValue::default()
    } else {
        key.peer = identity::ANY;
        probe(&key, trie).unwrap_or_default()
    };

    let (act, rule_id, proxy_port) = if any.action > exact.action {
        (any.action, any.rule_id, any.proxy_port)
    } else {
        (exact.action, exact.rule_id, exact.proxy_port)
    };
    let (audit_act, audit_rule) = if any.audit_action > exact.audit_action {
        (any.audit_action, any.audit_rule_id)
    } else {
        (exact.audit_action, exact.audit_rule_id)
    };

    let host = peer.identity == identity::HOST;
    let mut d = if act != action::NONE {
        Decision {
            action: act,
            rule_id,
            reason: reason::POLICY,
            proxy_port,
            audit_deny: false,
            audit_rule_id: 0,
        }
    } else if host {
        Decision::allow(reason::HOST)
    } else if ep.flags & ep_flag(ep_flags::ISOLATED, dir) != 0 {
        Decision {
            action: action::DENY,
            rule_id: ep.isolating_rule[dir as usize & 1],
            reason: reason::DEFAULT_DENY,
            proxy_port: 0,
            audit_deny: false,
            audit_rule_id: 0,
        }
    } else {
        Decision::allow(reason::NOT_ISOLATED)
    };
    if audit_act != action::NONE {
        d.audit_deny = audit_act == action::DENY;
        d.audit_rule_id = audit_rule;
    } else if !host && ep.flags & ep_flag(ep_flags::AUDIT_ISOLATED, dir) != 0 {
        d.audit_deny = true;
        d.audit_rule_id = ep.audit_isolating_rule[dir as usize & 1];
    }
    d
}
