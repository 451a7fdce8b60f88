//! Observability end to end (issue 6, run as root): a real Prometheus (Debian package
//! `prometheus`) runs inside the lab's node namespace and scrapes the agent's
//! `--metrics-addr 127.0.0.1:9962` there (nothing is bound in the root namespace); the test
//! sends a known number of allowed, denied and audited datagrams and finds the per-rule
//! counters equal to them through Prometheus's HTTP API, default-deny drops charged to the
//! isolating policy; moat's alerting rules (config/prometheus/prometheusrule.yaml) load,
//! evaluate cleanly, name only exported metrics and stay silent on the healthy node;
//! `promtool check metrics` on a scrape; `moat observe` shows exactly the
//! provoked flows; a flood of drops overflows the event rate limit, is counted, and never
//! stalls traffic.

mod agent_support;

use agent_support::*;
use moat::lab::Lab;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_millis(700);
const METRICS: &str = "127.0.0.1:9962";
const PROM: &str = "127.0.0.1:19090";
/// The job of config/prometheus/scrape-config.yaml, which the alerts select on.
const JOB: &str = "moat-agent";

const N_ALLOW: usize = 7;
const N_DENY: usize = 5;
const N_AUDIT: usize = 4;

const SCENARIO: &str = "name: observability
namespaces: {x: {ns: x}}
pods: {x/a: {pod: a}, x/b: {pod: b}, x/c: {pod: c}}
probes:
  - {port: 80, protocol: TCP, expect: {}}
  - {port: 81, protocol: UDP, expect: {}}
";

/// x/b admits x/a on TCP 80 and UDP 81 (and so isolates x/b: x/c is default-denied).
const ALLOW: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
    ports:
    - {port: 80, protocol: TCP}
    - {port: 81, protocol: UDP}
";

