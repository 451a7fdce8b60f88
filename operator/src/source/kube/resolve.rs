//! Finding a local pod's host-side interface: a route lookup over netlink, in the agent's
//! network namespace (the node's: the agent runs with `hostNetwork`), for each of the pod's IPs.
//!
//! # Which CNIs this covers
//!
//! moat enforces on the host-side end of each pod's veth. It finds that end by asking the
//! kernel's FIB which route the node would use to reach the pod (`RTM_GETROUTE` with
//! `RTM_F_FIB_MATCH`, so the answer is the matched route itself, with its prefix length), and
//! accepts the answer only if it is a **host route** (`/32`, `/128`) without a gateway whose
//! output device is a **veth**. Every address of the pod must lead to the same veth.
//!
//! Covered (per-pod host routes to the pod's veth, "ptp" style):
//! - kind's default CNI, **kindnet** (the `ptp` plugin: `10.244.1.5 dev vethXXXX scope host`);
//! - **Calico** (`10.x.y.z dev caliXXXX scope link`, both iptables and eBPF-less dataplanes);
//! - the **AWS VPC CNI** (`dev eniXXXX`, main table) and any CNI built on the reference `ptp`
//!   plugin.
//!
//! Not covered, and reported as an error naming the pod and what the lookup found:
//! - bridge-based CNIs: **flannel** (the `bridge` plugin behind `cni0`), the plain `bridge`
//!   plugin, Weave, and OVS-based CNIs (Antrea, OVN-Kubernetes) — the route points at a bridge
//!   (or an OVS port) shared by all pods of the node, so there is no per-pod device to attach to;
//! - **Cilium** (its own eBPF datapath owns the same hooks; running both is not supported);
//! - anything whose route to a pod has a gateway (the pod is not on this node, or the CNI
//!   routes through a tunnel).
use std::{future::Future, net::IpAddr, pin::Pin};

/// What the kube source needs to attach a local endpoint: its host-side interface name.
/// Behind a trait so tests can inject one without netlink.
pub trait InterfaceResolver: Send + Sync {
    /// The host-side interface of a pod with these addresses, or a message a person can act
    /// on (what the lookup found and why it cannot be used).
    fn resolve<'a>(
        &'a self,
        ips: &'a [IpAddr],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

/// The real resolver: netlink route and link lookups in the calling process's network
/// namespace.
#[cfg(target_os = "linux")]
pub struct NetlinkResolver {
    handle: rtnetlink::Handle,
}

#[cfg(target_os = "linux")]
impl NetlinkResolver {
    /// Opens a netlink socket (in the current network namespace) and spawns its connection
    /// task on the current tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NetlinkResolver { handle })
    }

    async fn one(&self, ip: IpAddr) -> Result<String, String> {
        use futures::TryStreamExt as _;
        use rtnetlink::packet_route::{
            link::{InfoKind, LinkAttribute, LinkInfo},
            route::{RouteAttribute, RouteFlags},
        };
        let host_len = if ip.is_ipv4() { 32 } else { 128 };
        let mut msg = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, host_len)
            .map_err(|e| format!("route lookup for {ip}: {e}"))?
            .build();
        msg.header.flags |= RouteFlags::FibMatch;
        let route = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_next()
            .await
            .map_err(|e| format!("route lookup for {ip}: {e}"))?
            .ok_or_else(|| format!("route lookup for {ip}: no answer"))?;
        let prefix = route.header.destination_prefix_length;
        let mut oif = None;
        let mut gateway = None;
        let mut multipath = false;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(g) => gateway = Some(format!("{g:?}")),
                RouteAttribute::MultiPath(_) => multipath = true,
                _ => {}
            }
        }
        let Some(oif) = oif else {
            return Err(format!(
                "the route to {ip} has no output device{} (/{prefix}); {NEEDS}",
                if multipath { " (multipath)" } else { "" }
            ));
        };
        let link = self
            .handle
            .link()
            .get()
            .match_index(oif)
            .execute()
            .try_next()
            .await
            .map_err(|e| format!("link {oif} of the route to {ip}: {e}"))?
            .ok_or_else(|| format!("link {oif} of the route to {ip}: not found"))?;
        let mut name = format!("ifindex {oif}");
        let mut kind = None;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let kind_text = kind
            .as_ref()
            .map_or("no link kind".to_string(), |k| k.to_string());
        let found = format!("/{prefix} dev {name} ({kind_text})");
        if let Some(gw) = gateway {
            return Err(format!(
                "the route to {ip} goes via a gateway {gw} {found}: the pod is not on this node or the CNI routes it through a tunnel; {NEEDS}"
            ));
        }
        if prefix != host_len {
            return Err(format!(
                "the route to {ip} is a /{prefix} network route to {name} ({kind_text}), not a per-pod host route: a bridge-based CNI (flannel, the bridge plugin, Weave, OVS) is not supported; {NEEDS}"
            ));
        }
        if kind != Some(InfoKind::Veth) {
            return Err(format!(
                "the route to {ip} leads to {name} ({kind_text}), not a veth; {NEEDS}"
            ));
        }
        Ok(name)
    }
}

