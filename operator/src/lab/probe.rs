//! The reachability probe: for every probe of a scenario, every ordered pair of distinct pods
//! is tried with real packets sent from inside the source pod's namespace, and the observed
//! matrix is compared with the scenario's `expect` (cyclonus-style).
//!
//! - TCP: connect, then one echo round trip (or, to a deathstar port, one HTTP exchange).
//! - UDP: one datagram from a fresh source port (a process-wide rotating counter, never the
//!   kernel's choice, so no probe rides a conntrack entry of an earlier one) and its echo.
//! - HTTP (extension): one request; reachable iff the status equals `expectStatus`.
//! - SCTP: skipped with the reason when the kernel has no SCTP (never reported as passed);
//!   ICMP: skipped (not implemented).
//!
//! Every attempt is bounded by [`ProbeOptions::timeout`]; pairs run in parallel on at most
//! [`ProbeOptions::parallelism`] worker threads, each of which enters the source pod's
//! namespace (setns) for the cell it runs. The diagonal is never probed or compared.

use super::LabError;
use super::ext::{Family, HttpProbe, LabScenario};
use super::netns;
use super::plan::{LabPlan, ServerKind};
use crate::api::Protocol;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Probe settings.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Bound on each step of an attempt (connect, reply).
    pub timeout: Duration,
    /// Worker threads.
    pub parallelism: usize,
    /// Attempts per cell before it counts as blocked (each UDP attempt on a fresh port).
    pub attempts: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_secs(1),
            parallelism: 32,
            attempts: 1,
        }
    }
}

/// One cell that differs from the expectation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub from: String,
    pub to: String,
    pub expected: bool,
    pub observed: bool,
}

/// What one cell observed, beyond the boolean.
#[derive(Clone, Debug)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub observed: bool,
    /// The local port of the last attempt (UDP: the fresh port it used).
    pub source_port: Option<u16>,
    /// What happened (`echo ok`, `connect: timed out`, `status 403`, …).
    pub detail: String,
}

/// The outcome of one probe (one port/protocol/family matrix).
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub port: u16,
    pub protocol: Protocol,
    pub family: Family,
    pub http: Option<HttpProbe>,
    pub skipped: bool,
    pub reason: Option<String>,
    /// Pods in matrix order.
    pub pods: Vec<String>,
    /// from -> to -> observed (diagonal left out).
    pub results: BTreeMap<String, BTreeMap<String, bool>>,
    /// from -> to -> expected (diagonal left out).
    pub expected: BTreeMap<String, BTreeMap<String, bool>>,
    pub mismatches: Vec<Mismatch>,
    pub cells: Vec<Cell>,
    pub elapsed: Duration,
}

impl ProbeResult {
    /// `TCP/80`, `UDP/81 IPv6`, `TCP/80 HTTP PUT /v1/exhaust-port =503`.
    pub fn title(&self) -> String {
        let mut t = format!("{}/{}", self.protocol.as_str(), self.port);
        if self.family == Family::IPv6 {
            t.push_str(" IPv6");
        }
        if let Some(h) = &self.http {
            t.push_str(&format!(
                " HTTP {} {} ={}",
                h.method, h.path, h.expect_status
            ));
        }
        t
    }

    pub fn cell(&self, from: &str, to: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.from == from && c.to == to)
    }
}

/// The outcome of probing a scenario.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub scenario: String,
    pub probes: Vec<ProbeResult>,
    pub elapsed: Duration,
    /// With agents: whether moat's own DROPPED counters account for the blocked cells (a
    /// cell blocked by something else must not pass for moat's doing).
    pub cross_check: Option<super::agents::DropCrossCheck>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    scenario: &'a str,
    passed: bool,
    probes: Vec<JsonProbe<'a>>,
}

#[derive(Serialize)]
struct JsonProbe<'a> {
    port: u16,
    protocol: &'static str,
    skipped: bool,
    reason: Option<&'a str>,
    results: &'a BTreeMap<String, BTreeMap<String, bool>>,
    mismatches: &'a [Mismatch],
    // Extension keys, only on probes that use the extensions.
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<Family>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<&'a HttpProbe>,
}

impl ProbeReport {
    /// Every probe that ran matched its expectation in every non-diagonal cell. Skipped
    /// probes are not passed, but neither do they fail the report (they say why instead).
    pub fn passed(&self) -> bool {
        self.probes
            .iter()
            .all(|p| p.skipped || p.mismatches.is_empty())
            && self.cross_check.as_ref().is_none_or(|c| c.consistent())
    }