/// Audit only: would deny x/b -> x/c on UDP 81 (a Deny-only policy isolates nothing).
const AUDIT: &str = "apiVersion: moat.dev/v1alpha1
kind: MoatNetworkPolicy
metadata: {name: audit-deny-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  enforcementMode: Audit
  ingress:
  - action: Deny
    from:
    - podSelector: {matchLabels: {pod: b}}
    ports:
    - {port: 81, protocol: UDP}
";

struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(node_ns: &str) -> Prometheus {
    let bin = which("prometheus").unwrap_or_else(|| {
        panic!(
            "the `prometheus` binary is missing: install the Debian package \
             (apt-get install prometheus; scripts/debs.sh lists it)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    // moat's alerting rules, as a plain Prometheus is told to take them: the PrometheusRule's
    // `spec` (JSON is YAML).
    let rules = dir.path().join("moat-rules.yaml");
    std::fs::write(&rules, alert_groups().to_string()).unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n\
             - job_name: {JOB}\n  static_configs:\n  - targets: ['{METRICS}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROM}"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start prometheus");
    Prometheus { child, _dir: dir }
}

/// The `spec` of config/prometheus/prometheusrule.yaml: its rule groups.
fn alert_groups() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/prometheus/prometheusrule.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let rule: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    rule["spec"].clone()
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// GET on Prometheus's HTTP API, from a socket made in the node namespace.
fn prom_get(node_ns: &str, path: &str) -> Option<serde_json::Value> {
    let addr: SocketAddr = PROM.parse().unwrap();
    let mut s = connect_addr(node_ns, addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query whose result is one series (None: no series yet).
fn prom_scalar(node_ns: &str, query: &str) -> Option<f64> {
    let v = prom_get(
        node_ns,
        &format!("/api/v1/query?query={}", urlencode(query)),
    )?;
    let r = v["data"]["result"].as_array()?;
    assert!(r.len() <= 1, "{query}: more than one series: {v}");
    r.first()?["value"][1].as_str()?.parse().ok()
}

/// Sum of the samples of a metric on the agent's own scrape (control socket) whose labels
/// contain every `k="v"` of `labels`.
fn scraped(socket: &Path, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = get(socket, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn send_udp(lab: &Lab, from: &str, to: &str, n: usize) {
    for _ in 0..n {
        let u = udp_socket(lab, from, T);
        u.send_to(b"x", SocketAddr::new(ip(lab, to), 81)).unwrap();
    }
}

fn rule_selector(policy: &str, rule: &str, verdict: &str) -> String {
    format!(
        "moat_policy_rule_packets_total{{namespace=\"x\",policy=\"{policy}\",rule=\"{rule}\",direction=\"ingress\",verdict=\"{verdict}\"}}"
    )
}

#[test]
fn prometheus_per_rule_counters_promtool_and_observe() {
    let s = scenario(SCENARIO);
    let mut lab = up(&s, &["--metrics-addr", METRICS]);
    write_source_file(&lab, "allow.yaml", ALLOW);
    write_source_file(&lab, "audit.yaml", AUDIT);
    lab.wait_programmed().unwrap();
    let socket = lab.agents()[0].socket.clone();
    let node = node_ns(&lab, 0);
    let prom = start_prometheus(&node);

    // Known traffic: allowed datagrams answered by the echo server, each from a fresh port (a
    // new flow each); denied ones (default deny of allow-a); audited ones (forwarded).
    for _ in 0..N_ALLOW {
        assert!(udp_reach(&lab, "x/a", "x/b", 81, T), "allowed datagram");
    }
    send_udp(&lab, "x/c", "x/b", N_DENY);
    for _ in 0..N_AUDIT {
        assert!(
            udp_reach(&lab, "x/b", "x/c", 81, T),
            "audited datagram passes"
        );
    }

    let want = [
        // A rule's counter charges every packet of the flows it admitted, replies included
        // (the datapath counts established packets on the conntrack entry's rule): each
        // allowed datagram and its echo.
        (rule_selector("allow-a", "0", "FORWARDED"), 2 * N_ALLOW),
        (rule_selector("allow-a", "default-deny", "DROPPED"), N_DENY),
        (rule_selector("audit-deny-b", "0", "AUDIT"), N_AUDIT),
    ];
    // The agent counts them (its own scrape), then Prometheus agrees.
    let (_, text) = get(&socket, "/metrics");
    let rule_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("moat_policy_rule_packets_total"))
        .collect();
    for (sel, n) in &want {
        let got = poll(
            &format!("prometheus: {sel} == {n}"),
            Duration::from_secs(30),
            || prom_scalar(&node, sel).filter(|v| *v >= *n as f64),
        );
        if got != *n as f64 {
            let flows = observe(&socket, &["--last", "1000"]);
            panic!("{sel} = {got}, sent {n}; agent's scrape: {rule_lines:#?}; flows: {flows:#?}");
        }
    }

    // Target healthy, no scrape errors.
    let targets = prom_get(&node, "/api/v1/targets").expect("targets");
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(active[0]["lastError"], "", "{targets}");
    assert_eq!(
        prom_scalar(&node, &format!("up{{job=\"{JOB}\"}}")),
        Some(1.0)
    );

    // The alerting rules load and evaluate without error, every metric they name is on the
    // agent's scrape, and none fires or is pending on this healthy node.
    // Evaluated after this point, they saw the samples queried above.
    let since = std::time::SystemTime::now();
    let want_rules = alert_groups()["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .len();
    let rules = poll(
        "prometheus evaluated every alerting rule",
        Duration::from_secs(30),
        || {
            let v = prom_get(&node, "/api/v1/rules?type=alert")?;
            let rules = v["data"]["groups"][0]["rules"].as_array()?.clone();
            let evaluated = rules.len() == want_rules
                && rules.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                        .is_some_and(|t| t > since)
                });
            evaluated.then_some(rules)
        },
    );
    for r in &rules {
        assert_eq!(r["health"], "ok", "{r}");
        assert_eq!(r["state"], "inactive", "{r}");
        let query = r["query"].as_str().unwrap();
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("moat_"))
        {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "alert {} uses {name}, which the agent does not export",
                r["name"]
            );
        }
    }
    drop(prom);

    // promtool on a scrape of the TCP endpoint (made in the node namespace).
    let body = {
        let mut c = connect_addr(&node, METRICS.parse().unwrap(), T).expect("metrics addr");
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: moat\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        text.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    assert!(body.contains("moat_policy_rule_packets_total"));
    // promtool reads only the Prometheus text format: it stops at OpenMetrics' `info` type
    // (an artefact, documented) and would lint nothing after it. Rewrite `info` to `gauge`
    // (the info metric's `_info` sample is a gauge of 1 in the text format) and drop `# EOF`.
    let text_format: String = body
        .lines()
        .filter(|l| *l != "# EOF")
        .map(|l| match l.strip_suffix(" info") {
            Some(head) if l.starts_with("# TYPE ") => format!("{head} gauge\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let findings = promtool_findings(&text_format);
    // Documented artefact: none expected beyond what OpenMetrics encoders always emit.
    let unexpected: Vec<&String> = findings
        .iter()
        .filter(|f| !is_openmetrics_artefact(f, &body))
        .collect();
    assert!(unexpected.is_empty(), "promtool findings: {findings:#?}");
    eprintln!("promtool findings (OpenMetrics artefacts): {findings:#?}");

    // `moat observe` shows exactly the provoked flows, with the right policy and rule.
    let lines = observe(&socket, &["--last", "1000"]);
    let count = |needle: &str| lines.iter().filter(|l| l.as_str() == needle).count();
    let fwd = "x/a -> x/b UDP 81 FORWARDED by netpol x/allow-a#0";
    let drop = "x/c -> x/b UDP 81 DROPPED by netpol x/allow-a#default-deny";
    let audit_pfx = "x/b -> x/c UDP 81 AUDIT";
    assert_eq!(count(fwd), N_ALLOW, "{lines:#?}");
    assert_eq!(count(drop), N_DENY, "{lines:#?}");
    let audits: Vec<&String> = lines.iter().filter(|l| l.starts_with(audit_pfx)).collect();
    assert_eq!(audits.len(), N_AUDIT, "{lines:#?}");
    assert!(
        audits.iter().all(|l| l.contains("audit-deny-b#0")),
        "audit rule named: {audits:#?}"
    );
    let others: Vec<&String> = lines
        .iter()
        .filter(|l| l.as_str() != fwd && l.as_str() != drop && !l.starts_with(audit_pfx))
        // The source's own egress hook reports each new flow as well (its egress is not
        // isolated), and the kernel's IPv6 MLD reports go to link-local multicast.
        .filter(|l| !l.ends_with("FORWARDED (not-isolated)"))
        .collect();
    assert!(others.is_empty(), "flows nobody provoked: {others:#?}");
    // Server-side filters.
    let dropped = observe(&socket, &["--last", "1000", "--verdict", "DROPPED"]);
    assert_eq!(dropped.len(), N_DENY, "{dropped:#?}");
    lab.down().unwrap();
}

fn observe(socket: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("observe")
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moat observe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn promtool_findings(body: &str) -> Vec<String> {
    let bin = which("promtool").expect("promtool (Debian package prometheus)");
    let mut c = Command::new(bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// promtool parses the Prometheus text format; in OpenMetrics a counter family is declared
/// without its `_total` suffix (`# TYPE moat_verdicts counter`, samples `moat_verdicts_total`)
/// and info metrics end in `_info`; the linter's naming advice about those is an artefact.
/// Likewise `# HELP` names the family (`moat_verdicts`), so promtool reports the sample name
/// (`moat_verdicts_total`, `moat_build_info`) as having "no help text" although it has.
fn is_openmetrics_artefact(finding: &str, body: &str) -> bool {
    if let Some(name) = finding.strip_suffix(" no help text") {
        let stem = name
            .strip_suffix("_total")
            .or_else(|| name.strip_suffix("_info"));
        return stem.is_some_and(|s| body.contains(&format!("# HELP {s} ")));
    }
    finding.contains("counter metrics should have \"_total\" suffix")
}

#[test]
fn event_overflow_is_counted_and_never_stalls_traffic() {
    let s = scenario(SCENARIO);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "allow.yaml", ALLOW);
    lab.wait_programmed().unwrap();
    let socket = lab.agents()[0].socket.clone();
    let before = scraped(&socket, "moat_events_suppressed_total", &[])
        + scraped(&socket, "moat_events_lost_total", &[]);
    let drops_before = scraped(
        &socket,
        "moat_policy_rule_packets_total",
        &[("rule", "default-deny"), ("verdict", "DROPPED")],
    );
    let mut open = connect(&lab, "x/a", "x/b", 80, T).expect("allowed");
    const FLOOD: usize = 20_000;
    std::thread::scope(|sc| {
        let lab = &lab;
        let flood = sc.spawn(move || {
            let u = udp_socket(lab, "x/c", T);
            let dst = SocketAddr::new(ip(lab, "x/b"), 81);
            for _ in 0..FLOOD {
                u.send_to(b"flood", dst).unwrap();
            }
        });
        // Allowed traffic keeps flowing during the flood.
        let mut i = 0;
        while !flood.is_finished() {
            assert!(
                echo(&mut open, format!("{i}\n").as_bytes()),
                "echo {i} during flood"
            );
            assert!(
                udp_reach(lab, "x/a", "x/b", 81, T),
                "new allowed flow during flood"
            );
            i += 1;
        }
        flood.join().unwrap();
    });
    let drops = poll("all flood drops counted", Duration::from_secs(10), || {
        let d = scraped(
            &socket,
            "moat_policy_rule_packets_total",
            &[("rule", "default-deny"), ("verdict", "DROPPED")],
        );
        (d - drops_before >= FLOOD as f64).then_some(d - drops_before)
    });
    assert_eq!(drops, FLOOD as f64, "every dropped packet counted exactly");
    let after = scraped(&socket, "moat_events_suppressed_total", &[])
        + scraped(&socket, "moat_events_lost_total", &[]);
    assert!(
        after > before,
        "a flood of {FLOOD} drops overflowed nothing? suppressed+lost {before} -> {after}"
    );
    assert!(echo(&mut open, b"after\n"));
    assert!(tcp_reach(&lab, "x/a", "x/b", 80, T));
    lab.down().unwrap();
}
