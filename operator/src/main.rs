//! The `moat` command: the per-node agent and the tools around it.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use moat::agent::{AgentConfig, SourceSpec};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "Kubernetes network policy enforced by eBPF"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MOAT_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node agent: watch the source, program the datapath, serve status.
    Agent(AgentArgs),
    /// Show what a running agent reports (through its control socket).
    Status {
        #[command(flatten)]
        control: ControlSocket,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Watch the agent's decisions as flows, like `hubble observe`.
    Observe(ObserveArgs),
    /// Labs: nodes and pods as network namespaces on this machine, each node with its agent.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Serve TCP/UDP echo and the Star Wars deathstar API (the lab's and the e2e's workload).
    Serve {
        /// TCP echo port (repeatable).
        #[arg(long)]
        tcp: Vec<u16>,
        /// UDP echo port (repeatable).
        #[arg(long)]
        udp: Vec<u16>,
        /// Deathstar HTTP API port (repeatable).
        #[arg(long)]
        deathstar: Vec<u16>,
    },
    /// Low-level operations on the pinned datapath.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
}

#[derive(Subcommand)]
enum DatapathCommand {
    /// Remove every pin (maps, programs, links) under the root: enforcement stops on every
    /// interface of this node. For upgrades across layout versions and for decommissioning.
    Reset {
        #[arg(long, env = "MOAT_PIN_ROOT", default_value = moat_datapath::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
}

/// Where an agent's control socket is (a Unix socket on the host filesystem, reachable from
/// any network namespace): health, readiness, status, metrics and flows.
#[derive(clap::Args)]
struct ControlSocket {
    /// The agent's control socket.
    #[arg(
        long = "control-socket",
        env = "MOAT_CONTROL_SOCKET",
        default_value = "/run/moat/agent.sock"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a lab from a scenario and keep it until SIGINT/SIGTERM.
    Up {
        scenario: PathBuf,
        /// Servers and topology only: no agents, no enforcement.
        #[arg(long)]
        no_agent: bool,
    },
    /// Tear down every lab on this machine (and what killed runs left behind).
    Down,
    /// Build a lab, apply the scenario's policies, probe every pod pair with real packets,
    /// compare with the expected matrices. Exit 0: all match; 1: a mismatch; 2: an error.
    Probe {
        #[arg(long)]
        scenario: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Probe many scenarios, reusing one lab per topology (`make conformance`).
    Suite { scenarios: Vec<PathBuf> },
    /// The Star Wars walk-through: no policy, L3/L4, L7, with counters and flows after each
    /// step (`make demo`).
    Demo,
}

#[derive(clap::Args)]
struct ObserveArgs {
    #[command(flatten)]
    control: ControlSocket,
    /// Only this verdict: FORWARDED, DROPPED, AUDIT or REDIRECTED.
    #[arg(long)]
    verdict: Option<String>,
    /// Either end in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Either end is this pod (`namespace/pod` or `pod`).
    #[arg(long)]
    pod: Option<String>,
    /// The source is this pod.
    #[arg(long)]
    from_pod: Option<String>,
    /// The destination is this pod.
    #[arg(long)]
    to_pod: Option<String>,
    /// Destination port.
    #[arg(long)]
    port: Option<u16>,
    /// TCP, UDP, SCTP, ICMP or ICMPv6.
    #[arg(long)]
    protocol: Option<String>,
    /// Keep printing new flows as they happen.
    #[arg(long, short)]
    follow: bool,
    /// Print the last N matching flows first (default 20, or 0 with --follow).
    #[arg(long)]
    last: Option<usize>,
    /// Output: `compact` (one line per flow) or `json`.
    #[arg(long, short, default_value = "compact")]
    output: ObserveOutput,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObserveOutput {
    Compact,
    Json,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Where policies and endpoints come from: `kube` (the Kubernetes API) or `dir:PATH` (a
    /// directory with endpoints.yaml and policy files, re-read on every change).
    #[arg(long, env = "MOAT_SOURCE", default_value = "kube")]
    source: SourceSpec,
    /// This node's name (in a DaemonSet, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// bpffs directory holding this node's maps, programs and links. One root per node.
    #[arg(long, env = "MOAT_PIN_ROOT", default_value = moat_datapath::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Directory for state that must survive restarts (identity and rule numbering).
    #[arg(long, env = "MOAT_STATE_DIR", default_value = "/var/lib/moat")]
    state_dir: PathBuf,
    #[command(flatten)]
    control: ControlSocket,
    /// TCP address for /metrics, /healthz, /readyz.
    #[arg(long, env = "MOAT_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Node uplink for the XDP prefilter and L7 steering of traffic from other nodes
    /// (repeatable). Default: the interface of the default route. Standalone sources may name
    /// their own in endpoints.yaml.
    #[arg(long = "uplink", env = "MOAT_UPLINKS", value_delimiter = ',')]
    uplinks: Vec<String>,
    /// Network namespace to operate in (a path such as /var/run/netns/NAME); entered before
    /// anything else starts.
    #[arg(long, env = "MOAT_NETNS")]
    netns: Option<PathBuf>,
    /// Port of the node's transparent L7 proxy.
    #[arg(long, env = "MOAT_PROXY_PORT", default_value_t = 15001)]
    proxy_port: u16,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Lab { command } => return lab(command),
        Command::Serve {
            tcp,
            udp,
            deathstar,
        } => moat::lab::servers::serve(&moat::lab::servers::ServeSpec {
            tcp,
            udp,
            deathstar,
        })
        .map_err(Into::into),
        Command::Agent(a) => moat::agent::run(AgentConfig {
            source: a.source,
            node_name: a.node_name,
            pin_root: a.pin_root,
            state_dir: a.state_dir,
            control_socket: a.control.path,
            metrics_addr: a.metrics_addr,
            uplinks: a.uplinks,
            netns: a.netns,
            proxy_port: a.proxy_port,
        }),
        Command::Status { control, json } => status(&control.path, json),
        Command::Observe(o) => observe(o),
        Command::Datapath {
            command: DatapathCommand::Reset { pin_root },
        } => moat_datapath::Datapath::reset(&pin_root).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn lab_options(agent: bool) -> anyhow::Result<moat::lab::LabOptions> {
    Ok(if agent {
        moat::lab::LabOptions::with_agent(std::env::current_exe()?)
    } else {
        moat::lab::LabOptions::default()
    })
}

fn lab(command: LabCommand) -> ExitCode {
    let run = || -> anyhow::Result<ExitCode> {
        match command {
            LabCommand::Up { scenario, no_agent } => {
                moat::lab::cli::up_and_wait(&scenario, &lab_options(!no_agent)?)?;
            }
            LabCommand::Demo => moat::lab::demo::run(&lab_options(true)?)?,
            LabCommand::Down => {
                for removed in moat::lab::cli::down(&lab_options(false)?)? {
                    println!("removed {removed}");
                }
            }
            LabCommand::Probe { scenario, json } => {
                let report = moat::lab::run_probe(&scenario, &lab_options(true)?)?;
                if json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.render_matrix());
                }
                return Ok(if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            LabCommand::Suite { scenarios } => {
                let started = std::time::Instant::now();
                let results = moat::lab::run_suite(&scenarios, &lab_options(true)?);
                let (mut passed, mut failed, mut errors) = (0, 0, 0);
                for entry in &results {
                    let name = entry.path.display();
                    match &entry.result {
                        Ok(r) if r.passed() => {
                            passed += 1;
                            println!("PASS  {name}");
                        }
                        Ok(r) => {
                            failed += 1;
                            println!("FAIL  {name}\n{}", r.render_matrix());
                        }
                        Err(e) => {
                            errors += 1;
                            println!("ERROR {name}: {e}");
                        }
                    }
                }
                println!(
                    "conformance: {passed} passed, {} failed ({errors} errors) in {:.1} s",
                    failed + errors,
                    started.elapsed().as_secs_f64()
                );
                return Ok(if errors > 0 {
                    ExitCode::from(2)
                } else if failed > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                });
            }
        }
        Ok(ExitCode::SUCCESS)
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn observe(o: ObserveArgs) -> anyhow::Result<()> {
    let filter = moat::flows::FlowFilter {
        verdict: o.verdict,
        namespace: o.namespace,
        pod: o.pod,
        from_pod: o.from_pod,
        to_pod: o.to_pod,
        port: o.port,
        protocol: o.protocol,
        follow: o.follow,
        last: o.last,
    };
    let query = serde_urlencoded::to_string(&filter)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(moat::control::client::get_lines(
        &o.control.path,
        &format!("/flows?{query}"),
        |line| {
            match o.output {
                ObserveOutput::Json => println!("{}", String::from_utf8_lossy(line)),
                ObserveOutput::Compact => match serde_json::from_slice::<moat::flows::Flow>(line) {
                    Ok(f) => println!("{}", f.line()),
                    Err(e) => eprintln!("moat: unreadable flow ({e})"),
                },
            }
            true
        },
    ))?;
    Ok(())
}

fn status(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if json {
        let (_, body) = rt.block_on(moat::control::client::get(socket, "/status"))?;
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let s = rt.block_on(moat::control::client::status(socket))?;
    println!("node:       {}", s.node);
    println!("ready:      {}", s.ready);
    println!("revision:   {}", s.revision);
    println!(
        "endpoints:  {} local, {} identities",
        s.local_endpoints, s.identities
    );
    println!(
        "programmed: {}",
        match (&s.programmed_digest, &s.source_digest) {
            (Some(p), Some(src)) if p == src => "the current source state",
            (Some(_), _) => "an earlier source state (see errors)",
            (None, _) => "nothing yet",
        }
    );
    println!("policies:");
    for p in &s.policies {
        let state = if p.accepted { "Accepted" } else { "Invalid" };
        println!(
            "  {:<60} {state:<9} endpoints={}",
            p.reference, p.selected_endpoints
        );
        if !p.message.is_empty() {
            println!("      {}", p.message);
        }
    }
    for o in &s.overflows {
        println!("overflow: {}: {}", o.reference, o.message);
    }
    for e in &s.errors {
        println!("error: {e}");
    }
    Ok(())
}
