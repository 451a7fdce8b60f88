//! The real programs on hand-built packets (BPF_PROG_TEST_RUN): every decision path, with the
//! counters and events it must leave behind. The programs see ifindex 1 (loopback, present in
//! every namespace) as the endpoint's interface; nothing is attached anywhere.
mod support;

use std::time::Duration;

use moat_common::{Counter, Event, action, capacity, event_kind, identity, mark, reason, verdict};
use moat_datapath::{Datapath, EVENT_FLUSH, Hook, MapOp, RuleCounterKey, VerdictCounterKey};
use support::*;

const OK: u32 = 0;
const SHOT: u32 = 2;
const IFINDEX: u32 = 1;

const EP_ID: u32 = 10;
const EP_IDENTITY: u32 = 300;
const RULESET: u32 = 5;
const PEER_IDENTITY: u32 = 400;
const CIDR_IDENTITY: u32 = identity::FIRST_CIDR;

const ME: &str = "10.244.1.2";
const PEER: &str = "10.244.1.3";
const OUTSIDE: &str = "192.0.2.7";

/// An endpoint (ifindex 1) isolated in `isolated`, a pod peer, a CIDR peer and the node.
fn setup(tag: &str, isolated: &[u8]) -> (PinRoot, Datapath) {
    let root = PinRoot::new(tag);
    let mut dp = root.open();
    dp.apply(&[
        MapOp::EndpointSet(IFINDEX, endpoint(EP_ID, EP_IDENTITY, RULESET, isolated)),
        MapOp::IpcacheUpsert(net("10.244.1.2/32"), ipc(EP_IDENTITY, EP_ID)),
        MapOp::IpcacheUpsert(net("10.244.1.3/32"), ipc(PEER_IDENTITY, 0)),
        MapOp::IpcacheUpsert(net("192.0.2.0/24"), ipc(CIDR_IDENTITY, 0)),
        MapOp::IpcacheUpsert(net("10.244.1.1/32"), ipc(identity::HOST, 0)),
        MapOp::IpcacheUpsert(net("fd00:10:244:1::2/128"), ipc(EP_IDENTITY, EP_ID)),
        MapOp::IpcacheUpsert(net("fd00:10:244:1::3/128"), ipc(PEER_IDENTITY, 0)),
    ])
    .unwrap();
    (root, dp)
}

fn run(dp: &Datapath, hook: Hook, pkt: &[u8]) -> u32 {
    dp.test_run(hook, pkt, IFINDEX, 0, 1).unwrap().action
}

fn tcp(flags: u8, sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
    }
}

/// An ingress SYN from `src` to the endpoint on `dport`.
fn syn_in(src: &str, dport: u16) -> Vec<u8> {
    packet(v4(src), v4(ME), tcp(SYN, 40000, dport))
}

fn verdicts(dp: &Datapath, dir: u8, v: u8, r: u8) -> u64 {
    dp.verdict_counters()
        .unwrap()
        .get(&VerdictCounterKey {
            direction: dir,
            verdict: v,
            reason: r,
        })
        .map_or(0, |c| c.packets)
}

fn rule_count(dp: &Datapath, rule_id: u32, v: u8) -> Counter {
    dp.rule_counters()
        .unwrap()
        .get(&RuleCounterKey {
            rule_id,
            verdict: v,
        })
        .copied()
        .unwrap_or_default()
}

fn allow_ingress(dp: &mut Datapath, peer: u32, proto: u8, port: u16, bits: u32, rule: u32) {
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, peer, INGRESS, proto, port, bits),
        pval(action::ALLOW, rule),
    )])
    .unwrap();
}

