//! `make bench-agent`: policy-apply latency of a standalone agent with 1,000 local endpoints —
//! from a policy file being written to the agent reporting that source state programmed —
//! for single policy edits. Writes `target/bench/agent.json` (shared notes, benchmarks.md).
//!
//! Run as root. Everything lives in a private network namespace (1,000 veth pairs whose one
//! end stands for a pod's host-side interface) and a private pin root, removed on exit.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

const ENDPOINTS: usize = 1_000;
const EDITS: usize = 100;

/// Removes the namespace, the pins, the directory and the agent, also on panic.
struct Bench {
    ns: String,
    pins: String,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = moat_datapath::Datapath::reset(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .expect("ip")
        .success();
    assert!(ok, "ip {}", args.join(" "));
}

fn endpoints_file() -> String {
    let mut s = String::from(
        "nodes:\n  - name: node-1\n    addresses: [10.250.0.1]\nnamespaces:\n  - name: bench\n    labels: {team: bench}\nendpoints:\n",
    );
    for i in 0..ENDPOINTS {
        let _ = writeln!(
            s,
            "  - {{name: pod-{i}, namespace: bench, node: node-1, labels: {{app: app-{}}}, interface: bd{i}, ips: [10.250.{}.{}]}}",
            i % 50,
            1 + i / 250,
            1 + i % 250
        );
    }
    s
}

/// A policy over every endpoint of app `app`, allowing port `port` from app-0.
fn policy(app: usize, port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{app}, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: app-{app}}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app-0}}}}}}]\n    ports: [{{port: {port}}}]\n"
    )
}

fn programmed(rt: &tokio::runtime::Runtime, socket: &Path, digest: &str) -> bool {
    matches!(rt.block_on(moat::control::client::status(socket)),
        Ok(s) if s.programmed_digest.as_deref() == Some(digest))
}

fn main() {
    let tag = std::process::id();
    let mut b = Bench {
        ns: format!("moat-bench-{tag}"),
        pins: format!("/sys/fs/bpf/moat-bench-agent-{tag}"),
        dir: std::env::temp_dir().join(format!("moat-bench-agent-{tag}")),
        agent: None,
    };
    let src = b.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    ip(&["netns", "add", &b.ns]);
    let batch = b.dir.join("links.batch");
    let mut cmds = String::new();
    for i in 0..ENDPOINTS {
        let _ = writeln!(
            cmds,
            "link add bd{i} type veth peer name bp{i}\nlink set bd{i} up\nlink set bp{i} up"
        );
    }
    std::fs::write(&batch, cmds).unwrap();
    ip(&["-n", &b.ns, "-batch", batch.to_str().unwrap()]);
    std::fs::write(src.join("endpoints.yaml"), endpoints_file()).unwrap();
    for app in 0..10 {
        std::fs::write(src.join(format!("p{app}.yaml")), policy(app, 80)).unwrap();
    }

    let socket = b.dir.join("agent.sock");
    let exe = std::env::current_exe().unwrap();
    let moat = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("moat"))
        .expect("target dir");
    b.agent = Some(
        Command::new(&moat)
            .args(["agent", "--node-name", "node-1"])
            .arg("--source")
            .arg(format!("dir:{}", src.display()))
            .args(["--pin-root", &b.pins])
            .arg("--state-dir")
            .arg(b.dir.join("state"))
            .arg("--control-socket")
            .arg(&socket)
            .arg("--netns")
            .arg(format!("/var/run/netns/{}", b.ns))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent (run `make build` first)"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let digest = moat::source::digest::dir_digest(&src).unwrap();
    while !programmed(&rt, &socket, &digest) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "agent never programmed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let initial = started.elapsed().as_secs_f64();
    let status = rt.block_on(moat::control::client::status(&socket)).unwrap();
    assert_eq!(status.local_endpoints, ENDPOINTS, "{:?}", status.errors);
    println!("initial programming of {ENDPOINTS} endpoints: {initial:.2} s");

    // Single edits: one policy's port changes; time from the write to the report.
    let mut ms = Vec::with_capacity(EDITS);
    for e in 0..EDITS {
        let app = e % 10;
        let text = policy(app, 1000 + e as u16);
        let path = src.join(format!("p{app}.yaml"));
        let t = Instant::now();
        std::fs::write(&path, &text).unwrap();
        let digest = moat::source::digest::dir_digest(&src).unwrap();
        while !programmed(&rt, &socket, &digest) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "edit {e} never programmed"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!(
        "policy edit -> programmed, {EDITS} edits: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
        ms[ms.len() - 1]
    );
    let params = json!({"local_endpoints": ENDPOINTS, "policies": 10, "edits": EDITS});
    let out = json!({
        "bench": "agent",
        "measured_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "method": format!("standalone agent in a private netns with {ENDPOINTS} veth ends \
            as endpoints; {EDITS} single-policy edits (file write, then the control socket is \
            polled every 0.5 ms until the agent reports the new directory digest programmed)"),
        "results": [
            {"name": "apply_latency_ms", "metric": "ms", "value": p50, "min": ms[0],
             "max": ms[ms.len() - 1], "runs": EDITS, "params": params},
            {"name": "apply_latency_p99_ms", "metric": "ms", "value": p99, "min": ms[0],
             "max": ms[ms.len() - 1], "runs": EDITS, "params": params},
            {"name": "initial_programming_s", "metric": "s", "value": initial, "min": initial,
             "max": initial, "runs": 1, "params": params},
        ],
        "targets": [
            {"name": "apply_latency_p99_ms", "value": p99, "op": "<=", "limit": 50.0,
             "met": p99 <= 50.0, "from": "p99 of apply_latency over the edits"},
        ],
    });
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/agent.json",
        serde_json::to_string_pretty(&out).unwrap() + "\n",
    )
    .unwrap();
    println!("wrote target/bench/agent.json");
}
