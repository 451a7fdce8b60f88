//! Hand-built frames for `test_run`: what the tests and benchmarks (here and in the
//! operator's datapath-backed property tests) feed the programs.
//!
//! Packets are assembled by hand rather than with a packet-building crate because the tests
//! need frames a builder refuses to make: truncated headers, bad lengths, extension-header
//! chains, SCTP, fragments. Checksums are left zero: TC and XDP test runs do not verify them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

/// L4 part of a packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP / ICMPv6 echo request (or reply) with an identifier.
    Echo {
        id: u16,
        reply: bool,
    },
    /// Any other ICMP message (type, code), 8-byte header, no payload.
    Icmp {
        ty: u8,
        code: u8,
    },
}

impl L4 {
    fn protocol(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => TCP,
            L4::Udp { .. } => UDP,
            L4::Sctp { .. } => SCTP,
            L4::Echo { .. } | L4::Icmp { .. } if v6 => ICMPV6,
            L4::Echo { .. } | L4::Icmp { .. } => ICMP,
        }
    }

    fn bytes(&self, v6: bool) -> Vec<u8> {
        let mut b = Vec::new();
        match *self {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend([0, 0, 0, 1, 0, 0, 0, 0]);
                b.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            L4::Udp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend([0, 8 + 4, 0, 0]);
                b.extend(*b"ping");
            }
            L4::Sctp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend([0; 8]);
            }
            L4::Echo { id, reply } => {
                let ty = match (v6, reply) {
                    (false, false) => 8,
                    (false, true) => 0,
                    (true, false) => 128,
                    (true, true) => 129,
                };
                b.extend([ty, 0, 0, 0]);
                b.extend(id.to_be_bytes());
                b.extend([0, 1]);
            }
            L4::Icmp { ty, code } => b.extend([ty, code, 0, 0, 0, 0, 0, 0]),
        }
        b
    }
}

/// An Ethernet frame carrying IPv4 or IPv6 (by the address family) and `l4`.
pub fn packet(src: IpAddr, dst: IpAddr, l4: L4) -> Vec<u8> {
    let v6 = src.is_ipv6();
    ip_packet(src, dst, l4.protocol(v6), &l4.bytes(v6), &[])
}

/// An IPv6 frame whose L4 header follows the given extension headers (each a whole header
/// with its next-header byte filled in by this function).
pub fn packet_v6_ext(src: Ipv6Addr, dst: Ipv6Addr, ext: &[Vec<u8>], l4: L4) -> Vec<u8> {
    ip_packet(
        src.into(),
        dst.into(),
        l4.protocol(true),
        &l4.bytes(true),
        ext,
    )
}

/// An IPv4 packet carrying `payload` as protocol `proto`, with explicit fragment fields.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    offset8: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(0x0800);
    let total = 20 + payload.len();
    let frag = offset8 | if more { 0x2000 } else { 0 };
    f.extend([0x45, 0]);
    f.extend((total as u16).to_be_bytes());
    f.extend(id.to_be_bytes());
    f.extend(frag.to_be_bytes());
    f.extend([64, proto, 0, 0]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(payload);
    f
}

/// The L4 bytes of `l4`, for building fragments and ICMP errors.
pub fn l4_bytes(l4: L4, v6: bool) -> Vec<u8> {
    l4.bytes(v6)
}

/// An ICMP (v4) or ICMPv6 error of `ty`/`code` from `src` to `dst`, quoting `quoted` (an
/// Ethernet frame; its IP part is embedded).
pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut body = vec![ty, code, 0, 0, 0, 0, 0, 0];
    body.extend(&quoted[14..]);
    ip_packet(src, dst, if v6 { ICMPV6 } else { ICMP }, &body, &[])
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend(ethertype.to_be_bytes());
    f
}

fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], ext: &[Vec<u8>]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_fragment(s, d, proto, 1, 0, false, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(0x86dd);
            let ext_len: usize = ext.iter().map(Vec::len).sum();
            let first_next = ext.first().map_or(proto, |h| ext_type(h));
            f.extend([0x60, 0, 0, 0]);
            f.extend(((ext_len + l4.len()) as u16).to_be_bytes());
            f.extend([first_next, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
            for (i, h) in ext.iter().enumerate() {
                let mut h = h.clone();
                h[0] = ext.get(i + 1).map_or(proto, |n| ext_type(n));
                f.extend(&h[..h.len()]);
            }
            f.extend(l4);
            f
        }
        _ => panic!("mixed address families"),
    }
}

/// Extension headers are tagged by their length for this builder: 8 bytes = hop-by-hop
/// (type 0), 16 bytes = destination options (type 60).
fn ext_type(h: &[u8]) -> u8 {
    if h.len() == 8 { 0 } else { 60 }
}

/// A hop-by-hop options header (8 bytes, PadN).
pub fn hop_by_hop() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A destination options header (16 bytes: length field 1, PadN).
pub fn dest_opts() -> Vec<u8> {
    vec![0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}
