//! `make bench-datapath`: kernel-measured ns/packet of `to_endpoint` (BPF_PROG_TEST_RUN) at
//! three map sizes, against an empty TC program, with every run checked by counters to have
//! taken the intended path. Writes `target/bench/datapath.json`
//! (../shared/notes/benchmarks.md).
//!
//! Run as root; it uses a private pin root and attaches nothing.
use std::{net::Ipv4Addr, time::Instant};

use ipnet::IpNet;
use moat_common::{
    Config, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, action, config_flags, direction,
    ep_flag, ep_flags, identity, policy_prefix, reason, verdict,
};
use moat_datapath::{
    Datapath, Hook, MapOp, PolicyEntryKey, VerdictCounterKey,
    packet::{L4, packet},
};
use serde_json::json;

const REPEAT: u32 = 100_000;
const RUNS: usize = 11;
const IFINDEX: u32 = 1;
const SUBJECT: u32 = 1;
const EP_ID: u32 = 1;
/// The benchmarked peer: in the exact hash, with no policy entry of its own.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const PEER_IDENTITY: u32 = 0x00ff_0000;
/// A peer found only through the CIDR trie.
const TRIE_PEER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// The established flow's peer, allowed on port 80.
const FRIEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const FRIEND_IDENTITY: u32 = 0x00ff_0001;
const ME: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

struct Size {
    label: &'static str,
    policy: u32,
    ipcache: u32,
}

const SIZES: [Size; 3] = [
    Size {
        label: "small",
        policy: 10,
        ipcache: 10,
    },
    Size {
        label: "medium",
        policy: 1_000,
        ipcache: 10_000,
    },
    Size {
        label: "large",
        policy: 100_000,
        ipcache: 1_000_000,
    },
];

/// Removes the pin root on exit, also on panic.
struct Root(String);
impl Drop for Root {
    fn drop(&mut self) {
        let _ = Datapath::reset(&self.0);
    }
}

/// A TCP segment from `src` to the endpoint, padded to a 64-byte frame (60 + FCS).
fn tcp_packet(src: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = L4::Tcp {
        sport: 40000,
        dport,
        flags,
    };
    let mut f = packet(src.into(), ME.into(), l4);
    f.resize(60, 0);
    f
}

fn entry(subject: u32, peer: u32, port: u16, prefix_len: u32) -> PolicyEntryKey {
    PolicyEntryKey {
        key: PolicyKey {
            subject,
            peer,
            direction: direction::INGRESS,
            protocol: 6,
            dport: port.to_be_bytes(),
        },
        prefix_len,
    }
}

/// Fill the maps: `size.policy` entries over other rule sets of 10 (every 5th a port range
/// in the trie, the rest exact ports in the hash); the subject's own set has an exact-peer and
/// an any-peer entry, so its deny takes both hash probes. `size.ipcache` prefixes: 90% exact
/// /32s, 10% CIDRs.
fn fill(dp: &mut Datapath, size: &Size) {
    let mut ops = vec![MapOp::EndpointSet(
        IFINDEX,
        EndpointInfo {
            endpoint_id: EP_ID,
            identity: identity::FIRST_LABEL,
            ruleset_id: SUBJECT,
            flags: ep_flag(ep_flags::POLICY, direction::INGRESS)
                | ep_flag(ep_flags::ISOLATED, direction::INGRESS)
                | ep_flag(ep_flags::AUDIT_ISOLATED, direction::INGRESS),
            isolating_rule: [1, 2],
            audit_isolating_rule: [1, 2],
        },
    )];
    ops.push(MapOp::PolicyUpsert(
        entry(SUBJECT, FRIEND_IDENTITY, 80, policy_prefix::FULL),
        PolicyValue::enforced(action::ALLOW, 3),
    ));
    ops.push(MapOp::PolicyUpsert(
        entry(SUBJECT, identity::ANY, 443, policy_prefix::FULL),
        PolicyValue::enforced(action::ALLOW, 4),
    ));
    for k in 0..size.policy.saturating_sub(2) {
        let subject = SUBJECT + 1 + k / 10;
        let peer = identity::FIRST_LABEL + 1 + k % 4093;
        let port = 1000 + (k % 10) as u16 * 16;
        let prefix = if k % 5 == 0 {
            policy_prefix::PROTOCOL + 12
        } else {
            policy_prefix::FULL
        };
        ops.push(MapOp::PolicyUpsert(
            entry(subject, peer, port, prefix),
            PolicyValue::enforced(action::ALLOW, 5 + k % 1000),
        ));
    }
    let peer = |identity| IpcacheValue {
        identity,
        endpoint_id: 0,
        flags: 0,
    };
    ops.push(MapOp::IpcacheUpsert(
        IpNet::from(std::net::IpAddr::V4(PEER)),
        peer(PEER_IDENTITY),
    ));
    ops.push(MapOp::IpcacheUpsert(
        IpNet::from(std::net::IpAddr::V4(FRIEND)),
        peer(FRIEND_IDENTITY),
    ));
    ops.push(MapOp::IpcacheUpsert(
        "172.31.0.0/16".parse().unwrap(),
        peer(identity::FIRST_CIDR),
    ));
    let cidrs = size.ipcache / 10;
    for i in 0..size.ipcache.saturating_sub(3) {
        let net = if i < cidrs {
            // Distinct /24s under 100.64.0.0/10.
            let a = Ipv4Addr::from(0x6440_0000 + (i << 8));
            IpNet::V4(ipnet::Ipv4Net::new(a, 24).unwrap())
        } else {
            IpNet::from(std::net::IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)))
        };
        ops.push(MapOp::IpcacheUpsert(
            net,
            peer(identity::FIRST_LABEL + 1 + i % 4093),
        ));
    }
    dp.apply(&ops).expect("fill maps");
}

