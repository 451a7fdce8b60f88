//! The lab: a Kubernetes-shaped cluster made of network namespaces on one machine, the
//! in-process workload servers, and the cyclonus-style reachability probe (DESIGN.md,
//! "The lab").
//!
//! A lab is built from a scenario ([`LabScenario`]: the conformance format of
//! `crate::scenario` plus the extensions of [`ext`]):
//! - one network namespace per node (`moat-lab-<id>-n<N>`), with the node address
//!   `10.244.N.1` / `fd00:10:244:N::1` on its loopback, forwarding on, and for every pod a
//!   routed veth pair (`lxc<K>` in the node, `eth0` in the pod; no bridge), the way a CNI
//!   without a bridge wires pods;
//! - one network namespace per pod with `10.244.N.K/32` and `fd00:10:244:N::K/128` and
//!   default routes via `169.254.1.1` / `fe80::1` on the host side;
//! - for two or more nodes, a veth "wire" between every pair of nodes (`wire<M>` in node N
//!   faces node M) with routes to each other's pod subnets;
//! - in every pod, servers for every probed port (TCP and UDP echo, the Star Wars `deathstar`
//!   HTTP API where asked), run by this process ([`servers`]): sockets keep the namespace they
//!   were made in, so one runtime serves every pod;
//! - optionally one `moat agent` per node reading a source directory ([`source`]) the lab
//!   writes, waited on through its control socket ([`agents`]).
//!
//! Nothing is ever configured in the machine's root namespace. Every lab records what it owns
//! in a state file (`/run/moat-lab/<id>.json`) before creating anything, so a later run (or
//! `moat lab down`) removes what a killed run left behind ([`state::sweep`]).
//!
//! Entry points for the CLI: [`run_probe`] (`moat lab probe`), [`cli::up_and_wait`]
//! (`moat lab up`), [`cli::down`] (`moat lab down`), [`servers::serve`] (`moat serve`).

pub mod agents;
pub mod cli;
pub mod deathstar;
pub mod demo;
pub mod ext;
pub mod netlink;
pub mod netns;
pub mod plan;
pub mod probe;
pub mod servers;
pub mod source;
pub mod state;
mod topology;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ext::{Family, HttpProbe, LabScenario};
pub use plan::{LabPlan, NodePlan, PodPlan, ServerKind, ServerSpec};
pub use probe::{Mismatch, ProbeOptions, ProbeReport, ProbeResult};
pub use topology::Lab;

/// Everything that can go wrong building, probing or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Scenario(#[from] crate::scenario::ScenarioError),
    #[error("scenario: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("netlink in {netns}: {message}")]
    Netlink { netns: String, message: String },
    #[error("agent for {node}: {message}")]
    Agent { node: String, message: String },
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}

/// How a lab is built.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Run one `moat agent` per node (None: servers and topology only, no enforcement).
    pub agent: Option<agents::AgentConfig>,
    /// Remove labs of dead runs before building (see [`state::sweep`]).
    pub sweep_stale: bool,
    /// Where pins go: `<bpffs>/moat-lab-<id>-<node>`.
    pub bpffs: PathBuf,
    /// Probe settings.
    pub probe: ProbeOptions,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            agent: None,
            sweep_stale: true,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            probe: ProbeOptions::default(),
        }
    }
}

impl LabOptions {
    /// Options that run the agent from `binary` (for the CLI: `std::env::current_exe()`;
    /// for integration tests: `env!("CARGO_BIN_EXE_moat")`).
    pub fn with_agent(binary: impl Into<PathBuf>) -> Self {
        LabOptions {
            agent: Some(agents::AgentConfig::new(binary)),
            ..LabOptions::default()
        }
    }
}

/// `moat lab probe --scenario FILE`: build the lab, apply the scenario's policies (waiting
/// until every agent reports them programmed), probe every ordered pod pair for every probe,
/// tear the lab down. The CLI exits 0 if [`ProbeReport::passed`], 1 if not, 2 on `Err`.
pub fn run_probe(scenario: &Path, opts: &LabOptions) -> Result<ProbeReport, LabError> {
    let scenario = LabScenario::load(scenario)?;
    let lab = Lab::up(&scenario, opts)?;
    let report = probe_checked(&lab, &scenario, &opts.probe);
    lab.down()?;
    report
}

/// Probe, and with agents cross-check the blocked cells against their DROPPED counters.
fn probe_checked(
    lab: &Lab,
    scenario: &LabScenario,
    opts: &ProbeOptions,
) -> Result<ProbeReport, LabError> {
    if lab.agents().is_empty() {
        return lab.probe(scenario, opts);
    }
    let (mut report, check) = agents::probe_cross_checked(lab, scenario, opts)?;
    report.cross_check = Some(check);
    Ok(report)
}

/// The outcome of one scenario of a suite.
pub struct SuiteEntry {
    pub path: PathBuf,
    pub result: Result<ProbeReport, LabError>,
}

/// `make conformance`: probe every scenario file, reusing one lab across consecutive
/// scenarios of the same topology (same nodes, pods, labels, named ports and servers) and
/// only swapping the policies in between (DESIGN.md: one lab per topology, not per file).
/// A scenario that fails to load or build is reported as its own error; the suite goes on.
pub fn run_suite(files: &[PathBuf], opts: &LabOptions) -> Vec<SuiteEntry> {
    let mut out = Vec::new();
    let mut current: Option<(String, Lab)> = None;
    for path in files {
        let result = (|| {
            let s = LabScenario::load(path)?;
            let key = LabPlan::new("key", &s)?.topology_key();
            let reuse = matches!(&current, Some((k, _)) if *k == key);
            if reuse {
                let (_, lab) = current.as_mut().expect("matched above");
                lab.set_policies(&s.base.policies)?;
            } else {
                if let Some((_, old)) = current.take() {
                    old.down()?;
                }
                current = Some((key, Lab::up(&s, opts)?));
            }
            let (_, lab) = current.as_ref().expect("set above");
            probe_checked(lab, &s, &opts.probe)
        })();
        if result.is_err()
            && let Some((_, lab)) = current.take()
        {
            // A failed step may leave the lab half-updated: start the next one afresh.
            let _ = lab.down();
        }
        out.push(SuiteEntry {
            path: path.clone(),
            result,
        });
    }
    if let Some((_, lab)) = current.take() {
        let _ = lab.down();
    }
    out
}
