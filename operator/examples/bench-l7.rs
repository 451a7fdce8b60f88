//! `make bench-l7`: what moat's L7 proxy costs an HTTP service, against the same requests
//! with no proxy and through nginx as a reverse proxy. Writes `<target dir>/bench/l7.json`
//! (shared notes, benchmarks.md) and prints a table.
//!
//! One lab node with a real agent and two pods, `bench/client` and `bench/server`. The server
//! pod runs nginx (`bench/l7/server.conf`) answering `GET /bench/hello` with a 64-byte body.
//! Three paths, every request the same (`GET /bench/hello` on a kept-alive connection):
//! - `direct`: client -> server, no policy (moat's datapath still sees every packet);
//! - `moat`: the same with an ingress HTTP rule on the server allowing exactly that request,
//!   so the datapath steers every connection into the agent's proxy (node namespace), which
//!   checks every request (proved by `moat_l7_requests_total`; a disallowed path gets 403);
//! - `nginx`: client -> nginx in the node namespace (`bench/l7/proxy.conf`, where moat's
//!   proxy runs) -> server, no policy.
//!
//! Two measurements, each run interleaved over the paths (a rotated order per round) and
//! summarised as the median of the rounds:
//! - requests/s at saturation: wrk, one thread, [`CONNECTIONS`] keep-alive connections,
//!   10 s (`bench/l7/report.lua` prints wrk's summary as JSON);
//! - latency at fixed offered loads ([`LOADS`]): half of the direct path's median requests/s
//!   (the judged one) and a tenth of it: an open-loop client (below, [`paced`]) that sends
//!   request `i` at `start + i / rate` round-robin over [`CONNECTIONS`] connections, whether
//!   or not earlier answers came back (pipelining then), and times each response from its
//!   scheduled send time, so a stall counts against every request it delays (no coordinated
//!   omission).
//!
//! Run as root. The lab (namespaces, agent, pins) and both nginx instances are removed on
//! exit, on error, on panic and on SIGINT/SIGTERM (checked between measurements).
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use moat::lab::{Lab, LabOptions, LabScenario, agents, netns};
use serde_json::json;

/// Keep-alive connections of both clients.
const CONNECTIONS: usize = 32;
/// wrk threads: one leaves the second core to the server and the proxy under test.
const WRK_THREADS: usize = 1;
const RUN: Duration = Duration::from_secs(10);
/// Untimed start of each paced run (connections and caches warm up).
const PACED_WARMUP: Duration = Duration::from_secs(1);
const ROUNDS: usize = 3;
/// Offered loads of the latency runs: a suffix for the result names and the fraction of the
/// direct path's median requests/s. Half is the judged load; on a 2-core machine shared by
/// client, proxy and server it is about four fifths of either proxy's capacity, where queueing
/// and scheduling set the tail. A tenth shows what a proxy adds when it is not the bottleneck.
const LOADS: [(&str, f64); 2] = [("", 0.5), ("_light", 0.1)];
/// The server pod's nginx (server.conf) and the reverse proxy's port (proxy.conf).
const SERVER_PORT: u16 = 80;
const NGINX_PORT: u16 = 8080;
const PATH: &str = "/bench/hello";
/// Answered 404 by the server; 403 by moat's proxy.
const DENIED_PATH: &str = "/bench/denied";
/// The body server.conf returns for PATH.
const BODY: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";

const TOPOLOGY: &str = r#"
name: "bench-l7"
namespaces:
  bench: {kubernetes.io/metadata.name: bench}
pods:
  bench/client: {app: client}
  bench/server: {app: server}
policies: []
probes: []
"#;

static STOP: AtomicBool = AtomicBool::new(false);

fn check_stop() -> anyhow::Result<()> {
    ensure!(!STOP.load(Ordering::Relaxed), "interrupted");
    Ok(())
}

/// The paths measured (the module docs say what each is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Direct,
    Nginx,
    Moat,
}

const SETUPS: [Setup; 3] = [Setup::Direct, Setup::Nginx, Setup::Moat];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Nginx => "nginx",
            Setup::Moat => "moat",
        }
    }

    fn index(self) -> usize {
        SETUPS.iter().position(|p| *p == self).expect("listed")
    }
}

