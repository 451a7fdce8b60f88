//! Typed, safe operations on the datapath's maps.
use std::collections::BTreeMap;

use aya::maps::{Map, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use moat_common::{
    Config, Counter, CtKey, CtValue, EndpointInfo, EventState, IpcacheValue, PolicyKey,
    PolicyValue, direction, policy_prefix, reason, rule_counter_index, verdict,
    verdict_counter_index,
};

use crate::{Datapath, Error, Maps, Result};

/// A policy entry's place: the exact hash for full-length keys, the trie for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntryKey {
    pub key: PolicyKey,
    /// Data bits that must match: `policy_prefix::ANY` (72) ..= `policy_prefix::FULL` (96).
    pub prefix_len: u32,
}

/// One map operation. The reconciler applies ordered batches of these.
#[derive(Clone, Debug, PartialEq)]
pub enum MapOp {
    IpcacheUpsert(IpNet, IpcacheValue),
    IpcacheRemove(IpNet),
    EndpointSet(u32, EndpointInfo),
    EndpointRemove(u32),
    PolicyUpsert(PolicyEntryKey, PolicyValue),
    PolicyRemove(PolicyEntryKey),
    PrefilterUpsert(IpNet, u32),
    PrefilterRemove(IpNet),
    SetRevision(u32),
}

/// (direction, verdict, reason) of a verdict counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictCounterKey {
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
}

/// (rule id, verdict) of a per-rule counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleCounterKey {
    pub rule_id: u32,
    pub verdict: u8,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Removing an absent key is not an error: removals are idempotent.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

fn v6_words(a: std::net::Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn v6_addr(w: [u32; 4]) -> std::net::Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    o.into()
}

impl Maps {
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        fn take<T: TryFrom<Map, Error = MapError>>(
            ebpf: &mut aya::Ebpf,
            name: &'static str,
        ) -> Result<T> {
            let map = ebpf.take_map(name).ok_or(Error::Map {
                name,
                source: MapError::InvalidName {
                    name: name.to_owned(),
                },
            })?;
            T::try_from(map).map_err(map_err(name))
        }
        Ok(Maps {
            ipcache4_exact: take(ebpf, "IPCACHE4_EXACT")?,
            ipcache6_exact: take(ebpf, "IPCACHE6_EXACT")?,
            ipcache4: take(ebpf, "IPCACHE4")?,
            ipcache6: take(ebpf, "IPCACHE6")?,
            endpoints: take(ebpf, "ENDPOINTS")?,
            endpoints_by_id: take(ebpf, "ENDPOINTS_BY_ID")?,
            policy_exact: take(ebpf, "POLICY_EXACT")?,
            policy: take(ebpf, "POLICY")?,
            revision: take(ebpf, "REVISION")?,
            config: take(ebpf, "CONFIG")?,
            conntrack: take(ebpf, "CONNTRACK")?,
            prefilter4: take(ebpf, "PREFILTER4")?,
            prefilter6: take(ebpf, "PREFILTER6")?,
            verdicts: take(ebpf, "VERDICTS")?,
            rules: take(ebpf, "RULES")?,
            event_state: take(ebpf, "EVENT_STATE")?,
        })
    }
}

