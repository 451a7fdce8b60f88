//! What a lab consists of, computed from a scenario without touching the system: node and
//! pod namespaces, interface names, addresses, and the servers every pod runs. Pure, so the
//! addressing rules are unit-tested and `moat lab up` can print the plan.

use super::LabError;
use super::ext::LabScenario;
use crate::api::Protocol;
use crate::model::ContainerPort;
use crate::selector::Labels;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Name prefix of every network namespace, pin root and state file a lab owns.
pub const PREFIX: &str = "moat-lab-";
/// The node every pod is on when a scenario places none.
pub const DEFAULT_NODE: &str = "node-1";
/// The pod-side gateway addresses (on every host-side veth).
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A lab's plan.
#[derive(Clone, Debug)]
pub struct LabPlan {
    /// Unique per run: `<pid hex><counter hex>`.
    pub id: String,
    pub nodes: Vec<NodePlan>,
    /// Sorted by `ns/name`.
    pub pods: Vec<PodPlan>,
    /// Namespace -> labels.
    pub namespaces: BTreeMap<String, Labels>,
}

/// A node: its namespace, number N (subnet `10.244.N.0/24`, `fd00:10:244:N::/64`) and
/// addresses (on its loopback).
#[derive(Clone, Debug)]
pub struct NodePlan {
    pub name: String,
    pub number: u8,
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Interfaces facing other nodes: `wire<M>` faces the node numbered M.
    pub uplinks: Vec<Uplink>,
}

/// One end of a node-to-node wire.
#[derive(Clone, Debug)]
pub struct Uplink {
    pub ifname: String,
    /// Index into [`LabPlan::nodes`] of the node at the other end.
    pub peer: usize,
}

/// A pod.
#[derive(Clone, Debug)]
pub struct PodPlan {
    /// `ns/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    /// Index into [`LabPlan::nodes`].
    pub node: usize,
    pub netns: String,
    /// The host-side veth in the node's namespace.
    pub host_if: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub labels: Labels,
    pub named_ports: Vec<ContainerPort>,
    pub servers: Vec<ServerSpec>,
}

/// What answers on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerKind {
    /// TCP: echo every byte back. UDP: echo every datagram back to its sender.
    Echo,
    /// The Star Wars deathstar HTTP API (TCP).
    Deathstar,
}

/// One server of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerSpec {
    pub port: u16,
    pub protocol: Protocol,
    pub kind: ServerKind,
}

/// Pods per node: addresses `.2` to `.254`.
const MAX_PODS_PER_NODE: usize = 253;

impl LabPlan {
    /// A fresh lab id, unique per process and call.
    pub fn new_id() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "{:x}x{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub fn new(id: &str, s: &LabScenario) -> Result<LabPlan, LabError> {
        // Nodes: those the scenario names (sorted), or the default one.
        let mut node_names: Vec<String> = s.ext.nodes.keys().cloned().collect();
        if node_names.is_empty() {
            node_names.push(DEFAULT_NODE.to_string());
        }
        if node_names.len() > 250 {
            return Err(LabError::Invalid("more than 250 nodes".into()));
        }
        let placement: BTreeMap<&str, usize> = s
            .ext
            .nodes
            .values()
            .enumerate()
            .flat_map(|(i, pods)| pods.iter().map(move |p| (p.as_str(), i)))
            .collect();
        let mut nodes: Vec<NodePlan> = node_names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let n = (i + 1) as u8;
                NodePlan {
                    name: name.clone(),
                    number: n,
                    netns: format!("{PREFIX}{id}-n{n}"),
                    ip4: Ipv4Addr::new(10, 244, n, 1),
                    ip6: pod_ip6(n, 1),
                    uplinks: Vec::new(),
                }
            })
            .collect();
        let count = nodes.len();
        for i in 0..count {
            for j in 0..count {
                if i != j {
                    let ifname = format!("wire{}", nodes[j].number);
                    nodes[i].uplinks.push(Uplink { ifname, peer: j });
                }
            }
        }

        // Servers: every probed TCP/UDP port gets an echo server, HTTP-probed ports and the
        // deathstar pods' port the API instead (on TCP).
        let mut echo: BTreeSet<(u16, Protocol)> = BTreeSet::new();
        let mut http_ports: BTreeSet<u16> = BTreeSet::new();
        for (i, p) in s.base.probes.iter().enumerate() {
            if s.probe_ext(i).http.is_some() {
                http_ports.insert(p.port);
            } else if matches!(p.protocol, Protocol::Tcp | Protocol::Udp) {
                echo.insert((p.port, p.protocol));
            }
        }

        let mut per_node = vec![0usize; count];
        let mut pods = Vec::new();
        for (key, labels) in &s.base.pods {
            let (namespace, name) = key
                .split_once('/')
                .ok_or_else(|| LabError::Invalid(format!("pod key {key:?} is not ns/name")))?;
            if !s.base.namespaces.contains_key(namespace) {
                return Err(LabError::Invalid(format!(
                    "pod {key}: namespace {namespace} is not declared"
                )));
            }
            let node = placement.get(key.as_str()).copied().unwrap_or(0);
            let k = per_node[node];
            per_node[node] += 1;
            if k >= MAX_PODS_PER_NODE {
                return Err(LabError::Invalid(format!(
                    "more than {MAX_PODS_PER_NODE} pods on node {}",
                    nodes[node].name
                )));
            }
            let n = nodes[node].number;
            let host = (k + 2) as u8;
            let deathstar_port = s
                .ext
                .deathstar
                .as_ref()
                .filter(|d| d.pods.iter().any(|p| p == key))
                .map(|d| d.port);
            let mut servers: BTreeSet<ServerSpec> = BTreeSet::new();
            for &(port, protocol) in &echo {
                let http = protocol == Protocol::Tcp
                    && (http_ports.contains(&port) || deathstar_port == Some(port));
                if !http {
                    servers.insert(ServerSpec {
                        port,
                        protocol,
                        kind: ServerKind::Echo,
                    });
                }
            }
            for port in http_ports.iter().copied().chain(deathstar_port) {
                servers.insert(ServerSpec {
                    port,
                    protocol: Protocol::Tcp,
                    kind: ServerKind::Deathstar,
                });
            }
            pods.push(PodPlan {
                key: key.clone(),
                namespace: namespace.to_string(),
                name: name.to_string(),
                node,
                netns: format!("{PREFIX}{id}-n{n}p{host}"),
                host_if: format!("lxc{host}"),
                ip4: Ipv4Addr::new(10, 244, n, host),
                ip6: pod_ip6(n, host),
                labels: labels.clone(),
                named_ports: s.base.container_ports(key),
                servers: servers.into_iter().collect(),
            });
        }
        Ok(LabPlan {
            id: id.to_string(),
            nodes,
            pods,
            namespaces: s.base.namespaces.clone(),
        })
    }

    pub fn pod(&self, key: &str) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.key == key)
    }

    /// A pod's address of `family`.
    pub fn ip_of(&self, key: &str, family: super::Family) -> Option<IpAddr> {
        self.pod(key).map(|p| match family {
            super::Family::IPv4 => IpAddr::V4(p.ip4),
            super::Family::IPv6 => IpAddr::V6(p.ip6),
        })
    }

    /// Every namespace of the lab, pods first (deletion order).
    pub fn all_netns(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| p.netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .collect()
    }

    /// The pin root of a node's agent.
    pub fn pin_root(&self, bpffs: &std::path::Path, node: &NodePlan) -> std::path::PathBuf {
        bpffs.join(format!("{PREFIX}{}-{}", self.id, node.name))
    }

    /// A key that is equal for scenarios the same lab can serve by swapping policies only
    /// (same nodes, pods, labels, named ports and servers).
    pub fn topology_key(&self) -> String {
        let mut k = String::new();
        for n in &self.nodes {
            k.push_str(&format!("node {} {};", n.name, n.number));
        }
        for (ns, l) in &self.namespaces {
            k.push_str(&format!("ns {ns} {l:?};"));
        }
        for p in &self.pods {
            k.push_str(&format!(
                "pod {} {} {:?} {:?} {:?};",
                p.key, p.node, p.labels, p.named_ports, p.servers
            ));
        }
        k
    }
}

