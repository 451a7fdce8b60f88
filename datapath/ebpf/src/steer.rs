//! Transparent steering of a flow to the node's L7 proxy with `bpf_sk_assign` (TC ingress
//! only), in the order a spike proved on this kernel (shared notes, l7-steering): an
//! established socket first (`bpf_skc_lookup_tcp` also finds request sockets), then the
//! listener, and the fwmark that routes the packet to the local stack.
use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::generated::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use moat_common::{family, mark};

use crate::parse::{Packet, TCP_ACK, TCP_SYN};

const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;

#[inline(always)]
fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple, v4: bool) -> *mut bpf_sock {
    let size = if v4 { 12 } else { 36 };
    // SAFETY: the tuple lives on our stack for the call; the returned reference is released
    // on every path by the callers.
    unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            tuple as *mut _,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    }
}

/// The packet's own tuple, as a socket of this namespace would be looked up for it.
#[inline(always)]
fn packet_tuple(pkt: &Packet, v4: bool) -> bpf_sock_tuple {
    // SAFETY: plain-old-data union, fully initialised below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Union field writes are safe: both variants are plain data.
    if v4 {
        tuple.__bindgen_anon_1.ipv4.saddr = pkt.saddr[0];
        tuple.__bindgen_anon_1.ipv4.daddr = pkt.daddr[0];
        tuple.__bindgen_anon_1.ipv4.sport = pkt.sport;
        tuple.__bindgen_anon_1.ipv4.dport = pkt.dport;
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr = pkt.saddr;
        tuple.__bindgen_anon_1.ipv6.daddr = pkt.daddr;
        tuple.__bindgen_anon_1.ipv6.sport = pkt.sport;
        tuple.__bindgen_anon_1.ipv6.dport = pkt.dport;
    }
    tuple
}

/// Assigns the packet to the connected (or connecting) socket of this namespace its tuple
/// names, if there is one: `None` when there is none (listeners and TIME_WAIT do not count).
#[inline(always)]
fn to_connected(ctx: &TcContext, tuple: &mut bpf_sock_tuple, v4: bool) -> Option<Result<(), ()>> {
    let sk = lookup(ctx, tuple, v4);
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket reference from the lookup.
    let state = unsafe { (*sk).state };
    if state != TCP_LISTEN && state != TCP_TIME_WAIT {
        return Some(assign(ctx, sk));
    }
    // SAFETY: releasing the reference we hold.
    unsafe { bpf_sk_release(sk as *mut _) };
    None
}

/// A reply to one of the proxy's upstream connections made from a client's address (to
/// another node): delivered to that socket, else left alone (`false`: not the proxy's).
#[inline(always)]
pub fn to_upstream(ctx: &TcContext, pkt: &Packet) -> bool {
    let v4 = pkt.family == family::V4;
    let mut tuple = packet_tuple(pkt, v4);
    matches!(to_connected(ctx, &mut tuple, v4), Some(Ok(())))
}

/// Assign the packet to the proxy's socket for this flow. `Err` means the proxy cannot take
/// it (not listening, or a non-SYN packet of a flow it does not know): the caller drops.
#[inline(always)]
pub fn to_proxy(ctx: &TcContext, pkt: &Packet, proxy_port: u16) -> Result<(), ()> {
    let v4 = pkt.family == family::V4;
    let mut tuple = packet_tuple(pkt, v4);
    if let Some(assigned) = to_connected(ctx, &mut tuple, v4) {
        return assigned;
    }
    // Only a SYN may open a connection to the listener; anything else of an unknown flow
    // would get the listener's RST.
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(());
    }
    // SAFETY: as above; the listener is bound to the wildcard address (0 / ::).
    unsafe {
        tuple = core::mem::zeroed();
        if v4 {
            tuple.__bindgen_anon_1.ipv4.dport = proxy_port.to_be();
        } else {
            tuple.__bindgen_anon_1.ipv6.dport = proxy_port.to_be();
        }
    }
    let sk = lookup(ctx, &mut tuple, v4);
    if sk.is_null() {
        return Err(());
    }
    assign(ctx, sk)
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> Result<(), ()> {
    // SAFETY: `sk` is a referenced socket from a lookup; released right after.
    let ret = unsafe {
        let r = bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0);
        bpf_sk_release(sk as *mut _);
        r
    };
    if ret < 0 {
        return Err(());
    }
    ctx.set_mark(mark::TO_PROXY);
    Ok(())
}
