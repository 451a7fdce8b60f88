//! The agents' input: one source directory per lab with `endpoints.yaml` (nodes, namespaces,
//! endpoints) and one file per policy (`NNN-<name>.yaml`, a single document of kind
//! NetworkPolicy, MoatNetworkPolicy or MoatClusterNetworkPolicy). Every agent of the lab reads
//! the same directory (`moat agent --source dir:<DIR>`), picks its node's endpoints by
//! `--node-name`, and reports the digest of what it programmed.
//!
//! Files are written atomically (a dot-file in the same directory, then a rename), so an
//! agent never reads half a file; stale policy files are removed after the new ones exist.

use super::LabError;
use super::plan::LabPlan;
use crate::api::Protocol;
use crate::selector::Labels;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub const ENDPOINTS_FILE: &str = "endpoints.yaml";

#[derive(Debug, Serialize)]
pub struct EndpointsFile {
    pub nodes: Vec<NodeEntry>,
    pub namespaces: Vec<NamespaceEntry>,
    pub endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Serialize)]
pub struct NodeEntry {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct NamespaceEntry {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointEntry {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: Labels,
    pub interface: String,
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPortEntry>,
}

#[derive(Debug, Serialize)]
pub struct NamedPortEntry {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl EndpointsFile {
    pub fn from_plan(plan: &LabPlan) -> EndpointsFile {
        EndpointsFile {
            nodes: plan
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.name.clone(),
                    addresses: vec![IpAddr::V4(n.ip4), IpAddr::V6(n.ip6)],
                    uplinks: n.uplinks.iter().map(|u| u.ifname.clone()).collect(),
                })
                .collect(),
            namespaces: plan
                .namespaces
                .iter()
                .map(|(name, labels)| NamespaceEntry {
                    name: name.clone(),
                    labels: labels.clone(),
                })
                .collect(),
            endpoints: plan
                .pods
                .iter()
                .map(|p| EndpointEntry {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    node: plan.nodes[p.node].name.clone(),
                    labels: p.labels.clone(),
                    interface: p.host_if.clone(),
                    ips: vec![IpAddr::V4(p.ip4), IpAddr::V6(p.ip6)],
                    named_ports: p
                        .named_ports
                        .iter()
                        .map(|c| NamedPortEntry {
                            name: c.name.clone(),
                            port: c.port,
                            protocol: c.protocol,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn to_yaml<T: Serialize>(v: &T) -> Result<String, LabError> {
    serde_saphyr::to_string(v).map_err(|e| LabError::Invalid(format!("writing YAML: {e}")))
}

/// Write `text` to `dir/name` atomically.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<(), LabError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    std::fs::write(&tmp, text).map_err(LabError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &dst).map_err(LabError::io(format!("writing {}", dst.display())))
}

/// The file name of policy `index` (0-based): `NNN-<metadata.name>.yaml`.
pub fn policy_file_name(index: usize, policy: &serde_json::Value) -> String {
    let name: String = policy
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("policy")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{:03}-{name}.yaml", index + 1)
}

/// A lab's source directory.
#[derive(Debug)]
pub struct SourceDir {
    path: PathBuf,
}

impl SourceDir {
    /// A fresh directory `/tmp/moat-lab-<id>-src…` (removed by [`SourceDir::remove`] or by
    /// the lab's state sweep).
    pub fn create(id: &str) -> Result<SourceDir, LabError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{id}-src", super::plan::PREFIX))
            .tempdir()
            .map_err(LabError::io("creating the lab source directory"))?;
        Ok(SourceDir { path: dir.keep() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write_endpoints(&self, plan: &LabPlan) -> Result<(), LabError> {
        let text = to_yaml(&EndpointsFile::from_plan(plan))?;
        write_atomic(&self.path, ENDPOINTS_FILE, &text)
    }

    /// Replace the policy files with `policies` (placeholders already resolved).
    pub fn write_policies(&self, policies: &[serde_json::Value]) -> Result<(), LabError> {
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (i, p) in policies.iter().enumerate() {
            wanted.insert(policy_file_name(i, p), to_yaml(p)?);
        }
        for (name, text) in &wanted {
            write_atomic(&self.path, name, text)?;
        }
        let rd = std::fs::read_dir(&self.path)
            .map_err(LabError::io(format!("listing {}", self.path.display())))?;
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != ENDPOINTS_FILE && name.ends_with(".yaml") && !wanted.contains_key(&name) {
                std::fs::remove_file(e.path())
                    .map_err(LabError::io(format!("removing {}", e.path().display())))?;
            }
        }
        Ok(())
    }

    pub fn remove(&self) -> Result<(), LabError> {
        super::state::remove_tree(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        let p = serde_json::json!({"metadata": {"name": "allow x/80", "namespace": "x"}});
        assert_eq!(policy_file_name(0, &p), "001-allow_x_80.yaml");
        assert_eq!(
            policy_file_name(41, &serde_json::json!({})),
            "042-policy.yaml"
        );
    }

    #[test]
    fn endpoints_file_is_what_the_file_source_reads() {
        let text = "name: t\nnamespaces: {x: {ns: x}, y: {ns: y}}\n\
            pods: {x/a: {pod: a}, y/b: {pod: b}}\n\
            namedPorts: {x/a: {serve-80-tcp: 80, dns: {port: 53, protocol: UDP}}}\n\
            nodes: {node-1: [x/a], node-2: [y/b]}\nprobes: []\n";
        let s = crate::lab::LabScenario::from_yaml(Path::new("t.yaml"), text).unwrap();
        let plan = LabPlan::new("t", &s).unwrap();
        let yaml = to_yaml(&EndpointsFile::from_plan(&plan)).unwrap();
        let back: crate::source::file::EndpointsFile =
            serde_saphyr::from_str_with_options(&yaml, crate::scenario::yaml_options())
                .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back.nodes.len(), 2);
        assert_eq!(back.nodes[0].uplinks, vec!["wire2".to_string()]);
        // Namespace `y` must stay the string "y" (YAML 1.1 would read a boolean).
        assert!(back.namespaces.iter().any(|n| n.name == "y"));
        let xa = back.endpoints.iter().find(|e| e.name == "a").unwrap();
        assert_eq!(xa.interface.as_deref(), Some("lxc2"));
        assert_eq!(xa.named_ports.len(), 2);
        assert_eq!(xa.ips.len(), 2);
    }
}
