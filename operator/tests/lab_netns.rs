//! The lab without agents (run as root): topology up/down, the sweep of a killed run, the
//! probe engine against the in-process servers (all reachable without policy; a drop planted
//! with nftables in the node namespace is reported; fresh UDP ports; IPv6; two nodes; a
//! deliberately wrong `expect`), and the deathstar HTTP API.

use moat::lab::state::{self, LabState, SweepMode};
use moat::lab::{Lab, LabOptions, LabScenario, ProbeOptions, netns};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn scenario(text: &str) -> LabScenario {
    LabScenario::from_yaml(Path::new("inline.yaml"), text).expect("scenario parses")
}

fn opts() -> LabOptions {
    LabOptions {
        probe: ProbeOptions {
            timeout: Duration::from_millis(700),
            ..ProbeOptions::default()
        },
        ..LabOptions::default()
    }
}

/// Four pods in two namespaces; every listed probe expects everything reachable.
fn all_reachable(extra_top: &str, probes: &[(&str, &str)]) -> String {
    let all = "[x/a, x/b, y/a, y/b]";
    let mut s = format!(
        "name: all-reachable\n\
         namespaces: {{x: {{ns: x}}, y: {{ns: y}}}}\n\
         pods: {{x/a: {{pod: a}}, x/b: {{pod: b}}, y/a: {{pod: a}}, y/b: {{pod: b}}}}\n\
         {extra_top}\nprobes:\n"
    );
    for (head, extra) in probes {
        s.push_str(&format!(
            "  - {head}\n{extra}    expect: {{x/a: {all}, x/b: {all}, y/a: {all}, y/b: {all}}}\n"
        ));
    }
    s
}

fn root_links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn links_in(ns: &str) -> BTreeSet<String> {
    netns::in_netns(ns, || {
        Ok(nix::net::if_::if_nameindex()
            .unwrap()
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .collect())
    })
    .unwrap()
}

fn assert_gone(id: &str, netns_names: &[String]) {
    for n in netns_names {
        assert!(!netns::path(n).exists(), "namespace {n} left behind");
    }
    assert!(
        netns::list(&format!("moat-lab-{id}-")).is_empty(),
        "namespaces of lab {id} left behind"
    );
    assert!(
        !LabState::file(id).exists(),
        "state file of {id} left behind"
    );
    assert!(
        !LabState::runtime_dir(id).exists(),
        "runtime dir of {id} left"
    );
}

