//! The contract between moat's eBPF programs and user space: map keys and values, verdict,
//! reason and action codes, reserved identities and capacities.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the kernel and user space agree
//! byte for byte and no uninitialised padding ever reaches a map key (a hash key with garbage
//! padding would never match). Sizes are asserted at compile time.
#![no_std]

/// Bumped whenever a pinned map changes shape. A loader refuses to adopt pins of another
/// layout instead of misreading them.
/// 2: conntrack keyed by interface instead of endpoint id.
pub const LAYOUT_VERSION: u32 = 2;

/// Reserved identity numbers (numbered as Cilium numbers them).
pub mod identity {
    /// Wildcard peer in policy keys; never the identity of an address.
    pub const ANY: u32 = 0;
    /// The local node (its own addresses, hostNetwork pods on it).
    pub const HOST: u32 = 1;
    /// Any address that is neither a pod, a node nor inside a policy CIDR.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = 6;
    /// First number handed out to label identities.
    pub const FIRST_LABEL: u32 = 256;
    /// First number handed out to CIDR identities.
    pub const FIRST_CIDR: u32 = 1 << 24;
    /// Numbers from here on stand in for an address while a batch moves it from one identity
    /// to another (the reconciler's transition identities); never allocated to labels or CIDRs.
    pub const FIRST_TRANSITION: u32 = 0xffff_0000;
}

/// Traffic direction from the endpoint's point of view.
pub mod direction {
    /// Traffic entering the endpoint (decided by `to-endpoint`).
    pub const INGRESS: u8 = 0;
    /// Traffic leaving the endpoint (decided by `from-endpoint`).
    pub const EGRESS: u8 = 1;
    pub const COUNT: usize = 2;
}

/// Verdicts as reported in counters and events.
pub mod verdict {
    pub const FORWARDED: u8 = 0;
    pub const DROPPED: u8 = 1;
    /// Enforce and Enforce+Audit policies decide differently; the packet took the Enforce verdict.
    pub const AUDIT: u8 = 2;
    /// Steered to the node's L7 proxy.
    pub const REDIRECTED: u8 = 3;
    pub const COUNT: usize = 4;
}

/// Why a verdict was reached.
pub mod reason {
    /// A policy rule decided (the rule id says which).
    pub const POLICY: u8 = 0;
    /// The endpoint is isolated in this direction and no rule allowed the packet.
    pub const DEFAULT_DENY: u8 = 1;
    /// No policy selects the endpoint in this direction.
    pub const NOT_ISOLATED: u8 = 2;
    /// Packet of a tracked flow, in the direction that opened it.
    pub const ESTABLISHED: u8 = 3;
    /// Reply of a tracked flow.
    pub const REPLY: u8 = 4;
    /// ICMP error about a tracked flow.
    pub const RELATED: u8 = 5;
    /// Traffic between the endpoint and its own node.
    pub const HOST: u8 = 6;
    /// The endpoint talking to itself.
    pub const SELF: u8 = 7;
    /// Truncated or malformed headers.
    pub const MALFORMED: u8 = 8;
    /// An IP fragment whose first fragment was never seen.
    pub const FRAGMENT: u8 = 9;
    /// A tracked flow whose allow was revoked by a policy change.
    pub const REVOKED: u8 = 10;
    /// The flow must go through the L7 proxy, and the proxy is not there.
    pub const NO_PROXY: u8 = 11;
    /// Dropped by the uplink prefilter blocklist.
    pub const PREFILTER: u8 = 12;
    /// Carries the proxy's mark: the proxy already decided.
    pub const PROXY: u8 = 13;
    /// The interface has a program attached but no endpoint entry (fail closed).
    pub const NO_ENDPOINT: u8 = 14;
    pub const COUNT: usize = 16;
}