/// Allows PEER to port 80 under rule 7 and opens a flow from it (the SYN passes); returns
/// the flow's data packets in and out.
fn open_flow(dp: &mut Datapath) -> (Vec<u8>, Vec<u8>) {
    allow_ingress(dp, PEER_IDENTITY, TCP, 80, 16, 7);
    bump(dp);
    assert_eq!(run(dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    (
        packet(v4(PEER), v4(ME), tcp(ACK, 40000, 80)),
        packet(v4(ME), v4(PEER), tcp(ACK, 80, 40000)),
    )
}

#[test]
fn allow_deny_and_default_deny_with_attribution() {
    let (_root, mut dp) = setup("allow", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    // Another port: default deny, charged to the isolating rule.
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 81)), SHOT);
    // Another peer: default deny.
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(OUTSIDE, 80)), SHOT);

    assert_eq!(
        verdicts(&dp, INGRESS, verdict::FORWARDED, reason::POLICY),
        1
    );
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::DEFAULT_DENY),
        2
    );
    let allowed = rule_count(&dp, 7, verdict::FORWARDED);
    assert_eq!(allowed.packets, 1);
    assert_eq!(allowed.bytes, syn_in(PEER, 80).len() as u64);
    assert_eq!(rule_count(&dp, 900, verdict::DROPPED).packets, 2);

    let mut events = dp.take_events().unwrap();
    let evs = events.drain();
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert_eq!(evs[0].kind, event_kind::NEW_FLOW);
    assert_eq!(evs[0].rule_id, 7);
    assert_eq!(evs[0].src_identity, PEER_IDENTITY);
    assert_eq!(evs[0].dst_identity, EP_IDENTITY);
    assert_eq!(
        (evs[0].sport, evs[0].dport, evs[0].protocol),
        (40000, 80, TCP)
    );
    assert_eq!(evs[0].src[0], u32::from_ne_bytes([10, 244, 1, 3]));
    assert_eq!(evs[1].kind, event_kind::DROP);
    assert_eq!(
        (evs[1].verdict, evs[1].reason),
        (verdict::DROPPED, reason::DEFAULT_DENY)
    );
    assert_eq!(evs[1].rule_id, 900);
    assert_eq!(evs[2].src_identity, CIDR_IDENTITY);
    assert_eq!(dp.event_stats().unwrap().emitted, 3);
}

#[test]
fn deny_beats_allow_across_exact_and_any_peer() {
    let (_root, mut dp) = setup("denywins", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    // While the any-peer entry only allows, the exact-peer allow decides alone (the any-peer
    // probe is skipped) and, winning the tie, is charged.
    let any = pkey(RULESET, identity::ANY, INGRESS, TCP, 80, 16);
    dp.apply(&[MapOp::PolicyUpsert(any, pval(action::ALLOW, 8))])
        .unwrap();
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    assert_eq!(rule_count(&dp, 7, verdict::FORWARDED).packets, 1);
    assert_eq!(rule_count(&dp, 8, verdict::FORWARDED).packets, 0);
    // The same any-peer entry rewritten to deny: the skip must stop.
    dp.apply(&[MapOp::PolicyUpsert(any, pval(action::DENY, 8))])
        .unwrap();
    let syn = packet(v4(PEER), v4(ME), tcp(SYN, 40001, 80));
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn), SHOT);
    assert_eq!(rule_count(&dp, 8, verdict::DROPPED).packets, 1);
    assert_eq!(verdicts(&dp, INGRESS, verdict::DROPPED, reason::POLICY), 1);
    // A deny only in the audit view is reported, and so also ends the skip.
    dp.apply(&[MapOp::PolicyUpsert(
        any,
        moat_common::PolicyValue {
            audit_action: action::DENY,
            ..pval(action::ALLOW, 8)
        },
    )])
    .unwrap();
    let syn = packet(v4(PEER), v4(ME), tcp(SYN, 40002, 80));
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn), OK);
    assert_eq!(verdicts(&dp, INGRESS, verdict::AUDIT, reason::POLICY), 1);
}

#[test]
fn wildcards_and_port_range_edges() {
    let (_root, mut dp) = setup("wild", &[INGRESS]);
    // Pod peer: TCP ports 8000-8015 (one 12-bit prefix) and any UDP port.
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 8000, 12, 3);
    allow_ingress(&mut dp, PEER_IDENTITY, UDP, 0, 0, 4);
    // CIDR peer: any protocol, any port.
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, CIDR_IDENTITY, INGRESS, 0, 0, 0),
        pval(action::ALLOW, 5),
    )])
    .unwrap();

    for (port, want) in [(7999, SHOT), (8000, OK), (8015, OK), (8016, SHOT)] {
        assert_eq!(
            run(&dp, Hook::ToEndpoint, &syn_in(PEER, port)),
            want,
            "TCP port {port}"
        );
    }
    assert_eq!(rule_count(&dp, 3, verdict::FORWARDED).packets, 2);
    let udp = |dport| packet(v4(PEER), v4(ME), L4::Udp { sport: 5353, dport });
    assert_eq!(run(&dp, Hook::ToEndpoint, &udp(1)), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &udp(65535)), OK);
    assert_eq!(rule_count(&dp, 4, verdict::FORWARDED).packets, 2);
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(OUTSIDE, 1)), OK);
    let sctp = packet(v4(OUTSIDE), v4(ME), L4::Sctp { sport: 1, dport: 2 });
    assert_eq!(run(&dp, Hook::ToEndpoint, &sctp), OK);
    assert_eq!(rule_count(&dp, 5, verdict::FORWARDED).packets, 2);
}

