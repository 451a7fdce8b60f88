//! The lab with real agents (run as root): a policy change between two probes of one lab,
//! cleanup after a killed run with agents, the Star Wars demo end to end, and the probe
//! cross-checked against the agents' DROPPED counters. Plus the `/metrics` parsing behind the
//! cross-check (no root needed).
//!
//! The lab tests take one lock: each builds a lab with agents, and the machine has two cores.

use moat::lab::agents::{self, DropCrossCheck};
use moat::lab::state::{self, LabState, SweepMode};
use moat::lab::{Lab, LabOptions, LabScenario, ProbeOptions, netns};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static LAB: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}

fn opts() -> LabOptions {
    let mut o = LabOptions::with_agent(env!("CARGO_BIN_EXE_moat"));
    o.probe = ProbeOptions {
        timeout: Duration::from_millis(700),
        ..ProbeOptions::default()
    };
    o
}

fn upstream(name: &str) -> LabScenario {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/scenarios")
        .join(name);
    LabScenario::load(&p).unwrap()
}

fn scenario(text: &str) -> LabScenario {
    LabScenario::from_yaml(Path::new("inline.yaml"), text).expect("scenario parses")
}

const BPFFS: &str = "/sys/fs/bpf";

fn pin_roots() -> BTreeSet<String> {
    std::fs::read_dir(BPFFS)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("moat-lab-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces and pin roots of labs that have no state file (what a leak looks like; a live
/// lab of someone else always has its state file).
fn orphans() -> BTreeSet<String> {
    netns::list("moat-lab-")
        .into_iter()
        .chain(pin_roots())
        .filter(|n| state::id_of(n).is_some_and(|id| !LabState::file(id).exists()))
        .collect()
}

fn my_labs() -> Vec<String> {
    let me = std::process::id();
    LabState::load_all()
        .into_iter()
        .filter(|s| s.owner.as_ref().is_some_and(|o| o.pid == me))
        .map(|s| s.id)
        .collect()
}

// ---- parsing (no root) ----

const SCRAPE: &str = r#"# HELP moat_verdicts Packets decided by the datapath, by direction, verdict and reason.
# TYPE moat_verdicts counter
moat_verdicts_total{direction="ingress",verdict="FORWARDED",reason="policy-allowed"} 12
moat_verdicts_total{direction="ingress",verdict="DROPPED",reason="policy-denied"} 5
moat_verdicts_total{direction="egress",verdict="DROPPED",reason="default-deny"} 2
# TYPE moat_verdict_bytes counter
moat_verdict_bytes_total{direction="ingress",verdict="DROPPED",reason="policy-denied"} 300
# TYPE moat_policy_rule_packets counter
moat_policy_rule_packets_total{kind="MoatNetworkPolicy",namespace="default",policy="rule1",rule="default-deny",direction="ingress",verdict="DROPPED"} 5
moat_policy_rule_packets_total{kind="NetworkPolicy",namespace="x",policy="a \"b\", c}",rule="0",direction="ingress",verdict="FORWARDED"} 7 1700000000
moat_l7_requests_total{kind="",namespace="",policy="",method="PUT",verdict="denied"} 1
moat_endpoints 4
# EOF
"#;

#[test]
fn parse_verdict_counters() {
    let c = agents::parse_counters(SCRAPE, agents::VERDICT_FAMILIES);
    assert_eq!(c.len(), 5, "{c:?}");
    assert_eq!(
        c[1],
        (
            "moat_verdicts_total{direction=\"ingress\",verdict=\"DROPPED\",reason=\"policy-denied\"}"
                .to_string(),
            5
        )
    );
    // A label value with an escaped quote, a comma, a brace; a timestamp after the value.
    assert_eq!(c[4].1, 7);
    let l = agents::series_labels(&c[4].0);
    assert_eq!(l["policy"], "a \"b\", c}");
    assert_eq!(l["verdict"], "FORWARDED");
    assert_eq!(l.len(), 6);
    assert_eq!(
        agents::series_name(&c[3].0),
        "moat_policy_rule_packets_total"
    );
    assert_eq!(agents::dropped_packets(&c), 7);
    // Other families on request; gauges and bytes are never mistaken for packets.
    let l7 = agents::parse_counters(SCRAPE, &["moat_l7_requests_total"]);
    assert_eq!(l7.len(), 1);
    assert_eq!(agents::series_labels(&l7[0].0)["method"], "PUT");
    assert!(agents::parse_counters("", agents::VERDICT_FAMILIES).is_empty());
    assert!(
        DropCrossCheck {
            blocked_cells: 3,
            dropped_packets: 3
        }
        .consistent()
    );
    assert!(
        !DropCrossCheck {
            blocked_cells: 3,
            dropped_packets: 2
        }
        .consistent()
    );
}

// ---- labs with agents (root) ----

/// Upstream 021 (allow-all ingress in x) then 022 (the same policy mutated to deny-all) on
/// one lab: the second probe sees the new matrix, and its blocked cells are backed by the
/// agent's DROPPED counters.
#[test]
fn policy_change_between_two_probes_of_one_lab() {
    let _l = lock();
    let (s1, s2) = (
        upstream("021-updated-policy-step1.yaml"),
        upstream("022-updated-policy-step2.yaml"),
    );
    let o = opts();
    let t0 = Instant::now();
    let mut lab = Lab::up(&s1, &o).unwrap();
    let up = t0.elapsed();
    let r1 = lab.probe(&s1, &o.probe).unwrap();
    assert!(r1.passed(), "step 1:\n{}", r1.render_matrix());
    let t1 = Instant::now();
    lab.set_policies(&s2.base.policies).unwrap();
    let swap = t1.elapsed();
    let (r2, check) = agents::probe_cross_checked(&lab, &s2, &o.probe).unwrap();
    assert!(r2.passed(), "step 2:\n{}", r2.render_matrix());
    assert_ne!(
        r1.probes[0].results, r2.probes[0].results,
        "the policy change changed nothing"
    );
    assert!(check.blocked_cells > 0);
    assert!(check.consistent(), "{check:?}");
    let t2 = Instant::now();
    lab.down().unwrap();
    println!(
        "up {:.1}s, probe 1 {:.1}s, swap {:.2}s, probe 2 {:.1}s, down {:.1}s, total {:.1}s; \
         {check:?}",
        up.as_secs_f64(),
        r1.elapsed.as_secs_f64(),
        swap.as_secs_f64(),
        r2.elapsed.as_secs_f64(),
        t2.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

const DENY: &str = r#"
name: default-deny ingress in x, TCP and UDP
namespaces: {x: {ns: x}, y: {ns: y}}
pods: {x/a: {pod: a}, x/b: {pod: b}, y/a: {pod: a}}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec: {podSelector: {}, policyTypes: [Ingress]}
probes:
  - port: 80
    protocol: TCP
    expect: {x/a: [y/a], x/b: [y/a], y/a: []}
  - port: 81
    protocol: UDP
    expect: {x/a: [y/a], x/b: [y/a], y/a: []}
"#;

/// The cross-check: after probing a default-deny scenario, the agents' DROPPED counters rose
/// by at least the number of blocked cells.
#[test]
fn dropped_counters_cover_blocked_cells() {
    let _l = lock();
    let s = scenario(DENY);
    let o = opts();
    let lab = Lab::up(&s, &o).unwrap();
    let before = agents::verdict_counters(&lab.agents()[0]).unwrap();
    let (r, check) = agents::probe_cross_checked(&lab, &s, &o.probe).unwrap();
    let after = agents::verdict_counters(&lab.agents()[0]).unwrap();
    lab.down().unwrap();
    // x/a, x/b blocked from everyone else: 2 pods x 2 sources x 2 probes.
    assert!(r.passed(), "{}", r.render_matrix());
    assert_eq!(check.blocked_cells, 8, "{}", r.render_matrix());
    assert!(check.consistent(), "{check:?}");
    // The drops are charged to the isolating policy.
    let rule_drops = |c: &[(String, u64)]| -> u64 {
        c.iter()
            .filter(|(s, _)| {
                let l = agents::series_labels(s);
                agents::series_name(s) == "moat_policy_rule_packets_total"
                    && l.get("policy").map(String::as_str) == Some("deny")
                    && l.get("verdict").map(String::as_str) == Some("DROPPED")
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        rule_drops(&after) >= rule_drops(&before) + 8,
        "before {before:?}\nafter {after:?}"
    );
}

/// Not a test on its own: the child half of `killed_run_with_agents_is_swept`.
#[test]
#[ignore]
fn killed_agent_lab_child() {
    if std::env::var_os("MOAT_LAB_AGENTS_CHILD").is_none() {
        return;
    }
    let lab = Lab::up(&scenario(DENY), &opts()).unwrap();
    println!("LAB-ID {}", lab.id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    drop(lab);
}

/// A run with agents killed with SIGKILL leaves namespaces, pins and running agents; the
/// next sweep removes all of them.
#[test]
fn killed_run_with_agents_is_swept() {
    let _l = lock();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_agent_lab_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MOAT_LAB_AGENTS_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = loop {
        let line = lines.next().expect("child printed its lab id").unwrap();
        if let Some((_, id)) = line.split_once("LAB-ID ") {
            break id.trim().to_string();
        }
    };
    let st = LabState::load(&LabState::file(&id)).expect("state of the child's lab");
    assert_eq!(st.agents.len(), 1);
    assert!(st.agents.iter().all(|a| a.alive()));
    assert!(!st.pin_roots.is_empty());
    assert!(
        st.pin_roots.iter().all(|p| p.exists()),
        "{:?}",
        st.pin_roots
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed: nothing cleaned up, the agent outlives its owner (unless a parallel lab's
    // stale sweep got there first).
    if LabState::file(&id).exists() {
        assert!(st.netns.iter().any(|n| netns::path(n).exists()));
    }
    state::sweep(SweepMode::Stale, Path::new(BPFFS)).unwrap();
    for n in &st.netns {
        assert!(!netns::path(n).exists(), "namespace {n} left behind");
    }
    for p in &st.pin_roots {
        assert!(!p.exists(), "pin root {} left behind", p.display());
    }
    for a in &st.agents {
        assert!(!a.alive(), "agent {} left running", a.pid);
    }
    assert!(!LabState::file(&id).exists());
    assert!(!LabState::runtime_dir(&id).exists());
    if let Some(d) = &st.source_dir {
        assert!(!d.exists(), "source dir {} left behind", d.display());
    }
}

/// `moat lab demo` runs to completion (every step as expected) and leaves nothing behind.
#[test]
fn demo_runs_and_leaves_nothing() {
    let _l = lock();
    let t0 = Instant::now();
    moat::lab::demo::run(&opts()).unwrap();
    println!("demo: {:.1}s", t0.elapsed().as_secs_f64());
    assert!(my_labs().is_empty(), "labs left: {:?}", my_labs());
    let o = orphans();
    assert!(o.is_empty(), "left behind: {o:?}");
}

/// The cross-check catches a drop that is not moat's: with no policy and an nftables drop
/// planted in the node namespace, the probe sees blocked cells the agent never dropped.
#[test]
fn drop_outside_moat_fails_the_cross_check() {
    let _l = lock();
    let s = scenario(
        r#"
name: no policy, TCP 80
namespaces: {x: {ns: x}}
pods: {x/a: {pod: a}, x/b: {pod: b}, x/c: {pod: c}}
probes:
  - port: 80
    protocol: TCP
    expect: {x/a: [x/b, x/c], x/b: [x/a, x/c], x/c: [x/a, x/b]}
"#,
    );
    let o = opts();
    let lab = Lab::up(&s, &o).unwrap();
    let node = lab.plan().nodes[0].netns.clone();
    let xb = lab.plan().pod("x/b").unwrap().ip4;
    // `ip netns exec` is fine here: nft needs no bpffs.
    let rules = format!(
        "table inet moat_lab_agents_test {{\n chain drop_fwd {{\n  \
         type filter hook forward priority 0; policy accept;\n  \
         ip daddr {xb} tcp dport 80 drop\n }}\n}}\n"
    );
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &node, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft rule loads");
    let (r, check) = agents::probe_cross_checked(&lab, &s, &o.probe).unwrap();
    lab.down().unwrap();
    assert_eq!(r.probes[0].mismatches.len(), 2, "{}", r.render_matrix());
    assert_eq!(
        check,
        DropCrossCheck {
            blocked_cells: 2,
            dropped_packets: 0
        }
    );
    assert!(!check.consistent());
}