/// What every rejection ends with.
pub const NEEDS: &str = "moat needs a per-pod host route to the pod's veth (kindnet, Calico, AWS VPC CNI, the ptp plugin)";

#[cfg(target_os = "linux")]
impl InterfaceResolver for NetlinkResolver {
    fn resolve<'a>(
        &'a self,
        ips: &'a [IpAddr],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut found: Option<(IpAddr, String)> = None;
            for &ip in ips {
                let name = self.one(ip).await?;
                match &found {
                    Some((first, n)) if *n != name => {
                        return Err(format!(
                            "{first} routes to {n} but {ip} routes to {name}: the pod's addresses must share one veth"
                        ));
                    }
                    Some(_) => {}
                    None => found = Some((ip, name)),
                }
            }
            found
                .map(|(_, n)| n)
                .ok_or_else(|| "the pod has no IP address".to_string())
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    //! The real lookups, in a network namespace made for the test (the calling thread only:
    //! `unshare(CLONE_NEWNET)` on a thread of its own, so nothing touches the machine's).
    use super::*;
    use std::process::Command;

    fn ip(args: &str) {
        let out = Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn host_routes_to_veths_resolve_and_bridges_are_refused() {
        if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipped: needs root and iproute2");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            // kindnet style: a veth per pod with a /32 route to it.
            ip("link add vethpod1 type veth peer name eth0p1");
            ip("link set vethpod1 up");
            ip("link set eth0p1 up");
            ip("route add 10.244.1.5/32 dev vethpod1 scope host");
            // flannel style: a bridge with the node's pod /24 behind it.
            ip("link add cni0 type bridge");
            ip("link set cni0 up");
            ip("addr add 10.244.2.1/24 dev cni0");
            // a /32 that leads to the bridge: a host route, but not to a veth.
            ip("route add 10.244.3.7/32 dev cni0");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let r = NetlinkResolver::new().unwrap();
                let a: IpAddr = "10.244.1.5".parse().unwrap();
                assert_eq!(r.resolve(&[a]).await, Ok("vethpod1".to_string()));
                let b: IpAddr = "10.244.2.9".parse().unwrap();
                let e = r.resolve(&[b]).await.unwrap_err();
                assert!(
                    e.contains("/24") && e.contains("cni0") && e.contains("bridge"),
                    "{e}"
                );
                let c: IpAddr = "10.244.3.7".parse().unwrap();
                let e = r.resolve(&[c]).await.unwrap_err();
                assert!(e.contains("cni0") && e.contains("not a veth"), "{e}");
                let d: IpAddr = "192.0.2.1".parse().unwrap();
                assert!(r.resolve(&[d]).await.is_err(), "no route at all");
            });
        })
        .join()
        .unwrap();
    }
}
