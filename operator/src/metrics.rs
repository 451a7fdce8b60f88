//! Prometheus metrics in the OpenMetrics text format (prometheus-client). Kernel counters are
//! read from the per-CPU maps at scrape time and summed, never estimated: the reconciler (the
//! maps' owner) takes a [`Snapshot`] when asked, and the scrape encodes it.
use std::{collections::BTreeMap, sync::Arc};

use moat_common::{Counter, EventState, direction};
use moat_datapath::{RuleCounterKey, VerdictCounterKey};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    compiler::RuleInfo,
    flows::{reason_name, verdict_name},
};

/// Metrics the agent updates as it runs (shared handles; cloning shares the values).
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Compile + diff + apply of one source state.
    pub reconcile_duration: Histogram,
    /// From a source change being observed to the maps holding it.
    pub apply_latency: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            apply_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

/// Fill of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// L7 verdict counts by (rule id or none, method, verdict).
pub type L7Counts = BTreeMap<(Option<u32>, String, &'static str), u64>;

/// The L7 proxy's own counters (besides its per-request ones in [`L7Counts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L7ProxyCounts {
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub connections_active: u64,
    pub upstream_errors: u64,
    pub events_suppressed: u64,
    pub events_dropped: u64,
    pub restarts: u64,
}

impl From<&crate::l7::L7Stats> for L7ProxyCounts {
    fn from(s: &crate::l7::L7Stats) -> Self {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        L7ProxyCounts {
            connections_accepted: get(&s.connections_accepted),
            connections_rejected: get(&s.connections_rejected),
            connections_active: get(&s.connections_active),
            upstream_errors: get(&s.upstream_errors),
            events_suppressed: get(&s.events_suppressed),
            events_dropped: get(&s.events_dropped),
            restarts: get(&s.restarts),
        }
    }
}

/// Everything read from the kernel and the reconciler for one scrape.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub verdicts: BTreeMap<VerdictCounterKey, Counter>,
    pub rules: BTreeMap<RuleCounterKey, Counter>,
    pub rule_info: Arc<BTreeMap<u32, RuleInfo>>,
    pub events: EventState,
    pub maps: Vec<MapFill>,
    pub endpoints: u64,
    pub identities: u64,
    pub map_writes: u64,
    /// Valid policies this node could not fit into its maps (nothing already enforced
    /// changed; each is also reported as an Event and in `moat status`).
    pub overflows: u64,
    pub l7: L7Counts,
    pub l7_proxy: L7ProxyCounts,
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