#[test]
fn unenforced_direction_is_tracked_for_replies() {
    // Isolated for ingress only: the endpoint's own egress flows must get their replies.
    let (_root, dp) = setup("track", &[INGRESS]);
    let out = packet(v4(ME), v4(OUTSIDE), tcp(SYN, 41000, 443));
    assert_eq!(run(&dp, Hook::FromEndpoint, &out), OK);
    assert_eq!(
        verdicts(&dp, EGRESS, verdict::FORWARDED, reason::NOT_ISOLATED),
        1
    );
    assert_eq!(dp.conntrack().unwrap().len(), 1);
    let reply = packet(v4(OUTSIDE), v4(ME), tcp(SYN | ACK, 443, 41000));
    assert_eq!(run(&dp, Hook::ToEndpoint, &reply), OK);
    assert_eq!(verdicts(&dp, INGRESS, verdict::FORWARDED, reason::REPLY), 1);
    // The same packet unsolicited (another port) is a new ingress flow: denied.
    let unsolicited = packet(v4(OUTSIDE), v4(ME), tcp(ACK, 443, 41001));
    assert_eq!(run(&dp, Hook::ToEndpoint, &unsolicited), SHOT);
    // Flushing conntrack forgets the flow: its next reply is judged as a new ingress flow.
    let mut dp = dp;
    dp.conntrack_flush().unwrap();
    assert!(dp.conntrack().unwrap().is_empty());
    assert_eq!(run(&dp, Hook::ToEndpoint, &reply), SHOT);
}

#[test]
fn ipv6_through_extension_headers() {
    let (_root, mut dp) = setup("v6", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    let me: std::net::Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
    let peer: std::net::Ipv6Addr = "fd00:10:244:1::3".parse().unwrap();
    let ext = [hop_by_hop(), dest_opts()];
    let allowed = packet_v6_ext(peer, me, &ext, tcp(SYN, 40000, 80));
    let denied = packet_v6_ext(peer, me, &ext, tcp(SYN, 40000, 81));
    assert_eq!(run(&dp, Hook::ToEndpoint, &allowed), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &denied), SHOT);
    assert_eq!(rule_count(&dp, 7, verdict::FORWARDED).packets, 1);
    // Truncated inside the extension chain: malformed, dropped.
    let truncated = &allowed[..14 + 40 + 4];
    assert_eq!(run(&dp, Hook::ToEndpoint, truncated), SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::MALFORMED),
        1
    );
}

#[test]
fn icmp_error_of_a_tracked_flow_passes() {
    let (_root, dp) = setup("icmperr", &[INGRESS, EGRESS]);
    // Egress isolated with nothing allowed: open an allowed flow by letting everything out.
    let mut dp = dp;
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, identity::ANY, EGRESS, UDP, 53, 16),
        pval(action::ALLOW, 11),
    )])
    .unwrap();
    let query = packet(
        v4(ME),
        v4(OUTSIDE),
        L4::Udp {
            sport: 5000,
            dport: 53,
        },
    );
    assert_eq!(run(&dp, Hook::FromEndpoint, &query), OK);
    let unreachable = icmp_error(v4("10.244.1.1"), v4(ME), 3, 3, &query);
    assert_eq!(run(&dp, Hook::ToEndpoint, &unreachable), OK);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::FORWARDED, reason::RELATED),
        1
    );
    // An error about a flow that never existed is dropped on the isolated endpoint.
    let other = packet(
        v4(ME),
        v4(OUTSIDE),
        L4::Udp {
            sport: 5001,
            dport: 53,
        },
    );
    let bogus = icmp_error(v4(OUTSIDE), v4(ME), 3, 3, &other);
    assert_eq!(run(&dp, Hook::ToEndpoint, &bogus), SHOT);
    assert_eq!(verdicts(&dp, INGRESS, verdict::DROPPED, reason::RELATED), 1);
}

#[test]
fn revision_recheck_revokes_open_flows() {
    let (_root, mut dp) = setup("revoke", &[INGRESS]);
    let (data_in, data_out) = open_flow(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), OK);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::FORWARDED, reason::ESTABLISHED),
        1
    );

    // Revoke, but do not bump yet: the open flow keeps its admission.
    dp.apply(&[MapOp::PolicyRemove(pkey(
        RULESET,
        PEER_IDENTITY,
        INGRESS,
        TCP,
        80,
        16,
    ))])
    .unwrap();
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), OK);
    // After the batch's revision bump the next forward packet is looked up again.
    bump(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), SHOT);
    assert_eq!(verdicts(&dp, INGRESS, verdict::DROPPED, reason::REVOKED), 1);
    assert_eq!(rule_count(&dp, 900, verdict::DROPPED).packets, 1);
    // Replies follow the forward verdict, and so do later forward packets.
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), SHOT);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), SHOT);
    // Allowed again: the flow resumes on its next forward packet.
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    bump(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), OK);
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), OK);
}

