//! Test support: a private pin root per test, packets (from `moat_datapath::packet`), and
//! policy fixtures.
#![allow(dead_code)]

pub mod netns;

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use ipnet::IpNet;
use moat_common::{
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, direction, ep_flag, ep_flags, policy_prefix,
};
use moat_datapath::{Datapath, MapOp, PolicyEntryKey};

/// A pin root unique to this process and test, removed (with everything pinned in it) on
/// drop, also when the test fails.
pub struct PinRoot(pub String);

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = format!(
            "/sys/fs/bpf/moat-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Datapath::reset(&path);
        PinRoot(path)
    }

    pub fn open(&self) -> Datapath {
        Datapath::open(&self.0).expect("open datapath")
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = Datapath::reset(&self.0);
    }
}

pub use moat_datapath::packet::*;

pub fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A policy key for `subject`, `peer`, `dir`, `proto` and a port prefix: `port_bits` of 16
/// significant bits (0 = any port; with proto 0 also any protocol).
pub fn pkey(
    subject: u32,
    peer: u32,
    dir: u8,
    proto: u8,
    port: u16,
    port_bits: u32,
) -> PolicyEntryKey {
    let prefix_len = if proto == 0 {
        policy_prefix::ANY
    } else {
        policy_prefix::PROTOCOL + port_bits
    };
    PolicyEntryKey {
        key: PolicyKey {
            subject,
            peer,
            direction: dir,
            protocol: proto,
            dport: port.to_be_bytes(),
        },
        prefix_len,
    }
}

pub fn pval(action: u8, rule_id: u32) -> PolicyValue {
    PolicyValue::enforced(action, rule_id)
}

/// An endpoint isolated in the given directions, with isolating rule ids 900 + direction.
pub fn endpoint(endpoint_id: u32, identity: u32, ruleset: u32, isolated: &[u8]) -> EndpointInfo {
    let mut flags = 0;
    for &d in isolated {
        flags |= ep_flag(ep_flags::POLICY, d)
            | ep_flag(ep_flags::ISOLATED, d)
            | ep_flag(ep_flags::AUDIT_ISOLATED, d);
    }
    EndpointInfo {
        endpoint_id,
        identity,
        ruleset_id: ruleset,
        flags,
        isolating_rule: [900, 901],
        audit_isolating_rule: [900, 901],
    }
}

pub fn ipc(identity: u32, endpoint_id: u32) -> IpcacheValue {
    IpcacheValue {
        identity,
        endpoint_id,
        flags: 0,
    }
}

/// Bump the revision by one (what the reconciler does after each batch).
pub fn bump(dp: &mut Datapath) {
    let r = dp.revision().unwrap();
    dp.apply(&[MapOp::SetRevision(r + 1)]).unwrap();
}

pub const INGRESS: u8 = direction::INGRESS;
pub const EGRESS: u8 = direction::EGRESS;