    /// All mismatches, with the probe each belongs to.
    pub fn mismatches(&self) -> impl Iterator<Item = (&ProbeResult, &Mismatch)> {
        self.probes
            .iter()
            .flat_map(|p| p.mismatches.iter().map(move |m| (p, m)))
    }

    /// The JSON document of `moat lab probe --json`.
    pub fn to_json_value(&self) -> serde_json::Value {
        let doc = JsonReport {
            scenario: &self.scenario,
            passed: self.passed(),
            probes: self
                .probes
                .iter()
                .map(|p| JsonProbe {
                    port: p.port,
                    protocol: p.protocol.as_str(),
                    skipped: p.skipped,
                    reason: p.reason.as_deref(),
                    results: &p.results,
                    mismatches: &p.mismatches,
                    family: (p.family != Family::IPv4).then_some(p.family),
                    http: p.http.as_ref(),
                })
                .collect(),
        };
        serde_json::to_value(doc).expect("report serializes")
    }

    pub fn to_json(&self) -> String {
        self.to_json_value().to_string()
    }

    /// The matrices as text: rows are sources, columns destinations; `.` reachable, `X`
    /// blocked, `~` the (unprobed) diagonal, and a `!` after every cell that differs from the
    /// expectation (so `X!` is blocked but expected reachable).
    pub fn render_matrix(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "scenario: {} ({})\n",
            self.scenario,
            if self.passed() { "passed" } else { "FAILED" }
        ));
        if let Some(c) = &self.cross_check {
            out.push_str(&format!(
                "cross-check: {} blocked cells, {} packets dropped by moat ({})\n",
                c.blocked_cells,
                c.dropped_packets,
                if c.consistent() {
                    "consistent"
                } else {
                    "INCONSISTENT: something other than moat blocked traffic"
                }
            ));
        }
        for p in &self.probes {
            out.push('\n');
            if p.skipped {
                out.push_str(&format!(
                    "{}: skipped: {}\n",
                    p.title(),
                    p.reason.as_deref().unwrap_or("")
                ));
                continue;
            }
            let w = p.pods.iter().map(|s| s.len()).max().unwrap_or(1).max(3);
            let title = p.title();
            let first = w.max(title.len().min(24));
            out.push_str(&format!(
                "{}: {} mismatches, {:.1}s ('.' reachable, 'X' blocked, '!' differs from expect)\n",
                title,
                p.mismatches.len(),
                p.elapsed.as_secs_f64()
            ));
            out.push_str(&format!("{:<first$}", "from\\to"));
            for to in &p.pods {
                out.push_str(&format!(" {to:<w$}"));
            }
            out.push('\n');
            for from in &p.pods {
                out.push_str(&format!("{from:<first$}"));
                for to in &p.pods {
                    let cell = if from == to {
                        "~".to_string()
                    } else {
                        let obs = p.results[from][to];
                        let exp = p.expected[from][to];
                        format!(
                            "{}{}",
                            if obs { "." } else { "X" },
                            if obs != exp { "!" } else { "" }
                        )
                    };
                    out.push_str(&format!(" {cell:<w$}"));
                }
                out.push('\n');
            }
            for m in &p.mismatches {
                let detail = p
                    .cell(&m.from, &m.to)
                    .map(|c| c.detail.as_str())
                    .unwrap_or("");
                out.push_str(&format!(
                    "  {} -> {}: expected {}, observed {} ({detail})\n",
                    m.from,
                    m.to,
                    word(m.expected),
                    word(m.observed)
                ));
            }
        }
        out
    }
}

fn word(reachable: bool) -> &'static str {
    if reachable { "reachable" } else { "blocked" }
}

/// Why probes of `protocol` cannot run here, if they cannot.
pub fn unsupported(protocol: Protocol) -> Option<String> {
    match protocol {
        Protocol::Tcp | Protocol::Udp => None,
        Protocol::Sctp => {
            // SAFETY: plain socket(2); the descriptor is closed right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                Some(format!(
                    "the kernel has no SCTP (socket(IPPROTO_SCTP): {e})"
                ))
            } else {
                // SAFETY: fd was just returned by socket(2) and is owned here.
                unsafe { libc::close(fd) };
                Some("SCTP probes are not implemented by the lab yet".into())
            }
        }
        Protocol::Icmp => Some("ICMP probes are not implemented by the lab yet".into()),
    }
}

