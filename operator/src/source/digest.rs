//! The digest of a source directory. The agent reports the digest of the source state it has
//! fully programmed; tools (the lab, the demo) compute the same function over what they wrote
//! and wait for it, instead of sleeping.
use std::{io, path::Path};

use sha2::{Digest, Sha256};

/// Whether the file source reads `path` (YAML files, not hidden, not editor leftovers).
pub fn is_source_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// SHA-256 over the sorted (name, content) pairs of the directory's source files, each
/// length-prefixed so that no two different directories hash alike.
pub fn dir_digest(dir: &Path) -> io::Result<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && is_source_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    let mut contents = Vec::with_capacity(files.len());
    for path in files {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        contents.push((name, std::fs::read(&path)?));
    }
    Ok(digest_of(
        contents.iter().map(|(n, c)| (n.as_str(), c.as_slice())),
    ))
}

/// The digest of named contents, in the order given.
pub fn digest_of<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (name, content) in items {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((content.len() as u64).to_le_bytes());
        h.update(content);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "x: 1").unwrap();
        let d1 = dir_digest(dir.path()).unwrap();
        std::fs::write(dir.path().join(".a.yaml.swp"), "junk").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "junk").unwrap();
        assert_eq!(
            dir_digest(dir.path()).unwrap(),
            d1,
            "non-source files are ignored"
        );
        std::fs::write(dir.path().join("a.yaml"), "x: 2").unwrap();
        assert_ne!(dir_digest(dir.path()).unwrap(), d1);
        // Moving bytes between name and content changes the digest.
        assert_ne!(
            digest_of([("ab", &b"c"[..])]),
            digest_of([("a", &b"bc"[..])])
        );
    }
}
