//! HTTP endpoints of the control socket (warp over a Unix listener).
use std::{path::Path, sync::Arc};

use tokio::sync::watch;
use warp::{Filter, http::StatusCode};

use crate::agent::status::AgentStatus;

/// The routes: `/healthz` (the process is serving), `/readyz` (every local endpoint is
/// programmed), `/status` (the whole [`AgentStatus`] as JSON).
pub fn routes(
    status: watch::Receiver<Arc<AgentStatus>>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
    let healthz = warp::path!("healthz").map(|| "ok\n");
    let ready_rx = status.clone();
    let readyz = warp::path!("readyz").map(move || {
        if ready_rx.borrow().ready {
            warp::reply::with_status("ready\n", StatusCode::OK)
        } else {
            warp::reply::with_status("not ready\n", StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let status_json = warp::path!("status").map(move || {
        let s = status.borrow().clone();
        warp::reply::json(&*s)
    });
    warp::get().and(healthz.or(readyz).or(status_json))
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
