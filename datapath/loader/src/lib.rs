//! User-space handle on moat's datapath: loads the eBPF object, pins programs and maps under one
//! root on bpffs, attaches the programs to interfaces with pinned links, and offers typed
//! operations on the maps.
//!
//! Everything lives under `<root>/layout-<N>/`: `maps/` (pinned by name by the loader),
//! `progs-<object hash>/` (one directory per build of the eBPF object) and `links/` (one pinned
//! TCX or XDP link per interface and hook). A new process opens the same root and *adopts*
//! what is there: the maps keep their entries, the links stay attached, and the programs
//! keep their ids. Nothing is reset unless [`Datapath::reset`] is called.
mod attach;
mod events;
mod hints;
mod maps;
pub mod packet;
mod testrun;

use std::{
    fs,
    path::{Path, PathBuf},
};

pub use attach::nix_ifindex as ifindex;
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
pub use events::{AsyncEventStream, EVENT_FLUSH, EventStream};
pub use maps::{MapOp, PolicyEntryKey, RuleCounterKey, VerdictCounterKey};
use moat_common::{
    Config, Counter, CtKey, CtValue, EndpointInfo, EventState, IpcacheValue, LAYOUT_VERSION,
    PolicyKey, PolicyValue,
};
pub use testrun::{Hook, RunResult, SKB_CTX_LEN};

/// The eBPF object built by `build.rs` (aya-build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat-ebpf"));

/// Where a node's datapath is pinned unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/moat";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{root} holds datapath pins of layout {found}, this build uses layout {LAYOUT_VERSION}: \
         drain the node and reset the pins (`moat datapath reset`) to upgrade"
    )]
    LayoutMismatch { root: PathBuf, found: String },
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {name}: {source}")]
    Pin {
        name: &'static str,
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{what} on {ifname}: {detail}")]
    Attach {
        what: &'static str,
        ifname: String,
        detail: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The program names in the object (the `#[classifier]` / `#[xdp]` functions).
pub(crate) const FROM_ENDPOINT: &str = "from_endpoint";
pub(crate) const TO_ENDPOINT: &str = "to_endpoint";
pub(crate) const PREFILTER: &str = "prefilter";
pub(crate) const FLOOR: &str = "floor";
pub(crate) const FROM_UPLINK: &str = "from_uplink";

/// Typed handles on every map.
pub(crate) struct Maps {
    ipcache4_exact: HashMap<MapData, u32, IpcacheValue>,
    ipcache6_exact: HashMap<MapData, [u32; 4], IpcacheValue>,
    ipcache4: LpmTrie<MapData, u32, IpcacheValue>,
    ipcache6: LpmTrie<MapData, [u32; 4], IpcacheValue>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    endpoints_by_id: HashMap<MapData, u32, EndpointInfo>,
    policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    revision: Array<MapData, u32>,
    config: Array<MapData, Config>,
    /// An LRU hash in the kernel; user space sees it as a hash.
    conntrack: HashMap<MapData, CtKey, CtValue>,
    prefilter4: LpmTrie<MapData, u32, u32>,
    prefilter6: LpmTrie<MapData, [u32; 4], u32>,
    verdicts: PerCpuArray<MapData, Counter>,
    rules: PerCpuArray<MapData, Counter>,
    event_state: PerCpuArray<MapData, EventState>,
}

/// The loaded programs, opened from their pins.
pub(crate) struct Programs {
    from_endpoint: SchedClassifier,
    to_endpoint: SchedClassifier,
    prefilter: Xdp,
    from_uplink: SchedClassifier,
    floor: SchedClassifier,
}

/// One node's datapath. Owned by the reconciler; other tasks talk to it through channels.
pub struct Datapath {
    layout_dir: PathBuf,
    maps: Maps,
    programs: Programs,
    events: Option<EventStream>,
    hints: hints::Hints,
}

impl Datapath {
    /// Open the datapath pinned under `root`, loading and pinning whatever is missing. Existing
    /// maps, programs and links are adopted as they are.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(io_err(root))?;
        check_bpffs(root)?;
        let layout_dir = root.join(format!("layout-{LAYOUT_VERSION}"));
        for entry in fs::read_dir(root).map_err(io_err(root))? {
            let name = entry.map_err(io_err(root))?.file_name();
            let name = name.to_string_lossy();
            if let Some(found) = name.strip_prefix("layout-")
                && found != LAYOUT_VERSION.to_string()
            {
                return Err(Error::LayoutMismatch {
                    root: root.to_owned(),
                    found: found.to_owned(),
                });
            }
        }
        let maps_dir = layout_dir.join("maps");
        let progs_dir = layout_dir.join(format!("progs-{:016x}", fnv1a(OBJECT)));
        for dir in [&maps_dir, &layout_dir.join("links")] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }

        // Maps named in the object are created and pinned by name, or reopened from their pins.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        if ![FROM_ENDPOINT, TO_ENDPOINT, FROM_UPLINK, PREFILTER, FLOOR]
            .iter()
            .all(|p| progs_dir.join(p).exists())
        {
            install_programs(&mut ebpf, &progs_dir)?;
        }
        let programs = Programs::from_pins(&progs_dir)?;
        let maps = Maps::take(&mut ebpf)?;
        let events = EventStream::take(&mut ebpf)?;
        let mut dp = Datapath {
            layout_dir,
            maps,
            programs,
            events: Some(events),
            hints: hints::Hints::default(),
        };
        dp.hints = hints::Hints::new(&dp.policy()?, &dp.endpoints()?);
        // A fresh config array reads as zeros; the programs fall back to the defaults until
        // it is written, so writing it here changes nothing for adopted pins.
        if dp.config()? == Config::default() {
            dp.set_config(Config::DEFAULT)?;
        }
        Ok(dp)
    }

    /// Remove every pin under `root`: maps, programs and links. Enforcement stops on every
    /// interface this root was attached to. The explicit, destructive counterpart of `open`.
    pub fn reset(root: impl AsRef<Path>) -> Result<()> {
        let root = root.as_ref();
        match fs::remove_dir_all(root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(root)(e)),
            _ => Ok(()),
        }
    }

    /// The directory holding this layout's pins.
    pub fn layout_dir(&self) -> &Path {
        &self.layout_dir
    }

    /// Kernel ids of the loaded programs (from-endpoint, to-endpoint, prefilter, floor).
    pub fn program_ids(&self) -> Result<[u32; 4]> {
        let id = |name, r: Result<aya::programs::ProgramInfo, _>| {
            r.map(|i| i.id())
                .map_err(|source| Error::Program { name, source })
        };
        Ok([
            id(FROM_ENDPOINT, self.programs.from_endpoint.info())?,
            id(TO_ENDPOINT, self.programs.to_endpoint.info())?,
            id(PREFILTER, self.programs.prefilter.info())?,
            id(FLOOR, self.programs.floor.info())?,
        ])
    }

    /// Take the event stream (once; later calls return `None`).
    pub fn take_events(&mut self) -> Option<EventStream> {
        self.events.take()
    }
}

