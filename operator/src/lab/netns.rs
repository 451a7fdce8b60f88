//! Named network namespaces (`/run/netns/<name>`, the iproute2 convention every tool and the
//! agent's `--netns` flag understand) and running code inside one.
//!
//! Creation shells out to `ip netns add`: a named namespace is a bind mount of the namespace
//! file under `/run/netns`, and iproute2 first makes that directory a shared mount point so
//! the name propagates to every mount namespace (including those `ip netns exec` makes).
//! Doing that dance here would duplicate iproute2's exact semantics for no gain; everything
//! inside the namespaces (links, addresses, routes) is done over rtnetlink ([`super::netlink`]).
//! Deletion is a lazy unmount and an unlink, as `ip netns del` does.
//!
//! Code that must run in a namespace runs on a dedicated thread that enters it with setns(2)
//! ([`in_netns`]): setns moves only the calling thread, so the caller and every other thread
//! (and any runtime) stay where they are. Sockets keep the namespace they were created in, so
//! a socket made on such a thread can be used from anywhere afterwards. Never `ip netns exec`
//! for anything that needs bpffs: it remounts `/sys`.

use super::LabError;
use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Create the named namespace `name` (fails if it exists).
pub fn add(name: &str) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .map_err(LabError::io(
            "running ip netns add (is iproute2 installed?)",
        ))?;
    if !out.status.success() {
        return Err(LabError::Io {
            context: format!("ip netns add {name}"),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Delete the named namespace `name` (its interfaces go with it once nothing else holds it).
/// A name that does not exist is not an error.
pub fn del(name: &str) -> Result<(), LabError> {
    let p = path(name);
    if !p.exists() {
        return Ok(());
    }
    // EINVAL: not a mount point (a half-made namespace); the unlink below still applies.
    match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(LabError::Io {
                context: format!("unmounting {}", p.display()),
                source: e.into(),
            });
        }
    }
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
            context: format!("removing {}", p.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Every named namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Open a named namespace (the handle setns takes).
pub fn open(name: &str) -> Result<File, LabError> {
    let p = path(name);
    File::open(&p).map_err(LabError::io(format!("opening {}", p.display())))
}

/// Move the calling thread into the namespace `ns`. Only for threads this module's callers
/// own for that purpose (a probe worker, an [`in_netns`] thread): never on a thread that runs
/// an async runtime or code that expects the root namespace.
pub fn enter(ns: &File) -> Result<(), LabError> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Io {
        context: "setns(CLONE_NEWNET)".into(),
        source: e.into(),
    })
}

/// Run `f` on a new thread inside the named namespace and return its result.
pub fn in_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> Result<T, LabError> + Send,
) -> Result<T, LabError> {
    let ns = open(name)?;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("moat-lab-netns".into())
            .spawn_scoped(s, move || {
                enter(&ns)?;
                f()
            })
            .map_err(LabError::io("spawning a namespace thread"))?
            .join()
            .unwrap_or_else(|_| Err(LabError::Invalid(format!("thread in {name} panicked"))))
    })
}

/// Write a sysctl of the calling thread's network namespace (`net.ipv4.ip_forward` ->
/// `/proc/sys/net/ipv4/ip_forward`; `/proc/sys/net` shows the opener's namespace).
pub fn sysctl(key: &str, value: &str) -> Result<(), LabError> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).map_err(LabError::io(format!("writing {p}")))
}
