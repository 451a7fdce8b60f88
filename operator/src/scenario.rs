//! Loader for conformance scenarios (`e2e/scenarios/*.yaml`, format in its README): a cluster
//! state (namespaces, pods, named ports, policies) and the reachability matrices expected of
//! it. The compiler tests and the lab both read scenarios through this, so the two can never
//! disagree on what a file means.
//!
//! YAML is read with `serde-saphyr`: a maintained pure-Rust parser (no unsafe C port like the
//! archived `serde_yaml`'s libyaml), panic-free on hostile input, with budgets on nesting and
//! size, and it deserializes straight into serde types.

use crate::api::Protocol;
use crate::model::{ContainerPort, Policy};
use crate::selector::Labels;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// YAML 1.2 reading: only `true`/`false` are booleans, so a label value `y` or `on` stays the
/// string it is meant to be (YAML 1.1's `y` = true would turn namespace `y` into a boolean).
pub fn yaml_options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.strict_booleans = true;
    o
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("policy {index}: {message}")]
    Policy { index: usize, message: String },
    #[error("placeholder ${{{pod}.ip}}: no such pod, or it has no address")]
    UnknownPod { pod: String },
}

/// A named port as the file writes it: a bare number is TCP.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NamedPort {
    Number(u16),
    Full {
        port: u16,
        #[serde(default)]
        protocol: Option<Protocol>,
    },
}

/// One reachability matrix.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    /// Source pod -> destination pods it must reach; every other pair must be blocked.
    pub expect: BTreeMap<String, Vec<String>>,
}

impl Probe {
    /// Whether the matrix says `from` reaches `to`.
    pub fn reachable(&self, from: &str, to: &str) -> bool {
        self.expect
            .get(from)
            .is_some_and(|l| l.iter().any(|t| t == to))
    }
}

/// A scenario file. Provenance fields (context, source, notes, upstreamCalls) are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scenario {
    pub name: String,
    pub namespaces: BTreeMap<String, Labels>,
    /// `ns/pod` -> labels.
    pub pods: BTreeMap<String, Labels>,
    #[serde(default)]
    pub named_ports: BTreeMap<String, BTreeMap<String, NamedPort>>,
    /// Policy objects as written, with `${ns/pod.ip}` placeholders unresolved.
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
    pub probes: Vec<Probe>,
}

impl Scenario {
    pub fn from_yaml(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
            ScenarioError::Parse {
                path: path.into(),
                message: e.to_string(),
            }
        })
    }

    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Every `*.yaml` of a directory, sorted by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<(String, Scenario)>, ScenarioError> {
        let io = |source| ScenarioError::Io {
            path: dir.into(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Scenario::load(&p).map(|s| (name, s))
            })
            .collect()
    }

    /// The named container ports of pod `ns/pod`.
    pub fn container_ports(&self, pod: &str) -> Vec<ContainerPort> {
        self.named_ports
            .get(pod)
            .into_iter()
            .flatten()
            .map(|(name, p)| {
                let (port, protocol) = match p {
                    NamedPort::Number(n) => (*n, Protocol::Tcp),
                    NamedPort::Full { port, protocol } => (*port, protocol.unwrap_or_default()),
                };
                ContainerPort {
                    name: name.clone(),
                    protocol,
                    port,
                }
            })
            .collect()
    }

    /// The policies with placeholders resolved by `ip_of(ns/pod)`.
    pub fn policies(
        &self,
        ip_of: &dyn Fn(&str) -> Option<IpAddr>,
    ) -> Result<Vec<Policy>, ScenarioError> {
        self.policies
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let v = resolve_value(v, ip_of)?;
                Policy::from_value(v).map_err(|message| ScenarioError::Policy { index, message })
            })
            .collect()
    }
}

fn resolve_value(
    v: &serde_json::Value,
    ip_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<serde_json::Value, ScenarioError> {
    use serde_json::Value;
    Ok(match v {
        Value::String(s) => Value::String(substitute(s, ip_of)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| resolve_value(x, ip_of))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), resolve_value(x, ip_of)?)))
                .collect::<Result<_, ScenarioError>>()?,
        ),
        other => other.clone(),
    })
}

/// Replaces `${ns/pod.ip}` with the pod's address and `${ns/pod.ip}/N` with the canonical /N
/// network that contains it (`${x/b.ip}/4` -> `0.0.0.0/4` for 10.244.0.7).
pub fn substitute(
    s: &str,
    ip_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<String, ScenarioError> {
    let re = regex::Regex::new(r"\$\{([^}]+)\.ip\}(/(\d+))?").expect("constant regex");
    let mut out = String::new();
    let mut last = 0;
    for c in re.captures_iter(s) {
        let m = c.get(0).expect("group 0 always matches");
        out.push_str(&s[last..m.start()]);
        let pod = &c[1];
        let ip = ip_of(pod).ok_or_else(|| ScenarioError::UnknownPod {
            pod: pod.to_string(),
        })?;
        match c.get(3).and_then(|n| n.as_str().parse::<u8>().ok()) {
            Some(len) => {
                let net = IpNet::new(ip, len).map_err(|_| ScenarioError::UnknownPod {
                    pod: pod.to_string(),
                })?;
                out.push_str(&net.trunc().to_string());
            }
            None => out.push_str(&ip.to_string()),
        }
        last = m.end();
    }
    out.push_str(&s[last..]);
    Ok(out)
}
