//! `moat lab demo` (`make demo`): the Star Wars walk-through of Cilium's getting-started
//! guide, on a one-node lab with a real moat agent.
//!
//! Pods in namespace `default`: `deathstar-1` and `deathstar-2` (org=empire, class=deathstar,
//! serving the deathstar HTTP API on port 80), `tiefighter` (org=empire) and `xwing`
//! (org=alliance). Three steps, each requesting a landing from both ships on both Death Stars
//! (HTTP from inside the ship's pod namespace) and showing the agent's counters and flows:
//!
//! 1. no policy: everyone lands;
//! 2. the L3/L4 policy (`config/samples/starwars-l3l4.yaml`, built in): the tiefighter lands,
//!    the xwing's packets are dropped (its request times out);
//! 3. the L7 policy (`config/samples/starwars-l7.yaml`): the tiefighter may still land, but
//!    `PUT /v1/exhaust-port` gets 403 `Access denied` from the node's proxy; the xwing is still
//!    dropped.
//!
//! The lab is torn down at the end, on any error (the lab's drop), and on SIGINT/SIGTERM: the
//! signals are blocked in the calling thread and waited for by a watcher thread, which asks
//! the walk-through to stop (it checks between requests, so the lab is dropped normally); a
//! second signal, or a walk-through that does not stop within [`FORCE_AFTER`], makes the
//! watcher remove this process's labs itself and exit with status 130.
//!
//! Every outcome is checked against what the step expects; a surprise is printed in the step
//! and makes `run` fail after tear-down.

use super::agents::{self, Agent};
use super::{Lab, LabError, LabOptions, LabScenario, netns};
use crate::flows::Flow;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The L3/L4 policy of the demo (the sample file, built into the binary).
pub const L3L4_POLICY: &str = include_str!("../../../config/samples/starwars-l3l4.yaml");
/// The L7 policy of the demo.
pub const L7_POLICY: &str = include_str!("../../../config/samples/starwars-l7.yaml");

/// The demo's topology (no policies, no probes: the demo makes its own requests).
pub const SCENARIO: &str = r#"
name: "moat demo: Star Wars"
namespaces:
  default: {kubernetes.io/metadata.name: default}
pods:
  default/deathstar-1: {org: empire, class: deathstar}
  default/deathstar-2: {org: empire, class: deathstar}
  default/tiefighter: {org: empire, class: tiefighter}
  default/xwing: {org: alliance, class: xwing}
deathstar:
  port: 80
  pods: [default/deathstar-1, default/deathstar-2]
policies: []
probes: []
"#;

/// How long one request may take before it counts as dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// After a first SIGINT/SIGTERM, how long the walk-through has to stop by itself.
pub const FORCE_AFTER: Duration = Duration::from_secs(20);
/// How many flows each step shows at most.
const FLOWS_SHOWN: usize = 8;

const SHIPS: [&str; 2] = ["tiefighter", "xwing"];
const DEATHSTARS: [&str; 2] = ["deathstar-1", "deathstar-2"];

/// What a step expects of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// An HTTP response with this status.
    Status(u16),
    /// No answer: the packets are dropped.
    Dropped,
}

/// One request of a step.
struct Request {
    ship: &'static str,
    deathstar: &'static str,
    method: &'static str,
    path: &'static str,
    expect: Expect,
}

/// What one request got.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Status and the first line of the body.
    Http(u16, String),
    /// No answer (connect or response timed out, or the connection was reset).
    NoAnswer(String),
}

/// Set by the signal watcher: stop between requests.
struct Stop(AtomicBool);

impl Stop {
    fn check(&self) -> Result<(), LabError> {
        if self.0.load(Ordering::Relaxed) {
            Err(LabError::Invalid("interrupted".into()))
        } else {
            Ok(())
        }
    }
}

/// Run the demo.
pub fn run(opts: &LabOptions) -> Result<(), LabError> {
    if opts.agent.is_none() {
        return Err(LabError::Invalid(
            "the demo needs the moat agent (LabOptions::with_agent)".into(),
        ));
    }
    let signals = super::cli::block_termination_signals()?;
    let stop = Arc::new(Stop(AtomicBool::new(false)));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::Builder::new()
            .name("moat-demo-signals".into())
            .spawn(move || watch_signals(&signals, &stop, &done))
            .map_err(LabError::io("spawning the signal watcher"))?
    };
    let result = walk_through(opts, &stop);
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    // Signals that arrived once the watcher stopped are handled now (default: terminate).
    let _ = signals.thread_unblock();
    match result {
        Ok(surprises) if surprises.is_empty() => {
            println!("\nThe lab is gone. That was moat: policies enforced on real packets.");
            Ok(())
        }
        Ok(surprises) => Err(LabError::Invalid(format!(
            "the demo did not go as expected:\n  {}",
            surprises.join("\n  ")
        ))),
        Err(e) => Err(e),
    }
}

