//! One standalone `moat agent` per lab node, as a child process:
//!
//! ```text
//! moat agent --source dir:<DIR> --node-name <node> --pin-root <bpffs>/moat-lab-<id>-<node>
//!            --control-socket /run/moat-lab/<id>/<node>.sock --netns /run/netns/<node ns>
//!            --state-dir /run/moat-lab/<id>/<node>-state
//! ```
//!
//! The lab never sleeps on an agent: it computes the digest of the source directory with the
//! same function the agents use and polls each agent's control socket until the agent reports
//! that digest as programmed ([`wait_programmed`]): `crate::source::digest::dir_digest` and
//! `crate::control::client::status`, isolated in [`source_digest`] and [`programmed_digest`].

use super::LabError;
use super::state::{Proc, terminate};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How agents are run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The `moat` binary.
    pub binary: PathBuf,
    /// Extra arguments after `agent …` (e.g. log level).
    pub extra_args: Vec<OsString>,
    /// How long every agent may take to report a digest as programmed.
    pub ready_timeout: Duration,
    /// How often the control socket is asked.
    pub poll_interval: Duration,
}

impl AgentConfig {
    pub fn new(binary: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            binary: binary.into(),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(20),
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    pub child: Child,
    pub proc: Proc,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    pub log: PathBuf,
}

/// Everything needed to start one node's agent.
pub struct AgentSpec<'a> {
    pub node: &'a str,
    pub netns: &'a str,
    pub source_dir: &'a Path,
    pub pin_root: &'a Path,
    pub runtime_dir: &'a Path,
}

/// Start the agent of one node; its output goes to `<runtime dir>/<node>.log`.
pub fn spawn(cfg: &AgentConfig, spec: &AgentSpec<'_>) -> Result<Agent, LabError> {
    std::fs::create_dir_all(spec.runtime_dir).map_err(LabError::io(format!(
        "creating {}",
        spec.runtime_dir.display()
    )))?;
    let socket = spec.runtime_dir.join(format!("{}.sock", spec.node));
    let log = spec.runtime_dir.join(format!("{}.log", spec.node));
    let _ = std::fs::remove_file(&socket);
    let out = File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(LabError::io("duplicating the log descriptor"))?;
    let mut source = OsString::from("dir:");
    source.push(spec.source_dir);
    let child = Command::new(&cfg.binary)
        .arg("agent")
        .arg("--source")
        .arg(source)
        .arg("--node-name")
        .arg(spec.node)
        .arg("--pin-root")
        .arg(spec.pin_root)
        .arg("--control-socket")
        .arg(&socket)
        .arg("--netns")
        .arg(super::netns::path(spec.netns))
        // Identity and rule numbering of this node's agent, gone with the lab.
        .arg("--state-dir")
        .arg(spec.runtime_dir.join(format!("{}-state", spec.node)))
        .args(&cfg.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| LabError::Agent {
            node: spec.node.to_string(),
            message: format!("starting {}: {e}", cfg.binary.display()),
        })?;
    let proc = Proc::of(child.id());
    Ok(Agent {
        node: spec.node.to_string(),
        child,
        proc,
        socket,
        pin_root: spec.pin_root.to_path_buf(),
        log,
    })
}

impl Agent {
    /// SIGTERM, then SIGKILL after `grace`; reaps the child.
    pub fn stop(&mut self, grace: Duration) {
        terminate(&self.proc, grace);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of the agent's log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The digest of a source directory, computed exactly as the agents compute it.
pub fn source_digest(dir: &Path) -> Result<String, LabError> {
    crate::source::digest::dir_digest(dir)
        .map_err(LabError::io(format!("digest of {}", dir.display())))
}

/// The digest an agent reports as fully programmed (None: nothing programmed yet), or an
/// error if its control socket does not answer (yet).
pub fn programmed_digest(
    rt: &tokio::runtime::Runtime,
    node: &str,
    socket: &Path,
) -> Result<Option<String>, LabError> {
    rt.block_on(crate::control::client::status(socket))
        .map(|s| s.programmed_digest)
        .map_err(|e| LabError::Agent {
            node: node.to_string(),
            message: e.to_string(),
        })
}

/// Wait until every agent reports `digest` as programmed. Fails at once if an agent exits,
/// and after `cfg.ready_timeout` with the last thing each lagging agent said.
pub fn wait_programmed(
    cfg: &AgentConfig,
    agents: &mut [Agent],
    digest: &str,
) -> Result<(), LabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LabError::io("building the control client runtime"))?;
    let deadline = Instant::now() + cfg.ready_timeout;
    let mut done = vec![false; agents.len()];
    loop {
        let mut last: Vec<String> = Vec::new();
        for (a, ok) in agents.iter_mut().zip(done.iter_mut()) {
            if *ok {
                continue;
            }
            if let Ok(Some(status)) = a.child.try_wait() {
                return Err(LabError::Agent {
                    node: a.node.clone(),
                    message: format!("exited ({status}); log:\n{}", a.log_tail(20)),
                });
            }
            match programmed_digest(&rt, &a.node, &a.socket) {
                Ok(Some(d)) if d == digest => *ok = true,
                Ok(other) => last.push(format!("{}: programmed {other:?}", a.node)),
                Err(e) => last.push(e.to_string()),
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: format!(
                    "agents to program source digest {digest} ({})",
                    last.join("; ")
                ),
                after: cfg.ready_timeout,
            });
        }
        std::thread::sleep(cfg.poll_interval);
    }
}