/// `fd00:10:244:N::H`.
pub fn pod_ip6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, host as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn scenario(extra: &str) -> LabScenario {
        let text = format!(
            r#"
name: t
namespaces: {{x: {{ns: x}}, y: {{ns: y}}}}
pods: {{x/a: {{pod: a}}, x/b: {{pod: b}}, y/a: {{pod: a}}}}
{extra}
probes:
  - port: 80
    protocol: TCP
    expect: {{}}
  - port: 81
    protocol: UDP
    expect: {{}}
"#
        );
        LabScenario::from_yaml(Path::new("t.yaml"), &text).unwrap()
    }

    #[test]
    fn one_node_addressing() {
        let p = LabPlan::new("abc", &scenario("")).unwrap();
        assert_eq!(p.nodes.len(), 1);
        assert_eq!(p.nodes[0].name, DEFAULT_NODE);
        assert_eq!(p.nodes[0].ip4, Ipv4Addr::new(10, 244, 1, 1));
        assert!(p.nodes[0].uplinks.is_empty());
        let xa = p.pod("x/a").unwrap();
        assert_eq!(xa.ip4, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(xa.ip6, "fd00:10:244:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(xa.host_if, "lxc2");
        assert_eq!(p.pod("y/a").unwrap().ip4, Ipv4Addr::new(10, 244, 1, 4));
        assert_eq!(xa.servers.len(), 2);
        assert!(xa.servers.iter().all(|s| s.kind == ServerKind::Echo));
        assert!(p.all_netns().iter().all(|n| n.starts_with("moat-lab-abc-")));
    }

    #[test]
    fn two_nodes_and_deathstar() {
        let p = LabPlan::new(
            "abc",
            &scenario("nodes: {node-1: [x/a], node-2: [x/b]}\ndeathstar: {pods: [x/b]}"),
        )
        .unwrap();
        assert_eq!(p.nodes.len(), 2);
        assert_eq!(p.nodes[0].uplinks[0].ifname, "wire2");
        assert_eq!(p.nodes[1].uplinks[0].ifname, "wire1");
        let xb = p.pod("x/b").unwrap();
        assert_eq!(xb.node, 1);
        assert_eq!(xb.ip4, Ipv4Addr::new(10, 244, 2, 2));
        // y/a is unplaced: first node, after x/a.
        assert_eq!(p.pod("y/a").unwrap().ip4, Ipv4Addr::new(10, 244, 1, 3));
        assert!(xb.servers.contains(&ServerSpec {
            port: 80,
            protocol: Protocol::Tcp,
            kind: ServerKind::Deathstar
        }));
        assert!(
            !xb.servers
                .iter()
                .any(|s| s.port == 80 && s.kind == ServerKind::Echo)
        );
    }
}