/// One cell to run.
struct Job {
    probe: usize,
    from: usize,
    to: usize,
}

struct Outcome {
    observed: bool,
    source_port: Option<u16>,
    detail: String,
}

/// Run every probe of `scenario` against the lab of `plan`.
pub fn run(
    plan: &LabPlan,
    scenario: &LabScenario,
    opts: &ProbeOptions,
) -> Result<ProbeReport, LabError> {
    let start = Instant::now();
    let pods: Vec<String> = plan.pods.iter().map(|p| p.key.clone()).collect();
    let files: Vec<std::fs::File> = plan
        .pods
        .iter()
        .map(|p| netns::open(&p.netns))
        .collect::<Result<_, _>>()?;
    let mut results: Vec<ProbeResult> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    for (i, probe) in scenario.base.probes.iter().enumerate() {
        let ext = scenario.probe_ext(i);
        if ext.http.is_some() && probe.protocol != Protocol::Tcp {
            return Err(LabError::Invalid(format!(
                "probe {i}: an http probe must be TCP, not {}",
                probe.protocol.as_str()
            )));
        }
        let reason = unsupported(probe.protocol);
        if reason.is_none() {
            for from in 0..pods.len() {
                for to in 0..pods.len() {
                    if from != to {
                        jobs.push(Job { probe: i, from, to });
                    }
                }
            }
        }
        let expected = pods
            .iter()
            .map(|f| {
                let row = pods
                    .iter()
                    .filter(|t| *t != f)
                    .map(|t| (t.clone(), probe.reachable(f, t)))
                    .collect();
                (f.clone(), row)
            })
            .collect();
        results.push(ProbeResult {
            port: probe.port,
            protocol: probe.protocol,
            family: ext.family,
            http: ext.http,
            skipped: reason.is_some(),
            reason,
            pods: pods.clone(),
            results: BTreeMap::new(),
            expected,
            mismatches: Vec::new(),
            cells: Vec::new(),
            elapsed: Duration::ZERO,
        });
    }

    let outcomes: Vec<Mutex<Option<(Outcome, Duration)>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = opts.parallelism.max(1).min(jobs.len());
    let worker_err: Mutex<Option<LabError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(j) else { break };
                    if let Err(e) = netns::enter(&files[job.from]) {
                        worker_err.lock().unwrap().get_or_insert(e);
                        break;
                    }
                    let t0 = Instant::now();
                    let o = run_cell(plan, scenario, &results[job.probe], job, opts);
                    *outcomes[j].lock().unwrap() = Some((o, t0.elapsed()));
                }
            });
        }
    });
    if let Some(e) = worker_err.into_inner().unwrap() {
        return Err(e);
    }

    for (job, o) in jobs.iter().zip(outcomes) {
        let (o, took) = o.into_inner().unwrap().expect("every job ran");
        let r = &mut results[job.probe];
        let (from, to) = (&pods[job.from], &pods[job.to]);
        r.results
            .entry(from.clone())
            .or_default()
            .insert(to.clone(), o.observed);
        r.elapsed = r.elapsed.max(took);
        r.cells.push(Cell {
            from: from.clone(),
            to: to.clone(),
            observed: o.observed,
            source_port: o.source_port,
            detail: o.detail,
        });
    }
    for r in &mut results {
        r.cells
            .sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        for c in &r.cells {
            let expected = r.expected[&c.from][&c.to];
            if expected != c.observed {
                r.mismatches.push(Mismatch {
                    from: c.from.clone(),
                    to: c.to.clone(),
                    expected,
                    observed: c.observed,
                });
            }
        }
    }
    Ok(ProbeReport {
        scenario: scenario.name().to_string(),
        probes: results,
        elapsed: start.elapsed(),
        cross_check: None,
    })
}

fn run_cell(
    plan: &LabPlan,
    _scenario: &LabScenario,
    probe: &ProbeResult,
    job: &Job,
    opts: &ProbeOptions,
) -> Outcome {
    let dst = &plan.pods[job.to];
    let ip = match probe.family {
        Family::IPv4 => IpAddr::V4(dst.ip4),
        Family::IPv6 => IpAddr::V6(dst.ip6),
    };
    let addr = SocketAddr::new(ip, probe.port);
    let kind = dst
        .servers
        .iter()
        .find(|s| s.port == probe.port && s.protocol == probe.protocol)
        .map(|s| s.kind)
        .unwrap_or(ServerKind::Echo);
    let mut last = Outcome {
        observed: false,
        source_port: None,
        detail: "not run".into(),
    };
    for _ in 0..opts.attempts.max(1) {
        last = match (&probe.http, probe.protocol) {
            (Some(h), _) => http(addr, h, opts.timeout),
            (None, Protocol::Udp) => udp(addr, opts.timeout),
            (None, _) => tcp(addr, kind, opts.timeout),
        };
        if last.observed {
            break;
        }
    }
    last
}

