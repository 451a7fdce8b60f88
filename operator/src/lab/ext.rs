//! The lab's extensions of the scenario format. The base format (namespaces, pods,
//! namedPorts, policies, probes with port/protocol/expect, `${ns/pod.ip}/N` placeholders) is
//! read by `crate::scenario` and nothing here reinterprets it; this module reads the same text
//! a second time for the optional keys only the lab needs. The loader ignores unknown keys,
//! so upstream files and moat's own files go through the same loader.
//!
//! ```yaml
//! nodes:                       # optional: node -> pods placed on it. Unlisted pods go on the
//!   node-1: [x/a, x/b]         # first node; without the key every pod is on `node-1`.
//!   node-2: [y/a]
//! deathstar:                   # optional: pods serving the Star Wars deathstar HTTP API
//!   port: 80                   # (default 80) instead of TCP echo on that port
//!   pods: [default/deathstar-1]
//! probes:
//!   - port: 80
//!     protocol: TCP
//!     family: IPv6             # optional, IPv4 (default) or IPv6: which pod address is probed
//!     http:                    # optional: an HTTP request instead of a TCP echo; the cell is
//!       method: PUT            # reachable iff the response status equals expectStatus.
//!       path: /v1/exhaust-port # Every pod serves the deathstar API on an HTTP-probed port.
//!       expectStatus: 503      # (default 200)
//!     expect: {...}
//! ```
//! Policies may be `MoatNetworkPolicy` / `MoatClusterNetworkPolicy` objects (the model reads
//! all three kinds), and may use `${ns/pod.ip6}` and `${ns/pod.ip6}/N`, the IPv6 counterparts
//! of the base placeholders (resolved by [`resolve_policies`]).

use super::LabError;
use crate::model::Policy;
use crate::scenario::Scenario;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// Which of a pod's addresses a probe targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    #[default]
    IPv4,
    IPv6,
}

/// An HTTP probe: the request to send and the status that counts as reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpProbe {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_status")]
    pub expect_status: u16,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}

/// The extension keys of one probe (aligned by index with `Scenario::probes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeExt {
    #[serde(default)]
    pub family: Family,
    #[serde(default)]
    pub http: Option<HttpProbe>,
}

/// Pods serving the deathstar API.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeathstarExt {
    #[serde(default = "default_http_port")]
    pub port: u16,
    #[serde(default)]
    pub pods: Vec<String>,
}

fn default_http_port() -> u16 {
    80
}

/// All extension keys of a scenario file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Extensions {
    #[serde(default)]
    pub nodes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub deathstar: Option<DeathstarExt>,
    #[serde(default)]
    pub probes: Vec<ProbeExt>,
}

/// A scenario as the lab runs it: the shared base format plus the lab's extensions.
#[derive(Clone, Debug)]
pub struct LabScenario {
    pub base: Scenario,
    pub ext: Extensions,
}

impl LabScenario {
    pub fn load(path: &Path) -> Result<LabScenario, LabError> {
        let text = std::fs::read_to_string(path)
            .map_err(LabError::io(format!("reading {}", path.display())))?;
        Self::from_yaml(path, &text)
    }

    pub fn from_yaml(path: &Path, text: &str) -> Result<LabScenario, LabError> {
        let base = Scenario::from_yaml(path, text)?;
        let ext: Extensions =
            serde_saphyr::from_str_with_options(text, crate::scenario::yaml_options()).map_err(
                |e| LabError::Invalid(format!("{}: lab extensions: {e}", path.display())),
            )?;
        let s = LabScenario { base, ext };
        s.validate()?;
        Ok(s)
    }

    pub fn name(&self) -> &str {
        &self.base.name
    }

    /// The extension keys of probe `i` (defaults where the file has none).
    pub fn probe_ext(&self, i: usize) -> ProbeExt {
        self.ext.probes.get(i).cloned().unwrap_or_default()
    }

