//! Header parsing for the TC hooks. Reads go through `bpf_skb_load_bytes` (`TcContext::load`),
//! which copes with non-linear (GRO/GSO) skbs where direct packet access would see a truncated
//! linear area.
use aya_ebpf::programs::TcContext;
use moat_common::{FragKey, FragValue, family};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Extension headers walked before giving up (fail closed on more).
const MAX_IPV6_EXT: usize = 6;

/// What a hook needs to know about a packet. Addresses as read from the wire (IPv4 in word 0);
/// ports in network order. For ICMP echo the identifier is both ports.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// Set for ICMP/ICMPv6 errors: the embedded packet's flow, as the embedded packet travelled.
    pub icmp_error: bool,
}

pub enum Parsed {
    Packet(Packet),
    /// Not subject to policy: non-IP (ARP) and IPv6 neighbour discovery.
    Pass,
    /// Truncated or malformed headers.
    Malformed,
    /// A non-first fragment of a datagram whose first fragment was not seen.
    UnknownFragment,
}

#[repr(C)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ipv6Hdr {
    ver_tc_flow: u32,
    payload_len: u16,
    next_hdr: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Enough of any L4 header for ports, TCP flags and ICMP type/identifier.
#[repr(C)]
struct L4Hdr {
    /// Ports (TCP, UDP, SCTP) or type/code (ICMP).
    w0: [u8; 4],
    /// ICMP identifier in the first two bytes.
    w1: [u8; 4],
    _seq: u32,
    doff: u8,
    flags: u8,
}