/// Addresses and namespaces of the lab.
struct Net {
    client_ns: String,
    server: SocketAddr,
    nginx: SocketAddr,
}

impl Net {
    /// Where the client connects for `p` (moat is transparent: the server's address).
    fn target(&self, p: Setup) -> SocketAddr {
        match p {
            Setup::Direct | Setup::Moat => self.server,
            Setup::Nginx => self.nginx,
        }
    }
}

/// The moat path's policy: only the benchmark's request is allowed into the server.
fn l7_policy() -> serde_json::Value {
    json!({
        "apiVersion": "moat.dev/v1alpha1",
        "kind": "MoatNetworkPolicy",
        "metadata": {"name": "bench-http", "namespace": "bench"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"port": SERVER_PORT, "protocol": "TCP"}],
                "http": [{"method": "GET", "path": PATH}],
            }],
        },
    })
}

/// The policies in force for `p`, applied only when they change.
fn select(lab: &mut Lab, current: &mut Option<bool>, p: Setup) -> anyhow::Result<()> {
    let want = p == Setup::Moat;
    if *current != Some(want) {
        let policies = if want { vec![l7_policy()] } else { vec![] };
        lab.set_policies(&policies)?;
        *current = Some(want);
    }
    Ok(())
}

/// An nginx master and its workers in their own process group, stopped (SIGTERM to the
/// group, SIGKILL after 5 s) on drop.
struct Nginx {
    child: Child,
}

impl Nginx {
    /// Runs `nginx -c conf` with prefix `dir` inside `ns` and waits until `listen` accepts.
    fn start(ns: &str, dir: &Path, conf: &Path, listen: SocketAddr) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let mut prefix = dir.as_os_str().to_owned();
        prefix.push("/");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nginx", "-e", "error.log", "-p"])
            .arg(prefix)
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting nginx (Debian package nginx)")?;
        let mut n = Nginx { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if connect(ns, listen).is_ok() {
                return Ok(n);
            }
            if n.child.try_wait()?.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!(
                    "nginx ({}) did not start listening on {listen}:\n{log}",
                    conf.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        // The master is not reaped before the group is signalled: its pid (the group id)
        // cannot have been reused.
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A TCP connection made inside `ns` (the socket stays in that namespace).
fn connect(ns: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    netns::in_netns(ns, || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)))
    })?
    .with_context(|| format!("connecting to {to} from {ns}"))
}

/// A complete response at the start of `buf`: (status, bytes it takes). Every response of
/// this benchmark has a Content-Length.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(u16, usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = r.parse(buf)? else {
        return Ok(None);
    };
    let len: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .context("response without Content-Length")
        .and_then(|h| Ok(std::str::from_utf8(h.value)?.trim().parse()?))?;
    let status = r.code.context("response without status")?;
    Ok((buf.len() >= head + len).then_some((status, head, head + len)))
}

