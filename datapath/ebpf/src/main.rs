//! moat's kernel side. Each policy decision is made, and counted, in exactly one hook:
//! - `from_endpoint` (TC ingress on an endpoint's host-side veth): the endpoint's egress policy,
//!   and L7 steering of its redirected flows;
//! - `to_endpoint` (TC egress on that veth): the endpoint's ingress policy;
//! - `from_uplink` (TC ingress on uplinks): L7 steering of flows from other nodes to local
//!   endpoints whose ingress policy redirects (no L3/L4 verdict of its own);
//! - `prefilter` (XDP on uplinks): the stateless source blocklist;
//! - `floor` (never attached): an empty program, the baseline of `make bench-datapath`.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod policy;
mod report;
mod steer;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use moat_common::{
    Config, CtKey, CtValue, EndpointInfo, IpcacheValue, action, config_flags, ct_flags, direction,
    ep_flag, ep_flags, event_kind, mark, reason, verdict,
};

use crate::{
    maps::{CONNTRACK, ENDPOINTS, ENDPOINTS_BY_ID, PREFILTER4, PREFILTER6, REVISION},
    parse::{IPPROTO_TCP, Packet, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    policy::{Decision, decide, peer_of},
    report::{EventInfo, config, count, count_rule, emit, now_ns},
};

const NS: u64 = 1_000_000_000;

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    endpoint_hook(&ctx, direction::EGRESS)
}

#[classifier]
pub fn to_endpoint(ctx: TcContext) -> i32 {
    endpoint_hook(&ctx, direction::INGRESS)
}

/// What the hook knows while deciding, for counters and events. The endpoint's id and
/// identity are filled in by [`Ctx::endpoint`], which tracked flows never need.
struct Ctx<'a> {
    cfg: Config,
    tc: &'a TcContext,
    dir: u8,
    ifindex: u32,
    len: u32,
    endpoint_id: u32,
    identity: u32,
}

impl Ctx<'_> {
    /// The endpoint behind this interface, remembered for events.
    #[inline(always)]
    fn endpoint(&mut self) -> Option<EndpointInfo> {
        // SAFETY: plain data, copied out at once.
        let ep = (unsafe { ENDPOINTS.get(self.ifindex) }).copied()?;
        self.endpoint_id = ep.endpoint_id;
        self.identity = ep.identity;
        Some(ep)
    }

    /// Count a verdict, emit an event of `kind` when asked, and return the TC action.
    #[inline(always)]
    fn finish(
        &self,
        pkt: &Packet,
        peer_identity: u32,
        verdict: u8,
        reason: u8,
        rule_id: u32,
        event: Option<u8>,
    ) -> i32 {
        count(&self.cfg, self.dir, verdict, reason, rule_id, self.len);
        if let Some(kind) = event {
            self.event(pkt, peer_identity, kind, verdict, reason, rule_id, 0);
        }
        if verdict == verdict::DROPPED {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        pkt: &Packet,
        peer_identity: u32,
        kind: u8,
        verdict: u8,
        reason: u8,
        rule_id: u32,
        audit_rule_id: u32,
    ) {
        let (src_identity, dst_identity) = if self.dir == direction::INGRESS {
            (peer_identity, self.identity)
        } else {
            (self.identity, peer_identity)
        };
        emit(
            &self.cfg,
            pkt,
            &EventInfo {
                kind,
                direction: self.dir,
                verdict,
                reason,
                src_identity,
                dst_identity,
                rule_id,
                audit_rule_id,
                endpoint_id: self.endpoint_id,
                ifindex: self.ifindex,
                packet_len: self.len,
            },
        );
    }
}

