//! A simulation of the datapath's policy decision (the contract the compiler writes for),
//! reading only the map contents. Tests only: the real datapath is the kernel's.

use ipnet::IpNet;
use moat::compiler::Maps;
use moat_common::{IpcacheValue, PolicyKey, PolicyValue, action, ep_flag, ep_flags, identity};
use std::net::IpAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub audit_allow: bool,
    pub rule_id: u32,
    /// Proxy port when the flow is steered to the L7 proxy.
    pub redirect: Option<u16>,
}

/// ipcache: exact /32 or /128 first, else the longest prefix, else world.
pub fn ipcache(maps: &Maps, addr: IpAddr) -> IpcacheValue {
    if let Some(v) = maps.ipcache.get(&IpNet::from(addr)) {
        return *v;
    }
    maps.ipcache
        .iter()
        .filter(|(n, _)| n.contains(&addr))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, v)| *v)
        .unwrap_or(IpcacheValue {
            identity: identity::WORLD,
            endpoint_id: 0,
            flags: 0,
        })
}

fn lookup(
    maps: &Maps,
    subject: u32,
    peer: u32,
    dir: u8,
    proto: u8,
    port: u16,
) -> Option<PolicyValue> {
    let key = PolicyKey {
        subject,
        peer,
        direction: dir,
        protocol: proto,
        dport: port.to_be_bytes(),
    };
    if let Some(v) = maps.exact.get(&key) {
        return Some(*v);
    }
    maps.prefixes
        .iter()
        .filter(|((k, len), _)| {
            k.subject == subject
                && k.peer == peer
                && k.direction == dir
                && (*len == 72
                    || (k.protocol == proto && {
                        let bits = *len - 80;
                        bits == 0 || (u16::from_be_bytes(k.dport) ^ port) >> (16 - bits) == 0
                    }))
        })
        .max_by_key(|((_, len), _)| *len)
        .map(|(_, v)| *v)
}

/// The decision for a new flow of the endpoint on `iface` in `dir` with `peer`.
pub fn decide(maps: &Maps, iface: &str, dir: u8, peer: IpAddr, proto: u8, port: u16) -> Decision {
    let deny = Decision {
        allow: false,
        audit_allow: false,
        rule_id: 0,
        redirect: None,
    };
    let pass = Decision {
        allow: true,
        audit_allow: true,
        rule_id: 0,
        redirect: None,
    };
    let Some(ep) = maps.endpoints.get(iface) else {
        return deny;
    };
    let ipc = ipcache(maps, peer);
    if ipc.endpoint_id != 0 && ipc.endpoint_id == ep.endpoint_id {
        return pass;
    }
    if ep.flags & ep_flag(ep_flags::POLICY, dir) == 0 {
        return pass;
    }
    let port = if proto == 1 || proto == 58 { 0 } else { port };
    let host = ipc.identity == identity::HOST;
    let mut v = lookup(maps, ep.ruleset_id, ipc.identity, dir, proto, port).unwrap_or_default();
    if !host && let Some(a) = lookup(maps, ep.ruleset_id, identity::ANY, dir, proto, port) {
        if a.action > v.action {
            v.action = a.action;
            v.rule_id = a.rule_id;
            v.proxy_port = a.proxy_port;
        }
        if a.audit_action > v.audit_action {
            v.audit_action = a.audit_action;
            v.audit_rule_id = a.audit_rule_id;
        }
    }
    let d = dir as usize;
    let (allow, rule_id) = match v.action {
        action::DENY => (false, v.rule_id),
        action::ALLOW | action::REDIRECT => (true, v.rule_id),
        _ if host => (true, 0),
        _ if ep.flags & ep_flag(ep_flags::ISOLATED, dir) != 0 => (false, ep.isolating_rule[d]),
        _ => (true, 0),
    };
    let audit_allow = match v.audit_action {
        action::DENY => false,
        action::ALLOW | action::REDIRECT => true,
        _ => host || ep.flags & ep_flag(ep_flags::AUDIT_ISOLATED, dir) == 0,
    };
    Decision {
        allow,
        audit_allow,
        rule_id,
        redirect: (v.action == action::REDIRECT).then_some(v.proxy_port),
    }
}
