//! Builds the eBPF crate (nightly, bpfel, bpf-linker) with aya-build, as the aya template does;
//! the object lands in OUT_DIR and is embedded by `include_bytes_aligned!`.
use std::path::Path;

/// Every file under `dir`, so that a change to any source of the eBPF object (its own crate
/// and the shared `common` crate) rebuilds it: a directory in `rerun-if-changed` only
/// notices entries being added or removed.
fn rerun_if_any_changed(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rerun_if_any_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() -> aya_build::Result<()> {
    let datapath = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["ebpf", "common"] {
        rerun_if_any_changed(&datapath.join(krate).join("src"));
        println!(
            "cargo:rerun-if-changed={}",
            datapath.join(krate).join("Cargo.toml").display()
        );
    }
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "moat-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