fn counter(dp: &Datapath, v: u8, r: u8) -> u64 {
    dp.verdict_counters()
        .unwrap()
        .get(&VerdictCounterKey {
            direction: direction::INGRESS,
            verdict: v,
            reason: r,
        })
        .map_or(0, |c| c.packets)
}

/// Median, min and max ns/packet over `RUNS` runs; each run must add exactly `REPEAT` to the
/// counter (verdict, reason), else the run did not take the intended path.
fn measure(
    dp: &mut Datapath,
    events: &mut moat_datapath::EventStream,
    hook: Hook,
    pkt: &[u8],
    path: Option<(u8, u8)>,
) -> (f64, f64, f64) {
    let mut ns = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let before = path.map(|(v, r)| counter(dp, v, r));
        let lost_before = dp.event_stats().unwrap().lost;
        let r = dp
            .test_run(hook, pkt, IFINDEX, 0, REPEAT)
            .expect("test_run");
        if let (Some((v, rs)), Some(before)) = (path, before) {
            let after = counter(dp, v, rs);
            assert_eq!(
                after - before,
                REPEAT as u64,
                "a run left the intended path"
            );
        }
        assert_eq!(
            dp.event_stats().unwrap().lost,
            lost_before,
            "ring buffer overflowed"
        );
        events.drain();
        ns.push(r.per_run.as_nanos() as f64);
    }
    ns.sort_by(f64::total_cmp);
    (ns[RUNS / 2], ns[0], ns[RUNS - 1])
}

