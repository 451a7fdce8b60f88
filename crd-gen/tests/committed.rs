//! The committed CRDs must be exactly what the Rust types generate: a type change without
//! `cargo run -p crd-gen` fails here instead of shipping a schema the API server disagrees with.

#[test]
fn committed_crds_match_the_types() {
    for (name, yaml) in crd_gen::manifests().unwrap() {
        let path = crd_gen::crd_dir().join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == yaml,
            "{} differs from what the types generate; run `cargo run -p crd-gen` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_have_names_scope_and_columns() {
    let all = crd_gen::manifests().unwrap();
    let (_, mnp) = &all[0];
    assert!(mnp.contains("scope: Namespaced") && mnp.contains("- mnp"));
    assert!(mnp.contains("jsonPath: .status.selectedEndpoints"));
    let (_, mcnp) = &all[1];
    assert!(mcnp.contains("scope: Cluster") && mcnp.contains("- mcnp"));
    assert!(mcnp.contains("denySources"));
}