impl Datapath {
    /// Apply `ops` in order, stopping at the first failure (the ops before it stay applied:
    /// the caller orders batches so that every prefix is safe).
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        for op in ops {
            self.apply_one(op)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<()> {
        match *op {
            MapOp::EndpointSet(ifindex, info) => {
                let info = self.hints.set_endpoint(ifindex, info);
                return self.write_endpoint(ifindex, info);
            }
            MapOp::EndpointRemove(ifindex) => {
                if let Some(id) = self.hints.endpoint_id(ifindex) {
                    ignore_missing(self.maps.endpoints_by_id.remove(&id))
                        .map_err(map_err("ENDPOINTS_BY_ID"))?;
                }
                self.hints.remove_endpoint(ifindex);
            }
            MapOp::PolicyUpsert(k, v) => {
                for (ifindex, info) in self.hints.before_upsert(&k, &v) {
                    self.write_endpoint(ifindex, info)?;
                }
            }
            _ => {}
        }
        self.write(op)?;
        let after = match *op {
            MapOp::PolicyRemove(k) => self.hints.after_remove(&k),
            MapOp::PolicyUpsert(k, v) => self.hints.after_upsert(&k, &v),
            _ => Vec::new(),
        };
        for (ifindex, info) in after {
            self.write_endpoint(ifindex, info)?;
        }
        Ok(())
    }

    /// Both endpoint maps: by ifindex (the hooks' own endpoint) and by endpoint id (a
    /// destination's policy, for steering).
    fn write_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<()> {
        self.maps
            .endpoints_by_id
            .insert(info.endpoint_id, info, 0)
            .map_err(map_err("ENDPOINTS_BY_ID"))?;
        self.maps
            .endpoints
            .insert(ifindex, info, 0)
            .map_err(map_err("ENDPOINTS"))
    }

    fn write(&mut self, op: &MapOp) -> Result<()> {
        let m = &mut self.maps;
        match *op {
            MapOp::IpcacheUpsert(net, v) => match net {
                IpNet::V4(n) if n.prefix_len() == 32 => m
                    .ipcache4_exact
                    .insert(u32::from_ne_bytes(n.addr().octets()), v, 0)
                    .map_err(map_err("IPCACHE4_EXACT")),
                IpNet::V6(n) if n.prefix_len() == 128 => m
                    .ipcache6_exact
                    .insert(v6_words(n.addr()), v, 0)
                    .map_err(map_err("IPCACHE6_EXACT")),
                IpNet::V4(n) => m
                    .ipcache4
                    .insert(
                        &Key::new(
                            n.prefix_len().into(),
                            u32::from_ne_bytes(n.network().octets()),
                        ),
                        v,
                        0,
                    )
                    .map_err(map_err("IPCACHE4")),
                IpNet::V6(n) => m
                    .ipcache6
                    .insert(
                        &Key::new(n.prefix_len().into(), v6_words(n.network())),
                        v,
                        0,
                    )
                    .map_err(map_err("IPCACHE6")),
            },
            MapOp::IpcacheRemove(net) => match net {
                IpNet::V4(n) if n.prefix_len() == 32 => ignore_missing(
                    m.ipcache4_exact
                        .remove(&u32::from_ne_bytes(n.addr().octets())),
                )
                .map_err(map_err("IPCACHE4_EXACT")),
                IpNet::V6(n) if n.prefix_len() == 128 => {
                    ignore_missing(m.ipcache6_exact.remove(&v6_words(n.addr())))
                        .map_err(map_err("IPCACHE6_EXACT"))
                }
                IpNet::V4(n) => ignore_missing(m.ipcache4.remove(&Key::new(
                    n.prefix_len().into(),
                    u32::from_ne_bytes(n.network().octets()),
                )))
                .map_err(map_err("IPCACHE4")),
                IpNet::V6(n) => ignore_missing(
                    m.ipcache6
                        .remove(&Key::new(n.prefix_len().into(), v6_words(n.network()))),
                )
                .map_err(map_err("IPCACHE6")),
            },
            MapOp::EndpointSet(..) => unreachable!("written by apply_one"),
            MapOp::EndpointRemove(ifindex) => {
                ignore_missing(m.endpoints.remove(&ifindex)).map_err(map_err("ENDPOINTS"))
            }
            MapOp::PolicyUpsert(k, v) if k.prefix_len == policy_prefix::FULL => m
                .policy_exact
                .insert(k.key, v, 0)
                .map_err(map_err("POLICY_EXACT")),
            MapOp::PolicyUpsert(k, v) => m
                .policy
                .insert(&Key::new(k.prefix_len, k.key), v, 0)
                .map_err(map_err("POLICY")),
            MapOp::PolicyRemove(k) if k.prefix_len == policy_prefix::FULL => {
                ignore_missing(m.policy_exact.remove(&k.key)).map_err(map_err("POLICY_EXACT"))
            }
            MapOp::PolicyRemove(k) => {
                ignore_missing(m.policy.remove(&Key::new(k.prefix_len, k.key)))
                    .map_err(map_err("POLICY"))
            }
            MapOp::PrefilterUpsert(net, rule) => match net {
                IpNet::V4(n) => m
                    .prefilter4
                    .insert(
                        &Key::new(
                            n.prefix_len().into(),
                            u32::from_ne_bytes(n.network().octets()),
                        ),
                        rule,
                        0,
                    )
                    .map_err(map_err("PREFILTER4")),
                IpNet::V6(n) => m
                    .prefilter6
                    .insert(
                        &Key::new(n.prefix_len().into(), v6_words(n.network())),
                        rule,
                        0,
                    )
                    .map_err(map_err("PREFILTER6")),
            },
            MapOp::PrefilterRemove(net) => match net {
                IpNet::V4(n) => ignore_missing(m.prefilter4.remove(&Key::new(
                    n.prefix_len().into(),
                    u32::from_ne_bytes(n.network().octets()),
                )))
                .map_err(map_err("PREFILTER4")),
                IpNet::V6(n) => ignore_missing(
                    m.prefilter6
                        .remove(&Key::new(n.prefix_len().into(), v6_words(n.network()))),
                )
                .map_err(map_err("PREFILTER6")),
            },
            MapOp::SetRevision(r) => m.revision.set(0, r, 0).map_err(map_err("REVISION")),
        }
    }

    /// Every ipcache entry (exact and prefix), as realized in the kernel.
    pub fn ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>> {
        let m = &self.maps;
        let mut out = BTreeMap::new();
        for kv in m.ipcache4_exact.iter() {
            let (k, v) = kv.map_err(map_err("IPCACHE4_EXACT"))?;
            let addr = std::net::Ipv4Addr::from(k.to_ne_bytes());
            out.insert(IpNet::from(std::net::IpAddr::V4(addr)), v);
        }
        for kv in m.ipcache6_exact.iter() {
            let (k, v) = kv.map_err(map_err("IPCACHE6_EXACT"))?;
            out.insert(IpNet::from(std::net::IpAddr::V6(v6_addr(k))), v);
        }
        for kv in m.ipcache4.iter() {
            let (k, v) = kv.map_err(map_err("IPCACHE4"))?;
            let addr = std::net::Ipv4Addr::from(k.data().to_ne_bytes());
            if let Ok(net) = ipnet::Ipv4Net::new(addr, k.prefix_len() as u8) {
                out.insert(IpNet::V4(net), v);
            }
        }
        for kv in m.ipcache6.iter() {
            let (k, v) = kv.map_err(map_err("IPCACHE6"))?;
            if let Ok(net) = ipnet::Ipv6Net::new(v6_addr(k.data()), k.prefix_len() as u8) {
                out.insert(IpNet::V6(net), v);
            }
        }
        Ok(out)
    }

    /// Every endpoint entry, by ifindex, as set by `MapOp::EndpointSet` (the skip hints the
    /// loader folds into the flags are left out).
    pub fn endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>> {
        self.maps
            .endpoints
            .iter()
            .map(|kv| {
                kv.map(|(k, v)| (k, crate::hints::strip(v)))
                    .map_err(map_err("ENDPOINTS"))
            })
            .collect()
    }

    /// Every policy entry (exact hash and trie).
    pub fn policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>> {
        let m = &self.maps;
        let mut out = BTreeMap::new();
        for kv in m.policy_exact.iter() {
            let (key, v) = kv.map_err(map_err("POLICY_EXACT"))?;
            out.insert(
                PolicyEntryKey {
                    key,
                    prefix_len: policy_prefix::FULL,
                },
                v,
            );
        }
        for kv in m.policy.iter() {
            let (k, v) = kv.map_err(map_err("POLICY"))?;
            out.insert(
                PolicyEntryKey {
                    key: k.data(),
                    prefix_len: k.prefix_len(),
                },
                v,
            );
        }
        Ok(out)
    }

    /// Every prefilter entry.
    pub fn prefilter(&self) -> Result<BTreeMap<IpNet, u32>> {
        let m = &self.maps;
        let mut out = BTreeMap::new();
        for kv in m.prefilter4.iter() {
            let (k, v) = kv.map_err(map_err("PREFILTER4"))?;
            let addr = std::net::Ipv4Addr::from(k.data().to_ne_bytes());
            if let Ok(net) = ipnet::Ipv4Net::new(addr, k.prefix_len() as u8) {
                out.insert(IpNet::V4(net), v);
            }
        }
        for kv in m.prefilter6.iter() {
            let (k, v) = kv.map_err(map_err("PREFILTER6"))?;
            if let Ok(net) = ipnet::Ipv6Net::new(v6_addr(k.data()), k.prefix_len() as u8) {
                out.insert(IpNet::V6(net), v);
            }
        }
        Ok(out)
    }

    pub fn revision(&self) -> Result<u32> {
        self.maps.revision.get(&0, 0).map_err(map_err("REVISION"))
    }

    pub fn config(&self) -> Result<Config> {
        self.maps.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err("CONFIG"))
    }