#[inline(always)]
fn endpoint_hook(tc: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ifindex, skb_mark) = unsafe { ((*tc.skb.skb).ifindex, (*tc.skb.skb).mark) };
    let mut c = Ctx {
        cfg: config(),
        tc,
        dir,
        ifindex,
        len: tc.len(),
        endpoint_id: 0,
        identity: 0,
    };
    let pkt = match parse::parse(tc) {
        Parsed::Packet(p) => p,
        other => return not_a_flow(&mut c, other),
    };

    // The conntrack key is the endpoint's view: its interface, local and remote. An ICMP
    // error carries the packet it is about, which travelled the other way.
    let key_dir = if pkt.icmp_error { dir ^ 1 } else { dir };
    let (local, remote, local_port, remote_port) = if key_dir == direction::INGRESS {
        (pkt.daddr, pkt.saddr, pkt.dport, pkt.sport)
    } else {
        (pkt.saddr, pkt.daddr, pkt.sport, pkt.dport)
    };
    let key = CtKey {
        ifindex,
        local_port,
        remote_port,
        protocol: pkt.protocol,
        family: pkt.family,
        _pad: [0; 2],
        local,
        remote,
    };
    let now = now_ns();
    let revision = REVISION.get(0).copied().unwrap_or(0);
    let tcp = pkt.protocol == IPPROTO_TCP;
    // A SYN always opens a new flow under the current policy (also on port reuse).
    let syn = tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let proxied = dir == direction::INGRESS && skb_mark & mark::MASK == mark::PROXY_UPSTREAM;

    // Most packets belong to a tracked flow, and one admitted under the current revision
    // needs nothing but its conntrack entry: the endpoint entry is read only when a flow is
    // decided (or a drop reported), which keeps a hash lookup off the common path. A SYN
    // looks its entry up only once policy has allowed it (see below).
    // SAFETY (every dereference of `tracked`): an LRU value pointer, valid for this run;
    // writes race only with other CPUs handling the same flow.
    let tracked = if syn {
        None
    } else {
        CONNTRACK.get_ptr_mut(key)
    };
    if !pkt.icmp_error
        && let Some(e) = tracked
    {
        let e = unsafe { &mut *e };
        if e.expires_ns > now {
            return established(&mut c, &pkt, e, revision, now, proxied);
        }
    }

    let Some(ep) = c.endpoint() else {
        return no_endpoint(&c);
    };
    let enforced = ep.flags & ep_flag(ep_flags::POLICY, dir) != 0;
    if pkt.icmp_error {
        return match tracked.map(|e| unsafe { *e }) {
            Some(e) if e.expires_ns > now && e.flags & ct_flags::DENIED == 0 => {
                c.finish(&pkt, 0, verdict::FORWARDED, reason::RELATED, 0, None)
            }
            _ if enforced => c.finish(
                &pkt,
                0,
                verdict::DROPPED,
                reason::RELATED,
                0,
                Some(event_kind::DROP),
            ),
            _ => c.finish(&pkt, 0, verdict::FORWARDED, reason::NOT_ISOLATED, 0, None),
        };
    }

    // A new flow.
    let peer = peer_of(pkt.family, &remote);
    let d = if proxied {
        Decision::proxied()
    } else {
        decide_with_destination(&ep, dir, &peer, &pkt)
    };
    if d.audit_differs() {
        report_audit(&c, &pkt, peer.identity, &d);
    }
    let rule_verdict = if d.audit_differs() {
        verdict::AUDIT
    } else if d.action == action::DENY {
        verdict::DROPPED
    } else if d.action == action::REDIRECT {
        verdict::REDIRECTED
    } else {
        verdict::FORWARDED
    };
    if d.action == action::DENY {
        if rule_verdict == verdict::AUDIT {
            count_rule_if(&c, d.rule_id, verdict::DROPPED);
            return TC_ACT_SHOT;
        }
        return c.finish(
            &pkt,
            peer.identity,
            verdict::DROPPED,
            d.reason,
            d.rule_id,
            Some(event_kind::DROP),
        );
    }
    if d.action == action::REDIRECT && !redirect(&c, &pkt, d.proxy_port) {
        return c.finish(
            &pkt,
            peer.identity,
            verdict::DROPPED,
            reason::NO_PROXY,
            d.rule_id,
            Some(event_kind::DROP),
        );
    }
    let timeout = if tcp {
        c.cfg.ct_tcp_syn_timeout_s
    } else {
        c.cfg.ct_other_timeout_s
    };
    let entry = CtValue {
        expires_ns: now + timeout as u64 * NS,
        rule_id: d.rule_id,
        revision,
        proxy_port: d.proxy_port,
        initiator: dir,
        flags: if d.action == action::REDIRECT {
            ct_flags::REDIRECT
        } else {
            0
        },
        _pad: 0,
    };
    // A flow reusing the ports of one still in the table (closed, or expired but not yet
    // evicted: the usual case for short connections between the same pods) takes its entry
    // over in place, sparing the LRU map an allocation, a free and, once the map is full,
    // an eviction.
    let tracked = if syn {
        CONNTRACK.get_ptr_mut(key)
    } else {
        tracked
    };
    match tracked {
        Some(e) => unsafe { *e = entry },
        None => {
            let _ = CONNTRACK.insert(key, entry, 0);
        }
    }
    if rule_verdict == verdict::AUDIT {
        count_rule_if(&c, d.rule_id, verdict::FORWARDED);
        return TC_ACT_OK;
    }
    c.finish(
        &pkt,
        peer.identity,
        rule_verdict,
        d.reason,
        d.rule_id,
        Some(event_kind::NEW_FLOW),
    )
}

