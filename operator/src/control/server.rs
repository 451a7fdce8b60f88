//! HTTP endpoints of the agent, served on the control socket (warp over a Unix listener) and,
//! for Prometheus and the kubelet's probes, on TCP.
use std::{convert::Infallible, path::Path, sync::Arc};

use hyper::body::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use warp::{Filter, http::StatusCode};

use crate::{
    agent::{reconcile::Request, status::AgentStatus},
    flows::{FlowFilter, FlowHub},
    metrics::AgentMetrics,
};

/// What the endpoints read.
pub struct ServerContext {
    pub status: watch::Receiver<Arc<AgentStatus>>,
    /// To the reconciler, the maps' owner.
    pub requests: mpsc::Sender<Request>,
    pub metrics: AgentMetrics,
    pub flows: FlowHub,
    /// The L7 proxy's counters, kept by the agent across proxy restarts.
    pub l7_stats: Arc<crate::l7::L7Stats>,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/healthz` (serving), `/readyz` (every local endpoint programmed), `/status` (JSON),
/// `/metrics` (OpenMetrics), `/flows` (newline-delimited JSON; filters as query parameters,
/// see [`FlowFilter`]).
pub fn routes(
    ctx: Arc<ServerContext>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
    let with = move || {
        let ctx = ctx.clone();
        warp::any().map(move || ctx.clone())
    };
    let healthz = warp::path!("healthz").map(|| "ok\n");
    let readyz = warp::path!("readyz")
        .and(with())
        .map(|ctx: Arc<ServerContext>| {
            if ctx.status.borrow().ready {
                warp::reply::with_status("ready\n", StatusCode::OK)
            } else {
                warp::reply::with_status("not ready\n", StatusCode::SERVICE_UNAVAILABLE)
            }
        });
    let status = warp::path!("status")
        .and(with())
        .map(|ctx: Arc<ServerContext>| {
            let s = ctx.status.borrow().clone();
            warp::reply::json(&*s)
        });
    let metrics = warp::path!("metrics").and(with()).and_then(metrics);
    let flows = warp::path!("flows")
        .and(warp::query::<FlowFilter>())
        .and(with())
        .map(flows);
    warp::get().and(healthz.or(readyz).or(status).or(metrics).or(flows))
}

async fn metrics(ctx: Arc<ServerContext>) -> Result<warp::reply::Response, Infallible> {
    let (tx, rx) = oneshot::channel();
    let snapshot = match ctx.requests.send(Request::Snapshot(tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    let Some(mut snapshot) = snapshot else {
        return Ok(warp::http::Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body("the reconciler is not running\n".into())
            .expect("static response"));
    };
    let l7: &crate::l7::L7Stats = &ctx.l7_stats;
    snapshot.l7_proxy = crate::metrics::L7ProxyCounts::from(l7);
    for (key, n) in l7.requests() {
        *snapshot
            .l7
            .entry((key.rule_id, key.method.to_owned(), key.verdict.as_str()))
            .or_default() += n;
    }
    let text = crate::metrics::encode(&ctx.metrics, snapshot);
    Ok(warp::http::Response::builder()
        .header("content-type", OPENMETRICS)
        .body(text.into())
        .expect("static response"))
}

fn flows(filter: FlowFilter, ctx: Arc<ServerContext>) -> impl warp::Reply {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    // Subscribe before reading the history, so nothing falls between the two.
    let mut live = ctx.flows.subscribe();
    let default_last = if filter.follow { 0 } else { 20 };
    let history = ctx.flows.last(&filter, filter.last.unwrap_or(default_last));
    tokio::spawn(async move {
        let line = |f: &crate::flows::Flow| {
            let mut v = serde_json::to_vec(f).expect("flows serialize");
            v.push(b'\n');
            Ok(Bytes::from(v))
        };
        for f in &history {
            if tx.send(line(f)).await.is_err() {
                return;
            }
        }
        if !filter.follow {
            return;
        }
        loop {
            match live.recv().await {
                Ok(f) if filter.matches(&f) => {
                    if tx.send(line(&f)).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    warp::reply::with_header(
        warp::reply::stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        "content-type",
        "application/x-ndjson",
    )
}

/// Serve `routes` on a Unix socket at `path` until `shutdown` resolves. A stale socket file
/// from an earlier run is replaced.
pub async fn serve_unix<F>(
    path: &Path,
    routes: F,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}

/// Serve `routes` on TCP `addr` until `shutdown` resolves.
pub async fn serve_tcp<F>(
    addr: std::net::SocketAddr,
    routes: F,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}