    /// Every live conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        self.maps
            .conntrack
            .iter()
            .map(|kv| kv.map_err(map_err("CONNTRACK")))
            .collect()
    }

    /// Forget every tracked flow (each is looked up again on its next packet).
    pub fn conntrack_flush(&mut self) -> Result<()> {
        let keys: Vec<CtKey> = self
            .maps
            .conntrack
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("CONNTRACK"))?;
        for k in keys {
            ignore_missing(self.maps.conntrack.remove(&k)).map_err(map_err("CONNTRACK"))?;
        }
        Ok(())
    }

    /// Verdict counters summed over CPUs; zero counters are left out.
    pub fn verdict_counters(&self) -> Result<BTreeMap<VerdictCounterKey, Counter>> {
        let mut out = BTreeMap::new();
        for d in [direction::INGRESS, direction::EGRESS] {
            for v in 0..verdict::COUNT as u8 {
                for r in 0..reason::COUNT as u8 {
                    let c = sum(
                        &self.maps.verdicts,
                        verdict_counter_index(d, v, r),
                        "VERDICTS",
                    )?;
                    if c.packets != 0 {
                        let key = VerdictCounterKey {
                            direction: d,
                            verdict: v,
                            reason: r,
                        };
                        out.insert(key, c);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Per-rule counters summed over CPUs; zero counters are left out.
    pub fn rule_counters(&self) -> Result<BTreeMap<RuleCounterKey, Counter>> {
        let mut out = BTreeMap::new();
        for (i, per_cpu) in self.maps.rules.iter().enumerate() {
            let per_cpu = per_cpu.map_err(map_err("RULES"))?;
            let c = per_cpu.iter().fold(Counter::default(), add);
            if c.packets != 0 {
                let i = i as u32;
                let key = RuleCounterKey {
                    rule_id: i / verdict::COUNT as u32,
                    verdict: (i % verdict::COUNT as u32) as u8,
                };
                debug_assert_eq!(rule_counter_index(key.rule_id, key.verdict), i);
                out.insert(key, c);
            }
        }
        Ok(out)
    }

    /// Per-rule counters of the given rule ids only (a scrape need not read every slot);
    /// zero counters are left out.
    pub fn rule_counters_for(
        &self,
        rule_ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<RuleCounterKey, Counter>> {
        let mut out = BTreeMap::new();
        for rule_id in rule_ids {
            for v in 0..verdict::COUNT as u8 {
                let c = sum(&self.maps.rules, rule_counter_index(rule_id, v), "RULES")?;
                if c.packets != 0 {
                    out.insert(
                        RuleCounterKey {
                            rule_id,
                            verdict: v,
                        },
                        c,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Number of live conntrack entries.
    pub fn conntrack_len(&self) -> Result<usize> {
        let mut n = 0;
        for k in self.maps.conntrack.keys() {
            k.map_err(map_err("CONNTRACK"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Event accounting summed over CPUs (emitted, suppressed by the rate limit, lost).
    pub fn event_stats(&self) -> Result<EventState> {
        let per_cpu = self
            .maps
            .event_state
            .get(&0, 0)
            .map_err(map_err("EVENT_STATE"))?;
        Ok(per_cpu
            .iter()
            .fold(EventState::default(), |a, b| EventState {
                emitted: a.emitted + b.emitted,
                suppressed: a.suppressed + b.suppressed,
                lost: a.lost + b.lost,
                ..a
            }))
    }
}

fn add(a: Counter, b: &Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

fn sum(
    map: &aya::maps::PerCpuArray<MapData, Counter>,
    index: u32,
    name: &'static str,
) -> Result<Counter> {
    let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
    Ok(per_cpu.iter().fold(Counter::default(), add))
}
