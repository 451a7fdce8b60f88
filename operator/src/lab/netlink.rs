//! Links, addresses and routes inside lab namespaces, over rtnetlink. Each step runs on a
//! thread that has entered the namespace ([`super::netns::in_netns`]) with its own
//! current-thread runtime: the netlink socket is created on that thread, so it talks to that
//! namespace's kernel tables and nothing else.

use super::LabError;
use super::netns;
use super::plan::{GATEWAY4, GATEWAY6, LabPlan};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

/// Run `f` with a netlink handle bound to the namespace `name`.
pub fn with_handle<F, Fut>(name: &str, f: F) -> Result<(), LabError>
where
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<(), LabError>>,
{
    let ns = name.to_string();
    netns::in_netns(name, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LabError::io("building a netlink runtime"))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(LabError::io(format!("netlink socket in {ns}")))?;
            let task = tokio::spawn(conn);
            let r = f(handle).await;
            task.abort();
            r
        })
    })
}

fn nl(netns: &str, what: String) -> impl FnOnce(rtnetlink::Error) -> LabError {
    let netns = netns.to_string();
    move |e| LabError::Netlink {
        netns,
        message: format!("{what}: {e}"),
    }
}

/// The index of interface `name` in the calling thread's namespace.
fn ifindex(name: &str) -> Result<u32, LabError> {
    nix::net::if_::if_nametoindex(name).map_err(|e| LabError::Io {
        context: format!("interface {name}"),
        source: e.into(),
    })
}

async fn up(h: &Handle, ns: &str, name: &str) -> Result<u32, LabError> {
    let idx = ifindex(name)?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl(ns, format!("set {name} up")))?;
    Ok(idx)
}

async fn addr(h: &Handle, ns: &str, idx: u32, ip: IpAddr, len: u8) -> Result<(), LabError> {
    let mut req = h.address().add(idx, ip, len);
    if ip.is_ipv6() {
        // No duplicate address detection: the address is usable at once (DESIGN.md, traps).
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(nl(ns, format!("add address {ip}/{len} on #{idx}")))
}

/// A veth pair `name` (here) <-> `peer` (created directly in the namespace `peer_ns`).
async fn veth(
    h: &Handle,
    ns: &str,
    name: &str,
    peer: &str,
    peer_ns: &std::fs::File,
) -> Result<(), LabError> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .setns_by_fd(peer_ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(name, peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl(ns, format!("add veth {name} <-> {peer}")))
}

struct Route4 {
    dst: Ipv4Addr,
    len: u8,
    oif: u32,
    gateway: Option<Ipv4Addr>,
    src: Option<Ipv4Addr>,
    scope_link: bool,
    onlink: bool,
}

async fn route4(h: &Handle, ns: &str, r: Route4) -> Result<(), LabError> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst, r.len)
        .output_interface(r.oif);
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    }
    if let Some(s) = r.src {
        b = b.pref_source(s);
    }
    if r.scope_link {
        b = b.scope(RouteScope::Link);
    }
    if r.onlink {
        b = b.onlink();
    }
    h.route()
        .add(b.build())
        .execute()
        .await
        .map_err(nl(ns, format!("add route {}/{}", r.dst, r.len)))
}

async fn route6(
    h: &Handle,
    ns: &str,
    dst: Ipv6Addr,
    len: u8,
    oif: u32,
    gateway: Option<Ipv6Addr>,
    src: Option<Ipv6Addr>,
) -> Result<(), LabError> {
    let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(dst, len)
        .output_interface(oif);
    if let Some(g) = gateway {
        b = b.gateway(g);
    }
    if let Some(s) = src {
        b = b.pref_source(s);
    }
    h.route()
        .add(b.build())
        .execute()
        .await
        .map_err(nl(ns, format!("add route {dst}/{len}")))
}

