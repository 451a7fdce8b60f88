//! Real packets through the attached programs: pods are network namespaces joined to a node
//! namespace by veth pairs, and reachability must follow the map contents as they change, and
//! survive the loading process being killed.
mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use aya::programs::tc::TcAttachType;
use moat_common::{action, identity};
use moat_datapath::{Datapath, MapOp};
use support::{netns::*, *};

const A_ID: u32 = 300;
const B_ID: u32 = 400;

fn sock(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Endpoints and ipcache for pods a (0) and b (1) of `node`; b isolated for ingress as asked.
fn program_node(dp: &mut Datapath, node: &Node, b_isolated: bool) {
    let (ia, ib) = (node.ifindex(0), node.ifindex(1));
    let (a, b) = (&node.pods[0], &node.pods[1]);
    let b_iso: &[u8] = if b_isolated { &[INGRESS] } else { &[] };
    dp.apply(&[
        MapOp::EndpointSet(ia, endpoint(1, A_ID, 1, &[])),
        MapOp::EndpointSet(ib, endpoint(2, B_ID, 2, b_iso)),
        MapOp::IpcacheUpsert(a.ip4.into(), ipc(A_ID, 1)),
        MapOp::IpcacheUpsert(a.ip6.into(), ipc(A_ID, 1)),
        MapOp::IpcacheUpsert(b.ip4.into(), ipc(B_ID, 2)),
        MapOp::IpcacheUpsert(b.ip6.into(), ipc(B_ID, 2)),
        MapOp::IpcacheUpsert(node.ip4.into(), ipc(identity::HOST, 0)),
    ])
    .unwrap();
    bump(dp);
}

fn attach(dp: Datapath, node: &Node) -> Datapath {
    let ifs: Vec<String> = node.pods.iter().map(|p| p.host_if.clone()).collect();
    in_ns(&node.ns, move || {
        let mut dp = dp;
        for i in &ifs {
            dp.attach_endpoint(i).unwrap();
        }
        dp
    })
}

fn b_allows(dp: &mut Datapath, proto: u8, port: u16, bits: u32, rule: u32) {
    dp.apply(&[MapOp::PolicyUpsert(
        pkey(2, A_ID, INGRESS, proto, port, bits),
        pval(action::ALLOW, rule),
    )])
    .unwrap();
    bump(dp);
}

#[test]
fn reachability_follows_map_contents() {
    let node = Node::new(2, 1);
    let root = PinRoot::new("reach");
    let (a, b) = (&node.pods[0], &node.pods[1]);
    echo_servers(&b.ns, 8080);
    echo_servers(&b.ns, 8081);
    echo_servers(&a.ns, 9090);
    let mut dp = attach(root.open(), &node);

    // Not isolated: everything flows.
    program_node(&mut dp, &node, false);
    assert!(tcp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(udp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(ping_reaches(&a.ns, b.ip4));

    // b isolated for ingress, nothing allowed.
    program_node(&mut dp, &node, true);
    assert!(!tcp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(!udp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(!ping_reaches(&a.ns, b.ip4));
    // b's own egress is not isolated, and its replies come back through its to-endpoint.
    assert!(tcp_reaches(&b.ns, sock(a.ip4, 9090)));
    assert!(udp_reaches(&b.ns, sock(a.ip4, 9090)));
    assert!(ping_reaches(&b.ns, a.ip4));

    // TCP 8080 from a.
    b_allows(&mut dp, TCP, 8080, 16, 1);
    assert!(tcp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(tcp_reaches(&a.ns, sock(b.ip6, 8080)));
    assert!(!tcp_reaches(&a.ns, sock(b.ip4, 8081)));
    assert!(!udp_reaches(&a.ns, sock(b.ip4, 8080)));
    // Any UDP port, then ICMP.
    b_allows(&mut dp, UDP, 0, 0, 2);
    assert!(udp_reaches(&a.ns, sock(b.ip4, 8081)));
    assert!(udp_reaches(&a.ns, sock(b.ip6, 8080)));
    assert!(!ping_reaches(&a.ns, b.ip4));
    b_allows(&mut dp, ICMP, 0, 0, 3);
    assert!(ping_reaches(&a.ns, b.ip4));

    // The node reaches b although b is isolated (semantic rule 3).
    assert!(tcp_reaches(&node.ns, sock(b.ip4, 8081)));

    // Revoking TCP 8080 stops new connections and, after the revision bump, open ones.
    let mut open = tcp_connect(&a.ns, sock(b.ip4, 8080)).unwrap();
    assert!(echo_ok(&mut open));
    dp.apply(&[MapOp::PolicyRemove(pkey(2, A_ID, INGRESS, TCP, 8080, 16))])
        .unwrap();
    bump(&mut dp);
    assert!(!tcp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(!echo_ok(&mut open));

    let rules = dp.rule_counters().unwrap();
    assert!(rules.keys().any(|k| k.rule_id == 1), "{rules:?}");
    assert!(rules.keys().any(|k| k.rule_id == 900), "{rules:?}");
    // Detaching b's interface removes its enforcement entirely.
    let b_if = b.host_if.clone();
    in_ns(&node.ns, move || {
        let mut dp = dp;
        dp.detach_endpoint(&b_if).unwrap();
        assert!(
            Datapath::tcx_program_ids(&b_if, TcAttachType::Egress)
                .unwrap()
                .is_empty()
        );
    });
    assert!(tcp_reaches(&a.ns, sock(b.ip4, 8080)));
}

/// The benchmarks' baseline: `attach_floor` puts the empty program where the endpoint
/// programs go, and it passes what they would drop.
#[test]
fn the_floor_sits_at_the_endpoint_hooks_and_passes_everything() {
    let node = Node::new(2, 1);
    let root = PinRoot::new("floor");
    let (a, b) = (&node.pods[0], &node.pods[1]);
    echo_servers(&b.ns, 8080);
    let mut dp = root.open();
    // b isolated for ingress with nothing allowed: its to-endpoint would drop a's connection.
    program_node(&mut dp, &node, true);
    let [.., floor] = dp.program_ids().unwrap();
    let b_if = b.host_if.clone();
    let attached = in_ns(&node.ns, move || {
        let mut dp = dp;
        dp.attach_floor(&b_if).unwrap();
        [TcAttachType::Ingress, TcAttachType::Egress]
            .map(|h| Datapath::tcx_program_ids(&b_if, h).unwrap())
    });
    assert_eq!(attached, [vec![floor], vec![floor]]);
    assert!(tcp_reaches(&a.ns, sock(b.ip4, 8080)));
}

/// Not a test on its own: the loading process of `survives_kill_of_the_loading_process`,
/// run as a child with `--ignored`. It adopts or creates the pins, attaches, programs the
/// node, reports ready and waits to be killed.
#[test]
#[ignore]
fn holder() {
    let Ok(root) = std::env::var("MOAT_HOLDER_ROOT") else {
        return;
    };
    let ns = std::env::var("MOAT_HOLDER_NS").unwrap();
    let ifs: Vec<String> = std::env::var("MOAT_HOLDER_IFS")
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    let ips: Vec<std::net::IpAddr> = std::env::var("MOAT_HOLDER_IPS")
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    in_ns(&ns, move || {
        let mut dp = Datapath::open(&root).unwrap();
        for i in &ifs {
            dp.attach_endpoint(i).unwrap();
        }
        let (ia, ib) = (
            moat_datapath::ifindex(&ifs[0]).unwrap(),
            moat_datapath::ifindex(&ifs[1]).unwrap(),
        );
        dp.apply(&[
            MapOp::EndpointSet(ia, endpoint(1, A_ID, 1, &[])),
            MapOp::EndpointSet(ib, endpoint(2, B_ID, 2, &[INGRESS])),
            MapOp::IpcacheUpsert(ips[0].into(), ipc(A_ID, 1)),
            MapOp::IpcacheUpsert(ips[1].into(), ipc(B_ID, 2)),
            MapOp::PolicyUpsert(
                pkey(2, A_ID, INGRESS, TCP, 8080, 16),
                pval(action::ALLOW, 1),
            ),
        ])
        .unwrap();
        // Same revision on every start: nothing changed.
        dp.apply(&[MapOp::SetRevision(1)]).unwrap();
        println!("moat-holder-ready");
        loop {
            thread::sleep(Duration::from_secs(60));
        }
    });
}

fn spawn_holder(root: &PinRoot, node: &Node) -> Child {
    let ifs: Vec<&str> = node.pods.iter().map(|p| p.host_if.as_str()).collect();
    let ips: Vec<String> = node.pods.iter().map(|p| p.ip4.to_string()).collect();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MOAT_HOLDER_ROOT", &root.0)
        .env("MOAT_HOLDER_NS", &node.ns)
        .env("MOAT_HOLDER_IFS", ifs.join(","))
        .env("MOAT_HOLDER_IPS", ips.join(","))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let ready = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("moat-holder-ready"));
    assert!(ready, "holder did not start");
    child
}

fn tcx_ids(node: &Node) -> Vec<Vec<u32>> {
    let ifs: Vec<String> = node.pods.iter().map(|p| p.host_if.clone()).collect();
    in_ns(&node.ns, move || {
        ifs.iter()
            .flat_map(|i| {
                [TcAttachType::Ingress, TcAttachType::Egress]
                    .map(|h| Datapath::tcx_program_ids(i, h).unwrap())
            })
            .collect()
    })
}

/// Kills the child on drop, so a failing assertion never leaves it running.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn survives_kill_of_the_loading_process() {
    let node = Node::new(2, 2);
    let root = PinRoot::new("restart");
    let (a, b) = (&node.pods[0], &node.pods[1]);
    echo_servers(&b.ns, 8080);
    echo_servers(&b.ns, 8081);

    let first = Holder(spawn_holder(&root, &node));
    let ids_before = tcx_ids(&node);
    assert!(
        ids_before.iter().all(|ids| ids.len() == 1),
        "{ids_before:?}"
    );
    assert!(tcp_reaches(&a.ns, sock(b.ip4, 8080)));
    assert!(!tcp_reaches(&a.ns, sock(b.ip4, 8081)));

    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU32::new(0));
    let echo_failures = Arc::new(AtomicU32::new(0));
    let breaches = Arc::new(AtomicU32::new(0));
    let mut conn = tcp_connect(&a.ns, sock(b.ip4, 8080)).unwrap();
    let traffic = {
        let (stop, echoes, failures) = (stop.clone(), echoes.clone(), echo_failures.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if echo_ok(&mut conn) {
                    echoes.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let denied = {
        let (stop, breaches, ns, addr) = (
            stop.clone(),
            breaches.clone(),
            a.ns.clone(),
            sock(b.ip4, 8081),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if tcp_reaches(&ns, addr) {
                    breaches.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    thread::sleep(Duration::from_millis(300));
    // kill -9: no destructor runs in the loading process.
    drop(first);
    let at_kill = echoes.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(500));
    let while_dead = echoes.load(Ordering::Relaxed) - at_kill;
    let second = Holder(spawn_holder(&root, &node));
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    denied.join().unwrap();

    assert_eq!(
        echo_failures.load(Ordering::Relaxed),
        0,
        "established flow broke"
    );
    assert!(
        while_dead > 10,
        "no traffic while the loader was dead: {while_dead}"
    );
    assert_eq!(
        breaches.load(Ordering::Relaxed),
        0,
        "denied flow got through"
    );
    assert_eq!(tcx_ids(&node), ids_before, "attached programs changed");
    drop(second);
}