/// Policy entry actions. The numeric order is the precedence: deny beats redirect beats allow,
/// and `NONE` (no Enforce entry: the key exists only for audit) loses to everything.
pub mod action {
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const REDIRECT: u8 = 2;
    pub const DENY: u8 = 3;
}

/// Event kinds in the ring buffer.
pub mod event_kind {
    pub const DROP: u8 = 0;
    pub const NEW_FLOW: u8 = 1;
    pub const AUDIT: u8 = 2;
}

/// Address family codes used in keys and events.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// Endpoint flags (`EndpointInfo::flags`), indexed by direction with [`ep_flag`].
pub mod ep_flags {
    /// Some Enforce or Audit policy has rules for the endpoint in this direction: look it up.
    pub const POLICY: u32 = 1;
    /// Enforce policies isolate the endpoint in this direction: a lookup miss denies.
    pub const ISOLATED: u32 = 1 << 2;
    /// Enforce + Audit policies would isolate it: an audit lookup miss denies.
    pub const AUDIT_ISOLATED: u32 = 1 << 4;
    /// Hint: the rule set has no trie (wildcard or port-range) entries in this direction, so
    /// a hash miss is final. Maintained by the loader, never by the compiler: it clears the
    /// hint before the first such entry is written and sets it after the last is removed.
    pub const NO_TRIE: u32 = 1 << 6;
    /// Hint: the rule set has no any-peer entries in this direction. Maintained like
    /// `NO_TRIE`.
    pub const NO_ANY_PEER: u32 = 1 << 8;
    /// Hint: the rule set has redirect (L7) entries in this direction, so the hooks that
    /// steer for a destination (`from_endpoint` for local flows, `from_uplink` for flows from
    /// other nodes) must look its policy up. Set before the first redirect entry is written
    /// and cleared after the last is removed. Missing it fails closed: the destination's
    /// `to_endpoint` drops a flow that should have gone through the proxy.
    pub const L7: u32 = 1 << 10;
    /// Hint: the rule set's any-peer entries in this direction (if any) only allow, in both
    /// the Enforce and the Enforce+Audit view. An exact-peer entry that allows (or more) in
    /// both views then decides alone, since ties go to the exact-peer entry, and the any-peer
    /// probe is skipped: one hash lookup less for most new flows. Cleared before the first
    /// any-peer entry that redirects or denies is written, set after the last is removed or
    /// rewritten to allow.
    pub const ANY_PEER_ALLOWS: u32 = 1 << 12;
    /// The hint bits, which the loader owns.
    pub const HINTS: u32 = (NO_TRIE | NO_ANY_PEER | L7 | ANY_PEER_ALLOWS) * 0b11;
}

/// The flag `base` (from [`ep_flags`]) for `dir`.
#[inline(always)]
pub const fn ep_flag(base: u32, dir: u8) -> u32 {
    base << dir
}

/// Conntrack entry flags.
pub mod ct_flags {
    /// A packet in the reply direction has been seen.
    pub const SEEN_REPLY: u8 = 1;
    /// The allow was revoked: both directions drop until policy allows the flow again.
    pub const DENIED: u8 = 1 << 1;
    /// The flow is steered to the L7 proxy (every packet takes the socket assign).
    pub const REDIRECT: u8 = 1 << 2;
    /// FIN seen from the initiator.
    pub const FIN_INIT: u8 = 1 << 3;
    /// FIN seen from the responder.
    pub const FIN_REPLY: u8 = 1 << 4;
}

/// Config flags (`Config::flags`).
pub mod config_flags {
    /// Emit ring-buffer events.
    pub const EVENTS: u32 = 1;
    /// Count packets and bytes per rule id.
    pub const RULE_COUNTERS: u32 = 1 << 1;
}