/// Wait for SIGINT/SIGTERM until `done`. The first signal asks the walk-through to stop;
/// a second one (or no stop within [`FORCE_AFTER`]) removes this process's labs and exits.
fn watch_signals(signals: &nix::sys::signal::SigSet, stop: &Stop, done: &AtomicBool) {
    let mut first: Option<Instant> = None;
    while !done.load(Ordering::Relaxed) {
        let got = timed_wait(signals, Duration::from_millis(100));
        if got.is_some() {
            if first.is_some() {
                force_teardown();
            }
            eprintln!("\nmoat demo: interrupted, tearing the lab down…");
            stop.0.store(true, Ordering::Relaxed);
            first = Some(Instant::now());
        } else if first.is_some_and(|t| t.elapsed() > FORCE_AFTER) {
            force_teardown();
        }
    }
}

/// sigtimedwait(2) on `set`: the signal received, or None on timeout.
fn timed_wait(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let raw: &libc::sigset_t = set.as_ref();
    // SAFETY: valid pointers to a signal set and a timespec; no siginfo requested.
    let r = unsafe { libc::sigtimedwait(raw, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// Remove every lab this process owns (agents, namespaces, pins, files) and exit with 130.
fn force_teardown() -> ! {
    let me = std::process::id();
    for s in super::state::LabState::load_all() {
        if s.owner.as_ref().is_some_and(|o| o.pid == me) {
            let _ = s.destroy();
        }
    }
    eprintln!("moat demo: lab removed");
    std::process::exit(130);
}

/// The three steps on one lab. Returns the surprises (outcomes that differ from the step's
/// expectation).
fn walk_through(opts: &LabOptions, stop: &Stop) -> Result<Vec<String>, LabError> {
    let t0 = Instant::now();
    let scenario = LabScenario::from_yaml(Path::new("starwars-demo.yaml"), SCENARIO)?;
    println!("moat demo: the Star Wars galaxy on one machine\n");
    println!(
        "Building a lab: one node (a network namespace) with a moat agent, and four pods in\n\
         namespace default, each in its own network namespace:"
    );
    let mut lab = Lab::up(&scenario, opts)?;
    stop.check()?;
    for p in &lab.plan().pods {
        let labels = scenario.base.pods[&p.key]
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let role = if p.key.contains("deathstar") {
            ", serving the deathstar API on port 80"
        } else {
            ""
        };
        println!("  {:<20} {:<12} {labels}{role}", p.key, p.ip4.to_string());
    }
    println!(
        "  agent log: {}  (lab {} up in {:.1} s)",
        lab.agents()
            .first()
            .map(|a| a.log.display().to_string())
            .unwrap_or_default(),
        lab.id(),
        t0.elapsed().as_secs_f64()
    );

    let mut shown = Shown::default();
    let mut surprises = Vec::new();
    // Whatever the agent counted while the lab came up is not part of step 1.
    shown.counters = counters(lab.agents(), FAMILIES)?;
    shown.last_flow = flows(lab.agents())?.last().map(|f| f.time_ns).unwrap_or(0);

    let landing = |ship: &'static str, deathstar: &'static str, expect: Expect| Request {
        ship,
        deathstar,
        method: "POST",
        path: "/v1/request-landing",
        expect,
    };
    let all_land: Vec<Request> = SHIPS
        .iter()
        .flat_map(|s| {
            DEATHSTARS
                .iter()
                .map(|d| landing(s, d, Expect::Status(200)))
        })
        .collect();

    header(
        1,
        "no policy",
        "No policy selects the Death Stars, so every ship may land.",
    );
    surprises.extend(requests(&lab, &all_land, stop)?);
    show(&lab, &mut shown, &["moat_verdicts_total"], |_| true)?;

    stop.check()?;
    header(
        2,
        "the L3/L4 policy (config/samples/starwars-l3l4.yaml)",
        "Policy default/rule1 lets only pods labelled org=empire reach the Death Stars, on TCP\n\
         port 80. The agent compiles it into the datapath's maps; the xwing's packets are now\n\
         dropped in the kernel, so its request times out.",
    );
    apply(&mut lab, L3L4_POLICY)?;
    let step2: Vec<Request> = SHIPS
        .iter()
        .flat_map(|s| {
            DEATHSTARS.iter().map(move |d| {
                let expect = if *s == "xwing" {
                    Expect::Dropped
                } else {
                    Expect::Status(200)
                };
                landing(s, d, expect)
            })
        })
        .collect();
    surprises.extend(requests(&lab, &step2, stop)?);
    show(
        &lab,
        &mut shown,
        &["moat_verdicts_total", "moat_policy_rule_packets_total"],
        |s| !s.starts_with("moat_verdicts_total") || s.contains("DROPPED"),
    )?;

    stop.check()?;
    header(
        3,
        "the L7 policy (config/samples/starwars-l7.yaml)",
        "The same rule, now with an HTTP rule: Empire ships may only POST /v1/request-landing.\n\
         Their connections go through the node's L7 proxy, which answers anything else with\n\
         403 Access denied. The xwing is still dropped at L3/L4.",
    );
    apply(&mut lab, L7_POLICY)?;
    let step3 = vec![
        landing("tiefighter", "deathstar-1", Expect::Status(200)),
        Request {
            ship: "tiefighter",
            deathstar: "deathstar-1",
            method: "PUT",
            path: "/v1/exhaust-port",
            expect: Expect::Status(403),
        },
        landing("xwing", "deathstar-1", Expect::Dropped),
    ];
    surprises.extend(requests(&lab, &step3, stop)?);
    show(
        &lab,
        &mut shown,
        &["moat_l7_requests_total", "moat_policy_rule_packets_total"],
        |_| true,
    )?;

    stop.check()?;
    println!("\n== Tear down ==");
    let t = Instant::now();
    let id = lab.id().to_string();
    lab.down()?;
    println!(
        "Lab {id} removed (agent stopped, namespaces and pins deleted) in {:.1} s; the demo took {:.1} s.",
        t.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(surprises)
}

fn header(n: u32, title: &str, what: &str) {
    println!("\n== Step {n}: {title} ==\n{what}");
}

/// Parse a policy document and make it the lab's only policy (waits until the agent
/// reports it programmed).
fn apply(lab: &mut Lab, yaml: &str) -> Result<(), LabError> {
    let v: serde_json::Value =
        serde_saphyr::from_str_with_options(yaml, crate::scenario::yaml_options())
            .map_err(|e| LabError::Invalid(format!("demo policy: {e}")))?;
    let t = Instant::now();
    lab.set_policies(&[v])?;
    println!(
        "  applied; the agent reports it programmed after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Make the requests of a step in parallel, print one line each, return the surprises.
fn requests(lab: &Lab, reqs: &[Request], stop: &Stop) -> Result<Vec<String>, LabError> {
    stop.check()?;
    let plan = lab.plan();
    let answers: Vec<Result<Answer, LabError>> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|r| {
                s.spawn(move || {
                    let from = plan
                        .pod(&format!("default/{}", r.ship))
                        .ok_or_else(|| LabError::Invalid(format!("no pod {}", r.ship)))?;
                    let to = plan
                        .pod(&format!("default/{}", r.deathstar))
                        .ok_or_else(|| LabError::Invalid(format!("no pod {}", r.deathstar)))?;
                    let addr = SocketAddr::new(to.ip4.into(), 80);
                    netns::in_netns(&from.netns, || {
                        Ok(http_request(addr, r.method, r.path, REQUEST_TIMEOUT))
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LabError::Invalid("a request thread panicked".into())))
            })
            .collect()
    });
    let mut surprises = Vec::new();
    for (r, a) in reqs.iter().zip(answers) {
        let a = a?;
        let got = match &a {
            Answer::Http(code, body) => format!("{code} {body}"),
            Answer::NoAnswer(why) => format!("no answer ({why}): dropped"),
        };
        let ok = matches!(
            (&a, r.expect),
            (Answer::Http(c, _), Expect::Status(e)) if *c == e
        ) || matches!((&a, r.expect), (Answer::NoAnswer(_), Expect::Dropped));
        let what = format!(
            "{:<10} {:<4} {:<20} -> {:<11}",
            r.ship, r.method, r.path, r.deathstar
        );
        println!(
            "  {what}  {got}{}",
            if ok { "" } else { "   <- UNEXPECTED" }
        );
        if !ok {
            surprises.push(format!(
                "{} {} {} -> {}: expected {:?}, got {got}",
                r.ship, r.method, r.path, r.deathstar, r.expect
            ));
        }
    }
    Ok(surprises)
}

/// One HTTP/1.1 request with `Connection: close` from the calling thread's namespace: the
/// status and the first line of the body, or why nothing came back within `timeout` per step.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> Answer {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Answer::NoAnswer(format!("connect: {}", short_io(&e))),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: deathstar.default.svc\r\nUser-Agent: moat-demo\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Answer::NoAnswer(format!("send: {}", short_io(&e)));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(a) = parse_response(&buf) {
            return a;
        }
        if Instant::now() >= deadline || buf.len() > 64 * 1024 {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => {
                return Answer::NoAnswer(format!("response: {}", short_io(&e)));
            }
            Err(_) => break,
        }
    }
    // Closed or timed out before the whole body: take what is there.
    match parse_head(&buf) {
        Some((code, body_at)) => Answer::Http(code, first_line(&buf[body_at..])),
        None if buf.is_empty() => Answer::NoAnswer("response: nothing came back".into()),
        None => Answer::NoAnswer("response: not HTTP".into()),
    }
}

fn short_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timed out".into(),
        _ => e.to_string(),
    }
}