/// Load every program into the kernel and pin it under `dir`. bpffs has no rename, so a crash
/// can leave a partial set: `open` only adopts a directory holding every program, and
/// starts a partial one over.
fn install_programs(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for name in [FROM_ENDPOINT, TO_ENDPOINT, FROM_UPLINK, FLOOR] {
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        prog.load()
            .map_err(|source| Error::Program { name, source })?;
        prog.pin(dir.join(name))
            .map_err(|source| Error::Pin { name, source })?;
    }
    let prog: &mut Xdp = program(ebpf, PREFILTER)?;
    prog.load().map_err(|source| Error::Program {
        name: PREFILTER,
        source,
    })?;
    prog.pin(dir.join(PREFILTER)).map_err(|source| Error::Pin {
        name: PREFILTER,
        source,
    })
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| Error::Program { name, source })
}

impl Programs {
    fn from_pins(dir: &Path) -> Result<Self> {
        let tc = |name: &'static str| {
            SchedClassifier::from_pin(dir.join(name))
                .map_err(|source| Error::Program { name, source })
        };
        Ok(Programs {
            from_endpoint: tc(FROM_ENDPOINT)?,
            to_endpoint: tc(TO_ENDPOINT)?,
            from_uplink: tc(FROM_UPLINK)?,
            floor: tc(FLOOR)?,
            prefilter: Xdp::from_pin(dir.join(PREFILTER), XdpAttachType::Interface).map_err(
                |source| Error::Program {
                    name: PREFILTER,
                    source,
                },
            )?,
        })
    }

    /// A TC program by its name in the object (one of the constants above).
    fn tc(&mut self, name: &str) -> &mut SchedClassifier {
        match name {
            FROM_ENDPOINT => &mut self.from_endpoint,
            TO_ENDPOINT => &mut self.to_endpoint,
            FROM_UPLINK => &mut self.from_uplink,
            FLOOR => &mut self.floor,
            _ => unreachable!("{name} is not one of moat's TC programs"),
        }
    }
}

fn check_bpffs(path: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::NotBpffs(path.to_owned()))?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs(path.to_owned()));
    }
    Ok(())
}

/// FNV-1a: a stable fingerprint of the object for the programs' pin directory (std's hasher
/// makes no stability promise across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}