/// Build the whole topology of `plan` in its (already created, empty) namespaces.
pub fn build(plan: &LabPlan) -> Result<(), LabError> {
    // Pods first: no DAD for anything created in them later (the veth peer is registered in
    // the pod namespace and takes its defaults), loopback up.
    for p in &plan.pods {
        netns::in_netns(&p.netns, || {
            netns::sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            netns::sysctl("net.ipv6.conf.all.accept_dad", "0")
        })?;
    }
    // Nodes: addresses, forwarding, pod veths with their routes.
    for (ni, node) in plan.nodes.iter().enumerate() {
        let ns = node.netns.as_str();
        let pods: Vec<_> = plan.pods.iter().filter(|p| p.node == ni).collect();
        let pod_ns: Vec<std::fs::File> = pods
            .iter()
            .map(|p| netns::open(&p.netns))
            .collect::<Result<_, _>>()?;
        let node_ip4 = node.ip4;
        let node_ip6 = node.ip6;
        with_handle(ns, |h| async move {
            netns::sysctl("net.ipv4.ip_forward", "1")?;
            netns::sysctl("net.ipv6.conf.all.forwarding", "1")?;
            netns::sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            netns::sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            let lo = up(&h, ns, "lo").await?;
            addr(&h, ns, lo, IpAddr::V4(node_ip4), 32).await?;
            addr(&h, ns, lo, IpAddr::V6(node_ip6), 128).await?;
            for (p, pfd) in pods.iter().zip(&pod_ns) {
                veth(&h, ns, &p.host_if, "eth0", pfd).await?;
                let idx = up(&h, ns, &p.host_if).await?;
                addr(&h, ns, idx, IpAddr::V4(GATEWAY4), 32).await?;
                addr(&h, ns, idx, IpAddr::V6(GATEWAY6), 64).await?;
                // The node talks to its pods from its own address (the host identity).
                route4(
                    &h,
                    ns,
                    Route4 {
                        dst: p.ip4,
                        len: 32,
                        oif: idx,
                        gateway: None,
                        src: Some(node_ip4),
                        scope_link: true,
                        onlink: false,
                    },
                )
                .await?;
                route6(&h, ns, p.ip6, 128, idx, None, Some(node_ip6)).await?;
            }
            Ok(())
        })?;
    }
    // Wires between every pair of nodes: created from the lower-numbered end.
    for (i, node) in plan.nodes.iter().enumerate() {
        for up_link in &node.uplinks {
            let j = up_link.peer;
            if j < i {
                continue;
            }
            let peer = &plan.nodes[j];
            let peer_fd = netns::open(&peer.netns)?;
            let name = up_link.ifname.clone();
            let peer_name = format!("wire{}", node.number);
            let ns = node.netns.as_str();
            with_handle(ns, |h| async move {
                veth(&h, ns, &name, &peer_name, &peer_fd).await
            })?;
        }
    }
    for node in &plan.nodes {
        let ns = node.netns.as_str();
        let me = node.clone();
        let peers: Vec<_> = node
            .uplinks
            .iter()
            .map(|u| (u.ifname.clone(), plan.nodes[u.peer].clone()))
            .collect();
        with_handle(ns, |h| async move {
            for (ifname, peer) in peers {
                let idx = up(&h, ns, &ifname).await?;
                // A fixed link-local address per node end: the IPv6 next hop of the other
                // node (NDP only answers for addresses on the receiving interface).
                let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, me.number as u16);
                addr(&h, ns, idx, IpAddr::V6(ll), 64).await?;
                let peer_ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, peer.number as u16);
                // IPv4: the peer node's address is the next hop (ARP is answered for any
                // local address), on-link since the wire has no IPv4 subnet.
                route4(
                    &h,
                    ns,
                    Route4 {
                        dst: Ipv4Addr::new(10, 244, peer.number, 0),
                        len: 24,
                        oif: idx,
                        gateway: Some(peer.ip4),
                        src: Some(me.ip4),
                        scope_link: false,
                        onlink: true,
                    },
                )
                .await?;
                route6(
                    &h,
                    ns,
                    Ipv6Addr::new(0xfd00, 0x10, 0x244, peer.number as u16, 0, 0, 0, 0),
                    64,
                    idx,
                    Some(peer_ll),
                    Some(me.ip6),
                )
                .await?;
            }
            Ok(())
        })?;
    }
    // Pod side: addresses and default routes via the host-side gateway.
    for p in &plan.pods {
        let ns = p.netns.as_str();
        let (ip4, ip6) = (p.ip4, p.ip6);
        with_handle(ns, |h| async move {
            up(&h, ns, "lo").await?;
            let eth0 = up(&h, ns, "eth0").await?;
            addr(&h, ns, eth0, IpAddr::V4(ip4), 32).await?;
            addr(&h, ns, eth0, IpAddr::V6(ip6), 128).await?;
            route4(
                &h,
                ns,
                Route4 {
                    dst: GATEWAY4,
                    len: 32,
                    oif: eth0,
                    gateway: None,
                    src: None,
                    scope_link: true,
                    onlink: false,
                },
            )
            .await?;
            route4(
                &h,
                ns,
                Route4 {
                    dst: Ipv4Addr::UNSPECIFIED,
                    len: 0,
                    oif: eth0,
                    gateway: Some(GATEWAY4),
                    src: None,
                    scope_link: false,
                    onlink: false,
                },
            )
            .await?;
            route6(&h, ns, Ipv6Addr::UNSPECIFIED, 0, eth0, Some(GATEWAY6), None).await
        })?;
    }
    Ok(())
}

/// Wait until every lab interface is operationally up (`IFF_RUNNING`). A veth only passes
/// packets once the kernel's link watcher has processed its carrier change and attached a
/// qdisc (until then it drops everything), and the watcher batches events for up to a second:
/// probing a freshly built lab without this loses the first packets of the newest pods.
pub fn wait_running(plan: &LabPlan, timeout: std::time::Duration) -> Result<(), LabError> {
    use nix::net::if_::InterfaceFlags;
    let deadline = std::time::Instant::now() + timeout;
    let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
    for (i, n) in plan.nodes.iter().enumerate() {
        let mut ifs: Vec<String> = n.uplinks.iter().map(|u| u.ifname.clone()).collect();
        ifs.extend(
            plan.pods
                .iter()
                .filter(|p| p.node == i)
                .map(|p| p.host_if.clone()),
        );
        wanted.push((n.netns.clone(), ifs));
    }
    for p in &plan.pods {
        wanted.push((p.netns.clone(), vec!["eth0".to_string()]));
    }
    for (ns, ifs) in wanted {
        netns::in_netns(&ns, || {
            loop {
                let running: Vec<String> = nix::ifaddrs::getifaddrs()
                    .map_err(|e| LabError::Io {
                        context: format!("listing interfaces of {ns}"),
                        source: e.into(),
                    })?
                    .filter(|a| {
                        a.flags
                            .contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING)
                    })
                    .map(|a| a.interface_name)
                    .collect();
                let missing: Vec<&String> = ifs.iter().filter(|i| !running.contains(i)).collect();
                if missing.is_empty() {
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(LabError::Timeout {
                        what: format!("interfaces {missing:?} of {ns} to come up"),
                        after: timeout,
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })?;
    }
    Ok(())
}