/// The status and where the body starts, once the whole head is in `buf`.
fn parse_head(buf: &[u8]) -> Option<(u16, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let code = head.lines().next()?.split(' ').nth(1)?.parse().ok()?;
    Some((code, end + 4))
}

/// A complete response (head and `Content-Length` body, or a body's first line).
fn parse_response(buf: &[u8]) -> Option<Answer> {
    let (code, body_at) = parse_head(buf)?;
    let head = String::from_utf8_lossy(&buf[..body_at]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body = &buf[body_at..];
    let complete = match len {
        Some(n) => body.len() >= n,
        None => body.contains(&b'\n'),
    };
    complete.then(|| Answer::Http(code, first_line(body)))
}

fn first_line(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let line = s.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        String::new()
    } else {
        format!("\"{line}\"")
    }
}

/// The families a step may show.
const FAMILIES: &[&str] = &[
    "moat_verdicts_total",
    "moat_policy_rule_packets_total",
    "moat_l7_requests_total",
];

/// What earlier steps showed: counters to diff against, the newest flow.
#[derive(Default)]
struct Shown {
    counters: BTreeMap<String, u64>,
    last_flow: u64,
}

/// Every counter of `families` over all agents (summed per series).
fn counters(agents: &[Agent], families: &[&str]) -> Result<BTreeMap<String, u64>, LabError> {
    let mut out = BTreeMap::new();
    for a in agents {
        let text = agents::scrape(&a.node, &a.socket)?;
        for (series, v) in agents::parse_counters(&text, families) {
            *out.entry(series).or_default() += v;
        }
    }
    Ok(out)
}

