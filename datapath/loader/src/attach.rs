//! Attaching programs to interfaces with pinned links.
//!
//! TC hooks use TCX links and XDP uses XDP links. A link detaches when its last descriptor
//! closes unless it is pinned, so every link is pinned under `links/` the moment it exists:
//! the attachment then outlives the process (kill -9 included) and a restarted agent finds it
//! and keeps it, with the same program ids.
//!
//! Interfaces are looked up by name in the calling thread's network namespace: a caller
//! managing another namespace's interfaces must enter it first (setns before any runtime
//! starts).
use std::{fs, path::PathBuf};

use aya::programs::{
    LinkOrder, ProgramError,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifier, TcAttachOptions, TcAttachType},
    xdp::XdpMode,
};

use crate::{
    Datapath, Error, FLOOR, FROM_ENDPOINT, FROM_UPLINK, PREFILTER, Result, TO_ENDPOINT, io_err,
};

fn attach_err<'a>(what: &'static str, ifname: &'a str) -> impl FnOnce(String) -> Error + 'a {
    move |detail| Error::Attach {
        what,
        ifname: ifname.to_owned(),
        detail,
    }
}

impl Datapath {
    /// `links/<hook>@<ifname>`. bpffs refuses names containing '.', which interface names
    /// may have (VLANs: `eth0.100`), so '%' and '.' are percent-encoded.
    fn link_pin(&self, ifname: &str, hook: &str) -> PathBuf {
        let ifname = ifname.replace('%', "%25").replace('.', "%2e");
        self.layout_dir
            .join("links")
            .join(format!("{hook}@{ifname}"))
    }

    /// Attach `from-endpoint` (TC ingress) and `to-endpoint` (TC egress) to an endpoint's
    /// host-side interface. Idempotent: an attachment of the current programs stays as it is;
    /// one of an older build is replaced without a gap (the new link is in place before the
    /// old one goes).
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<()> {
        for (hook, name) in [
            (TcAttachType::Ingress, FROM_ENDPOINT),
            (TcAttachType::Egress, TO_ENDPOINT),
        ] {
            self.attach_tc(ifname, hook, name, name)?;
        }
        Ok(())
    }

    /// Attach the empty `floor` program where `attach_endpoint` attaches the endpoint programs
    /// (TC ingress and egress), for benchmarks: what any TC-based enforcement costs before it
    /// does anything. Links are pinned like the others (`floor-ingress@…`, `floor-egress@…`)
    /// and go with [`Datapath::reset`].
    pub fn attach_floor(&mut self, ifname: &str) -> Result<()> {
        for (hook, label) in [
            (TcAttachType::Ingress, "floor-ingress"),
            (TcAttachType::Egress, "floor-egress"),
        ] {
            self.attach_tc(ifname, hook, FLOOR, label)?;
        }
        Ok(())
    }