/// skb marks. `PROXY_UPSTREAM` is what the proxy sets (SO_MARK) on its upstream sockets; the
/// destination's `to-endpoint` trusts it (the proxy already applied the ingress policy).
/// `TO_PROXY` routes a socket-assigned packet to the local stack (the fwmark rule). The two
/// must not overlap under `MARK_MASK`, or the proxy's own connects route to itself.
pub mod mark {
    pub const MASK: u32 = 0xf00;
    pub const TO_PROXY: u32 = 0x200;
    pub const PROXY_UPSTREAM: u32 = 0xb00;
}

/// Capacities of the maps. A compiled state that does not fit is refused by user space with an
/// error on the policy's status; the datapath never sees a partial table.
pub mod capacity {
    pub const IPCACHE_EXACT: u32 = 1 << 20;
    pub const IPCACHE_PREFIXES: u32 = 1 << 18;
    pub const ENDPOINTS: u32 = 4096;
    pub const POLICY_EXACT: u32 = 1 << 18;
    pub const POLICY_PREFIXES: u32 = 1 << 18;
    pub const CONNTRACK: u32 = 1 << 18;
    pub const FRAGMENTS: u32 = 8192;
    pub const PREFILTER: u32 = 1 << 16;
    /// Rule ids are dense in `1..MAX_RULE_IDS` (0 means "no rule").
    pub const MAX_RULE_IDS: u32 = 1 << 15;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Unread event bytes at which a producer wakes the reader (about 740 events of 88 bytes
    /// with their record header): below it events are submitted without a wake-up, and the
    /// reader looks on its own every `moat_datapath::EVENT_FLUSH`.
    pub const EVENTS_WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 16;
}

/// Index of the verdict counter for (direction, verdict, reason).
#[inline(always)]
pub const fn verdict_counter_index(dir: u8, verdict: u8, reason: u8) -> u32 {
    ((dir as u32 * verdict::COUNT as u32) + verdict as u32) * reason::COUNT as u32 + reason as u32
}
pub const VERDICT_COUNTERS: u32 = (direction::COUNT * verdict::COUNT * reason::COUNT) as u32;

/// Index of the per-rule counter for (rule id, verdict).
#[inline(always)]
pub const fn rule_counter_index(rule_id: u32, verdict: u8) -> u32 {
    rule_id * verdict::COUNT as u32 + verdict as u32
}
pub const RULE_COUNTERS: u32 = capacity::MAX_RULE_IDS * verdict::COUNT as u32;

/// Prefix lengths of policy trie keys, in data bits (subject + peer + direction = 72).
pub mod policy_prefix {
    /// Any protocol, any port.
    pub const ANY: u32 = 72;
    /// One protocol, any port.
    pub const PROTOCOL: u32 = 80;
    /// One protocol, one port (also the length of every exact-hash key).
    pub const FULL: u32 = 96;
}

/// What an address is: its identity and, when it is an endpoint on this node, its endpoint id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Local endpoint id, 0 when the address is not an endpoint of this node.
    pub endpoint_id: u32,
    pub flags: u32,
}

/// Per-interface endpoint state, keyed by the host-side ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    /// The policy subject: endpoints whose compiled policy is identical share it.
    pub ruleset_id: u32,
    /// [`ep_flags`] shifted by direction.
    pub flags: u32,
    /// Rule id charged with default-deny drops, per direction (the isolating policy).
    pub isolating_rule: [u32; 2],
    /// Same for the audit view (Enforce + Audit policies).
    pub audit_isolating_rule: [u32; 2],
}

/// Policy key. In the trie, `prefix_len` counts data bits: subject, peer and direction always
/// match fully (72), then protocol (80), then the destination port (up to 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub subject: u32,
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, network byte order (so that prefixes cover port ranges).
    pub dport: [u8; 2],
}

/// Policy value: the Enforce view (`action`, `rule_id`) and the Enforce+Audit view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub action: u8,
    pub audit_action: u8,
    /// L7 proxy port (host order) for `action::REDIRECT`.
    pub proxy_port: u16,
    pub rule_id: u32,
    pub audit_rule_id: u32,
}