/// The agents' recent flows, oldest first.
fn flows(agents: &[Agent]) -> Result<Vec<Flow>, LabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LabError::io("building the control client runtime"))?;
    let mut out = Vec::new();
    for a in agents {
        let (code, body) = rt
            .block_on(crate::control::client::get(
                &a.socket,
                "/flows?namespace=default&last=200",
            ))
            .map_err(|e| LabError::Agent {
                node: a.node.clone(),
                message: e.to_string(),
            })?;
        if code != 200 {
            return Err(LabError::Agent {
                node: a.node.clone(),
                message: format!("GET /flows: HTTP {code}"),
            });
        }
        out.extend(
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .filter_map(|l| serde_json::from_slice::<Flow>(l).ok()),
        );
    }
    out.sort_by_key(|f| f.time_ns);
    Ok(out)
}

/// Print the counters of `families` that changed since the last step (filtered by `keep`)
/// and the flows since the last step.
fn show(
    lab: &Lab,
    shown: &mut Shown,
    families: &[&str],
    keep: impl Fn(&str) -> bool,
) -> Result<(), LabError> {
    // Flow events reach the agent through a ring buffer: give them a moment to arrive
    // (bounded; the counters are read from the maps and exact at once).
    // Wait (bounded) until they stop coming: two reads 100 ms apart that agree.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut new_flows: Vec<Flow> = Vec::new();
    loop {
        let got: Vec<Flow> = flows(lab.agents())?
            .into_iter()
            .filter(|f| f.time_ns > shown.last_flow)
            .collect();
        let settled = !got.is_empty() && got.len() == new_flows.len();
        new_flows = got;
        if settled || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(f) = new_flows.last() {
        shown.last_flow = shown.last_flow.max(f.time_ns);
    }
    // Each connection is seen leaving the ship (egress) and arriving at the Death Star
    // (ingress): show the arrivals, the proxy's verdicts and redirections to it.
    new_flows.retain(|f| f.direction == "ingress" || f.http.is_some() || f.verdict == "REDIRECTED");
    let now = counters(lab.agents(), FAMILIES)?;
    println!("  counters (agent /metrics, changes in this step):");
    let mut any = false;
    for (series, v) in &now {
        let before = shown.counters.get(series).copied().unwrap_or(0);
        if *v == before || !families.contains(&agents::series_name(series)) || !keep(series) {
            continue;
        }
        any = true;
        println!("    {series} {v} (+{})", v - before);
    }
    if !any {
        println!("    (none)");
    }
    shown.counters = now;
    println!("  flows (agent /flows, newest last):");
    let skip = new_flows.len().saturating_sub(FLOWS_SHOWN);
    if new_flows.is_empty() {
        println!("    (none yet)");
    }
    for f in &new_flows[skip..] {
        println!("    {}", f.line());
    }
    Ok(())
}