fn main() {
    let cpu = nix::sched::CpuSet::new();
    let mut cpu = cpu;
    cpu.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).expect("pin to cpu 0");

    let mut results = Vec::new();
    let mut table = Vec::new();
    let mut full = Vec::new();
    let mut floor_ns = 0.0;
    let mut obs_ratio = 0.0;
    for size in &SIZES {
        let root = Root(format!(
            "/sys/fs/bpf/moat-bench-{}-{}",
            std::process::id(),
            size.label
        ));
        let _ = Datapath::reset(&root.0);
        let mut dp = Datapath::open(&root.0).expect("open datapath");
        let mut events = dp.take_events().unwrap();
        let t = Instant::now();
        fill(&mut dp, size);
        eprintln!(
            "{}: filled {} policy entries, {} ipcache prefixes in {:.1}s",
            size.label,
            size.policy,
            size.ipcache,
            t.elapsed().as_secs_f64()
        );
        let params = json!({"policy_entries": size.policy, "ipcache_prefixes": size.ipcache});
        let deny = tcp_packet(PEER, 80, 0x02);
        let deny_trie = tcp_packet(TRIE_PEER, 80, 0x02);
        let est = tcp_packet(FRIEND, 80, 0x10);

        let mut record = |name: &str, (v, lo, hi): (f64, f64, f64), params: &serde_json::Value| {
            table.push(format!(
                "{name:<28} {:<8} {v:>8.1} ns  [{lo:.1} .. {hi:.1}]",
                size.label
            ));
            results.push(
                json!({"name": name, "metric": "ns_per_packet", "value": v, "min": lo,
                "max": hi, "runs": RUNS, "params": params}),
            );
            v
        };
        let floor = measure(&mut dp, &mut events, Hook::Floor, &deny, None);
        let f = record("tc_empty", floor, &params);
        if size.label == "large" {
            floor_ns = f;
        }
        let dd = (verdict::DROPPED, reason::DEFAULT_DENY);
        let v = record(
            "tc_full_lookup_deny",
            measure(&mut dp, &mut events, Hook::ToEndpoint, &deny, Some(dd)),
            &params,
        );
        full.push(v);
        record(
            "tc_full_lookup_deny_trie_peer",
            measure(&mut dp, &mut events, Hook::ToEndpoint, &deny_trie, Some(dd)),
            &params,
        );
        // A port range in the subject's own rule set: both trie probes join the path.
        let range = entry(SUBJECT, FRIEND_IDENTITY, 2048, policy_prefix::PROTOCOL + 5);
        dp.apply(&[MapOp::PolicyUpsert(
            range,
            PolicyValue::enforced(action::ALLOW, 6),
        )])
        .unwrap();
        record(
            "tc_full_lookup_deny_with_ranges",
            measure(&mut dp, &mut events, Hook::ToEndpoint, &deny, Some(dd)),
            &params,
        );
        dp.apply(&[MapOp::PolicyRemove(range)]).unwrap();
        // An allowed SYN: a new flow written to conntrack. Repeated, it reuses the ports of
        // the flow before it (as short connections between two pods do).
        record(
            "tc_new_flow_port_reuse",
            measure(
                &mut dp,
                &mut events,
                Hook::ToEndpoint,
                &tcp_packet(FRIEND, 80, 0x02),
                Some((verdict::FORWARDED, reason::POLICY)),
            ),
            &params,
        );
        // The flow is open: time its established packets.
        record(
            "tc_established",
            measure(
                &mut dp,
                &mut events,
                Hook::ToEndpoint,
                &est,
                Some((verdict::FORWARDED, reason::ESTABLISHED)),
            ),
            &params,
        );
        if size.label == "large" {
            // The same full-lookup path with events and per-rule counters switched off.
            let on = dp.config().unwrap();
            dp.set_config(Config {
                flags: on.flags & !(config_flags::EVENTS | config_flags::RULE_COUNTERS),
                ..on
            })
            .unwrap();
            let off = record(
                "tc_full_lookup_deny_no_observability",
                measure(&mut dp, &mut events, Hook::ToEndpoint, &deny, Some(dd)),
                &params,
            );
            dp.set_config(on).unwrap();
            obs_ratio = v / off;
        }
    }
    for line in &table {
        println!("{line}");
    }
    let scale = full[2] / full[0];
    let overhead = full[2] - floor_ns;
    let targets = json!([
        {"name": "scale_ratio", "value": scale, "op": "<=", "limit": 1.5, "met": scale <= 1.5,
         "from": "tc_full_lookup_deny at the large size / tc_full_lookup_deny at the small size"},
        {"name": "overhead_ns", "value": overhead, "op": "<=", "limit": 150.0,
         "met": overhead <= 150.0,
         "from": "tc_full_lookup_deny at the large size - tc_empty at the large size"},
        {"name": "observability_overhead", "value": obs_ratio, "op": "<=", "limit": 1.10,
         "met": obs_ratio <= 1.10,
         "from": "tc_full_lookup_deny / tc_full_lookup_deny_no_observability, large size"},
    ]);
    println!(
        "scale_ratio {scale:.3}  overhead_ns {overhead:.1}  observability_overhead {obs_ratio:.3}"
    );
    let out = json!({
        "bench": "datapath",
        "measured_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "method": format!("BPF_PROG_TEST_RUN of to_endpoint, 64-byte IPv4 TCP frame, repeat {REPEAT}, \
            median of {RUNS} runs, process pinned to CPU 0, every run checked by the verdict \
            counters to have taken the intended path and by the event stats to have lost no event"),
        "results": results,
        "targets": targets,
    });
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/datapath.json",
        serde_json::to_string_pretty(&out).unwrap() + "\n",
    )
    .unwrap();
    println!("wrote target/bench/datapath.json");
}
