//! Builds the eBPF crate (nightly, bpfel, bpf-linker) with aya-build, as the aya template does;
//! the object lands in OUT_DIR and is embedded by `include_bytes_aligned!`.
fn main() -> aya_build::Result<()> {
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