#[test]
fn topology_up_down_leaves_nothing() {
    let before = root_links();
    let s = scenario(&all_reachable(
        "nodes: {node-1: [x/a, y/a], node-2: [x/b, y/b]}",
        &[("port: 80\n    protocol: TCP", "")],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    let id = lab.id().to_string();
    let names = lab.plan().all_netns();
    assert_eq!(names.len(), 6);
    for n in &names {
        assert!(netns::path(n).exists(), "{n} exists while up");
    }
    let n1 = &lab.plan().nodes[0];
    let links = links_in(&n1.netns);
    for want in ["lo", "lxc2", "lxc3", "wire2"] {
        assert!(links.contains(want), "{want} in {}: {links:?}", n1.netns);
    }
    let pod = &lab.plan().pods[0];
    assert!(links_in(&pod.netns).contains("eth0"));
    assert!(LabState::file(&id).exists());
    lab.down().unwrap();
    assert_gone(&id, &names);
    assert_eq!(root_links(), before, "the root namespace's links changed");
}

#[test]
fn probe_without_policy_all_reachable_both_families() {
    let s = scenario(&all_reachable(
        "",
        &[
            ("port: 80\n    protocol: TCP", ""),
            ("port: 81\n    protocol: UDP", ""),
            ("port: 80\n    protocol: TCP", "    family: IPv6\n"),
            ("port: 81\n    protocol: UDP", "    family: IPv6\n"),
        ],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    let r = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(r.passed(), "{}", r.render_matrix());
    assert_eq!(r.probes.len(), 4);
    for p in &r.probes {
        assert!(!p.skipped);
        assert_eq!(p.cells.len(), 12, "4 pods, diagonal left out");
        assert!(p.cells.iter().all(|c| c.observed), "{}", r.render_matrix());
    }
}

#[test]
fn two_nodes_reach_each_other_across_the_wire() {
    let s = scenario(&all_reachable(
        "nodes: {node-1: [x/a, y/a], node-2: [x/b, y/b]}",
        &[
            ("port: 80\n    protocol: TCP", ""),
            ("port: 80\n    protocol: UDP", ""),
            ("port: 80\n    protocol: TCP", "    family: IPv6\n"),
            ("port: 80\n    protocol: UDP", "    family: IPv6\n"),
        ],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    let plan = lab.plan().clone();
    assert_eq!(plan.pod("x/b").unwrap().ip4.to_string(), "10.244.2.2");
    assert_eq!(plan.pod("x/b").unwrap().ip6.to_string(), "fd00:10:244:2::2");
    let r = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(r.passed(), "{}", r.render_matrix());
}

#[test]
fn planted_nft_drop_is_reported_unreachable() {
    let s = scenario(&all_reachable(
        "",
        &[
            ("port: 80\n    protocol: TCP", ""),
            ("port: 81\n    protocol: TCP", ""),
        ],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    let node = lab.plan().nodes[0].netns.clone();
    let xb = lab.plan().pod("x/b").unwrap().ip4;
    // A drop outside moat: forwarded TCP to x/b:80, in the node's own netfilter. `ip netns
    // exec` is fine here: nft needs no bpffs.
    let rules = format!(
        "table inet moat_lab_test {{\n chain drop_fwd {{\n  \
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
    let r = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(!r.passed());
    let tcp80 = &r.probes[0];
    let wrong: BTreeSet<(String, String)> = tcp80
        .mismatches
        .iter()
        .map(|m| {
            assert!(m.expected && !m.observed);
            (m.from.clone(), m.to.clone())
        })
        .collect();
    let want: BTreeSet<(String, String)> = ["x/a", "y/a", "y/b"]
        .iter()
        .map(|f| (f.to_string(), "x/b".to_string()))
        .collect();
    assert_eq!(wrong, want, "{}", r.render_matrix());
    assert!(r.probes[1].mismatches.is_empty(), "port 81 is untouched");
}

#[test]
fn udp_probes_use_fresh_source_ports() {
    let s = scenario(&all_reachable(
        "",
        &[
            ("port: 80\n    protocol: UDP", ""),
            ("port: 81\n    protocol: UDP", ""),
        ],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    let r1 = lab.probe(&s, &opts().probe).unwrap();
    let r2 = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(r1.passed() && r2.passed(), "{}", r1.render_matrix());
    // Per source pod, no two probes (of either run) share a source port.
    let mut seen: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut n = 0;
    for r in [&r1, &r2] {
        for p in &r.probes {
            for c in &p.cells {
                let port = c.source_port.expect("udp cells record their port");
                assert!(
                    seen.insert((c.from.clone(), port)),
                    "port {port} reused by {}",
                    c.from
                );
                n += 1;
            }
        }
    }
    assert_eq!(n, 2 * 2 * 12);
}

#[test]
fn wrong_expect_fails_listing_exactly_the_wrong_cells() {
    let text = "name: wrong-expect\n\
        namespaces: {x: {ns: x}, y: {ns: y}}\n\
        pods: {x/a: {pod: a}, x/b: {pod: b}, y/a: {pod: a}}\n\
        probes:\n\
        \x20 - port: 80\n\
        \x20   protocol: TCP\n\
        \x20   expect: {x/a: [x/a, y/a], x/b: [x/a, x/b, y/a], y/a: [x/b, y/a]}\n\
        \x20 - port: 80\n\
        \x20   protocol: UDP\n\
        \x20   expect: {x/a: [x/a, x/b, y/a], x/b: [x/a, x/b, y/a], y/a: [x/a, x/b, y/a]}\n\
        \x20 - port: 80\n\
        \x20   protocol: SCTP\n\
        \x20   expect: {}\n";
    let s = scenario(text);
    let lab = Lab::up(&s, &opts()).unwrap();
    let r = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(!r.passed());
    let json = r.to_json_value();
    assert_eq!(json["scenario"], "wrong-expect");
    assert_eq!(json["passed"], false);
    let p0 = &json["probes"][0];
    assert_eq!(p0["port"], 80);
    assert_eq!(p0["protocol"], "TCP");
    assert_eq!(p0["skipped"], false);
    assert!(p0["reason"].is_null());
    assert_eq!(
        p0["results"],
        serde_json::json!({
            "x/a": {"x/b": true, "y/a": true},
            "x/b": {"x/a": true, "y/a": true},
            "y/a": {"x/a": true, "x/b": true},
        })
    );
    assert_eq!(
        p0["mismatches"],
        serde_json::json!([
            {"from": "x/a", "to": "x/b", "expected": false, "observed": true},
            {"from": "y/a", "to": "x/a", "expected": false, "observed": true},
        ])
    );
    assert_eq!(json["probes"][1]["mismatches"], serde_json::json!([]));
    // SCTP: this kernel has none; skipped with a reason, not passed, not failed.
    let p2 = &json["probes"][2];
    if p2["skipped"] == true {
        assert!(p2["reason"].as_str().unwrap().contains("SCTP"));
        assert_eq!(p2["results"], serde_json::json!({}));
    }
    // Exactly the keys the CLI contract names.
    let keys: Vec<&str> = p0.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys.iter().copied().collect::<BTreeSet<_>>(),
        [
            "mismatches",
            "port",
            "protocol",
            "reason",
            "results",
            "skipped"
        ]
        .into_iter()
        .collect()
    );
    // The matrix marks exactly the two wrong cells.
    let m = r.render_matrix();
    assert_eq!(m.matches(".!").count(), 2, "{m}");
    assert_eq!(m.matches("X!").count(), 0, "{m}");
    assert!(
        m.contains("x/a -> x/b: expected blocked, observed reachable"),
        "{m}"
    );
    assert!(
        m.contains("y/a -> x/a: expected blocked, observed reachable"),
        "{m}"
    );
}

fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[test]
fn deathstar_http_api() {
    let all = "[default/deathstar, default/tiefighter]";
    let text = format!(
        "name: deathstar\n\
         namespaces: {{default: {{kubernetes.io/metadata.name: default}}}}\n\
         pods: {{default/deathstar: {{class: deathstar}}, default/tiefighter: {{class: tiefighter}}}}\n\
         deathstar: {{pods: [default/deathstar]}}\n\
         probes:\n\
         \x20 - port: 80\n    protocol: TCP\n    http: {{method: POST, path: /v1/request-landing}}\n    expect: {{default/deathstar: {all}, default/tiefighter: {all}}}\n\
         \x20 - port: 80\n    protocol: TCP\n    family: IPv6\n    http: {{method: PUT, path: /v1/exhaust-port, expectStatus: 503}}\n    expect: {{default/deathstar: {all}, default/tiefighter: {all}}}\n\
         \x20 - port: 80\n    protocol: TCP\n    http: {{method: PUT, path: /v1/exhaust-port}}\n    expect: {{}}\n"
    );
    let s = scenario(&text);
    let lab = Lab::up(&s, &opts()).unwrap();
    let ds = lab.plan().pod("default/deathstar").unwrap().clone();
    let tf = lab.plan().pod("default/tiefighter").unwrap().clone();
    let addr = SocketAddr::from((ds.ip4, 80));
    let answers = netns::in_netns(&tf.netns, move || {
        Ok([
            http(addr, "POST", "/v1/request-landing"),
            http(addr, "PUT", "/v1/exhaust-port"),
            http(addr, "GET", "/"),
            http(addr, "GET", "/nothing"),
        ])
    })
    .unwrap();
    assert_eq!(answers[0], (200, "Ship landed\n".to_string()));
    assert_eq!(answers[1].0, 503);
    assert!(
        answers[1].1.starts_with("Panic: deathstar exploded"),
        "{}",
        answers[1].1
    );
    assert_eq!(answers[2].0, 200);
    assert!(answers[2].1.contains("Death Star"));
    assert_eq!(answers[3].0, 404);
    // The same through the probe engine: landing 200 and the panic 503 everywhere (every pod
    // serves the API on an HTTP-probed port); expecting 200 from the exhaust port fails.
    let r = lab.probe(&s, &opts().probe).unwrap();
    lab.down().unwrap();
    assert!(r.probes[0].mismatches.is_empty(), "{}", r.render_matrix());
    assert!(r.probes[1].mismatches.is_empty(), "{}", r.render_matrix());
    assert!(r.probes[2].cells.iter().all(|c| !c.observed));
    assert!(
        r.probes[2].mismatches.is_empty(),
        "expect {{}} = all blocked"
    );
    let d = &r.probes[1].cells[0].detail;
    assert_eq!(d, "status 503");
}

/// Not a test on its own: the child half of `killed_run_is_swept` (re-executed with the
/// variable set, it builds a lab, prints its id and waits to be killed).
#[test]
fn killed_run_child() {
    if std::env::var_os("MOAT_LAB_TEST_CHILD").is_none() {
        return;
    }
    let s = scenario(&all_reachable(
        "nodes: {node-1: [x/a, y/a], node-2: [x/b, y/b]}",
        &[("port: 80\n    protocol: TCP", "")],
    ));
    let lab = Lab::up(&s, &opts()).unwrap();
    println!("LAB-ID {}", lab.id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    drop(lab);
}

#[test]
fn killed_run_is_swept() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "killed_run_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MOAT_LAB_TEST_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = loop {
        let line = lines.next().expect("child printed its lab id").unwrap();
        // libtest may print "test killed_run_child ... " before it on the same line.
        if let Some((_, id)) = line.split_once("LAB-ID ") {
            break id.trim().to_string();
        }
    };
    let st = LabState::load(&LabState::file(&id)).expect("state file of the child's lab");
    assert!(st.owner_alive());
    // A sweep of stale labs leaves a live lab alone.
    state::sweep(SweepMode::Stale, Path::new("/sys/fs/bpf")).unwrap();
    assert!(st.netns.iter().all(|n| netns::path(n).exists()));
    child.kill().unwrap();
    child.wait().unwrap();
    // A killed run leaves its namespaces (unless a lab being built by a parallel test has
    // swept them already: its state file is then gone too).
    if LabState::file(&id).exists() {
        assert!(st.netns.iter().any(|n| netns::path(n).exists()));
    }
    // (A lab being built by a parallel test may sweep it first: either way it is gone.)
    state::sweep(SweepMode::Stale, Path::new("/sys/fs/bpf")).unwrap();
    assert_gone(&id, &st.netns);
}

#[test]
fn project_scenarios_load_and_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/scenarios");
    let mut n = 0;
    for dir in [root.clone(), root.join("moat")] {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let s = LabScenario::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let plan = moat::lab::LabPlan::new("test", &s).unwrap();
            moat::lab::ext::resolve_policies(
                &s.base.policies,
                &|p| plan.ip_of(p, moat::lab::Family::IPv4),
                &|p| plan.ip_of(p, moat::lab::Family::IPv6),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            // Every expected row names known pods, and every probe has a server.
            for (i, p) in s.base.probes.iter().enumerate() {
                for pod in &plan.pods {
                    let serves = pod.servers.iter().any(|sv| sv.port == p.port);
                    let skip = moat::lab::probe::unsupported(p.protocol).is_some();
                    assert!(
                        serves || skip,
                        "{}: probe {i}: {} has no server",
                        f.display(),
                        pod.key
                    );
                }
            }
            n += 1;
        }
    }
    assert!(n >= 29, "upstream and moat scenarios found: {n}");
}

/// Timing of the reference size (9 pods, two ports) without agents: `cargo test
/// --release -p moat --test lab_netns -- --ignored --nocapture timing`. Without enforcement
/// every cell is reachable, so this measures build, probe and teardown, not timeouts.
#[test]
#[ignore]
fn timing_nine_pods_two_ports() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/scenarios/018-ingress-named-port.yaml");
    let s = LabScenario::load(&path).unwrap();
    let t0 = std::time::Instant::now();
    let lab = Lab::up(&s, &opts()).unwrap();
    let up = t0.elapsed();
    let r = lab.probe(&s, &opts().probe).unwrap();
    let probed = t0.elapsed();
    lab.down().unwrap();
    println!(
        "9 pods, {} probes: up {:.2}s, probe {:.2}s, down {:.2}s",
        r.probes.len(),
        up.as_secs_f64(),
        (probed - up).as_secs_f64(),
        (t0.elapsed() - probed).as_secs_f64()
    );
    println!("{}", r.render_matrix());
}

/// Smoke run through real agents (the agent tests proper come with the agent): `cargo test
/// --release -p moat --test lab_netns -- --ignored --nocapture agent_smoke`.
#[test]
#[ignore]
fn agent_smoke_upstream_001() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/scenarios/001-default-deny-ingress.yaml");
    let mut o = LabOptions::with_agent(env!("CARGO_BIN_EXE_moat"));
    o.probe = opts().probe;
    let t0 = std::time::Instant::now();
    let r = moat::lab::run_probe(&path, &o);
    match r {
        Ok(r) => {
            println!("{:.2}s\n{}", t0.elapsed().as_secs_f64(), r.render_matrix());
            assert!(r.passed());
        }
        Err(e) => panic!("{e}"),
    }
}

/// Every scenario through real agents, one lab per topology: `cargo test --release -p moat
/// --test lab_netns -- --ignored --nocapture agent_suite`.
#[test]
#[ignore]
fn agent_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/scenarios");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("moat")] {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        v.sort();
        files.extend(v);
    }
    let mut o = LabOptions::with_agent(env!("CARGO_BIN_EXE_moat"));
    o.probe = opts().probe;
    let t0 = std::time::Instant::now();
    let mut failed = Vec::new();
    for e in moat::lab::run_suite(&files, &o) {
        let name = e.path.file_name().unwrap().to_string_lossy().into_owned();
        match e.result {
            Ok(r) if r.passed() => println!("ok    {name} ({:.1}s)", r.elapsed.as_secs_f64()),
            Ok(r) => {
                println!("FAIL  {name}\n{}", r.render_matrix());
                failed.push(name);
            }
            Err(err) => {
                println!("ERROR {name}: {err}");
                failed.push(name);
            }
        }
    }
    println!(
        "suite: {:.1}s, failed: {failed:?}",
        t0.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty());
}
