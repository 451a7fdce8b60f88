//! The per-node agent: a source (Kubernetes API or a directory) feeding the reconciler, the
//! sole owner of the datapath, which publishes its status to the control socket.
pub mod kube_status;
pub mod l7;
pub mod reconcile;
pub mod status;
pub mod uplink;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    compiler::CompileConfig,
    control::{self, server::ServerContext},
    flows::{FlowContext, FlowHub},
    l7::{L7Policy, L7Stats},
    metrics::AgentMetrics,
    source::{SourceState, file::FileSource},
};
use reconcile::{Publishers, Reconciler};
use status::AgentStatus;

/// How long open connections may delay the agent's exit after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Where the agent learns the world.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// The Kubernetes API (in-cluster or kubeconfig).
    Kube,
    /// A directory of YAML: `endpoints.yaml` and policy files.
    Dir(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kube" => Ok(SourceSpec::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(p) if !p.is_empty() => Ok(SourceSpec::Dir(PathBuf::from(p))),
                _ => Err(format!("{s:?}: expected `kube` or `dir:PATH`")),
            },
        }
    }
}

/// Everything the agent is told on its command line.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceSpec,
    pub node_name: String,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub uplinks: Vec<String>,
    /// Network namespace to operate in (entered before any thread starts).
    pub netns: Option<PathBuf>,
    pub proxy_port: u16,
}

/// Run the agent until SIGTERM/SIGINT. Enforcement stays in the kernel when it exits.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // A parent may have left SIGTERM/SIGINT blocked (the mask is inherited across exec; the
    // lab blocks them to tear down cleanly): the agent must see them to stop in time.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    term.add(nix::sys::signal::Signal::SIGINT);
    term.thread_unblock().context("unblocking SIGTERM/SIGINT")?;
    if let Some(ns) = &cfg.netns {
        // setns moves only the calling thread: do it before the runtime starts any thread,
        // so every thread of the agent lives in the node's namespace.
        let f = std::fs::File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", ns.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run_async(cfg));
    // Tasks still parked on I/O (a proxy connection, a flows follower) must not hold the
    // process: dropping the runtime would wait for them.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn run_async(cfg: AgentConfig) -> anyhow::Result<()> {
    let mut dp = moat_datapath::Datapath::open(&cfg.pin_root)
        .with_context(|| format!("opening the datapath at {}", cfg.pin_root.display()))?;
    let events = dp
        .take_events()
        .context("the datapath's event stream")?
        .into_async()
        .context("registering the event ring buffer")?;
    let (status_tx, status_rx) = watch::channel(Arc::new(AgentStatus {
        node: cfg.node_name.clone(),
        ..AgentStatus::default()
    }));
    let (flow_ctx_tx, flow_ctx_rx) = watch::channel(Arc::new(FlowContext::default()));
    let (l7_policy_tx, l7_policy_rx) = watch::channel(Arc::new(L7Policy::empty()));
    let l7_stats = Arc::new(L7Stats::default());
    let (l7_events_tx, l7_events_rx) = tokio::sync::mpsc::channel(4096);
    let metrics = AgentMetrics::default();
    let flows = FlowHub::default();
    let flows_task = tokio::spawn(flows.clone().run(events, flow_ctx_rx.clone()));
    let l7_flows_task = tokio::spawn(flows.clone().run_l7(l7_events_rx, flow_ctx_rx));

    // Steered packets reach the proxy only with the fwmark routing in place; without it they
    // are dropped (fail closed), so a failure here is reported, not fatal.
    if let Err(e) = l7::install_steering_routes().await {
        error!("L7 steering: {e}; redirected flows will be dropped");
    }
    let proxy_stop = tokio_util::sync::CancellationToken::new();
    let proxy_task = tokio::spawn(l7::run_proxy(
        cfg.proxy_port,
        l7_policy_rx,
        l7_events_tx,
        l7_stats.clone(),
        proxy_stop.clone(),
    ));
    // No --uplink: the default route's interface (a standalone source may still name its own).
    let uplinks = if cfg.uplinks.is_empty() {
        uplink::default_route_interface()
            .await
            .into_iter()
            .collect()
    } else {
        cfg.uplinks.clone()
    };
    let mut reconciler = Reconciler::new(
        dp,
        cfg.node_name.clone(),
        &cfg.state_dir,
        CompileConfig {
            proxy_port: cfg.proxy_port,
        },
        uplinks,
        Publishers {
            status: status_tx,
            flow_ctx: flow_ctx_tx,
            l7_policy: l7_policy_tx,
        },
        metrics.clone(),
    )?;
    let (req_tx, mut req_rx) = tokio::sync::mpsc::channel(16);
    let (source_tx, mut source_rx) = watch::channel(Arc::new(SourceState::default()));
    let (stop_tx, stop_rx) = watch::channel(false);

    let source_task = match &cfg.source {
        SourceSpec::Dir(dir) => {
            let src = FileSource::new(dir, cfg.node_name.clone());
            tokio::spawn(async move {
                if let Err(e) = src.watch(source_tx).await {
                    error!("watching the source directory: {e}");
                }
            })
        }
        SourceSpec::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let src = crate::source::kube::KubeSource::new(client.clone(), cfg.node_name.clone())
                .context("starting the Kubernetes source")?;
            let status_cfg = kube_status::StatusConfig::from_env().with_stores(src.policy_stores());
            let status = status_rx.clone();
            let node = cfg.node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = kube_status::run(client, node, status, status_cfg).await {
                    error!("policy status writer: {e}");
                }
            });
            tokio::spawn(async move {
                if let Err(e) = src.run(source_tx).await {
                    error!("Kubernetes source: {e}");
                }
            })
        }
    };

    let routes = control::server::routes(Arc::new(ServerContext {
        status: status_rx,
        requests: req_tx,
        metrics,
        flows,
        l7_stats,
    }));
    let mut stop = stop_rx.clone();
    let control_path = cfg.control_socket.clone();
    let unix_routes = routes.clone();
    let control_task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = control::server::serve_unix(&control_path, unix_routes, shutdown).await {
            error!("control socket {}: {e}", control_path.display());
        }
    });
    let metrics_task = cfg.metrics_addr.map(|addr| {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = control::server::serve_tcp(addr, routes, shutdown).await {
                error!("metrics endpoint {addr}: {e}");
            }
        })
    });

    let mut stop = stop_rx.clone();
    let reconcile_task = tokio::spawn(async move {
        // The watch channel keeps only the newest state: a burst that arrives while a
        // reconcile runs is applied as one, and a single change is applied at once.
        loop {
            tokio::select! {
                changed = source_rx.changed() => if changed.is_err() { break },
                Some(req) = req_rx.recv() => {
                    tokio::task::block_in_place(|| reconciler.handle(req));
                    continue;
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            let state = source_rx.borrow_and_update().clone();
            tokio::task::block_in_place(|| reconciler.reconcile(&state));
        }
    });

    info!(node = %cfg.node_name, pins = %cfg.pin_root.display(), "agent running");
    wait_for_signal().await?;
    info!("stopping; enforcement stays in the kernel");
    let _ = stop_tx.send(true);
    source_task.abort();
    flows_task.abort();
    l7_flows_task.abort();
    proxy_stop.cancel();
    let _ = reconcile_task.await;
    // Open proxy connections and `/flows` followers get a moment to finish, not a veto over
    // the exit: nothing they hold matters to enforcement, which stays in the kernel.
    let servers = async {
        let _ = proxy_task.await;
        let _ = control_task.await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, servers).await.is_err() {
        info!("closing connections still open after {SHUTDOWN_GRACE:?}");
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