/// Where the L4 header starts and what it is.
struct L3 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    l4_off: usize,
    family: u8,
    protocol: u8,
    /// Fragment datagram id (IPv4 id or IPv6 identification).
    frag_id: u32,
    /// 0: not fragmented; 1: first fragment; 2: later fragment.
    frag: u8,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    if let Some(pkt) = fast_ipv4(ctx) {
        return Parsed::Packet(pkt);
    }
    let Ok(proto) = ctx.load::<u16>(ETH_HLEN - 2) else {
        return Parsed::Malformed;
    };
    let l3 = match u16::from_be(proto) {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN),
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN),
        _ => return Parsed::Pass,
    };
    let Some(l3) = l3 else {
        return Parsed::Malformed;
    };
    let mut pkt = Packet {
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport: 0,
        dport: 0,
        family: l3.family,
        protocol: l3.protocol,
        tcp_flags: 0,
        icmp_error: false,
    };
    let frag_key = FragKey {
        src: l3.saddr,
        dst: l3.daddr,
        id: l3.frag_id,
        protocol: l3.protocol,
        family: l3.family,
        _pad: [0; 2],
    };
    if l3.frag == 2 {
        // SAFETY: the value is plain data, copied out at once.
        return match unsafe { FRAGMENTS.get(frag_key) } {
            Some(v) => {
                pkt.sport = v.sport;
                pkt.dport = v.dport;
                Parsed::Packet(pkt)
            }
            None => Parsed::UnknownFragment,
        };
    }
    let parsed = parse_l4(ctx, &l3, pkt);
    if l3.frag == 1
        && let Parsed::Packet(p) = &parsed
    {
        let ports = FragValue {
            sport: p.sport,
            dport: p.dport,
        };
        let _ = FRAGMENTS.insert(frag_key, ports, 0);
    }
    parsed
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, l3: &L3, mut pkt: Packet) -> Parsed {
    let Ok(l4) = ctx.load::<L4Hdr>(l3.l4_off) else {
        // Protocols without ports may be shorter than L4Hdr: only the ones we read must fit.
        return match l3.protocol {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                parse_short_l4(ctx, l3.l4_off, pkt)
            }
            _ => Parsed::Packet(pkt),
        };
    };
    match l3.protocol {
        IPPROTO_TCP => {
            if l4.doff >> 4 < 5 {
                return Parsed::Malformed;
            }
            pkt.sport = u16::from_ne_bytes([l4.w0[0], l4.w0[1]]);
            pkt.dport = u16::from_ne_bytes([l4.w0[2], l4.w0[3]]);
            pkt.tcp_flags = l4.flags;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            pkt.sport = u16::from_ne_bytes([l4.w0[0], l4.w0[1]]);
            pkt.dport = u16::from_ne_bytes([l4.w0[2], l4.w0[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            return icmp(ctx, l3, pkt, l4.w0[0], [l4.w1[0], l4.w1[1]]);
        }
        _ => {}
    }
    Parsed::Packet(pkt)
}

/// The common case read straight from the linear packet data: unfragmented IPv4 without
/// options carrying TCP or UDP, with the headers in the linear area. Anything else (and any
/// doubt) goes the general way, through `bpf_skb_load_bytes`.
#[inline(always)]
fn fast_ipv4(ctx: &TcContext) -> Option<Packet> {
    const IP: usize = ETH_HLEN;
    const L4: usize = ETH_HLEN + 20;
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + L4 + 8 > end {
        return None;
    }
    // SAFETY: every read below is within [data, end), checked above or just before it.
    unsafe {
        if *((data + 12) as *const u16) != ETH_P_IP.to_be() {
            return None;
        }
        let ip = &*((data + IP) as *const Ipv4Hdr);
        // Version 4, 20-byte header; neither MF nor a fragment offset.
        if ip.ver_ihl != 0x45 || ip.frag_off & 0x3fffu16.to_be() != 0 {
            return None;
        }
        let ports = *((data + L4) as *const [u16; 2]);
        let mut pkt = Packet {
            saddr: [ip.saddr, 0, 0, 0],
            daddr: [ip.daddr, 0, 0, 0],
            sport: ports[0],
            dport: ports[1],
            family: family::V4,
            protocol: ip.protocol,
            tcp_flags: 0,
            icmp_error: false,
        };
        match ip.protocol {
            IPPROTO_UDP => Some(pkt),
            IPPROTO_TCP => {
                if data + L4 + 20 > end {
                    return None;
                }
                let off_flags = *((data + L4 + 12) as *const [u8; 2]);
                if off_flags[0] >> 4 < 5 {
                    return None;
                }
                pkt.tcp_flags = off_flags[1];
                Some(pkt)
            }
            _ => None,
        }
    }
}

/// L4 headers shorter than `L4Hdr` (a bare UDP header, a minimal ICMP message).
#[inline(always)]
fn parse_short_l4(ctx: &TcContext, off: usize, mut pkt: Packet) -> Parsed {
    let Ok(w) = ctx.load::<[u8; 8]>(off) else {
        return Parsed::Malformed;
    };
    match pkt.protocol {
        IPPROTO_UDP | IPPROTO_SCTP => {
            pkt.sport = u16::from_ne_bytes([w[0], w[1]]);
            pkt.dport = u16::from_ne_bytes([w[2], w[3]]);
            Parsed::Packet(pkt)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if is_ndp(pkt.protocol, w[0]) {
                return Parsed::Pass;
            }
            if is_icmp_error(pkt.protocol, w[0]) {
                // An error must carry the offending packet's headers.
                return Parsed::Malformed;
            }
            if is_icmp_echo(pkt.protocol, w[0]) {
                let id = u16::from_ne_bytes([w[4], w[5]]);
                pkt.sport = id;
                pkt.dport = id;
            }
            Parsed::Packet(pkt)
        }
        // TCP needs its full 20-byte header.
        _ => Parsed::Malformed,
    }
}

/// IPv6 link-local control traffic that always passes: neighbour discovery (133–137) and
/// multicast listener discovery (130–132, 143), without which IPv6 on the link breaks.
#[inline(always)]
fn is_ndp(protocol: u8, ty: u8) -> bool {
    protocol == IPPROTO_ICMPV6 && ((130..=137).contains(&ty) || ty == 143)
}

#[inline(always)]
fn is_icmp_error(protocol: u8, ty: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => ty == 3 || ty == 11 || ty == 12,
        _ => (1..=4).contains(&ty),
    }
}

#[inline(always)]
fn is_icmp_echo(protocol: u8, ty: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => ty == 8 || ty == 0,
        _ => ty == 128 || ty == 129,
    }
}

