//! Writes `config/crd/*.yaml` (or the directory given as the first argument).

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(crd_gen::crd_dir);
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in crd_gen::manifests()? {
        let path = dir.join(name);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