#[test]
fn a_syn_reusing_a_tracked_flows_ports_opens_a_new_flow() {
    let (_root, mut dp) = setup("reuse", &[INGRESS]);
    let (data_in, data_out) = open_flow(&mut dp);
    // Revoked: the entry is marked denied, both ways.
    dp.apply(&[MapOp::PolicyRemove(pkey(
        RULESET,
        PEER_IDENTITY,
        INGRESS,
        TCP,
        80,
        16,
    ))])
    .unwrap();
    bump(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), SHOT);
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), SHOT);
    // A SYN on the same ports under a policy that denies it leaves the entry as it was ...
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), SHOT);
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), SHOT);
    // ... and one that is allowed again takes it over whole: rule, revision, no denial.
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 8);
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), OK);
    assert_eq!(rule_count(&dp, 8, verdict::FORWARDED).packets, 3);
    assert_eq!(dp.conntrack().unwrap().len(), 1);
}

#[test]
fn both_ends_decide() {
    // Endpoint A (id 10) may send to B; endpoint B (id 20, same test interface) refuses A.
    let (_root, mut dp) = setup("bothends", &[INGRESS, EGRESS]);
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, PEER_IDENTITY, EGRESS, TCP, 80, 16),
        pval(action::ALLOW, 12),
    )])
    .unwrap();
    let a_to_b = packet(v4(ME), v4(PEER), tcp(SYN, 40000, 80));
    assert_eq!(run(&dp, Hook::FromEndpoint, &a_to_b), OK);
    // Now the interface is B's, with its own (empty) rule set.
    dp.apply(&[MapOp::EndpointSet(
        IFINDEX,
        endpoint(20, PEER_IDENTITY, 6, &[INGRESS]),
    )])
    .unwrap();
    assert_eq!(run(&dp, Hook::ToEndpoint, &a_to_b), SHOT);
    assert_eq!(rule_count(&dp, 900, verdict::DROPPED).packets, 1);
}

#[test]
fn malformed_and_truncated_packets() {
    // (A frame cut inside the IPv4 header cannot be test-run: the kernel refuses it with
    // EINVAL before the program sees it.)
    let (_root, dp) = setup("malformed", &[INGRESS]);
    let good = syn_in(PEER, 80);
    for (what, pkt) in [
        ("truncated TCP header", good[..14 + 20 + 10].to_vec()),
        ("bad IHL", {
            let mut p = good.clone();
            p[14] = 0x43;
            p
        }),
        ("bad TCP data offset", {
            let mut p = good.clone();
            p[14 + 20 + 12] = 0x20;
            p
        }),
    ] {
        assert_eq!(run(&dp, Hook::ToEndpoint, &pkt), SHOT, "{what}");
    }
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::MALFORMED),
        3
    );
    // Egress is not isolated: the same garbage passes there.
    assert_eq!(run(&dp, Hook::FromEndpoint, &good[..14 + 20 + 10]), OK);
}

#[test]
fn sctp_and_icmp_match_by_protocol() {
    let (_root, mut dp) = setup("protos", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, SCTP, 9000, 16, 21);
    allow_ingress(&mut dp, PEER_IDENTITY, ICMP, 0, 0, 22);
    let sctp = |dport| packet(v4(PEER), v4(ME), L4::Sctp { sport: 1000, dport });
    assert_eq!(run(&dp, Hook::ToEndpoint, &sctp(9000)), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &sctp(9001)), SHOT);
    // TCP on the SCTP port is another protocol.
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 9000)), SHOT);
    let ping = packet(
        v4(PEER),
        v4(ME),
        L4::Echo {
            id: 7,
            reply: false,
        },
    );
    assert_eq!(run(&dp, Hook::ToEndpoint, &ping), OK);
    assert_eq!(rule_count(&dp, 21, verdict::FORWARDED).packets, 1);
    assert_eq!(rule_count(&dp, 22, verdict::FORWARDED).packets, 1);
    // The echo reply going out is the reply of that tracked flow.
    let pong = packet(v4(ME), v4(PEER), L4::Echo { id: 7, reply: true });
    assert_eq!(run(&dp, Hook::FromEndpoint, &pong), OK);
    assert_eq!(verdicts(&dp, EGRESS, verdict::FORWARDED, reason::REPLY), 1);
    // ICMPv6 is its own protocol: not allowed by the ICMP rule.
    let me6 = "fd00:10:244:1::2".parse().unwrap();
    let peer6 = "fd00:10:244:1::3".parse().unwrap();
    let ping6 = packet(
        peer6,
        me6,
        L4::Echo {
            id: 7,
            reply: false,
        },
    );
    assert_eq!(run(&dp, Hook::ToEndpoint, &ping6), SHOT);
}