#[inline(always)]
fn icmp(ctx: &TcContext, l3: &L3, mut pkt: Packet, ty: u8, id: [u8; 2]) -> Parsed {
    if is_ndp(pkt.protocol, ty) {
        return Parsed::Pass;
    }
    if is_icmp_echo(pkt.protocol, ty) {
        let id = u16::from_ne_bytes(id);
        pkt.sport = id;
        pkt.dport = id;
        return Parsed::Packet(pkt);
    }
    if !is_icmp_error(pkt.protocol, ty) {
        return Parsed::Packet(pkt);
    }
    // The embedded packet starts after the 8-byte ICMP header. Only the IP header and the
    // first 8 bytes of its L4 header are guaranteed to be there.
    let inner_off = l3.l4_off + 8;
    let inner = if pkt.family == family::V4 {
        parse_ipv4(ctx, inner_off)
    } else {
        parse_ipv6(ctx, inner_off)
    };
    let Some(inner) = inner else {
        return Parsed::Malformed;
    };
    let Ok(w) = ctx.load::<[u8; 8]>(inner.l4_off) else {
        return Parsed::Malformed;
    };
    let (sport, dport) = match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (
            u16::from_ne_bytes([w[0], w[1]]),
            u16::from_ne_bytes([w[2], w[3]]),
        ),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let id = u16::from_ne_bytes([w[4], w[5]]);
            (id, id)
        }
        _ => (0, 0),
    };
    Parsed::Packet(Packet {
        saddr: inner.saddr,
        daddr: inner.daddr,
        sport,
        dport,
        family: inner.family,
        protocol: inner.protocol,
        tcp_flags: 0,
        icmp_error: true,
    })
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize) -> Option<L3> {
    let ip = ctx.load::<Ipv4Hdr>(off).ok()?;
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 || (u16::from_be(ip.tot_len) as usize) < ihl {
        return None;
    }
    let frag_off = u16::from_be(ip.frag_off);
    let frag = if frag_off & 0x1fff != 0 {
        2
    } else if frag_off & 0x2000 != 0 {
        1
    } else {
        0
    };
    Some(L3 {
        saddr: [ip.saddr, 0, 0, 0],
        daddr: [ip.daddr, 0, 0, 0],
        l4_off: off + ihl,
        family: family::V4,
        protocol: ip.protocol,
        frag_id: ip.id as u32,
        frag,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize) -> Option<L3> {
    let ip = ctx.load::<Ipv6Hdr>(off).ok()?;
    if u32::from_be(ip.ver_tc_flow) >> 28 != 6 {
        return None;
    }
    let mut l3 = L3 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        l4_off: off + 40,
        family: family::V6,
        protocol: ip.next_hdr,
        frag_id: 0,
        frag: 0,
    };
    for _ in 0..MAX_IPV6_EXT {
        match l3.protocol {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let h = ctx.load::<[u8; 2]>(l3.l4_off).ok()?;
                l3.protocol = h[0];
                l3.l4_off += (h[1] as usize + 1) * 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let h = ctx.load::<[u8; 2]>(l3.l4_off).ok()?;
                l3.protocol = h[0];
                l3.l4_off += (h[1] as usize + 2) * 4;
            }
            // Fragment header: 8 bytes, offset and M flag, 32-bit identification.
            44 => {
                let h = ctx.load::<[u8; 8]>(l3.l4_off).ok()?;
                l3.protocol = h[0];
                let off_m = u16::from_be_bytes([h[2], h[3]]);
                l3.frag = if off_m & 0xfff8 != 0 {
                    2
                } else if off_m & 1 != 0 {
                    1
                } else {
                    0
                };
                l3.frag_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                l3.l4_off += 8;
            }
            _ => return Some(l3),
        }
    }
    // Still in extension headers: refuse rather than guess.
    None
}