    /// Attach program `name` to `hook` of `ifname`, its link pinned as `<label>@<ifname>`.
    fn attach_tc(
        &mut self,
        ifname: &str,
        hook: TcAttachType,
        name: &'static str,
        label: &str,
    ) -> Result<()> {
        let pin = self.link_pin(ifname, label);
        let prog_id = self
            .programs
            .tc(name)
            .info()
            .map_err(|source| Error::Program { name, source })?
            .id();
        let attached = SchedClassifier::query_tcx(ifname, hook)
            .map_err(|e| attach_err("querying TCX", ifname)(e.to_string()))?
            .1;
        let ours_attached = attached.iter().any(|p| p.id() == prog_id);
        let old = if pin.exists() {
            if ours_attached {
                return Ok(());
            }
            // A pin of an older build, or of a deleted interface that had this name.
            Some(
                PinnedLink::from_pin(&pin)
                    .map_err(|e| attach_err("opening link", ifname)(e.to_string()))?,
            )
        } else {
            None
        };
        let prog = self.programs.tc(name);
        let id = prog
            .attach_with_options(
                ifname,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_err(name, ifname)(e.to_string()))?;
        let link = prog
            .take_link(id)
            .map_err(|e| attach_err(name, ifname)(e.to_string()))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| {
                attach_err(name, ifname)(e.to_string())
            })?;
        if let Some(old) = old {
            let _ = old.unpin();
        }
        fd_link
            .pin(&pin)
            .map_err(|e| attach_err("pinning link", ifname)(format!("{}: {e:?}", pin.display())))?;
        Ok(())
    }

    /// Detach both endpoint programs from `ifname` (no-op where nothing is attached; an
    /// interface that is already gone took its attachments with it).
    pub fn detach_endpoint(&mut self, ifname: &str) -> Result<()> {
        for name in [FROM_ENDPOINT, TO_ENDPOINT] {
            self.unpin_link(ifname, name)?;
        }
        Ok(())
    }

    /// Attach the uplink programs: the XDP prefilter and `from_uplink` (TC ingress, L7
    /// steering for flows from other nodes). Idempotent like `attach_endpoint`.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(ifname, TcAttachType::Ingress, FROM_UPLINK, FROM_UPLINK)?;
        self.attach_xdp(ifname)
    }

    fn attach_xdp(&mut self, ifname: &str) -> Result<()> {
        let pin = self.link_pin(ifname, PREFILTER);
        let prog_id = self
            .programs
            .prefilter
            .info()
            .map_err(|source| Error::Program {
                name: PREFILTER,
                source,
            })?
            .id();
        let old = if pin.exists() {
            let link = PinnedLink::from_pin(&pin)
                .map_err(|e| attach_err("opening link", ifname)(e.to_string()))?;
            if link_prog_id(&pin)? == Some(prog_id) && interface_exists(ifname) {
                return Ok(());
            }
            Some(link)
        } else {
            None
        };
        // An older link must go first: an interface takes one XDP program.
        if let Some(old) = old {
            drop(old.unpin());
        }
        let prog = &mut self.programs.prefilter;
        let id = prog
            .attach(ifname, XdpMode::Default)
            .map_err(|e: ProgramError| attach_err(PREFILTER, ifname)(e.to_string()))?;
        let link = prog
            .take_link(id)
            .map_err(|e| attach_err(PREFILTER, ifname)(e.to_string()))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| {
                attach_err(PREFILTER, ifname)(e.to_string())
            })?;
        fd_link
            .pin(&pin)
            .map_err(|e| attach_err("pinning link", ifname)(format!("{}: {e:?}", pin.display())))?;
        Ok(())
    }

    pub fn detach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.unpin_link(ifname, FROM_UPLINK)?;
        self.unpin_link(ifname, PREFILTER)
    }

    fn unpin_link(&self, ifname: &str, hook: &str) -> Result<()> {
        let pin = self.link_pin(ifname, hook);
        if !pin.exists() {
            return Ok(());
        }
        // Removing the pin and closing the last descriptor detaches the link.
        match PinnedLink::from_pin(&pin) {
            Ok(link) => drop(link.unpin().map_err(io_err(&pin))?),
            Err(_) => fs::remove_file(&pin).map_err(io_err(&pin))?,
        }
        Ok(())
    }

    /// Interfaces with pinned links, by hook: (interface, hook name). The reconciler compares
    /// them with the endpoints it expects, to detach leftovers.
    pub fn attachments(&self) -> Result<Vec<(String, String)>> {
        let dir = self.layout_dir.join("links");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = entry.map_err(io_err(&dir))?.file_name();
            if let Some((hook, ifname)) = name.to_string_lossy().split_once('@') {
                let ifname = ifname.replace("%2e", ".").replace("%25", "%");
                out.push((ifname, hook.to_owned()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Ids of the TCX programs attached to `ifname` for `hook`, in run order (all of them,
    /// not only moat's).
    pub fn tcx_program_ids(ifname: &str, hook: TcAttachType) -> Result<Vec<u32>> {
        let (_, progs) = SchedClassifier::query_tcx(ifname, hook)
            .map_err(|e| attach_err("querying TCX", ifname)(e.to_string()))?;
        Ok(progs.iter().map(|p| p.id()).collect())
    }
}

fn link_prog_id(pin: &std::path::Path) -> Result<Option<u32>> {
    let link = PinnedLink::from_pin(pin).map_err(|e| Error::Attach {
        what: "opening link",
        ifname: pin.display().to_string(),
        detail: e.to_string(),
    })?;
    let fd: FdLink = link.into();
    Ok(fd.info().ok().map(|i| i.program_id()))
}

fn interface_exists(ifname: &str) -> bool {
    nix_ifindex(ifname).is_some()
}

/// The ifindex of `ifname` in the calling thread's network namespace.
pub fn nix_ifindex(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: NUL-terminated name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