#[test]
fn neighbour_discovery_and_arp_pass() {
    let (_root, dp) = setup("ndp", &[INGRESS, EGRESS]);
    let me6 = "fd00:10:244:1::2".parse().unwrap();
    let peer6 = "fe80::1".parse().unwrap();
    for ty in (130..=137).chain([143]) {
        let ns = packet(peer6, me6, L4::Icmp { ty, code: 0 });
        assert_eq!(run(&dp, Hook::ToEndpoint, &ns), OK, "ICMPv6 type {ty}");
    }
    let mut arp = vec![0xff; 6];
    arp.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend([0; 20]);
    assert_eq!(run(&dp, Hook::ToEndpoint, &arp), OK);
    assert_eq!(run(&dp, Hook::FromEndpoint, &arp), OK);
    // Nothing was counted as a policy decision.
    assert!(dp.verdict_counters().unwrap().is_empty());
}

#[test]
fn fragments_follow_their_first_fragment() {
    let (_root, mut dp) = setup("frag", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, UDP, 53, 16, 31);
    let (src, dst) = ("10.244.1.3".parse().unwrap(), "10.244.1.2".parse().unwrap());
    let udp = l4_bytes(
        L4::Udp {
            sport: 999,
            dport: 53,
        },
        false,
    );
    let first = ipv4_fragment(src, dst, UDP, 77, 0, true, &udp);
    let later = ipv4_fragment(src, dst, UDP, 77, 3, false, &[0; 24]);
    let stray = ipv4_fragment(src, dst, UDP, 78, 3, false, &[0; 24]);
    assert_eq!(run(&dp, Hook::ToEndpoint, &first), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &later), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &stray), SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::FRAGMENT),
        1
    );
    // A denied datagram's later fragments are denied too (their first fragment's ports).
    let udp = l4_bytes(
        L4::Udp {
            sport: 999,
            dport: 54,
        },
        false,
    );
    let first = ipv4_fragment(src, dst, UDP, 79, 0, true, &udp);
    let later = ipv4_fragment(src, dst, UDP, 79, 3, false, &[0; 24]);
    assert_eq!(run(&dp, Hook::ToEndpoint, &first), SHOT);
    assert_eq!(run(&dp, Hook::ToEndpoint, &later), SHOT);
}

#[test]
fn host_and_self_are_always_allowed_unless_host_is_denied() {
    let (_root, mut dp) = setup("host", &[INGRESS]);
    // An any-peer deny on port 80 does not stop the node (kubelet probes).
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, identity::ANY, INGRESS, TCP, 80, 16),
        pval(action::DENY, 41),
    )])
    .unwrap();
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in("10.244.1.1", 80)), OK);
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in("10.244.1.1", 9)), OK);
    assert_eq!(verdicts(&dp, INGRESS, verdict::FORWARDED, reason::HOST), 2);
    // The pod itself (hairpin through the host).
    let me_to_me = packet(v4(ME), v4(ME), tcp(SYN, 40000, 9));
    assert_eq!(run(&dp, Hook::ToEndpoint, &me_to_me), OK);
    assert_eq!(verdicts(&dp, INGRESS, verdict::FORWARDED, reason::SELF), 1);
    // A rule naming the host itself does deny it.
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, identity::HOST, INGRESS, TCP, 22, 16),
        pval(action::DENY, 42),
    )])
    .unwrap();
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in("10.244.1.1", 22)), SHOT);
    assert_eq!(rule_count(&dp, 42, verdict::DROPPED).packets, 1);
}

#[test]
fn audit_reports_without_changing_the_verdict() {
    // Not isolated by Enforce policies; an Audit policy would isolate and allow only port 80.
    let (_root, mut dp) = setup("audit", &[]);
    let mut ep = endpoint(EP_ID, EP_IDENTITY, RULESET, &[]);
    ep.flags = moat_common::ep_flag(moat_common::ep_flags::POLICY, INGRESS)
        | moat_common::ep_flag(moat_common::ep_flags::AUDIT_ISOLATED, INGRESS);
    ep.audit_isolating_rule = [950, 951];
    dp.apply(&[
        MapOp::EndpointSet(IFINDEX, ep),
        MapOp::PolicyUpsert(
            pkey(RULESET, PEER_IDENTITY, INGRESS, TCP, 80, 16),
            moat_common::PolicyValue {
                action: action::NONE,
                audit_action: action::ALLOW,
                proxy_port: 0,
                rule_id: 0,
                audit_rule_id: 51,
            },
        ),
    ])
    .unwrap();
    // Port 80: both views allow; no audit.
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    // Port 81: Enforce allows (not isolated), Audit would deny: forwarded, reported AUDIT.
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 81)), OK);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::AUDIT, reason::NOT_ISOLATED),
        1
    );
    assert_eq!(rule_count(&dp, 950, verdict::AUDIT).packets, 1);
    let evs = dp.take_events().unwrap().drain();
    let audit: Vec<_> = evs.iter().filter(|e| e.kind == event_kind::AUDIT).collect();
    assert_eq!(audit.len(), 1, "{evs:?}");
    assert_eq!(
        (audit[0].verdict, audit[0].audit_rule_id, audit[0].dport),
        (verdict::AUDIT, 950, 81)
    );
}