/// One request on a fresh connection from `ns`: (status, body).
fn one_request(ns: &str, to: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = connect(ns, to)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {to}\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((status, head, end)) = parse_response(&buf)? {
            return Ok((status, buf[head..end].to_vec()));
        }
        let n = s.read(&mut chunk)?;
        ensure!(
            n > 0,
            "GET {path} via {to}: connection closed before a response"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `moat_l7_requests_total` with `verdict`, summed over the node's agent.
fn l7_requests(lab: &Lab, verdict: &str) -> anyhow::Result<u64> {
    let a = &lab.agents()[0];
    let text = agents::scrape(&a.node, &a.socket)?;
    Ok(agents::parse_counters(&text, &["moat_l7_requests_total"])
        .iter()
        .filter(|(s, _)| {
            agents::series_labels(s).get("verdict").map(String::as_str) == Some(verdict)
        })
        .map(|(_, n)| n)
        .sum())
}

/// Checks that the proxy decided exactly the requests it should have since `before`
/// (allowed count): none off the moat path, between `done` and `done + in_flight` on it
/// (wrk stops with up to one request per connection unanswered).
fn check_proxy(lab: &Lab, p: Setup, before: u64, done: u64, in_flight: u64) -> anyhow::Result<u64> {
    // The proxy counts a request after relaying its response: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let (want_min, want_max) = match p {
        Setup::Moat => (done, done + in_flight),
        _ => (0, 0),
    };
    loop {
        let delta = l7_requests(lab, "allowed")? - before;
        if (want_min..=want_max).contains(&delta) {
            return Ok(delta);
        }
        ensure!(
            delta < want_min && Instant::now() < deadline,
            "{}: the proxy allowed {delta} requests, expected {want_min}..={want_max}",
            p.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Wrk {
    requests: u64,
    rps: f64,
}

/// wrk from the client pod for `d`; fails unless every response was a success and there
/// were no socket errors.
fn wrk(net: &Net, p: Setup, d: Duration) -> anyhow::Result<Wrk> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/l7/report.lua");
    let url = format!("http://{}{PATH}", net.target(p));
    let out = Command::new("ip")
        .args(["netns", "exec", &net.client_ns, "wrk"])
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{}s", d.as_secs()))
        .args(["--timeout", "2s", "-s"])
        .arg(&script)
        .arg(&url)
        .output()
        .context("running wrk (Debian package wrk)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk {url}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_L7 "))
        .with_context(|| format!("wrk printed no summary:\n{stdout}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let socket_errors = n("connect") + n("read") + n("write") + n("timeout");
    ensure!(
        n("requests") > 0 && socket_errors == 0 && n("status") == 0,
        "{}: wrk {url}: {line}",
        p.name()
    );
    Ok(Wrk {
        requests: n("requests"),
        rps: n("requests") as f64 / (n("duration_us") as f64 / 1e6),
    })
}

/// Latency of every path at one offered load, per round.
struct Latency {
    suffix: &'static str,
    rate: f64,
    p50: [[f64; ROUNDS]; 3],
    p99: [[f64; ROUNDS]; 3],
    lag99: [[f64; ROUNDS]; 3],
    samples: [usize; 3],
}

/// [`ROUNDS`] rounds of the paced client at `rate` over the paths, interleaved.
fn latency_at(
    lab: &mut Lab,
    policy: &mut Option<bool>,
    net: &Net,
    suffix: &'static str,
    rate: f64,
) -> anyhow::Result<Latency> {
    let mut l = Latency {
        suffix,
        rate,
        p50: [[0f64; ROUNDS]; 3],
        p99: [[0f64; ROUNDS]; 3],
        lag99: [[0f64; ROUNDS]; 3],
        samples: [0usize; 3],
    };
    for round in 0..ROUNDS {
        for j in 0..3 {
            let p = SETUPS[(round + j) % 3];
            select(lab, policy, p)?;
            let before = l7_requests(lab, "allowed")?;
            let mut r = paced(&net.client_ns, net.target(p), rate)?;
            check_proxy(lab, p, before, r.sent, 0)?;
            r.latency_ns.sort_unstable();
            r.send_lag_ns.sort_unstable();
            let ms = |ns: u64| ns as f64 / 1e6;
            let i = p.index();
            l.p50[i][round] = ms(percentile(&r.latency_ns, 0.50));
            l.p99[i][round] = ms(percentile(&r.latency_ns, 0.99));
            l.lag99[i][round] = ms(percentile(&r.send_lag_ns, 0.99));
            l.samples[i] += r.latency_ns.len();
            println!(
                "round {} {:<6} at {rate:.0} req/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms \
                 (send lag p99 {:.3} ms; load {})",
                round + 1,
                p.name(),
                l.p50[i][round],
                l.p99[i][round],
                ms(*r.latency_ns.last().expect("checked non-empty")),
                l.lag99[i][round],
                loadavg()
            );
            check_stop()?;
        }
    }
    Ok(l)
}

/// What one connection of the paced client saw.
#[derive(Default)]
struct Received {
    /// Response time from the scheduled send, of every request after the warm-up.
    latency_ns: Vec<u64>,
    responses: u64,
    not_ok: u64,
    error: Option<String>,
}

/// The result of one paced run.
struct Paced {
    latency_ns: Vec<u64>,
    /// How late the sender wrote requests behind their schedule (the client's own jitter,
    /// already inside `latency_ns`).
    send_lag_ns: Vec<u64>,
    sent: u64,
}

/// Reads the responses to requests `k`, `k + CONNECTIONS`, … on `s`, in order.
async fn receive(
    s: TcpStream,
    k: usize,
    total: usize,
    first: usize,
    due: impl Fn(usize) -> Instant,
) -> Received {
    use tokio::io::AsyncReadExt;
    let mut out = Received::default();
    let mut s = match s
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(s))
    {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut read_at = Instant::now();
    let mut i = k;
    while i < total {
        let (status, len) = loop {
            match parse_response(&buf) {
                Ok(Some((status, _, end))) => break (status, end),
                Ok(None) => {}
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    out.error = Some("connection closed".into());
                    return out;
                }
                Ok(Ok(n)) => {
                    read_at = Instant::now();
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => {
                    out.error = Some(e.to_string());
                    return out;
                }
                Err(_) => {
                    out.error = Some("no response for 5 s".into());
                    return out;
                }
            }
        };
        buf.drain(..len);
        out.responses += 1;
        if status != 200 {
            out.not_ok += 1;
        }
        if i >= first {
            out.latency_ns
                .push(read_at.saturating_duration_since(due(i)).as_nanos() as u64);
        }
        i += CONNECTIONS;
    }
    out
}

/// The open-loop client: `rate` requests/s for `PACED_WARMUP + RUN` from `ns` to `to`.
/// One thread keeps the schedule (sleeping until each request is due, writing at once when
/// late); one single-threaded tokio runtime reads every connection's responses, so the
/// client costs about what wrk costs at the same rate.
fn paced(ns: &str, to: SocketAddr, rate: f64) -> anyhow::Result<Paced> {
    let streams = (0..CONNECTIONS)
        .map(|_| {
            let s = connect(ns, to)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Clones share the file description: the readers make it non-blocking for the sender too.
    let readers = streams
        .iter()
        .map(TcpStream::try_clone)
        .collect::<std::io::Result<Vec<_>>>()?;
    let request = format!("GET {PATH} HTTP/1.1\r\nHost: {to}\r\n\r\n");
    let total = ((PACED_WARMUP + RUN).as_secs_f64() * rate) as usize;
    let first = (PACED_WARMUP.as_secs_f64() * rate) as usize;
    let start = Instant::now() + Duration::from_millis(100);
    let due = move |i: usize| start + Duration::from_secs_f64(i as f64 / rate);
    let (received, send_lag_ns, sent, send_error) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let tasks: Vec<_> = readers
                    .into_iter()
                    .enumerate()
                    .map(|(k, s)| tokio::spawn(receive(s, k, total, first, due)))
                    .collect();
                let mut out = Vec::with_capacity(tasks.len());
                for t in tasks {
                    out.push(t.await?);
                }
                anyhow::Ok(out)
            })
        });
        // A sleep ends up to the timer slack (50 us) late; requests due meanwhile go out
        // together on waking, so the sender wakes at most every 50 us whatever the rate
        // (its lateness is in the latencies and reported as send lag).
        let mut lag = Vec::with_capacity(total - first);
        let mut sent = 0u64;
        let mut send_error = None;
        'send: for i in 0..total {
            let t = due(i);
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
            if i >= first {
                lag.push(Instant::now().saturating_duration_since(t).as_nanos() as u64);
            }
            let mut rest = request.as_bytes();
            let stalled_after = Instant::now() + Duration::from_secs(5);
            while !rest.is_empty() {
                match (&streams[i % CONNECTIONS]).write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < stalled_after =>
                    {
                        std::thread::yield_now()
                    }
                    Err(e) => {
                        send_error = Some(e);
                        // Unblock the readers: their responses will never come.
                        for s in &streams {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        break 'send;
                    }
                }
            }
            sent += 1;
        }
        let received = reader.join().expect("reader thread");
        (received, lag, sent, send_error)
    });
    if let Some(e) = send_error {
        bail!("paced client: sending to {to}: {e}");
    }
    let mut latency_ns = Vec::with_capacity(total - first);
    let mut responses = 0;
    for r in received? {
        if let Some(e) = r.error {
            bail!("paced client: reading from {to}: {e}");
        }
        ensure!(
            r.not_ok == 0,
            "paced client: {} responses from {to} were not 200",
            r.not_ok
        );
        responses += r.responses;
        latency_ns.extend(r.latency_ns);
    }
    ensure!(
        responses == sent && sent > 0,
        "paced client: {responses} responses to {sent} requests"
    );
    Ok(Paced {
        latency_ns,
        send_lag_ns,
        sent,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    // SIGINT/SIGTERM become a flag checked between measurements, so every guard below runs.
    let signals = moat::lab::cli::block_termination_signals()?;
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            eprintln!("stopping after the current measurement");
            STOP.store(true, Ordering::Relaxed);
        }
    });

    let exe = std::env::current_exe()?;
    // <target>/release/examples/bench-l7: the agent binary and the output go under <target>.
    let release = exe.parent().and_then(Path::parent).context("target dir")?;
    let target_dir = release.parent().context("target dir")?.to_path_buf();
    let moat_bin = release.join("moat");
    ensure!(
        moat_bin.exists(),
        "{} missing: run `make build` first",
        moat_bin.display()
    );
    let confs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/l7");
    let load_start = loadavg();

    let scenario = LabScenario::from_yaml(Path::new("bench-l7"), TOPOLOGY)?;
    let mut opts = LabOptions::with_agent(&moat_bin);
    if let Some(a) = opts.agent.as_mut() {
        a.ready_timeout = Duration::from_secs(60);
    }
    let mut lab = Lab::up(&scenario, &opts)?;
    let plan = lab.plan();
    let pod = |k: &str| plan.pod(k).with_context(|| format!("pod {k}"));
    let (server, client) = (pod("bench/server")?, pod("bench/client")?);
    let node = &plan.nodes[0];
    let net = Net {
        client_ns: client.netns.clone(),
        server: SocketAddr::new(server.ip4.into(), SERVER_PORT),
        nginx: SocketAddr::new(node.ip4.into(), NGINX_PORT),
    };
    let (server_ns, node_ns) = (server.netns.clone(), node.netns.clone());

    // nginx's workers run as nobody: the prefix directories must be reachable.
    let dir = tempfile::Builder::new()
        .prefix("moat-bench-l7-")
        .tempdir()?;
    let (srv_dir, px_dir) = (dir.path().join("server"), dir.path().join("proxy"));
    std::fs::create_dir_all(&srv_dir)?;
    std::fs::create_dir_all(&px_dir)?;
    for d in [dir.path(), &srv_dir, &px_dir] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let proxy_conf = px_dir.join("proxy.conf");
    std::fs::write(
        &proxy_conf,
        std::fs::read_to_string(confs.join("proxy.conf"))?
            .replace("@UPSTREAM@", &net.server.to_string()),
    )?;
    let server_nginx = Nginx::start(&server_ns, &srv_dir, &confs.join("server.conf"), net.server)?;
    let proxy_nginx = Nginx::start(&node_ns, &px_dir, &proxy_conf, net.nginx)?;

    // Every path answers the benchmark's request with the server's body; moat's proxy denies
    // another path with its 403 and counts both; each path is warmed up.
    let mut policy = None;
    for p in SETUPS {
        select(&mut lab, &mut policy, p)?;
        let (allowed, denied) = (l7_requests(&lab, "allowed")?, l7_requests(&lab, "denied")?);
        let (status, body) = one_request(&net.client_ns, net.target(p), PATH)?;
        ensure!(
            status == 200 && body == BODY,
            "{}: GET {PATH}: {status} {body:?}",
            p.name()
        );
        if p == Setup::Moat {
            let (status, body) = one_request(&net.client_ns, net.target(p), DENIED_PATH)?;
            ensure!(
                status == 403 && body == b"Access denied\r\n",
                "moat: GET {DENIED_PATH} not denied by the proxy: {status} {body:?}"
            );
            ensure!(
                l7_requests(&lab, "denied")? == denied + 1,
                "moat: the denial was not counted"
            );
        }
        check_proxy(&lab, p, allowed, u64::from(p == Setup::Moat), 0)?;
        wrk(&net, p, Duration::from_secs(2))?;
        check_stop()?;
    }

    // Saturation: rounds of wrk over the three paths.
    let mut rps = [[0f64; ROUNDS]; 3];
    for round in 0..ROUNDS {
        for j in 0..3 {
            let p = SETUPS[(round + j) % 3];
            select(&mut lab, &mut policy, p)?;
            let before = l7_requests(&lab, "allowed")?;
            let w = wrk(&net, p, RUN)?;
            let checked = check_proxy(&lab, p, before, w.requests, CONNECTIONS as u64)?;
            println!(
                "round {} {:<6} {:>8.0} req/s ({} requests, proxy counted {checked}; load {})",
                round + 1,
                p.name(),
                w.rps,
                w.requests,
                loadavg()
            );
            rps[p.index()][round] = w.rps;
            check_stop()?;
        }
    }
    let direct_rps = median(&rps[Setup::Direct.index()]);
    let mut latency = Vec::with_capacity(LOADS.len());
    for (suffix, fraction) in LOADS {
        let rate = (direct_rps * fraction).round();
        latency.push(latency_at(&mut lab, &mut policy, &net, suffix, rate)?);
    }
    let load_end = loadavg();

    let per_round = |f: &dyn Fn(usize) -> f64| median(&(0..ROUNDS).map(f).collect::<Vec<_>>());
    let (d, n, m) = (
        Setup::Direct.index(),
        Setup::Nginx.index(),
        Setup::Moat.index(),
    );
    let vs_nginx = per_round(&|r| rps[m][r] / rps[n][r]);
    let vs_direct = per_round(&|r| rps[m][r] / rps[d][r]);
    // Per load, moat's p99 minus direct's in each round.
    let added_p99: Vec<Vec<f64>> = latency
        .iter()
        .map(|l| (0..ROUNDS).map(|r| l.p99[m][r] - l.p99[d][r]).collect())
        .collect();

    let figure = |name: String, metric: &str, v: &[f64], params: serde_json::Value| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        json!({"name": name, "metric": metric, "value": median(v), "min": lo, "max": hi,
               "runs": v.len(), "params": params})
    };
    let mut results = Vec::new();
    for p in SETUPS {
        let i = p.index();
        let path = match p {
            Setup::Direct => "client pod -> server pod, no policy",
            Setup::Nginx => "client pod -> nginx reverse proxy in the node namespace -> server pod",
            Setup::Moat => {
                "client pod -> moat L7 proxy (ingress HTTP rule on the server) -> server pod"
            }
        };
        results.push(figure(
            format!("{}_rps", p.name()),
            "requests_per_s",
            &rps[i],
            json!({"path": path, "request": format!("GET {PATH}"), "body_bytes": BODY.len(),
                   "connections": CONNECTIONS, "wrk_threads": WRK_THREADS,
                   "duration_s": RUN.as_secs()}),
        ));
        for l in &latency {
            let paced_params = json!({"path": path, "offered_rps": l.rate,
                "connections": CONNECTIONS, "duration_s": RUN.as_secs(),
                "samples": l.samples[i],
                "send_lag_p99_ms_max": l.lag99[i].iter().copied().fold(0.0, f64::max)});
            results.push(figure(
                format!("{}_p50_ms{}", p.name(), l.suffix),
                "ms",
                &l.p50[i],
                paced_params.clone(),
            ));
            results.push(figure(
                format!("{}_p99_ms{}", p.name(), l.suffix),
                "ms",
                &l.p99[i],
                paced_params,
            ));
        }
    }
    // Reported, not judged: what moat adds at the light load.
    for (l, added) in latency.iter().zip(&added_p99).skip(1) {
        results.push(figure(
            format!("added_p99_ms{}", l.suffix),
            "ms",
            added,
            json!({"offered_rps": l.rate,
                   "from": "moat_p99_ms - direct_p99_ms of the same round"}),
        ));
    }
    let target = |name: &str, value: f64, op: &str, limit: f64, from: &str| {
        let met = if op == ">=" {
            value >= limit
        } else {
            value <= limit
        };
        json!({"name": name, "value": value, "op": op, "limit": limit, "met": met, "from": from})
    };
    let targets = vec![
        target(
            "rps_vs_nginx",
            vs_nginx,
            ">=",
            1.0,
            "median over the rounds of moat_rps / nginx_rps of the same round",
        ),
        target(
            "rps_vs_direct",
            vs_direct,
            ">=",
            0.7,
            "median over the rounds of moat_rps / direct_rps of the same round",
        ),
        target(
            "added_p99_ms",
            median(&added_p99[0]),
            "<=",
            1.0,
            "median over the rounds of moat_p99_ms - direct_p99_ms of the same round",
        ),
    ];
    let out = json!({
        "bench": "l7",
        "measured_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "method": format!(
            "one lab node (network namespaces, real agent), client and server pods; nginx \
             (bench/l7/server.conf) in the server pod returns a {}-byte body for GET {PATH}; \
             paths: direct (no policy), moat (ingress HTTP rule allowing GET {PATH}: every \
             request checked by the agent's proxy, verified by moat_l7_requests_total per run; \
             GET {DENIED_PATH} answered 403), nginx (bench/l7/proxy.conf in the node \
             namespace, no policy). Throughput at saturation: wrk -t{WRK_THREADS} \
             -c{CONNECTIONS} -d{}s keep-alive. Latency at fixed offered loads of half the \
             direct median ({:.0} req/s, judged) and a tenth of it ({:.0} req/s, suffix \
             _light): open-loop paced client over {CONNECTIONS} \
             keep-alive connections, {}s warm-up then {}s, each response timed from its \
             scheduled send time (no coordinated omission). {ROUNDS} rounds, paths \
             interleaved in a rotated order, value = median of the rounds; every run checked \
             (all responses 200, no socket errors, proxy counters). Load average (1/5/15 min) \
             at start {load_start}, at end {load_end}.",
            BODY.len(),
            RUN.as_secs(),
            latency[0].rate,
            latency[1].rate,
            PACED_WARMUP.as_secs(),
            RUN.as_secs()
        ),
        "results": results,
        "targets": targets,
    });

    println!();
    print!("{:<8} {:>22}", "path", "req/s median (min-max)");
    for l in &latency {
        print!(
            " {:>14} {:>14}",
            format!("p50 ms @{:.0}", l.rate),
            format!("p99 ms @{:.0}", l.rate)
        );
    }
    println!();
    for p in SETUPS {
        let i = p.index();
        let lo = rps[i].iter().copied().fold(f64::MAX, f64::min);
        let hi = rps[i].iter().copied().fold(0.0, f64::max);
        print!(
            "{:<8} {:>22}",
            p.name(),
            format!("{:.0} ({lo:.0}-{hi:.0})", median(&rps[i]))
        );
        for l in &latency {
            print!(" {:>14.3} {:>14.3}", median(&l.p50[i]), median(&l.p99[i]));
        }
        println!();
    }
    for (l, added) in latency.iter().zip(&added_p99).skip(1) {
        println!(
            "added_p99_ms at {:.0} req/s (reported, not judged): {:.3}",
            l.rate,
            median(added)
        );
    }
    for t in &targets {
        println!(
            "{:<14} {:>8.3} {} {} {}",
            t["name"].as_str().unwrap_or_default(),
            t["value"].as_f64().unwrap_or_default(),
            t["op"].as_str().unwrap_or_default(),
            t["limit"],
            if t["met"] == true { "met" } else { "NOT met" }
        );
    }
    println!("load average at start {load_start}, at end {load_end}");
    let dir = target_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("l7.json");
    std::fs::write(&file, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("wrote {}", file.display());
    drop(proxy_nginx);
    drop(server_nginx);
    lab.down()?;
    Ok(())
}
