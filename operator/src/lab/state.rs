//! What a lab owns, recorded before it is created, and the sweep that removes labs whose
//! owner is gone (a killed `moat lab probe`, a test that panicked past its drops).
//!
//! Ownership is the name prefix ([`PREFIX`]: namespaces `moat-lab-<id>-…`, pin roots
//! `<bpffs>/moat-lab-<id>-<node>`) plus a marker: the state file `/run/moat-lab/<id>.json`
//! naming the owner process (pid and start time, so a reused pid is not mistaken for it),
//! the agents it started, its source directory and runtime directory. A lab is stale when its
//! owner is not running; a namespace or pin root with the prefix but no state file is an
//! orphan of a run that died halfway through its own cleanup (the state file is written
//! before anything is created and removed last). Labs of live owners are never touched by
//! [`sweep`] with [`SweepMode::Stale`], so parallel runs (and parallel tests) coexist.

use super::LabError;
use super::netns;
use super::plan::PREFIX;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where state files and per-lab runtime directories (control sockets, agent logs) live.
pub const STATE_DIR: &str = "/run/moat-lab";

/// A process, identified beyond its pid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl Proc {
    pub fn current() -> Proc {
        let pid = std::process::id();
        Proc {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    pub fn of(pid: u32) -> Proc {
        Proc {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this very process is still running (not a zombie).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start) && !is_zombie(self.pid)
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn start_time(pid: u32) -> Option<u64> {
    // Fields after the name start at field 3 (state); start time is field 22.
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
}

/// Everything a lab owns.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub owner: Option<Proc>,
    pub scenario: String,
    pub netns: Vec<String>,
    pub pin_roots: Vec<PathBuf>,
    pub source_dir: Option<PathBuf>,
    pub agents: Vec<Proc>,
}

impl LabState {
    pub fn file(id: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{id}.json"))
    }

    /// Per-lab runtime directory (control sockets, agent logs).
    pub fn runtime_dir(id: &str) -> PathBuf {
        Path::new(STATE_DIR).join(id)
    }

    /// Write (or rewrite) the state file atomically.
    pub fn save(&self) -> Result<(), LabError> {
        std::fs::create_dir_all(STATE_DIR)
            .map_err(LabError::io(format!("creating {STATE_DIR}")))?;
        let path = Self::file(&self.id);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text).map_err(LabError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(LabError::io(format!("writing {}", path.display())))
    }

    pub fn load(path: &Path) -> Option<LabState> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn load_all() -> Vec<LabState> {
        let Ok(rd) = std::fs::read_dir(STATE_DIR) else {
            return Vec::new();
        };
        let mut v: Vec<LabState> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| Self::load(&p))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn owner_alive(&self) -> bool {
        self.owner.as_ref().is_some_and(Proc::alive)
    }

    /// Remove everything recorded here: agents (SIGTERM, then SIGKILL), namespaces, pin roots,
    /// the source and runtime directories, and the state file last. Best effort: keeps going
    /// past errors and returns the first.
    pub fn destroy(&self) -> Result<(), LabError> {
        let mut first: Option<LabError> = None;
        let mut note = |r: Result<(), LabError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        for a in &self.agents {
            terminate(a, Duration::from_secs(5));
        }
        for ns in &self.netns {
            note(netns::del(ns));
        }
        for root in &self.pin_roots {
            note(remove_tree(root));
        }
        if let Some(d) = &self.source_dir {
            note(remove_tree(d));
        }
        note(remove_tree(&Self::runtime_dir(&self.id)));
        let f = Self::file(&self.id);
        if let Err(e) = std::fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            note(Err(LabError::Io {
                context: format!("removing {}", f.display()),
                source: e,
            }));
        }
        first.map_or(Ok(()), Err)
    }
}

/// Remove a directory tree (a pin root is removed this way too: `Datapath::reset` is exactly
/// a `remove_dir_all` of the root). Missing is fine.
pub fn remove_tree(p: &Path) -> Result<(), LabError> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
            context: format!("removing {}", p.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// SIGTERM `p`, wait up to `grace`, then SIGKILL. Only if it is still that very process.
pub fn terminate(p: &Proc, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if !p.alive() {
        return;
    }
    let pid = Pid::from_raw(p.pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !p.alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if p.alive() {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// The lab id in a name with the lab prefix (`moat-lab-<id>-…`).
pub fn id_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    let id = rest.split('-').next()?;
    (!id.is_empty()).then_some(id)
}

/// Which labs a sweep removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepMode {
    /// Only labs whose owner is gone (safe beside other running labs).
    Stale,
    /// Every lab: live owners get SIGTERM first (they clean up themselves), and whatever is
    /// left is removed (`moat lab down`).
    All,
}

/// Remove labs per `mode`; returns the ids removed.
pub fn sweep(mode: SweepMode, bpffs: &Path) -> Result<Vec<String>, LabError> {
    // Names first, states second: a lab created in between has its state file written
    // before its first namespace, so every name listed here belongs to a state listed below
    // or to a dead run.
    let names = netns::list(PREFIX);
    let pins = list_pin_roots(bpffs);
    let states = LabState::load_all();
    let me = std::process::id();
    let mut removed = Vec::new();
    let mut keep: Vec<String> = Vec::new();
    let mut first_err: Option<LabError> = None;
    for s in &states {
        if s.owner_alive() {
            let own = s.owner.as_ref().is_some_and(|o| o.pid == me);
            if mode == SweepMode::Stale || own {
                keep.push(s.id.clone());
                continue;
            }
            if let Some(o) = &s.owner {
                terminate(o, Duration::from_secs(15));
            }
        }
        // The owner may have cleaned up after SIGTERM; whatever remains goes.
        if let Some(s) = LabState::load(&LabState::file(&s.id)).or_else(|| Some(s.clone()))
            && let Err(e) = s.destroy()
        {
            first_err.get_or_insert(e);
        }
        removed.push(s.id.clone());
    }
    let known: Vec<&str> = states.iter().map(|s| s.id.as_str()).collect();
    for n in &names {
        let Some(id) = id_of(n) else { continue };
        if keep.iter().any(|k| k == id) {
            continue;
        }
        if let Err(e) = netns::del(n) {
            first_err.get_or_insert(e);
        }
        if !known.contains(&id) && !removed.iter().any(|r| r == id) {
            removed.push(id.to_string());
        }
    }
    for p in &pins {
        let Some(id) = p.file_name().and_then(|f| f.to_str()).and_then(id_of) else {
            continue;
        };
        if keep.iter().any(|k| k == id) {
            continue;
        }
        if let Err(e) = remove_tree(p) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

fn list_pin_roots(bpffs: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(bpffs) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_names() {
        assert_eq!(id_of("moat-lab-1fx0-n1p2"), Some("1fx0"));
        assert_eq!(id_of("moat-lab-1fx0-node-1"), Some("1fx0"));
        assert_eq!(id_of("moat-t12-n"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(Proc::current().alive());
        assert!(
            !Proc {
                pid: std::process::id(),
                start: 1
            }
            .alive()
        );
    }
}