#[test]
fn redirect_without_a_proxy_fails_closed() {
    let (_root, mut dp) = setup("redirect", &[EGRESS]);
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(RULESET, PEER_IDENTITY, EGRESS, TCP, 80, 16),
        moat_common::PolicyValue {
            action: action::REDIRECT,
            audit_action: action::REDIRECT,
            proxy_port: 15999,
            rule_id: 61,
            audit_rule_id: 61,
        },
    )])
    .unwrap();
    let out = packet(v4(ME), v4(PEER), tcp(SYN, 40000, 80));
    assert_eq!(run(&dp, Hook::FromEndpoint, &out), SHOT);
    assert_eq!(verdicts(&dp, EGRESS, verdict::DROPPED, reason::NO_PROXY), 1);
    assert!(dp.conntrack().unwrap().is_empty());
}

#[test]
fn proxy_marked_traffic_was_decided_by_the_proxy() {
    let (_root, dp) = setup("proxymark", &[INGRESS]);
    let from_world = syn_in(OUTSIDE, 80);
    let r = dp
        .test_run(
            Hook::ToEndpoint,
            &from_world,
            IFINDEX,
            mark::PROXY_UPSTREAM,
            1,
        )
        .unwrap();
    assert_eq!(r.action, OK);
    assert_eq!(verdicts(&dp, INGRESS, verdict::FORWARDED, reason::PROXY), 1);
    // Without the mark the same packet is default-denied.
    assert_eq!(run(&dp, Hook::ToEndpoint, &from_world), SHOT);
}

#[test]
fn prefilter_drops_listed_sources_replies_included() {
    let (_root, mut dp) = setup("prefilter", &[]);
    dp.apply(&[
        MapOp::PrefilterUpsert(net("198.51.100.0/24"), 71),
        MapOp::PrefilterUpsert(net("2001:db8:bad::/48"), 72),
    ])
    .unwrap();
    let xdp = |pkt: &[u8]| dp.test_run(Hook::Prefilter, pkt, 0, 0, 1).unwrap().action;
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    let listed_syn = packet(v4("198.51.100.9"), v4(ME), tcp(SYN, 1, 80));
    let listed_reply = packet(v4("198.51.100.9"), v4(ME), tcp(SYN | ACK, 443, 40000));
    let other = packet(v4("198.51.101.9"), v4(ME), tcp(SYN, 1, 80));
    let listed6 = packet(
        "2001:db8:bad::1".parse().unwrap(),
        "fd00:10:244:1::2".parse().unwrap(),
        L4::Udp { sport: 1, dport: 2 },
    );
    assert_eq!(xdp(&listed_syn), XDP_DROP);
    assert_eq!(xdp(&listed_reply), XDP_DROP);
    assert_eq!(xdp(&other), XDP_PASS);
    assert_eq!(xdp(&listed6), XDP_DROP);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::PREFILTER),
        3
    );
    assert_eq!(rule_count(&dp, 71, verdict::DROPPED).packets, 2);
    assert_eq!(rule_count(&dp, 72, verdict::DROPPED).packets, 1);
}

#[test]
fn unknown_interface_fails_closed() {
    let root = PinRoot::new("noep");
    let dp = root.open();
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), SHOT);
    // Packets that belong to no flow too (the hook parses before it reads the endpoint).
    let mut arp = vec![0xff; 6];
    arp.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend([0; 20]);
    assert_eq!(run(&dp, Hook::ToEndpoint, &arp), SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::NO_ENDPOINT),
        2
    );
}

#[test]
fn an_interface_that_loses_its_endpoint_ends_its_flows() {
    // Tracked flows are found by interface, without reading the endpoint entry. Once the
    // endpoint is gone and the batch's revision is bumped, the next forward packet fails
    // closed, and replies follow it.
    let (_root, mut dp) = setup("lostep", &[INGRESS]);
    let (data_in, data_out) = open_flow(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), OK);
    dp.apply(&[MapOp::EndpointRemove(IFINDEX)]).unwrap();
    bump(&mut dp);
    assert_eq!(run(&dp, Hook::ToEndpoint, &data_in), SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::NO_ENDPOINT),
        1
    );
    assert_eq!(run(&dp, Hook::FromEndpoint, &data_out), SHOT);
    assert_eq!(verdicts(&dp, EGRESS, verdict::DROPPED, reason::REVOKED), 1);
}

