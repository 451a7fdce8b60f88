//! Running the L7 proxy on the node: the policy routing that delivers socket-assigned packets
//! to the local stack, and the proxy itself, restarted if it ever stops while the agent runs.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::Arc,
    time::Duration,
};

use moat_common::mark;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::l7::{L7Event, L7Policy, L7Stats, Proxy, ProxyConfig, Transparent};

/// Routing table for packets the datapath assigned to the proxy.
const TABLE: u32 = 2004;
/// Rule preference: before the main table (32766).
const PREF: u32 = 100;

/// `ip rule add fwmark 0x200/0xf00 lookup 2004 pref 100` and `ip route add local 0/0 dev lo
/// table 2004`, for IPv4 and IPv6 (shared notes, l7-steering). Without them a steered SYN is
/// routed for forwarding and silently dropped. Idempotent.
pub async fn install_steering_routes() -> Result<(), SteeringError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(SteeringError::Socket)?;
    let task = tokio::spawn(conn);
    let lo = nix::net::if_::if_nametoindex("lo").unwrap_or(1);
    for v6 in [false, true] {
        let mut req = handle
            .rule()
            .add()
            .fw_mark(mark::TO_PROXY)
            .table_id(TABLE)
            .priority(PREF)
            .action(RuleAction::ToTable);
        req.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(mark::MASK));
        let added = if v6 {
            req.v6().execute().await
        } else {
            req.v4().execute().await
        };
        ignore_exists(added).map_err(SteeringError::Rule)?;
        let route = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(TABLE)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(TABLE)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build()
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(SteeringError::Route)?;
    }
    task.abort();
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("adding the fwmark rule for the L7 proxy: {0}")]
    Rule(rtnetlink::Error),
    #[error("adding the local route for the L7 proxy: {0}")]
    Route(rtnetlink::Error),
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        r => r,
    }
}

/// Serve the transparent proxy on `[::]:port` until `shutdown`, restarting it (after a short
/// pause) if it fails. While it is down the datapath drops redirected flows (fail closed).
pub async fn run_proxy(
    port: u16,
    policy: watch::Receiver<Arc<L7Policy>>,
    events: mpsc::Sender<L7Event>,
    stats: watch::Sender<Arc<L7Stats>>,
    shutdown: CancellationToken,
) {
    let cfg = ProxyConfig {
        listen: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        ..ProxyConfig::default()
    };
    while !shutdown.is_cancelled() {
        match Proxy::bind(cfg.clone(), policy.clone(), Arc::new(Transparent)) {
            Ok(proxy) => {
                let proxy = proxy.with_events(events.clone());
                stats.send_replace(proxy.stats());
                if let Err(e) = proxy.run(shutdown.clone()).await {
                    error!("L7 proxy stopped: {e}; restarting");
                }
            }
            Err(e) => error!("L7 proxy cannot listen on port {port}: {e}; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