static NONCE: AtomicU32 = AtomicU32::new(0);

fn nonce() -> String {
    format!(
        "moat-probe {} {}\n",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
}

fn blocked(source_port: Option<u16>, detail: String) -> Outcome {
    Outcome {
        observed: false,
        source_port,
        detail,
    }
}

fn tcp(addr: SocketAddr, kind: ServerKind, timeout: Duration) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return blocked(None, format!("connect: {e}")),
    };
    let port = s.local_addr().ok().map(|a| a.port());
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    match kind {
        ServerKind::Echo => {
            let msg = nonce();
            let mut back = vec![0u8; msg.len()];
            if let Err(e) = s.write_all(msg.as_bytes()) {
                return blocked(port, format!("send: {e}"));
            }
            match s.read_exact(&mut back) {
                Ok(()) if back == msg.as_bytes() => Outcome {
                    observed: true,
                    source_port: port,
                    detail: "echo ok".into(),
                },
                Ok(()) => blocked(port, "echo: wrong bytes".into()),
                Err(e) => blocked(port, format!("echo: {e}")),
            }
        }
        ServerKind::Deathstar => match http_exchange(&mut s, addr, "GET", "/", timeout) {
            Ok(status) => Outcome {
                observed: true,
                source_port: port,
                detail: format!("http status {status}"),
            },
            Err(e) => blocked(port, e),
        },
    }
}

/// Send one request on `s` and return the response status.
fn http_exchange(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: moat-lab-probe\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let mut parts = line.split(' ');
            return match (
                parts.next(),
                parts.next().and_then(|c| c.parse::<u16>().ok()),
            ) {
                (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
                _ => Err(format!("bad status line {line:?}")),
            };
        }
        if buf.len() > 8192 || Instant::now() >= deadline {
            return Err("no status line".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed before a response".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("response: {e}")),
        }
    }
}

fn http(addr: SocketAddr, h: &HttpProbe, timeout: Duration) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return blocked(None, format!("connect: {e}")),
    };
    let port = s.local_addr().ok().map(|a| a.port());
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    match http_exchange(&mut s, addr, &h.method, &h.path, timeout) {
        Ok(status) => Outcome {
            observed: status == h.expect_status,
            source_port: port,
            detail: format!("status {status}"),
        },
        Err(e) => blocked(port, e),
    }
}

/// Local UDP ports handed out by [`fresh_udp_socket`]: below the kernel's default ephemeral
/// range (32768–60999), so they never collide with a port the kernel picked.
const UDP_PORT_BASE: u32 = 20000;
const UDP_PORT_SPAN: u32 = 12000;
static UDP_NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A UDP socket on a port no earlier probe of this process used (until the counter wraps
/// after 12000 probes), in the calling thread's namespace.
pub fn fresh_udp_socket(v6: bool) -> std::io::Result<UdpSocket> {
    // Start at a per-process offset so consecutive runs do not begin on the same ports.
    let _ = UDP_NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % UDP_PORT_SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut last = None;
    for _ in 0..64 {
        let port =
            (UDP_PORT_BASE + UDP_NEXT.fetch_add(1, Ordering::Relaxed) % UDP_PORT_SPAN) as u16;
        let bind: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        match UdpSocket::bind(bind) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

fn udp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let s = match fresh_udp_socket(addr.is_ipv6()) {
        Ok(s) => s,
        Err(e) => return blocked(None, format!("bind: {e}")),
    };
    let port = s.local_addr().ok().map(|a| a.port());
    let msg = nonce();
    if let Err(e) = s.send_to(msg.as_bytes(), addr) {
        return blocked(port, format!("send: {e}"));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return blocked(port, "no reply".into());
        }
        let _ = s.set_read_timeout(Some(left));
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == addr && &buf[..n] == msg.as_bytes() => {
                return Outcome {
                    observed: true,
                    source_port: port,
                    detail: "echo ok".into(),
                };
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return blocked(port, "no reply".into());
            }
            // ICMP port unreachable and the like.
            Err(e) => return blocked(port, format!("reply: {e}")),
        }
    }
}