#[test]
fn events_are_rate_limited_and_counters_stay_exact() {
    let (_root, mut dp) = setup("ratelimit", &[INGRESS]);
    let mut cfg = dp.config().unwrap();
    cfg.event_rate = 1;
    cfg.event_burst = 5;
    dp.set_config(cfg).unwrap();
    let r = dp
        .test_run(Hook::ToEndpoint, &syn_in(PEER, 81), IFINDEX, 0, 1000)
        .unwrap();
    assert_eq!(r.action, SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::DEFAULT_DENY),
        1000
    );
    let stats = dp.event_stats().unwrap();
    assert_eq!(stats.emitted, 5);
    assert_eq!(stats.suppressed, 995);
    assert_eq!(stats.lost, 0);
    assert_eq!(dp.take_events().unwrap().drain().len(), 5);
}

/// Events go into the ring without waking its reader until `EVENTS_WAKEUP_BYTES` are unread
/// (a wake-up per event cost an interrupt and a reader context switch each): an edge-triggered
/// epoll on the ring sees nothing for a lone event and one wake-up for a burst past the mark.
#[test]
fn events_wake_the_reader_only_once_a_batch_has_gathered() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let (_root, mut dp) = setup("wakeup", &[INGRESS]);
    let mut events = dp.take_events().unwrap();
    let epoll = Epoll::new(EpollCreateFlags::empty()).unwrap();
    epoll
        .add(
            &events,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0),
        )
        .unwrap();
    let wait = |ms: u16| {
        let mut ready = [EpollEvent::empty()];
        epoll.wait(&mut ready, EpollTimeout::from(ms)).unwrap()
    };
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(OUTSIDE, 80)), SHOT);
    assert_eq!(wait(300), 0, "a lone event woke the reader");

    // Records are the event and an 8-byte header.
    let burst = (capacity::EVENTS_WAKEUP_BYTES as usize / (size_of::<Event>() + 8)) as u32 + 1;
    let r = dp
        .test_run(Hook::ToEndpoint, &syn_in(OUTSIDE, 80), IFINDEX, 0, burst)
        .unwrap();
    assert_eq!(r.action, SHOT);
    assert_eq!(
        wait(10_000),
        1,
        "a burst past the mark did not wake the reader"
    );
    let stats = dp.event_stats().unwrap();
    assert_eq!((stats.emitted, stats.lost), (burst as u64 + 1, 0));
    assert_eq!(events.drain().len(), burst as usize + 1);
}

/// The async reader gets a lone event, which never wakes it: it looks on its own every
/// `EVENT_FLUSH`.
#[tokio::test]
async fn the_async_reader_gets_a_lone_event_without_a_wake_up() {
    let (_root, mut dp) = setup("lone", &[INGRESS]);
    let mut events = dp.take_events().unwrap().into_async().unwrap();
    let reader = tokio::spawn(async move { events.next().await });
    // The reader finds the ring empty and waits before the event is made.
    tokio::time::sleep(EVENT_FLUSH / 5).await;
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(OUTSIDE, 80)), SHOT);
    let ev = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the lone event was never read")
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind, ev.reason),
        (event_kind::DROP, reason::DEFAULT_DENY)
    );
}

#[test]
fn a_new_process_adopts_pinned_state() {
    let (root, mut dp) = setup("adopt", &[INGRESS]);
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    bump(&mut dp);
    let ids = dp.program_ids().unwrap();
    let policy = dp.policy().unwrap();
    let ipcache = dp.ipcache().unwrap();
    drop(dp);
    let dp = root.open();
    assert_eq!(dp.program_ids().unwrap(), ids);
    assert_eq!(dp.policy().unwrap(), policy);
    assert_eq!(dp.ipcache().unwrap(), ipcache);
    assert_eq!(dp.revision().unwrap(), 1);
    assert_eq!(run(&dp, Hook::ToEndpoint, &syn_in(PEER, 80)), OK);
    // An explicit reset removes everything.
    drop(dp);
    Datapath::reset(&root.0).unwrap();
    assert!(!std::path::Path::new(&root.0).exists());
}

/// Destination B (endpoint 20, rule set 6) redirects TCP 80 from A's identity to the proxy.
fn with_redirecting_destination(dp: &mut Datapath) {
    dp.apply(&[
        // B lives on another interface (never run here): only its id matters for steering.
        MapOp::EndpointSet(9999, endpoint(20, PEER_IDENTITY, 6, &[INGRESS])),
        MapOp::IpcacheUpsert(net("10.244.1.3/32"), ipc(PEER_IDENTITY, 20)),
        MapOp::PolicyUpsert(
            pkey(6, EP_IDENTITY, INGRESS, TCP, 80, 16),
            moat_common::PolicyValue {
                action: action::REDIRECT,
                audit_action: action::REDIRECT,
                proxy_port: 15999,
                rule_id: 62,
                audit_rule_id: 62,
            },
        ),
    ])
    .unwrap();
}