/// Per-agent verdict counters, for cross-checking a probe against what the datapath counted
/// (DESIGN.md, "The lab"). Boundary: the agent's `/metrics` over its control socket.
///
/// Every `moat_verdicts_total` and `moat_policy_rule_packets_total` series of one scrape, as
/// (`name{labels}` exactly as the agent wrote it, value), in scrape order.
pub fn verdict_counters(agent: &Agent) -> Result<Vec<(String, u64)>, LabError> {
    let text = scrape(&agent.node, &agent.socket)?;
    Ok(parse_counters(&text, VERDICT_FAMILIES))
}

/// The counter families [`verdict_counters`] keeps.
pub const VERDICT_FAMILIES: &[&str] = &["moat_verdicts_total", "moat_policy_rule_packets_total"];

/// One `/metrics` scrape of the agent of `node` (the OpenMetrics text).
pub fn scrape(node: &str, socket: &Path) -> Result<String, LabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LabError::io("building the control client runtime"))?;
    let err = |message: String| LabError::Agent {
        node: node.to_string(),
        message,
    };
    let (code, body) = rt
        .block_on(crate::control::client::get(socket, "/metrics"))
        .map_err(|e| err(e.to_string()))?;
    if code != 200 {
        return Err(err(format!(
            "GET /metrics: HTTP {code}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    String::from_utf8(body.to_vec()).map_err(|e| err(format!("/metrics is not UTF-8: {e}")))
}

/// The samples of the named counter families in an OpenMetrics/Prometheus text, as
/// (`name{labels}`, value). Comments, other families and non-integer values are skipped.
pub fn parse_counters(text: &str, families: &[&str]) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let name_end = l.find(['{', ' ']).unwrap_or(l.len());
            if !families.contains(&&l[..name_end]) {
                return None;
            }
            // The value follows the series: after the closing brace if there are labels
            // (label values may contain spaces), else after the name. An optional timestamp
            // may follow the value.
            let series_end = match l[name_end..].starts_with('{') {
                true => name_end + closing_brace(&l[name_end..])? + 1,
                false => name_end,
            };
            let value = l[series_end..].split_whitespace().next()?;
            let value = value
                .parse::<u64>()
                .ok()
                .or_else(|| value.parse::<f64>().ok().map(|f| f as u64))?;
            Some((l[..series_end].to_string(), value))
        })
        .collect()
}

/// The index of the brace closing a label set that starts at `s[0] == '{'`, honouring quoted
/// label values with escapes.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (false, _, '"') => quoted = true,
            (false, _, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

/// The labels of a series `name{a="x",b="y"}` (unescaped values).
pub fn series_labels(series: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Some(open) = series.find('{') else {
        return out;
    };
    let mut rest = &series[open + 1..];
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        let mut chars = rest[eq + 1..].char_indices();
        if !matches!(chars.next(), Some((_, '"'))) {
            break;
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            match (escaped, c) {
                (true, 'n') => {
                    value.push('\n');
                    escaped = false
                }
                (true, c) => {
                    value.push(c);
                    escaped = false
                }
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                (false, c) => value.push(c),
            }
        }
        let Some(end) = end else { break };
        out.insert(key, value);
        rest = &rest[end..];
    }
    out
}

/// The series name of `name{labels}`.
pub fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// Packets the datapath dropped, summed over `moat_verdicts_total{verdict="DROPPED"}`.
pub fn dropped_packets(counters: &[(String, u64)]) -> u64 {
    counters
        .iter()
        .filter(|(s, _)| {
            series_name(s) == "moat_verdicts_total"
                && series_labels(s).get("verdict").map(String::as_str) == Some("DROPPED")
        })
        .map(|(_, v)| v)
        .sum()
}

/// The outcome of [`probe_cross_checked`]: how many cells the probe saw blocked by a lost
/// packet (not by an HTTP status) and how many packets the agents' datapaths dropped meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropCrossCheck {
    /// Cells observed blocked for want of an answer (every skipped probe and every cell that
    /// got an HTTP response left out).
    pub blocked_cells: u64,
    /// Increase of `moat_verdicts_total{verdict="DROPPED"}`, summed over every agent.
    pub dropped_packets: u64,
}

impl DropCrossCheck {
    /// Every blocked cell is backed by at least one packet moat dropped (each blocked
    /// attempt lost at least its first packet). A blocked cell that moat did not drop (a
    /// drop outside moat, a dead server) makes the sums disagree unless other cells dropped
    /// more than once: this is a lower-bound check, not a cell-by-cell one.
    pub fn consistent(&self) -> bool {
        self.dropped_packets >= self.blocked_cells
    }
}

/// The cells of `report` observed blocked because nothing answered (see [`DropCrossCheck`]).
pub fn blocked_cells(report: &super::ProbeReport) -> u64 {
    report
        .probes
        .iter()
        .filter(|p| !p.skipped)
        .flat_map(|p| p.cells.iter())
        .filter(|c| {
            !c.observed && !c.detail.starts_with("status ") && !c.detail.starts_with("http status")
        })
        .count() as u64
}

/// Total DROPPED packets over all agents of a lab.
pub fn lab_dropped_packets(agents: &[Agent]) -> Result<u64, LabError> {
    agents
        .iter()
        .map(|a| verdict_counters(a).map(|c| dropped_packets(&c)))
        .sum()
}

/// Probe `scenario` on `lab` and cross-check the report against the agents' DROPPED counters
/// (read before and after the probe). Without agents, `dropped_packets` is 0.
pub fn probe_cross_checked(
    lab: &super::Lab,
    scenario: &super::LabScenario,
    opts: &super::ProbeOptions,
) -> Result<(super::ProbeReport, DropCrossCheck), LabError> {
    let before = lab_dropped_packets(lab.agents())?;
    let report = lab.probe(scenario, opts)?;
    let after = lab_dropped_packets(lab.agents())?;
    let check = DropCrossCheck {
        blocked_cells: blocked_cells(&report),
        dropped_packets: after.saturating_sub(before),
    };
    Ok((report, check))
}