    fn validate(&self) -> Result<(), LabError> {
        let pods = &self.base.pods;
        let mut seen = BTreeMap::new();
        for (node, list) in &self.ext.nodes {
            for p in list {
                if !pods.contains_key(p) {
                    return Err(LabError::Invalid(format!("nodes.{node}: no pod {p}")));
                }
                if let Some(other) = seen.insert(p.clone(), node.clone()) {
                    return Err(LabError::Invalid(format!(
                        "pod {p} placed on both {other} and {node}"
                    )));
                }
            }
        }
        if let Some(d) = &self.ext.deathstar {
            for p in &d.pods {
                if !pods.contains_key(p) {
                    return Err(LabError::Invalid(format!("deathstar.pods: no pod {p}")));
                }
            }
        }
        for p in pods.keys() {
            if p.split('/').count() != 2 || p.starts_with('/') || p.ends_with('/') {
                return Err(LabError::Invalid(format!("pod key {p:?} is not ns/name")));
            }
        }
        for (i, probe) in self.base.probes.iter().enumerate() {
            for (from, tos) in &probe.expect {
                for p in std::iter::once(from).chain(tos) {
                    if !pods.contains_key(p) {
                        return Err(LabError::Invalid(format!(
                            "probe {i} ({}/{}): expect names unknown pod {p}",
                            probe.protocol.as_str(),
                            probe.port
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The scenario's policy objects with every placeholder resolved: `${ns/pod.ip}` by `ip4_of`,
/// `${ns/pod.ip6}` by `ip6_of` (each with the optional canonical-`/N` form). Every object is
/// checked by the model's reader, so a broken policy fails here with its index.
pub fn resolve_policies(
    values: &[serde_json::Value],
    ip4_of: &dyn Fn(&str) -> Option<IpAddr>,
    ip6_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<Vec<serde_json::Value>, LabError> {
    values
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let v = resolve_value(v, ip4_of, ip6_of)?;
            Policy::from_value(v.clone()).map_err(|message| {
                LabError::Scenario(crate::scenario::ScenarioError::Policy { index, message })
            })?;
            Ok(v)
        })
        .collect()
}

/// Marks a rewritten `.ip6` placeholder for the shared substitution (`#` never appears in a
/// pod key, which is `ns/name` with DNS-label parts).
const V6_MARK: &str = "#6";

fn resolve_value(
    v: &serde_json::Value,
    ip4_of: &dyn Fn(&str) -> Option<IpAddr>,
    ip6_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<serde_json::Value, LabError> {
    use serde_json::Value;
    Ok(match v {
        Value::String(s) => Value::String(substitute(s, ip4_of, ip6_of)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| resolve_value(x, ip4_of, ip6_of))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), resolve_value(x, ip4_of, ip6_of)?)))
                .collect::<Result<_, LabError>>()?,
        ),
        other => other.clone(),
    })
}

/// One string: `${p.ip6}` is rewritten to `${p#6.ip}` so that the loader's own substitution
/// (and its canonical-/N rule) handles both families.
pub fn substitute(
    s: &str,
    ip4_of: &dyn Fn(&str) -> Option<IpAddr>,
    ip6_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<String, LabError> {
    let re = regex::Regex::new(r"\$\{([^}]+)\.ip6\}").expect("constant regex");
    let rewritten = re.replace_all(s, |c: &regex::Captures| {
        format!("${{{}{V6_MARK}.ip}}", &c[1])
    });
    let ip_of = |key: &str| match key.strip_suffix(V6_MARK) {
        Some(pod) => ip6_of(pod),
        None => ip4_of(key),
    };
    Ok(crate::scenario::substitute(&rewritten, &ip_of)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_of_both_families() {
        let v4 = |p: &str| (p == "x/a").then(|| "10.244.1.2".parse().unwrap());
        let v6 = |p: &str| (p == "x/a").then(|| "fd00:10:244:1::2".parse().unwrap());
        assert_eq!(
            substitute("${x/a.ip}/32 ${x/a.ip6}/128", &v4, &v6).unwrap(),
            "10.244.1.2/32 fd00:10:244:1::2/128"
        );
        assert_eq!(
            substitute("${x/a.ip6}/48", &v4, &v6).unwrap(),
            "fd00:10:244::/48"
        );
        assert_eq!(substitute("${x/a.ip}/4", &v4, &v6).unwrap(), "0.0.0.0/4");
        assert!(substitute("${x/b.ip6}", &v4, &v6).is_err());
    }

    #[test]
    fn extensions_parse_and_default() {
        let text = r#"
name: t
namespaces: {x: {ns: x}}
pods: {x/a: {pod: a}, x/b: {pod: b}}
nodes: {node-1: [x/a], node-2: [x/b]}
deathstar: {pods: [x/b]}
probes:
  - port: 80
    protocol: TCP
    expect: {x/a: [x/b]}
  - port: 80
    protocol: TCP
    family: IPv6
    http: {method: PUT, path: /v1/exhaust-port, expectStatus: 503}
    upstreamCalls: []
    expect: {}
"#;
        let s = LabScenario::from_yaml(Path::new("t.yaml"), text).unwrap();
        assert_eq!(s.probe_ext(0), ProbeExt::default());
        let p1 = s.probe_ext(1);
        assert_eq!(p1.family, Family::IPv6);
        assert_eq!(p1.http.unwrap().expect_status, 503);
        assert_eq!(s.ext.deathstar.as_ref().unwrap().port, 80);
        assert_eq!(s.ext.nodes["node-2"], vec!["x/b".to_string()]);
    }

    #[test]
    fn unknown_pods_are_errors() {
        let text = r#"
name: t
namespaces: {x: {ns: x}}
pods: {x/a: {pod: a}}
nodes: {node-1: [x/zz]}
probes: []
"#;
        assert!(LabScenario::from_yaml(Path::new("t.yaml"), text).is_err());
    }
}