#[test]
fn local_destination_redirect_is_steered_by_the_source_and_fails_closed() {
    let (_root, mut dp) = setup("dstredirect", &[]);
    with_redirecting_destination(&mut dp);
    // A's own egress allows everything; B's ingress wants the proxy, which is not there.
    let to_b = packet(v4(ME), v4(PEER), tcp(SYN, 40000, 80));
    assert_eq!(run(&dp, Hook::FromEndpoint, &to_b), SHOT);
    assert_eq!(verdicts(&dp, EGRESS, verdict::DROPPED, reason::NO_PROXY), 1);
    // Another port is not redirected.
    let other = packet(v4(ME), v4(PEER), tcp(SYN, 40000, 81));
    assert_eq!(run(&dp, Hook::FromEndpoint, &other), OK);
    // Once the redirect entry is gone, so is the L7 hint, and the flow goes direct.
    dp.apply(&[MapOp::PolicyRemove(pkey(
        6,
        EP_IDENTITY,
        INGRESS,
        TCP,
        80,
        16,
    ))])
    .unwrap();
    assert_eq!(
        dp.endpoints().unwrap()[&9999].flags & moat_common::ep_flags::HINTS,
        0
    );
    assert_eq!(run(&dp, Hook::FromEndpoint, &to_b), OK);
}

#[test]
fn uplink_steers_redirected_flows_and_passes_the_rest() {
    let (_root, mut dp) = setup("uplink", &[]);
    with_redirecting_destination(&mut dp);
    // From another node's pod with A's identity to B:80: must reach the proxy; none is
    // listening, so it is dropped (fail closed) and counted.
    dp.apply(&[MapOp::IpcacheUpsert(
        net("10.244.2.5/32"),
        ipc(EP_IDENTITY, 0),
    )])
    .unwrap();
    let remote = packet(v4("10.244.2.5"), v4(PEER), tcp(SYN, 40000, 80));
    assert_eq!(run(&dp, Hook::FromUplink, &remote), SHOT);
    assert_eq!(
        verdicts(&dp, INGRESS, verdict::DROPPED, reason::NO_PROXY),
        1
    );
    // Other ports, other peers, other destinations: untouched (no verdict of its own).
    let other_port = packet(v4("10.244.2.5"), v4(PEER), tcp(SYN, 40000, 81));
    let other_peer = packet(v4(OUTSIDE), v4(PEER), tcp(SYN, 40000, 80));
    let other_dst = packet(v4("10.244.2.5"), v4(ME), tcp(SYN, 40000, 80));
    for p in [&other_port, &other_peer, &other_dst] {
        assert_eq!(run(&dp, Hook::FromUplink, p), OK);
    }
    assert_eq!(dp.verdict_counters().unwrap().len(), 1);
}

#[test]
fn source_redirect_does_not_bypass_the_destinations_ingress_policy() {
    // A's egress sends TCP 80 to the proxy; local destination B is isolated for ingress and
    // does not allow A. The proxy's marked upstream would be trusted by B's to-endpoint, so
    // B's decision is made at A's hook: dropped before the proxy, charged to B's isolation.
    let (_root, mut dp) = setup("nobypass", &[EGRESS]);
    dp.apply(&[
        MapOp::EndpointSet(9999, endpoint(20, PEER_IDENTITY, 6, &[INGRESS])),
        MapOp::IpcacheUpsert(net("10.244.1.3/32"), ipc(PEER_IDENTITY, 20)),
        MapOp::PolicyUpsert(
            pkey(RULESET, PEER_IDENTITY, EGRESS, TCP, 80, 16),
            moat_common::PolicyValue {
                action: action::REDIRECT,
                audit_action: action::REDIRECT,
                proxy_port: 15999,
                rule_id: 63,
                audit_rule_id: 63,
            },
        ),
    ])
    .unwrap();
    let to_b = packet(v4(ME), v4(PEER), tcp(SYN, 40000, 80));
    assert_eq!(run(&dp, Hook::FromEndpoint, &to_b), SHOT);
    assert_eq!(
        verdicts(&dp, EGRESS, verdict::DROPPED, reason::DEFAULT_DENY),
        1
    );
    assert_eq!(rule_count(&dp, 900, verdict::DROPPED).packets, 1);
    // Once B allows A, the flow goes to the proxy (which is not there: fail closed).
    allow_ingress(&mut dp, PEER_IDENTITY, TCP, 80, 16, 7);
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(6, EP_IDENTITY, INGRESS, TCP, 80, 16),
        pval(action::ALLOW, 64),
    )])
    .unwrap();
    assert_eq!(run(&dp, Hook::FromEndpoint, &to_b), SHOT);
    assert_eq!(verdicts(&dp, EGRESS, verdict::DROPPED, reason::NO_PROXY), 1);
}
