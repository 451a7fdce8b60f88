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
pub fn verdict_counters(agent: &Agent) -> Result<Vec<(String, u64)>, LabError> {
    Err(LabError::Agent {
        node: agent.node.clone(),
        message: "reading verdict counters is not implemented yet".into(),
    })
}