/// The endpoint's own decision, completed for egress flows to a local destination that will
/// go through the L7 proxy:
/// - the destination's ingress policy redirects: `bpf_sk_assign` only works at TC ingress,
///   so the source's hook steers on the destination's behalf;
/// - the source's own egress policy redirects: the proxy's upstream connection carries the
///   mark the destination's `to_endpoint` trusts, so the destination's L3/L4 ingress
///   decision is made here instead, and a denial drops the flow before the proxy sees it.
///
/// Otherwise the destination's `to_endpoint` makes (and counts) its own decision as usual.
#[inline(always)]
fn decide_with_destination(
    ep: &EndpointInfo,
    dir: u8,
    peer: &IpcacheValue,
    pkt: &Packet,
) -> Decision {
    let mut d = decide(ep, dir, peer, pkt);
    if dir != direction::EGRESS
        || d.action == action::DENY
        || peer.endpoint_id == 0
        || peer.endpoint_id == ep.endpoint_id
        || pkt.protocol != IPPROTO_TCP
    {
        return d;
    }
    // SAFETY: plain data, copied out at once.
    let Some(dst_ep) = (unsafe { ENDPOINTS_BY_ID.get(peer.endpoint_id) }).copied() else {
        return d;
    };
    let dst_l7 = dst_ep.flags & ep_flag(ep_flags::L7, direction::INGRESS) != 0;
    if d.action != action::REDIRECT && !dst_l7 {
        return d;
    }
    let src = IpcacheValue {
        identity: ep.identity,
        endpoint_id: ep.endpoint_id,
        flags: 0,
    };
    let theirs = decide(&dst_ep, direction::INGRESS, &src, pkt);
    if theirs.action == action::DENY && d.action == action::REDIRECT {
        return theirs;
    }
    if theirs.action == action::REDIRECT && d.action == action::ALLOW {
        d.action = action::REDIRECT;
        d.proxy_port = theirs.proxy_port;
    }
    d
}

/// The proxy port when local destination `dst_ep`'s ingress policy redirects this TCP flow
/// from a source of identity `src_identity`.
#[inline(always)]
fn ingress_redirect(dst_ep: &EndpointInfo, src_identity: u32, pkt: &Packet) -> Option<u16> {
    if dst_ep.flags & ep_flag(ep_flags::L7, direction::INGRESS) == 0 {
        return None;
    }
    let src = IpcacheValue {
        identity: src_identity,
        endpoint_id: 0,
        flags: 0,
    };
    let d = decide(dst_ep, direction::INGRESS, &src, pkt);
    (d.action == action::REDIRECT).then_some(d.proxy_port)
}

/// TC ingress on node uplinks, for TCP to local endpoints with HTTP rules; makes no L3/L4
/// verdict (the destination's `to_endpoint` does). On every packet (established sockets
/// first):
/// - replies to the proxy's upstream connections, which it makes from a local client's
///   address toward other nodes (the client's egress HTTP rules), go to those sockets;
/// - flows from other nodes that the destination's ingress policy redirects go to the proxy.
#[classifier]
pub fn from_uplink(ctx: TcContext) -> i32 {
    let Parsed::Packet(pkt) = parse::parse(&ctx) else {
        return TC_ACT_OK;
    };
    if pkt.icmp_error || pkt.protocol != IPPROTO_TCP {
        return TC_ACT_OK;
    }
    let dst = peer_of(pkt.family, &pkt.daddr);
    if dst.endpoint_id == 0 {
        return TC_ACT_OK;
    }
    // SAFETY: plain data, copied out at once.
    let Some(dst_ep) = (unsafe { ENDPOINTS_BY_ID.get(dst.endpoint_id) }).copied() else {
        return TC_ACT_OK;
    };
    if dst_ep.flags & ep_flag(ep_flags::L7, direction::EGRESS) != 0
        && steer::to_upstream(&ctx, &pkt)
    {
        return TC_ACT_OK;
    }
    let src = peer_of(pkt.family, &pkt.saddr);
    let Some(port) = ingress_redirect(&dst_ep, src.identity, &pkt) else {
        return TC_ACT_OK;
    };
    if steer::to_proxy(&ctx, &pkt, port).is_ok() {
        return TC_ACT_OK;
    }
    let cfg = config();
    count(
        &cfg,
        direction::INGRESS,
        verdict::DROPPED,
        reason::NO_PROXY,
        0,
        ctx.len(),
    );
    TC_ACT_SHOT
}

