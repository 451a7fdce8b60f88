//! Every map of the datapath, pinned by name under the loader's pin root so a restarted agent
//! adopts them. Capacities come from `moat_common::capacity`.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use moat_common::{
    Config, Counter, CtKey, CtValue, EndpointInfo, EventState, FragKey, FragValue, IpcacheValue,
    PolicyKey, PolicyValue, RULE_COUNTERS, VERDICT_COUNTERS, capacity,
};

/// Large hashes allocate entries on insert: a node with few pods pays for few entries, and the
/// million-entry capacity costs nothing until used.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Exact IPv4 addresses (pods, nodes): probed before the trie, a hash hit is cheaper than a
/// trie walk at a million prefixes. Key: the address as read from the packet.
#[map]
pub static IPCACHE4_EXACT: HashMap<u32, IpcacheValue> =
    HashMap::pinned(capacity::IPCACHE_EXACT, NO_PREALLOC);
#[map]
pub static IPCACHE6_EXACT: HashMap<[u32; 4], IpcacheValue> =
    HashMap::pinned(capacity::IPCACHE_EXACT, NO_PREALLOC);
/// Prefixes (policy CIDRs, and any address not in the exact tables).
#[map]
pub static IPCACHE4: LpmTrie<u32, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE_PREFIXES, 0);
#[map]
pub static IPCACHE6: LpmTrie<[u32; 4], IpcacheValue> =
    LpmTrie::pinned(capacity::IPCACHE_PREFIXES, 0);

/// Host-side ifindex -> endpoint.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);
/// Endpoint id -> endpoint: a hook steering for a local destination finds its policy here
/// (the ipcache gives the destination's endpoint id).
#[map]
pub static ENDPOINTS_BY_ID: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Exact (subject, peer, direction, protocol, port) keys, probed before the trie. Each value
/// already folds in every broader entry that covers it.
#[map]
pub static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY_EXACT, NO_PREALLOC);
/// Wildcard-protocol, wildcard-port and port-range keys.
#[map]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY_PREFIXES, 0);

/// The current policy revision (index 0), bumped by user space after each batch.
#[map]
pub static REVISION: Array<u32> = Array::pinned(1, 0);
/// Runtime configuration (index 0). All zero means "not configured": see `config()`.
#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);
/// First-fragment ports, so later fragments of an allowed datagram follow it.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Uplink blocklist (source prefixes) -> rule id charged with the drop.
#[map]
pub static PREFILTER4: LpmTrie<u32, u32> = LpmTrie::pinned(capacity::PREFILTER, 0);
#[map]
pub static PREFILTER6: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(capacity::PREFILTER, 0);

/// Packets and bytes by (direction, verdict, reason).
#[map]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(VERDICT_COUNTERS, 0);
/// Packets and bytes by (rule id, verdict).
#[map]
pub static RULES: PerCpuArray<Counter> = PerCpuArray::pinned(RULE_COUNTERS, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
/// Per-CPU event limiter and event accounting (index 0).
#[map]
pub static EVENT_STATE: PerCpuArray<EventState> = PerCpuArray::pinned(1, 0);
