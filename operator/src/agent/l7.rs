//! Running the L7 proxy on the node: the policy routing that delivers socket-assigned packets
//! to the local stack, and the proxy itself, restarted if it ever stops while the agent runs.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
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

/// How long a stopped proxy stays down before it is started again: long enough that a proxy
/// failing at once does not spin, short enough that redirected flows (dropped meanwhile) come
/// back quickly.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Serve the transparent proxy on `[::]:port` until `shutdown`, restarting it if it stops: an
/// error (its listener cannot be bound, a worker thread died) or a panic. While it is down the
/// datapath drops redirected flows (fail closed). `stats` outlive each instance.
pub async fn run_proxy(
    port: u16,
    policy: watch::Receiver<Arc<L7Policy>>,
    events: mpsc::Sender<L7Event>,
    stats: Arc<L7Stats>,
    shutdown: CancellationToken,
) {
    let cfg = ProxyConfig {
        listen: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        ..ProxyConfig::default()
    };
    let (token, counters) = (shutdown.clone(), stats.clone());
    supervise(RESTART_PAUSE, &stats.restarts, shutdown, move || {
        let (cfg, policy, events) = (cfg.clone(), policy.clone(), events.clone());
        let (counters, token) = (counters.clone(), token.clone());
        async move {
            let proxy = Proxy::bind(cfg, policy, Arc::new(Transparent)).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on port {port}: {e}"))
            })?;
            proxy
                .with_events(events)
                .with_stats(counters)
                .run(token)
                .await
        }
    })
    .await
}

/// Runs what `start` makes, each time on a task of its own so that a panic ends only that
/// run, until `shutdown`; whenever a run ends otherwise (an error, a panic, or an early
/// return) it is logged, counted in `restarts`, and started again after `pause`.
async fn supervise<F, Fut>(
    pause: Duration,
    restarts: &AtomicU64,
    shutdown: CancellationToken,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        let ended = tokio::spawn(start()).await;
        if shutdown.is_cancelled() {
            return;
        }
        match ended {
            Ok(Ok(())) => error!("L7 proxy stopped; restarting"),
            Ok(Err(e)) => error!("L7 proxy stopped: {e}; restarting"),
            Err(e) => error!("L7 proxy failed: {e}; restarting"),
        }
        restarts.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A run that panics, one that fails and one that returns early are each restarted and
    /// counted; the one running at shutdown ends the supervision without a restart.
    #[tokio::test]
    async fn a_stopped_or_panicked_proxy_is_restarted_until_shutdown() {
        let restarts = AtomicU64::new(0);
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (token, counted) = (shutdown.clone(), runs.clone());
        let supervised = supervise(Duration::from_millis(1), &restarts, shutdown, move || {
            let (run, token) = (counted.fetch_add(1, Ordering::SeqCst), token.clone());
            async move {
                match run {
                    0 => panic!("injected: the first run panics"),
                    1 => Err(io::Error::other("injected: the second run fails")),
                    2 => Ok(()),
                    _ => {
                        token.cancel();
                        Ok(())
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), supervised)
            .await
            .expect("supervision ends at shutdown");
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(restarts.load(Ordering::Relaxed), 3);
    }
}