/// A program on an interface moat does not know: fail closed.
#[inline(always)]
fn no_endpoint(c: &Ctx) -> i32 {
    count(
        &c.cfg,
        c.dir,
        verdict::DROPPED,
        reason::NO_ENDPOINT,
        0,
        c.len,
    );
    TC_ACT_SHOT
}

/// A packet that is not part of a flow: non-IP and neighbour discovery pass, malformed
/// packets and fragments we cannot attribute are dropped where policy applies — on an
/// interface moat knows.
#[inline(always)]
fn not_a_flow(c: &mut Ctx, parsed: Parsed) -> i32 {
    let Some(ep) = c.endpoint() else {
        return no_endpoint(c);
    };
    let enforced = ep.flags & ep_flag(ep_flags::POLICY, c.dir) != 0;
    match parsed {
        Parsed::Malformed => unparsable(c, enforced, reason::MALFORMED),
        Parsed::UnknownFragment => unparsable(c, enforced, reason::FRAGMENT),
        Parsed::Pass | Parsed::Packet(_) => TC_ACT_OK,
    }
}

/// A malformed packet, or a fragment we cannot attribute: dropped where policy applies.
#[inline(always)]
fn unparsable(c: &Ctx, enforced: bool, why: u8) -> i32 {
    let (v, r) = if enforced {
        (verdict::DROPPED, why)
    } else {
        (verdict::FORWARDED, reason::NOT_ISOLATED)
    };
    count(&c.cfg, c.dir, v, r, 0, c.len);
    if enforced { TC_ACT_SHOT } else { TC_ACT_OK }
}

#[inline(always)]
fn count_rule_if(c: &Ctx, rule_id: u32, verdict: u8) {
    if rule_id != 0 && c.cfg.flags & config_flags::RULE_COUNTERS != 0 {
        count_rule(rule_id, verdict, c.len);
    }
}

/// Enforce and Enforce+Audit disagree: the packet takes the Enforce verdict and is counted and
/// reported as AUDIT with the audit rule.
#[inline(always)]
fn report_audit(c: &Ctx, pkt: &Packet, peer_identity: u32, d: &Decision) {
    count(
        &c.cfg,
        c.dir,
        verdict::AUDIT,
        d.reason,
        d.audit_rule_id,
        c.len,
    );
    c.event(
        pkt,
        peer_identity,
        event_kind::AUDIT,
        verdict::AUDIT,
        d.reason,
        d.rule_id,
        d.audit_rule_id,
    );
}

/// Steering happens where `bpf_sk_assign` works: TC ingress, i.e. `from_endpoint`. A flow
/// that must be redirected but reaches `to_endpoint` without the proxy's mark bypassed the
/// proxy and is dropped.
#[inline(always)]
fn redirect(c: &Ctx, pkt: &Packet, proxy_port: u16) -> bool {
    c.dir == direction::EGRESS
        && pkt.protocol == IPPROTO_TCP
        && steer::to_proxy(c.tc, pkt, proxy_port).is_ok()
}

