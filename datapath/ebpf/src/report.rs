//! Counters (exact, per CPU) and ring-buffer events (rate-limited per CPU, never blocking).
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use moat_common::{
    Config, Event, capacity, config_flags, rule_counter_index, verdict_counter_index,
};

use crate::{
    maps::{CONFIG, EVENT_STATE, EVENTS, RULES, VERDICTS},
    parse::Packet,
};

/// The runtime configuration; a map never written by user space reads as all zero, which
/// would disable events and flow timeouts, so fall back to the defaults.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) if c.ct_other_timeout_s != 0 => *c,
        _ => Config::DEFAULT,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn count(cfg: &Config, dir: u8, verdict: u8, reason: u8, rule_id: u32, bytes: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(verdict_counter_index(dir, verdict, reason)) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
    if rule_id != 0 && cfg.flags & config_flags::RULE_COUNTERS != 0 {
        count_rule(rule_id, verdict, bytes);
    }
}

#[inline(always)]
pub fn count_rule(rule_id: u32, verdict: u8, bytes: u32) {
    if let Some(c) = RULES.get_ptr_mut(rule_counter_index(rule_id, verdict)) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// What an event says beyond the packet.
pub struct EventInfo {
    pub kind: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    pub audit_rule_id: u32,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub packet_len: u32,
}

/// Token bucket per CPU: `event_rate` per second sustained, `event_burst` at once. Tokens are
/// scaled by 2^10.
#[inline(always)]
fn admit(cfg: &Config, now: u64) -> bool {
    let Some(st) = EVENT_STATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer.
    let st = unsafe { &mut *st };
    let cap = (cfg.event_burst as u64) << 10;
    if st.last_ns == 0 {
        // First event on this CPU: start with a full bucket.
        st.tokens = cap;
        st.last_ns = now;
    }
    let elapsed = now.saturating_sub(st.last_ns);
    // rate/s * elapsed ns * 2^10 / 1e9. Capping elapsed at 1 s keeps the product in u64 and
    // still refills a full burst for any rate >= burst.
    let refill = (elapsed.min(1_000_000_000) * cfg.event_rate as u64) / 976_562;
    st.tokens = (st.tokens + refill).min(cap);
    st.last_ns = now;
    if st.tokens < 1 << 10 {
        st.suppressed += 1;
        return false;
    }
    st.tokens -= 1 << 10;
    true
}

#[inline(always)]
pub fn emit(cfg: &Config, pkt: &Packet, info: &EventInfo) {
    if cfg.flags & config_flags::EVENTS == 0 {
        return;
    }
    let now = now_ns();
    if !admit(cfg, now) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(st) = EVENT_STATE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer.
            unsafe { (*st).lost += 1 };
        }
        return;
    };
    entry.write(Event {
        timestamp_ns: now,
        src: pkt.saddr,
        dst: pkt.daddr,
        src_identity: info.src_identity,
        dst_identity: info.dst_identity,
        rule_id: info.rule_id,
        audit_rule_id: info.audit_rule_id,
        endpoint_id: info.endpoint_id,
        ifindex: info.ifindex,
        packet_len: info.packet_len,
        sport: u16::from_be(pkt.sport),
        dport: u16::from_be(pkt.dport),
        protocol: pkt.protocol,
        family: pkt.family,
        direction: info.direction,
        verdict: info.verdict,
        reason: info.reason,
        kind: info.kind,
        _pad: [0; 2],
    });
    // By default the kernel wakes a reader that has caught up on every event it is given:
    // an interrupt (irq_work) on this CPU and a context switch for the reader, per event.
    // Under connection churn, with the agent's reader, that made the programs' own run time
    // 1.6 times as long (in situ, `make bench-throughput`). So the reader is woken once a
    // batch has gathered; it also looks on its own every `EVENT_FLUSH`, which bounds how late
    // a lone event is read.
    let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= capacity::EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup as u64);
    if let Some(st) = EVENT_STATE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*st).emitted += 1 };
    }
}
