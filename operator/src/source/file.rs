//! The standalone source: a directory holding `endpoints.yaml` (nodes, namespaces, endpoints)
//! and policy files (any other `*.yaml`, one or more documents of kind `NetworkPolicy`,
//! `MoatNetworkPolicy` or `MoatClusterNetworkPolicy`), re-read on every change (inotify).
//!
//! Bad input loses nothing: a file that does not parse is reported with its name, line and
//! reason, and the last good version of that file stays in force (a file that never parsed
//! contributes nothing); every other file is used as it is.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use super::{
    SourceState,
    digest::{digest_of, is_source_file},
};
use crate::{
    api::Protocol,
    model::{ContainerPort, Endpoint, Model, Namespace, Node, Phase, Policy},
    scenario::yaml_options,
    selector::Labels,
};

/// Quiet time that ends a burst of directory events.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(5);

/// The name of the endpoints file in a source directory.
pub const ENDPOINTS_FILE: &str = "endpoints.yaml";

/// `endpoints.yaml`: what a cluster's API server would tell the agent about nodes,
/// namespaces and pods.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsFile {
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Interfaces facing other nodes: the XDP prefilter goes there.
    #[serde(default)]
    pub uplinks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
    #[serde(default)]
    pub labels: Labels,
    /// Host-side interface in the node's network namespace (local endpoints).
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub named_ports: Vec<NamedPortSpec>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedPortSpec {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl EndpointsFile {
    /// The model for `local_node`, without policies.
    pub fn model(&self, local_node: &str) -> Model {
        Model {
            local_node: local_node.to_owned(),
            namespaces: self
                .namespaces
                .iter()
                .map(|n| Namespace {
                    name: n.name.clone(),
                    labels: n.labels.clone(),
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| Node {
                    name: n.name.clone(),
                    addresses: n.addresses.clone(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    name: e.name.clone(),
                    namespace: e.namespace.clone(),
                    node: e.node.clone(),
                    labels: e.labels.clone(),
                    addresses: e.ips.clone(),
                    ports: e
                        .named_ports
                        .iter()
                        .map(|p| ContainerPort {
                            name: p.name.clone(),
                            protocol: p.protocol,
                            port: p.port,
                        })
                        .collect(),
                    revision: None,
                    interface: e.interface.clone(),
                    host_network: e.host_network,
                    phase: Phase::Running,
                })
                .collect(),
            policies: Vec::new(),
        }
    }
}

/// Reads a source directory, remembering the last good version of every file.
pub struct FileSource {
    dir: PathBuf,
    node: String,
    endpoints: Option<EndpointsFile>,
    policies: BTreeMap<String, Vec<Policy>>,
    /// The text each file had when it was last parsed, and its error if it was bad: an
    /// unchanged file is not parsed again, so one edit costs one file's parse, not the
    /// directory's.
    seen: BTreeMap<String, (String, Option<String>)>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        FileSource {
            dir: dir.into(),
            node: node.into(),
            endpoints: None,
            policies: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read the directory once. The digest is computed over the very bytes that were parsed.
    pub fn load(&mut self) -> SourceState {
        let mut errors = Vec::new();
        let files = match read_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!("{}: {e}", self.dir.display()));
                Vec::new()
            }
        };
        let digest = digest_of(files.iter().map(|(n, c)| (n.as_str(), c.as_bytes())));
        let present: BTreeSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        self.policies
            .retain(|name, _| present.contains(name.as_str()));

        self.seen.retain(|name, _| present.contains(name.as_str()));
        for (name, text) in &files {
            if let Some((seen, error)) = self.seen.get(name)
                && seen == text
            {
                errors.extend(error.clone());
                continue;
            }
            let error = if name == ENDPOINTS_FILE {
                match serde_saphyr::from_str_with_options::<EndpointsFile>(text, yaml_options()) {
                    Ok(f) => {
                        self.endpoints = Some(f);
                        None
                    }
                    Err(e) => Some(format!("{name}: {e}")),
                }
            } else {
                match parse_policies(text) {
                    Ok(p) => {
                        self.policies.insert(name.clone(), p);
                        None
                    }
                    Err(e) => Some(format!("{name}: {e}")),
                }
            };
            errors.extend(error.clone());
            self.seen.insert(name.clone(), (text.clone(), error));
        }
        if !present.contains(ENDPOINTS_FILE) {
            errors.push(format!(
                "{ENDPOINTS_FILE}: missing from {}",
                self.dir.display()
            ));
        }

        let endpoints = self.endpoints.clone().unwrap_or_default();
        let mut model = endpoints.model(&self.node);
        let mut seen = BTreeSet::new();
        for (name, policies) in &self.policies {
            for p in policies {
                let r = p.reference();
                if seen.insert(r.clone()) {
                    model.policies.push(p.clone());
                } else {
                    errors.push(format!(
                        "{name}: {r} is defined in more than one file; ignored here"
                    ));
                }
            }
        }
        let uplinks = endpoints
            .nodes
            .iter()
            .find(|n| n.name == self.node)
            .map(|n| n.uplinks.clone())
            .unwrap_or_default();
        SourceState {
            model,
            uplinks,
            digest,
            errors,
            observed: Some(std::time::Instant::now()),
        }
    }

    /// Publish the directory's state now and after every change, until the receiver side
    /// is gone.
    pub async fn watch(mut self, tx: watch::Sender<Arc<SourceState>>) -> notify::Result<()> {
        use notify::Watcher as _;
        use notify::event::{AccessKind, AccessMode, EventKind};
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Opening or reading a file is an event too (inotify IN_OPEN), and every load
            // opens every file: counting those made each load schedule the next, a reload
            // every SETTLE for ever. A close after writing still counts.
            if let Ok(e) = &ev
                && matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            let _ = ev_tx.send(ev.is_ok());
        })?;
        watcher.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
        let mut last = self.load();
        if tx.send(Arc::new(last.clone())).is_err() {
            return Ok(());
        }
        while ev_rx.recv().await.is_some() {
            let observed = std::time::Instant::now();
            // Writing one file is a burst of events (truncate, write, close): read once the
            // directory has been quiet for a moment, not on a half-written file.
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE, ev_rx.recv()).await {}
            let mut state = self.load();
            state.observed = Some(observed);
            if state.digest != last.digest || state.errors != last.errors {
                last = state.clone();
                if tx.send(Arc::new(state)).is_err() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// (file name, content) of every source file, sorted by name.
fn read_files(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.is_file() || !is_source_file(&path) {
            continue;
        }
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        match std::fs::read_to_string(&path) {
            Ok(text) => out.push((name, text)),
            // Deleted between listing and reading: it is gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Every document of a policy file. One bad document makes the whole file bad, so that a
/// file is always taken whole or not at all.
fn parse_policies(text: &str) -> Result<Vec<Policy>, String> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options())
            .map_err(|e| e.to_string())?;
    docs.into_iter()
        .filter(|d| !d.is_null())
        .enumerate()
        .map(|(i, d)| Policy::from_value(d).map_err(|e| format!("document {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDPOINTS: &str = r#"
nodes:
  - name: node-1
    addresses: [10.244.1.1]
    uplinks: [wire0]
namespaces:
  - name: x
    labels: {ns: x}
endpoints:
  - name: a
    namespace: x
    node: node-1
    labels: {pod: a}
    interface: lxc1a
    ips: [10.244.1.2]
    namedPorts: [{name: http, port: 80}]
"#;

    const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

    #[test]
    fn loads_endpoints_and_policies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ENDPOINTS_FILE), ENDPOINTS).unwrap();
        std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
        let s = FileSource::new(dir.path(), "node-1").load();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.uplinks, ["wire0"]);
        assert_eq!(s.model.endpoints[0].interface.as_deref(), Some("lxc1a"));
        assert_eq!(s.model.endpoints[0].ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.model.policies.len(), 1);
        assert_eq!(
            s.digest,
            super::super::digest::dir_digest(dir.path()).unwrap()
        );
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version_and_reports_where() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ENDPOINTS_FILE), ENDPOINTS).unwrap();
        std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
        let mut src = FileSource::new(dir.path(), "node-1");
        assert_eq!(src.load().model.policies.len(), 1);
        std::fs::write(
            dir.path().join("p.yaml"),
            "kind: NetworkPolicy\nspec: [unclosed\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("q.yaml"),
            "kind: Bogus\nmetadata: {name: q}\n",
        )
        .unwrap();
        let s = src.load();
        assert_eq!(s.model.policies.len(), 1, "the last good p.yaml stays");
        assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
        assert!(
            s.errors[0].starts_with("p.yaml: ") && s.errors[0].contains("line"),
            "{:?}",
            s.errors
        );
        assert!(
            s.errors[1].contains("q.yaml") && s.errors[1].contains("Bogus"),
            "{:?}",
            s.errors
        );
        // Deleting the file removes its policies.
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        assert!(src.load().model.policies.is_empty());
    }

    #[tokio::test]
    async fn watch_publishes_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ENDPOINTS_FILE), ENDPOINTS).unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(SourceState::default()));
        let src = FileSource::new(dir.path(), "node-1");
        tokio::spawn(src.watch(tx));
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().model.policies.is_empty());
        std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let s = rx.borrow().clone();
        assert_eq!(s.model.policies.len(), 1);
        assert_eq!(
            s.digest,
            super::super::digest::dir_digest(dir.path()).unwrap()
        );
    }
}
