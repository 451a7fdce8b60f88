//! Rebuild the programs when bpf-linker changes (a rebuilt linker may emit different code).
fn main() {
    let bpf_linker =
        which::which("bpf-linker").expect("bpf-linker not found: run `make toolchain`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