impl PolicyValue {
    /// An entry on which Enforce and Enforce+Audit agree: `action` by `rule_id`, no proxy.
    pub const fn enforced(action: u8, rule_id: u32) -> Self {
        PolicyValue {
            action,
            audit_action: action,
            proxy_port: 0,
            rule_id,
            audit_rule_id: rule_id,
        }
    }
}

/// Conntrack key, per endpoint. Ports in network byte order as on the wire; for ICMP echo the
/// identifier is both ports. IPv4 addresses use the first word, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// The endpoint's host-side interface, which the hook knows from the packet: a tracked
    /// flow is found without reading the endpoint entry first (one hash lookup less on the
    /// common path). A new endpoint comes with a new interface; and an endpoint entry that
    /// changes comes with a new policy revision, under which every flow is decided again.
    pub ifindex: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub local: [u32; 4],
    pub remote: [u32; 4],
}

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Coarse monotonic clock (ns) after which the entry is dead.
    pub expires_ns: u64,
    /// The rule that admitted the flow (0: not isolated, host, self).
    pub rule_id: u32,
    /// Policy revision the flow was admitted under.
    pub revision: u32,
    pub proxy_port: u16,
    /// Direction of the first packet ([`direction`]).
    pub initiator: u8,
    /// [`ct_flags`].
    pub flags: u8,
    pub _pad: u32,
}

/// Runtime configuration (one-element array), written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`config_flags`].
    pub flags: u32,
    /// Sustained events per second per CPU.
    pub event_rate: u32,
    /// Burst of events per CPU.
    pub event_burst: u32,
    pub ct_tcp_syn_timeout_s: u32,
    pub ct_tcp_timeout_s: u32,
    pub ct_tcp_close_timeout_s: u32,
    pub ct_other_timeout_s: u32,
    pub _pad: u32,
}

impl Config {
    /// The defaults the agent starts with.
    pub const DEFAULT: Config = Config {
        flags: config_flags::EVENTS | config_flags::RULE_COUNTERS,
        event_rate: 10_000,
        event_burst: 1_000,
        ct_tcp_syn_timeout_s: 60,
        ct_tcp_timeout_s: 6 * 3600,
        ct_tcp_close_timeout_s: 10,
        ct_other_timeout_s: 60,
        _pad: 0,
    };
}

/// Packets and bytes, per CPU (summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-CPU event limiter state and event accounting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventState {
    /// Tokens, scaled by 2^10 so that refills of less than one event per packet add up.
    pub tokens: u64,
    pub last_ns: u64,
    pub emitted: u64,
    /// Dropped by the rate limit.
    pub suppressed: u64,
    /// The ring buffer was full.
    pub lost: u64,
}

/// A verdict event. Addresses as in [`CtKey`]; ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    pub audit_rule_id: u32,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub packet_len: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
}

/// Key of the fragment table: the datagram a non-first fragment belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Ports of a fragmented datagram, taken from its first fragment (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

const _: () = {
    assert!(core::mem::size_of::<IpcacheValue>() == 12);
    assert!(core::mem::size_of::<EndpointInfo>() == 32);
    assert!(core::mem::size_of::<PolicyKey>() == 12);
    assert!(core::mem::size_of::<PolicyValue>() == 12);
    assert!(core::mem::size_of::<CtKey>() == 44);
    assert!(core::mem::size_of::<CtValue>() == 24);
    assert!(core::mem::size_of::<Config>() == 32);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<EventState>() == 40);
    assert!(core::mem::size_of::<Event>() == 80);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragValue>() == 4);
    // A policy key's bytes in order: subject, peer, direction, protocol, port.
    assert!(core::mem::offset_of!(PolicyKey, direction) == 8);
    assert!(core::mem::offset_of!(PolicyKey, dport) == 10);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with every byte covered by a field (no implicit padding,
    // asserted above), so any bit pattern is valid.
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for EventState {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
}