fn dir_name(d: u8) -> &'static str {
    if d == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let verdict_rows = |bytes: bool| {
            s.verdicts.iter().map(move |(k, c)| {
                (
                    vec![
                        ("direction", dir_name(k.direction).to_owned()),
                        ("verdict", verdict_name(k.verdict).to_owned()),
                        ("reason", reason_name(k.reason).to_owned()),
                    ],
                    if bytes { c.bytes } else { c.packets },
                )
            })
        };
        counter_family(
            &mut encoder,
            "moat_verdicts",
            "Packets decided by the datapath, by direction, verdict and reason.",
            verdict_rows(false),
        )?;
        counter_family(
            &mut encoder,
            "moat_verdict_bytes",
            "Bytes decided by the datapath, by direction, verdict and reason.",
            verdict_rows(true),
        )?;
        let rule_rows = |bytes: bool| {
            s.rules.iter().filter_map(move |(k, c)| {
                let info = s.rule_info.get(&k.rule_id)?;
                Some((
                    vec![
                        ("kind", info.kind.as_str().to_owned()),
                        ("namespace", info.namespace.clone()),
                        ("policy", info.name.clone()),
                        ("rule", info.rule.clone()),
                        ("direction", info.direction.clone()),
                        ("verdict", verdict_name(k.verdict).to_owned()),
                    ],
                    if bytes { c.bytes } else { c.packets },
                ))
            })
        };
        counter_family(
            &mut encoder,
            "moat_policy_rule_packets",
            "Packets per policy rule and verdict; default-deny drops are charged to the \
             policy that isolated the endpoint (rule=\"default-deny\").",
            rule_rows(false),
        )?;
        counter_family(
            &mut encoder,
            "moat_policy_rule_bytes",
            "Bytes per policy rule and verdict.",
            rule_rows(true),
        )?;
        counter_family(
            &mut encoder,
            "moat_l7_requests",
            "HTTP requests decided by the L7 proxy.",
            s.l7.iter().map(|((rule, method, verdict), n)| {
                let info = rule.and_then(|r| s.rule_info.get(&r));
                (
                    vec![
                        ("kind", info.map_or("", |i| i.kind.as_str()).to_owned()),
                        (
                            "namespace",
                            info.map_or(String::new(), |i| i.namespace.clone()),
                        ),
                        ("policy", info.map_or(String::new(), |i| i.name.clone())),
                        ("method", method.clone()),
                        ("verdict", (*verdict).to_owned()),
                    ],
                    *n,
                )
            }),
        )?;
        let p = &s.l7_proxy;
        for (name, help, value) in [
            (
                "moat_l7_connections",
                "Client connections the L7 proxy accepted and served.",
                p.connections_accepted,
            ),
            (
                "moat_l7_connections_rejected",
                "Client connections the L7 proxy closed at accept: the connection cap was \
                 reached.",
                p.connections_rejected,
            ),
            (
                "moat_l7_upstream_errors",
                "Upstream connections the L7 proxy could not make (answered 502).",
                p.upstream_errors,
            ),
            (
                "moat_l7_events_suppressed",
                "L7 flow events held back by the per-worker rate limit (counters stay exact).",
                p.events_suppressed,
            ),
            (
                "moat_l7_events_lost",
                "L7 flow events dropped because the agent's flow feed was full.",
                p.events_dropped,
            ),
            (
                "moat_l7_proxy_restarts",
                "Times the agent restarted the L7 proxy after it stopped or panicked (redirected \
                 flows are dropped while it is down).",
                p.restarts,
            ),
        ] {
            counter_family(&mut encoder, name, help, [(vec![], value)])?;
        }
        gauge(
            &mut encoder,
            "moat_l7_connections_active",
            "Client connections open in the L7 proxy.",
            p.connections_active as i64,
        )?;
        counter_family(
            &mut encoder,
            "moat_events_lost",
            "Verdict events dropped because the ring buffer was full.",
            [(vec![], s.events.lost)],
        )?;
        counter_family(
            &mut encoder,
            "moat_events_suppressed",
            "Verdict events held back by the per-CPU rate limit (counters stay exact).",
            [(vec![], s.events.suppressed)],
        )?;
        counter_family(
            &mut encoder,
            "moat_map_writes",
            "Map writes issued by this agent since it started.",
            [(vec![], s.map_writes)],
        )?;
        gauge(
            &mut encoder,
            "moat_endpoints",
            "Local endpoints programmed.",
            s.endpoints as i64,
        )?;
        gauge(
            &mut encoder,
            "moat_policy_overflows",
            "Policies refused on this node because its maps would overflow.",
            s.overflows as i64,
        )?;
        gauge(
            &mut encoder,
            "moat_identities",
            "Identities in the ipcache.",
            s.identities as i64,
        )?;
        for (name, help, value) in [
            ("moat_map_entries", "Entries per datapath map.", true),
            ("moat_map_capacity", "Capacity per datapath map.", false),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for m in &s.maps {
                let v = if value { m.entries } else { m.capacity };
                ConstGauge::new(v as i64).encode(family.encode_family(&[("map", m.map)])?)?;
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text of one scrape.
pub fn encode(agent: &AgentMetrics, snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register(
        "moat_reconcile_duration_seconds",
        "Time to compile, diff and apply one source state.",
        agent.reconcile_duration.clone(),
    );
    registry.register(
        "moat_policy_apply_latency_seconds",
        "From a source change being observed to the maps holding it.",
        agent.apply_latency.clone(),
    );
    let info =
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
    registry.register("moat_build", "moat build information.", info);
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}
