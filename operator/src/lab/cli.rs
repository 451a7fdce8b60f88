//! What `moat lab up` and `moat lab down` do (argument parsing stays in main.rs).

use super::state::{self, LabState, SweepMode};
use super::{Lab, LabError, LabOptions, LabScenario};
use nix::sys::signal::{SigSet, Signal};
use std::path::Path;

/// Block SIGINT and SIGTERM in the calling thread (and so in every thread it starts later)
/// and return the set to wait on. Call it first thing in `main`, before any thread exists,
/// so that a Ctrl-C reaches the `sigwait` and the lab is torn down instead of the process
/// dying with namespaces left behind.
pub fn block_termination_signals() -> Result<SigSet, LabError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(|e| LabError::Io {
        context: "blocking SIGINT/SIGTERM".into(),
        source: e.into(),
    })?;
    Ok(set)
}

/// A human summary of a lab: nodes, pods, namespaces, addresses, servers.
pub fn describe(lab: &Lab) -> String {
    let plan = lab.plan();
    let mut out = format!("lab {}\n", plan.id);
    for (i, n) in plan.nodes.iter().enumerate() {
        out.push_str(&format!(
            "  node {} (netns {}): {} {}{}\n",
            n.name,
            n.netns,
            n.ip4,
            n.ip6,
            if n.uplinks.is_empty() {
                String::new()
            } else {
                format!(
                    ", uplinks {}",
                    n.uplinks
                        .iter()
                        .map(|u| u.ifname.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        ));
        for p in plan.pods.iter().filter(|p| p.node == i) {
            out.push_str(&format!(
                "    pod {:<12} netns {} {} {} {} [{}]\n",
                p.key,
                p.netns,
                p.host_if,
                p.ip4,
                p.ip6,
                super::servers::describe(&p.servers)
            ));
        }
    }
    if let Some(d) = lab.source_dir() {
        out.push_str(&format!("  source {}\n", d.display()));
    }
    for a in lab.agents() {
        out.push_str(&format!(
            "  agent {} pid {} socket {} log {}\n",
            a.node,
            a.proc.pid,
            a.socket.display(),
            a.log.display()
        ));
    }
    out
}

/// `moat lab up --scenario FILE`: build the lab, print it, and keep it (servers run in this
/// process) until SIGINT/SIGTERM or `moat lab down`; then tear it down.
pub fn up_and_wait(scenario: &Path, opts: &LabOptions) -> Result<(), LabError> {
    let signals = block_termination_signals()?;
    let scenario = LabScenario::load(scenario)?;
    let lab = Lab::up(&scenario, opts)?;
    println!("{}", describe(&lab));
    println!(
        "lab {} is up; Ctrl-C or `moat lab down` tears it down",
        lab.id()
    );
    let _ = signals.wait();
    lab.down()
}

/// `moat lab down`: stop every lab on this machine (their owners get SIGTERM and clean up;
/// what a dead owner left is removed). Returns the ids removed.
pub fn down(opts: &LabOptions) -> Result<Vec<String>, LabError> {
    state::sweep(SweepMode::All, &opts.bpffs)
}

/// Labs recorded on this machine, with whether their owner is alive.
pub fn list() -> Vec<(LabState, bool)> {
    LabState::load_all()
        .into_iter()
        .map(|s| {
            let alive = s.owner_alive();
            (s, alive)
        })
        .collect()
}