/// A packet of a tracked flow.
#[inline(always)]
fn established(
    c: &mut Ctx,
    pkt: &Packet,
    e: &mut CtValue,
    revision: u32,
    now: u64,
    proxied: bool,
) -> i32 {
    let forward = e.initiator == c.dir;
    if forward && e.revision != revision {
        // Policy changed since the flow was admitted: look it up again (semantic rule 6).
        let Some(ep) = c.endpoint() else {
            // The interface lost its endpoint: its flows end, replies included.
            e.revision = revision;
            e.flags |= ct_flags::DENIED;
            return no_endpoint(c);
        };
        let remote = if c.dir == direction::INGRESS {
            &pkt.saddr
        } else {
            &pkt.daddr
        };
        let peer = peer_of(pkt.family, remote);
        let d = if proxied {
            Decision::proxied()
        } else {
            decide_with_destination(&ep, c.dir, &peer, pkt)
        };
        e.revision = revision;
        e.rule_id = d.rule_id;
        e.proxy_port = d.proxy_port;
        if d.action == action::DENY {
            e.flags |= ct_flags::DENIED;
        } else {
            e.flags &= !ct_flags::DENIED;
        }
        if d.action == action::REDIRECT {
            e.flags |= ct_flags::REDIRECT;
        } else {
            e.flags &= !ct_flags::REDIRECT;
        }
        if e.flags & ct_flags::DENIED != 0 {
            return c.finish(
                pkt,
                peer.identity,
                verdict::DROPPED,
                reason::REVOKED,
                d.rule_id,
                Some(event_kind::DROP),
            );
        }
    }
    if e.flags & ct_flags::DENIED != 0 {
        // Replies follow the forward verdict.
        return c.finish(pkt, 0, verdict::DROPPED, reason::REVOKED, e.rule_id, None);
    }
    if forward && e.flags & ct_flags::REDIRECT != 0 && !redirect(c, pkt, e.proxy_port) {
        // For the event's identities.
        let _ = c.endpoint();
        return c.finish(
            pkt,
            0,
            verdict::DROPPED,
            reason::NO_PROXY,
            e.rule_id,
            Some(event_kind::DROP),
        );
    }
    refresh(&c.cfg, pkt, e, forward, now);
    let (v, r) = if !forward {
        (verdict::FORWARDED, reason::REPLY)
    } else if e.flags & ct_flags::REDIRECT != 0 {
        (verdict::REDIRECTED, reason::ESTABLISHED)
    } else {
        (verdict::FORWARDED, reason::ESTABLISHED)
    };
    c.finish(pkt, 0, v, r, e.rule_id, None)
}

/// Track TCP closing and push the expiry forward (written only when it moves by more than a
/// second, or shrinks, to keep established packets from dirtying the entry's cache line).
#[inline(always)]
fn refresh(cfg: &Config, pkt: &Packet, e: &mut CtValue, forward: bool, now: u64) {
    let mut flags = e.flags;
    if !forward {
        flags |= ct_flags::SEEN_REPLY;
    }
    let timeout = if pkt.protocol == IPPROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            flags |= ct_flags::FIN_INIT | ct_flags::FIN_REPLY;
        } else if pkt.tcp_flags & TCP_FIN != 0 {
            flags |= if forward {
                ct_flags::FIN_INIT
            } else {
                ct_flags::FIN_REPLY
            };
        }
        if flags & (ct_flags::FIN_INIT | ct_flags::FIN_REPLY)
            == ct_flags::FIN_INIT | ct_flags::FIN_REPLY
        {
            cfg.ct_tcp_close_timeout_s
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            cfg.ct_tcp_timeout_s
        } else {
            cfg.ct_tcp_syn_timeout_s
        }
    } else {
        cfg.ct_other_timeout_s
    };
    let expires = now + timeout as u64 * NS;
    if flags != e.flags || expires < e.expires_ns || expires > e.expires_ns + NS {
        e.flags = flags;
        e.expires_ns = expires;
    }
}

/// Returns "ok" and does nothing else: the floor that benchmarks measure the hooks against.
#[classifier]
pub fn floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// XDP on node uplinks: drop sources on the prefilter blocklist before anything else. Stateless
/// by design (replies from a listed source are dropped too).
#[xdp]
pub fn prefilter(ctx: XdpContext) -> u32 {
    match prefilter_check(&ctx) {
        Some(rule_id) => {
            let cfg = config();
            let len = (ctx.data_end() - ctx.data()) as u32;
            count(
                &cfg,
                direction::INGRESS,
                verdict::DROPPED,
                reason::PREFILTER,
                rule_id,
                len,
            );
            xdp_action::XDP_DROP
        }
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn prefilter_check(ctx: &XdpContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + parse::ETH_HLEN > end {
        return None;
    }
    // SAFETY: bounds checked against data_end before each read.
    let proto = u16::from_be(unsafe { *((data + 12) as *const u16) });
    match proto {
        0x0800 => {
            if data + parse::ETH_HLEN + 20 > end {
                return None;
            }
            // SAFETY: as above; source address at offset 12 of the IPv4 header.
            let saddr = unsafe { *((data + parse::ETH_HLEN + 12) as *const u32) };
            PREFILTER4.get(Key::new(32, saddr)).copied()
        }
        0x86dd => {
            if data + parse::ETH_HLEN + 40 > end {
                return None;
            }
            // SAFETY: as above; source address at offset 8 of the IPv6 header.
            let saddr = unsafe { *((data + parse::ETH_HLEN + 8) as *const [u32; 4]) };
            PREFILTER6.get(Key::new(128, saddr)).copied()
        }
        _ => None,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
