//! `BPF_PROG_TEST_RUN` on the real programs: tests feed hand-built packets, benchmarks time
//! them with the kernel's own clock.
use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};

use crate::{Datapath, Error, FLOOR, FROM_ENDPOINT, FROM_UPLINK, PREFILTER, Result, TO_ENDPOINT};

/// Which program to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    FromEndpoint,
    ToEndpoint,
    Prefilter,
    FromUplink,
    /// An empty TC program: the floor for benchmarks.
    Floor,
}

/// Size of the `__sk_buff` context passed to TC test runs.
pub const SKB_CTX_LEN: usize = 192;
/// Offset of `ifindex` in `__sk_buff`.
const SKB_IFINDEX_OFF: usize = 40;
/// Offset of `mark` in `__sk_buff`.
const SKB_MARK_OFF: usize = 8;

#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    /// TC action (0 ok, 2 shot) or XDP action (1 drop, 2 pass).
    pub action: u32,
    /// Kernel-measured time per run.
    pub per_run: Duration,
}

impl Datapath {
    /// Run `hook` on `packet` (an Ethernet frame) `repeat` times, as if it arrived on
    /// `ifindex` (which must exist in the caller's network namespace; 0 means loopback) with
    /// skb mark `mark`.
    pub fn test_run(
        &self,
        hook: Hook,
        packet: &[u8],
        ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<RunResult> {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            // XDP takes no skb context.
            ctx_in: (hook != Hook::Prefilter).then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::new()
        };
        let (name, r) = match hook {
            Hook::FromEndpoint => (FROM_ENDPOINT, self.programs.from_endpoint.test_run(opts)),
            Hook::ToEndpoint => (TO_ENDPOINT, self.programs.to_endpoint.test_run(opts)),
            Hook::Prefilter => (PREFILTER, self.programs.prefilter.test_run(opts)),
            Hook::FromUplink => (FROM_UPLINK, self.programs.from_uplink.test_run(opts)),
            Hook::Floor => (FLOOR, self.programs.floor.test_run(opts)),
        };
        let r = r.map_err(|source| Error::Program { name, source })?;
        Ok(RunResult {
            action: r.return_value,
            per_run: r.duration,
        })
    }
}
