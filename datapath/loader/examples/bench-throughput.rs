//! `make bench-throughput`: what moat costs real traffic. One lab node (a network namespace)
//! routes between a client pod and a server pod (their own namespaces, joined to the node by
//! veth pairs; nothing in the machine's root namespace). For each filter configuration —
//! none, empty TC programs at moat's hooks (`tc-floor`: what any TC-based enforcement costs
//! before it does anything), moat with 10 / 1,000 / 10,000 other policy entries per enforced
//! rule set and 100,000 ipcache prefixes, iptables (nf_tables backend) with 10,000 linear rules, nftables
//! with the 10,000 peers in one set — it measures (the configurations alternating within each
//! metric of each run, each set up afresh):
//! - TCP throughput (iperf3, one stream), Gbit/s;
//! - UDP 64-byte datagrams (iperf3 `-u -l 64 -b 0`), packets/s received by the server;
//! - HTTP requests/s on 16 keep-alive connections (wrk `-t1 -c16`, nginx, a tiny file);
//! - the same with a new connection per request (`Connection: close`).
//!
//! Every measurement is checked: the filter holds the intended rules, and its counters (and
//! the node's veth counters) prove that the traffic crossed it and was accepted by the rule
//! meant to accept it — for moat, per-rule counters at both ends, no drops, and for new
//! connections one full policy lookup per connection at each end. The floor has no rules and
//! no counters: its program ids must be the ones on the four hooks, and the veth counters
//! prove the traffic crossed them. Once per configuration a connection to a port no rule
//! allows must be dropped (with no filter, or the floor, it is refused by the server).
//!
//! After the judged runs, each metric is measured once more under `tc-floor` and `moat-10k`
//! with the kernel's per-program run-time statistics on (`BPF_ENABLE_STATS`): the programs'
//! time per run and as a share of the machine's busy CPU time. For CPU-bound traffic that
//! share, over the floor's, is the most any cheaper datapath could give back — a figure that
//! does not drown in the run-to-run spread of whole-system throughput on a shared VM.
//!
//! Writes `$CARGO_TARGET_DIR/bench/throughput.json` (../shared/notes/benchmarks.md). Run as
//! root. `MOAT_BENCH_RUNS` (default 5), `MOAT_BENCH_SECONDS` (default 10),
//! `MOAT_BENCH_CONFIGS` and `MOAT_BENCH_METRICS` (comma-separated names, default all) shorten
//! it for development.
//! Placement is fixed, the same for every configuration: the clients (iperf3 -c, wrk) on CPU 0,
//! the servers (iperf3 -s, one nginx worker) on CPU 1; the kernel forwards each packet in the
//! softirq of the CPU that sent it. Unpinned, the scheduler's placement alone moved single
//! runs by a factor of two on this 2-core VM.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use moat_common::{
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, action, direction, ep_flag, ep_flags,
    identity, policy_prefix, reason, verdict,
};
use moat_datapath::{
    Datapath, EventStream, MapOp, PolicyEntryKey, RuleCounterKey, VerdictCounterKey,
};
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 80;
/// iperf3's UDP datagram payload (`-l`).
const UDP_PAYLOAD: u64 = 64;
/// Ports no rule allows the client: 81 is refused by the client's egress policy, 82 is
/// allowed there and refused by the server's ingress policy.
const DENIED_EGRESS_PORT: u16 = 81;
const DENIED_INGRESS_PORT: u16 = 82;

/// The ipcache every moat configuration carries: 90% exact /32s (hash), 10% CIDRs (trie).
const IPCACHE_PREFIXES: u32 = 100_000;
const IPCACHE_CIDRS: u32 = 10_000;
/// Other peers of the server (and the client): as many as the largest moat configuration
/// has entries, and the iptables rules / nftables set elements.
const OTHER_PEERS: u32 = 10_000;

const CLIENT_EP: u32 = 1;
const SERVER_EP: u32 = 2;
const CLIENT_ID: u32 = identity::FIRST_LABEL;
const SERVER_ID: u32 = identity::FIRST_LABEL + 1;
/// Identities of the other peers (one each) and of the filler addresses.
const OTHER_ID: u32 = identity::FIRST_LABEL + 16;
const FILLER_ID: u32 = identity::FIRST_LABEL + 20_000;

/// Rule ids: the entries that allow the benchmark's flows, per end and protocol/port.
const RULE_SERVER_TCP_IPERF: u32 = 1;
const RULE_SERVER_UDP_IPERF: u32 = 2;
const RULE_SERVER_HTTP: u32 = 3;
const RULE_CLIENT_TCP_IPERF: u32 = 4;
const RULE_CLIENT_UDP_IPERF: u32 = 5;
const RULE_CLIENT_HTTP: u32 = 6;
const RULE_CLIENT_PROBE: u32 = 7;
/// The policies that isolate the server's ingress and the client's egress.
const RULE_SERVER_ISOLATING: u32 = 8;
const RULE_CLIENT_ISOLATING: u32 = 9;
/// Other entries are charged to rule ids from here.
const RULE_OTHER: u32 = 16;

/// Set by SIGINT/SIGTERM: the benchmark stops after the current step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted: cleaning up"
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    None,
    /// moat's empty `floor` program at both TC hooks of both pods' veths.
    Floor,
    /// Other policy entries per enforced rule set.
    Moat(u32),
    Iptables,
    NftSet,
}

struct Config {
    name: &'static str,
    filter: Filter,
}

const CONFIGS: [Config; 7] = [
    Config {
        name: "none",
        filter: Filter::None,
    },
    Config {
        name: "tc-floor",
        filter: Filter::Floor,
    },
    Config {
        name: "moat-10",
        filter: Filter::Moat(10),
    },
    Config {
        name: "moat-1k",
        filter: Filter::Moat(1_000),
    },
    Config {
        name: "moat-10k",
        filter: Filter::Moat(10_000),
    },
    Config {
        name: "iptables-10k",
        filter: Filter::Iptables,
    },
    Config {
        name: "nft-set-10k",
        filter: Filter::NftSet,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    Tcp,
    Udp,
    HttpKeepAlive,
    HttpClose,
}

const METRICS: [Metric; 4] = [
    Metric::Tcp,
    Metric::Udp,
    Metric::HttpKeepAlive,
    Metric::HttpClose,
];

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Tcp => "tcp_throughput",
            Metric::Udp => "udp_64b_packets",
            Metric::HttpKeepAlive => "http_keepalive_requests",
            Metric::HttpClose => "http_new_connection_requests",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Tcp => "gbit_per_s",
            Metric::Udp => "packets_per_s",
            _ => "requests_per_s",
        }
    }

    /// Its column heading in the printed table.
    fn heading(self) -> &'static str {
        match self {
            Metric::Tcp => "TCP Gbit/s",
            Metric::Udp => "UDP 64B pkt/s",
            Metric::HttpKeepAlive => "HTTP k-a req/s",
            Metric::HttpClose => "HTTP new req/s",
        }
    }

    /// The allowing rule at the server's ingress and at the client's egress.
    fn rules(self) -> (u32, u32) {
        match self {
            Metric::Tcp => (RULE_SERVER_TCP_IPERF, RULE_CLIENT_TCP_IPERF),
            Metric::Udp => (RULE_SERVER_UDP_IPERF, RULE_CLIENT_UDP_IPERF),
            _ => (RULE_SERVER_HTTP, RULE_CLIENT_HTTP),
        }
    }
}

/// One measurement: the figure, and how many units of traffic (packets or requests) the
/// counters must at least show.
struct Outcome {
    value: f64,
    min_packets: u64,
    /// New connections opened (the new-connection HTTP test: one per request).
    connections: u64,
}

fn run_cmd(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? `make debs`)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip` with whitespace-separated arguments.
fn ip(args: &str) {
    run_cmd(Command::new("ip").args(args.split_whitespace()));
}

/// `ip netns exec <ns> <args>`: tools that need no bpffs (a new mount namespace hides it).
fn in_ns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// The calling thread inside network namespace `ns` until dropped (setns moves only this
/// thread; the benchmark has no other threads while it is entered).
struct Entered(File);

impl Entered {
    fn new(ns: &str) -> Self {
        let orig = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(format!("/var/run/netns/{ns}")).expect("netns");
        setns(&target, CloneFlags::CLONE_NEWNET).expect("setns");
        Entered(orig)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(&self.0, CloneFlags::CLONE_NEWNET);
    }
}

/// A child process killed (and reaped) when dropped, also on panic.
struct Guarded(Child);

impl Guarded {
    /// SIGTERM, then SIGKILL if it has not exited within two seconds.
    fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lab: node, client and server namespaces, nginx in the server, a run directory and a
/// pin root. Everything is removed on drop, also on panic.
struct Lab {
    node: String,
    client: String,
    server: String,
    client_if: String,
    server_if: String,
    dir: PathBuf,
    pins: String,
    nginx: Option<Guarded>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut n) = self.nginx.take() {
            n.stop();
        }
        let _ = Datapath::reset(&self.pins);
        for ns in [&self.client, &self.server, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn new() -> Lab {
        let tag = format!("{:x}", std::process::id());
        let mut lab = Lab {
            node: format!("moat-tp{tag}-node"),
            client: format!("moat-tp{tag}-cli"),
            server: format!("moat-tp{tag}-srv"),
            client_if: format!("lxc{tag}c"),
            server_if: format!("lxc{tag}s"),
            dir: std::env::temp_dir().join(format!("moat-bench-throughput-{tag}")),
            pins: format!("/sys/fs/bpf/moat-bench-throughput-{tag}"),
            nginx: None,
        };
        std::fs::create_dir_all(&lab.dir).unwrap();
        for ns in [&lab.node, &lab.client, &lab.server] {
            ip(&format!("netns add {ns}"));
        }
        let node = &lab.node;
        ip(&format!("-n {node} link set lo up"));
        run_cmd(&mut in_ns_cmd(
            node,
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ));
        // Pods as a CNI without a bridge sets them up: a /32 on eth0, a link-scope default
        // gateway answered by the host side, a /32 route per pod in the node.
        for (pod, host_if, addr) in [
            (&lab.client, &lab.client_if, CLIENT),
            (&lab.server, &lab.server_if, SERVER),
        ] {
            for cmd in [
                format!("-n {node} link add {host_if} type veth peer name eth0 netns {pod}"),
                format!("-n {pod} link set lo up"),
                format!("-n {pod} link set eth0 up"),
                format!("-n {node} link set {host_if} up"),
                format!("-n {pod} addr add {addr}/32 dev eth0"),
                format!("-n {pod} route add 169.254.1.1 dev eth0 scope link"),
                format!("-n {pod} route add default via 169.254.1.1 dev eth0"),
                format!("-n {node} addr add 169.254.1.1/32 dev {host_if}"),
                format!("-n {node} route add {addr}/32 dev {host_if}"),
            ] {
                ip(&cmd);
            }
        }
        // 16 connections a request each for 10 s reuse the client's ports; a wide range
        // keeps the kernel from waiting for one.
        run_cmd(&mut in_ns_cmd(
            &lab.client,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"],
        ));
        lab.start_nginx();
        std::fs::write(lab.dir.join("peers.txt"), peers_file()).unwrap();
        std::fs::write(lab.dir.join("peers.nft"), nft_defines()).unwrap();
        lab
    }

    fn start_nginx(&mut self) {
        let prefix = self.dir.join("nginx");
        for d in ["html", "logs", "tmp"] {
            std::fs::create_dir_all(prefix.join(d)).unwrap();
        }
        std::fs::write(prefix.join("html/index.html"), "moat bench\n").unwrap();
        // Workers run as nobody: they must be able to read the prefix.
        for p in [&self.dir, &prefix, &prefix.join("html")] {
            let _ =
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        }
        let conf = repo_file("bench/throughput/nginx.conf");
        let pid = format!("pid {};", prefix.join("nginx.pid").display());
        let child = in_ns_cmd(&self.server, &["nginx", "-e", "stderr", "-p"])
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-g", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx (`make debs`)");
        self.nginx = Some(Guarded(child));
        wait_listening(&self.server, "tcp", HTTP_PORT);
    }

    /// A datapath under the lab's pin root with nothing left from an earlier configuration.
    fn fresh_datapath(&self) -> Datapath {
        let _ = Datapath::reset(&self.pins);
        Datapath::open(&self.pins).expect("open datapath")
    }

    fn ifindex(&self, ifname: &str) -> u32 {
        let _in = Entered::new(&self.node);
        moat_datapath::ifindex(ifname).expect("ifindex")
    }

    /// Packets the node sent to the server pod (its veth's counter).
    fn server_veth_tx(&self) -> u64 {
        let out = run_cmd(Command::new("ip").args([
            "-n",
            &self.node,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            &self.server_if,
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
    }

    /// Ids of the programs attached to the pods' host-side veths (TCX ingress and egress).
    fn tcx_programs(&self) -> Vec<u32> {
        use aya::programs::tc::TcAttachType;
        let _in = Entered::new(&self.node);
        [&self.client_if, &self.server_if]
            .iter()
            .flat_map(|i| [(i, TcAttachType::Ingress), (i, TcAttachType::Egress)])
            .flat_map(|(i, h)| Datapath::tcx_program_ids(i, h).unwrap())
            .collect()
    }

    fn nft(&self, args: &[&str]) -> Output {
        let mut c = in_ns_cmd(&self.node, &["nft"]);
        c.args(args);
        run_cmd(&mut c)
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// The other peers' addresses: 10.96.0.1 and up.
fn other_peer(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + k + 1)
}

fn peers_file() -> String {
    (0..OTHER_PEERS)
        .map(|k| format!("{}\n", other_peer(k)))
        .collect()
}

fn nft_defines() -> String {
    let mut s = format!("define CLIENT = {CLIENT}\ndefine SERVER = {SERVER}\ndefine PEERS = {{\n");
    for k in 0..OTHER_PEERS {
        s.push_str(&format!("\t{},\n", other_peer(k)));
    }
    s.push_str(&format!("\t{CLIENT}\n}}\n"));
    s
}

/// Poll `ss` in `ns` until something listens on `port` (`proto` "tcp" or "udp").
fn wait_listening(ns: &str, proto: &str, port: u16) {
    let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let filter = format!("sport = :{port}");
    let t = Instant::now();
    loop {
        let out = run_cmd(&mut in_ns_cmd(ns, &["ss", flag, &filter]));
        if !out.stdout.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "nothing listens on {proto} port {port} in {ns}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- moat ----

fn policy_key(subject: u32, peer: u32, dir: u8, proto: u8, port: u16) -> PolicyKey {
    PolicyKey {
        subject,
        peer,
        direction: dir,
        protocol: proto,
        dport: port.to_be_bytes(),
    }
}

/// `n` other entries of a rule set in `dir`: the first allows any peer (UDP 53), every tenth
/// covers a port range (in the trie), the rest allow one peer on one port (exact hash). So a
/// new flow takes every probe moat has: exact and any-peer, hash and trie.
fn other_entries(subject: u32, dir: u8, n: u32, ops: &mut Vec<MapOp>) {
    for k in 0..n {
        let (key, prefix_len) = if k == 0 {
            (
                policy_key(subject, identity::ANY, dir, 17, 53),
                policy_prefix::FULL,
            )
        } else if k % 10 == 9 {
            // Ports 1024-2047.
            (
                policy_key(subject, OTHER_ID + k, dir, 6, 1024),
                policy_prefix::PROTOCOL + 6,
            )
        } else {
            let port = [80, 443, 5201, 8080][k as usize % 4];
            (
                policy_key(subject, OTHER_ID + k, dir, 6, port),
                policy_prefix::FULL,
            )
        };
        ops.push(MapOp::PolicyUpsert(
            PolicyEntryKey { key, prefix_len },
            PolicyValue::enforced(action::ALLOW, RULE_OTHER + k % 1000),
        ));
    }
}

/// The whole desired state of a moat configuration, in the reconciler's order (ipcache and
/// policy before the endpoints that use them; attachment after, by the caller).
fn moat_state(lab: &Lab, others: u32) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let v = |identity, endpoint_id| IpcacheValue {
        identity,
        endpoint_id,
        flags: 0,
    };
    let host = |a: Ipv4Addr| IpNet::from(std::net::IpAddr::V4(a));
    ops.push(MapOp::IpcacheUpsert(host(CLIENT), v(CLIENT_ID, CLIENT_EP)));
    ops.push(MapOp::IpcacheUpsert(host(SERVER), v(SERVER_ID, SERVER_EP)));
    for k in 0..OTHER_PEERS {
        ops.push(MapOp::IpcacheUpsert(
            host(other_peer(k)),
            v(OTHER_ID + k, 0),
        ));
    }
    let exact = IPCACHE_PREFIXES - IPCACHE_CIDRS - 2 - OTHER_PEERS;
    for i in 0..exact {
        // 10.112.0.0/12 and up: addresses of pods elsewhere in the cluster.
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 112, 0, 1)) + i);
        ops.push(MapOp::IpcacheUpsert(host(a), v(FILLER_ID + i % 4096, 0)));
    }
    for i in 0..IPCACHE_CIDRS {
        // Distinct /24s under 100.64.0.0/10: policy CIDRs.
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i << 8));
        ops.push(MapOp::IpcacheUpsert(
            IpNet::V4(ipnet::Ipv4Net::new(a, 24).unwrap()),
            v(identity::FIRST_CIDR + i, 0),
        ));
    }

    let (ing, eg) = (direction::INGRESS, direction::EGRESS);
    // (subject, peer, direction, protocol, port, rule): the server's ingress allows the
    // client on the iperf3 and HTTP ports; the client's egress allows the server on the same
    // ports, and on the probe port the server refuses.
    #[rustfmt::skip]
    let allowed = [
        (SERVER_EP, CLIENT_ID, ing, 6, IPERF_PORT, RULE_SERVER_TCP_IPERF),
        (SERVER_EP, CLIENT_ID, ing, 17, IPERF_PORT, RULE_SERVER_UDP_IPERF),
        (SERVER_EP, CLIENT_ID, ing, 6, HTTP_PORT, RULE_SERVER_HTTP),
        (CLIENT_EP, SERVER_ID, eg, 6, IPERF_PORT, RULE_CLIENT_TCP_IPERF),
        (CLIENT_EP, SERVER_ID, eg, 17, IPERF_PORT, RULE_CLIENT_UDP_IPERF),
        (CLIENT_EP, SERVER_ID, eg, 6, HTTP_PORT, RULE_CLIENT_HTTP),
        (CLIENT_EP, SERVER_ID, eg, 6, DENIED_INGRESS_PORT, RULE_CLIENT_PROBE),
    ];
    for (subject, peer, dir, proto, port, rule) in allowed {
        ops.push(MapOp::PolicyUpsert(
            PolicyEntryKey {
                key: policy_key(subject, peer, dir, proto, port),
                prefix_len: policy_prefix::FULL,
            },
            PolicyValue::enforced(action::ALLOW, rule),
        ));
    }
    other_entries(SERVER_EP, ing, others, &mut ops);
    other_entries(CLIENT_EP, eg, others, &mut ops);

    let endpoint = |ep, identity, dir: u8, isolating: u32| {
        let mut rules = [0; 2];
        rules[dir as usize] = isolating;
        EndpointInfo {
            endpoint_id: ep,
            identity,
            // Rule-set id = endpoint id: each pod its own policy subject.
            ruleset_id: ep,
            flags: ep_flag(ep_flags::POLICY, dir)
                | ep_flag(ep_flags::ISOLATED, dir)
                | ep_flag(ep_flags::AUDIT_ISOLATED, dir),
            isolating_rule: rules,
            audit_isolating_rule: rules,
        }
    };
    ops.push(MapOp::EndpointSet(
        lab.ifindex(&lab.client_if),
        endpoint(CLIENT_EP, CLIENT_ID, eg, RULE_CLIENT_ISOLATING),
    ));
    ops.push(MapOp::EndpointSet(
        lab.ifindex(&lab.server_if),
        endpoint(SERVER_EP, SERVER_ID, ing, RULE_SERVER_ISOLATING),
    ));
    ops.push(MapOp::SetRevision(1));
    ops
}

/// What moat's counters say, summed over CPUs.
struct MoatCounters {
    verdicts: BTreeMap<VerdictCounterKey, u64>,
    rules: BTreeMap<RuleCounterKey, u64>,
    /// Events emitted, and lost to a full ring buffer.
    events: (u64, u64),
}

impl MoatCounters {
    fn read(dp: &Datapath) -> Self {
        let verdicts = dp
            .verdict_counters()
            .unwrap()
            .into_iter()
            .map(|(k, c)| (k, c.packets))
            .collect();
        let rules = dp
            .rule_counters_for(1..RULE_OTHER)
            .unwrap()
            .into_iter()
            .map(|(k, c)| (k, c.packets))
            .collect();
        let e = dp.event_stats().unwrap();
        MoatCounters {
            verdicts,
            rules,
            events: (e.emitted, e.lost),
        }
    }

    fn rule(&self, rule_id: u32, v: u8) -> u64 {
        self.rules
            .get(&RuleCounterKey {
                rule_id,
                verdict: v,
            })
            .copied()
            .unwrap_or(0)
    }

    fn verdict(&self, dir: u8, v: u8, r: u8) -> u64 {
        self.verdicts
            .get(&VerdictCounterKey {
                direction: dir,
                verdict: v,
                reason: r,
            })
            .copied()
            .unwrap_or(0)
    }

    fn dropped(&self) -> u64 {
        self.verdicts
            .iter()
            .filter(|(k, _)| k.verdict == verdict::DROPPED)
            .map(|(_, n)| n)
            .sum()
    }
}

/// moat in place: its maps, its event reader, and how many other entries each rule set has.
struct Moat {
    dp: Datapath,
    /// Reads until the configuration is torn down.
    _events: EventReader,
    others: u32,
}

/// Reads moat's events the way the agent does — the async stream on a tokio runtime, woken
/// by the kernel — so that what events cost a node, wake-ups included, is in the figures.
struct EventReader {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventReader {
    fn start(stream: EventStream) -> EventReader {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut events = stream.into_async().expect("event stream");
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        ev = events.next() => {
                            ev.expect("event stream");
                        }
                    }
                }
            })
        });
        EventReader {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for EventReader {
    /// Stops the reader and closes its ring buffer (before the datapath's pins go).
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A configuration in place.
enum Active {
    None,
    /// The datapath only holds the floor's links.
    Floor(Box<Datapath>),
    Moat(Box<Moat>),
    Iptables,
    Nft,
}

/// Counters before a measurement.
struct Before {
    veth: u64,
    filter: FilterBefore,
}

enum FilterBefore {
    None,
    Moat(MoatCounters),
    Rules(BTreeMap<&'static str, u64>),
}

impl Active {
    fn setup(lab: &Lab, filter: Filter) -> Active {
        match filter {
            Filter::None => Active::None,
            Filter::Floor => {
                let mut dp = lab.fresh_datapath();
                let _in = Entered::new(&lab.node);
                dp.attach_floor(&lab.client_if).expect("attach client");
                dp.attach_floor(&lab.server_if).expect("attach server");
                Active::Floor(Box::new(dp))
            }
            Filter::Moat(others) => {
                let mut dp = lab.fresh_datapath();
                let events = EventReader::start(dp.take_events().unwrap());
                dp.apply(&moat_state(lab, others)).expect("fill maps");
                {
                    let _in = Entered::new(&lab.node);
                    dp.attach_endpoint(&lab.client_if).expect("attach client");
                    dp.attach_endpoint(&lab.server_if).expect("attach server");
                }
                Active::Moat(Box::new(Moat {
                    dp,
                    _events: events,
                    others,
                }))
            }
            Filter::Iptables => {
                let rules = run_cmd(
                    Command::new(repo_file("bench/throughput/iptables.sh"))
                        .arg(lab.dir.join("peers.txt"))
                        .arg(CLIENT.to_string())
                        .arg(SERVER.to_string()),
                )
                .stdout;
                let mut c = in_ns_cmd(&lab.node, &["iptables-restore"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("iptables-restore");
                c.stdin.take().unwrap().write_all(&rules).unwrap();
                assert!(c.wait().unwrap().success(), "iptables-restore failed");
                Active::Iptables
            }
            Filter::NftSet => {
                let inc = lab.dir.display().to_string();
                let file = repo_file("bench/throughput/nftables.nft");
                lab.nft(&["-I", &inc, "-f", &file.display().to_string()]);
                Active::Nft
            }
        }
    }

    /// The configuration holds what it should, and nothing else filters.
    fn check_rules(&self, lab: &Lab) {
        let ruleset = String::from_utf8(lab.nft(&["list", "ruleset"]).stdout).unwrap();
        let tcx = lab.tcx_programs();
        match self {
            Active::None => {
                assert!(ruleset.trim().is_empty(), "stray nftables rules");
                assert_eq!(tcx.len(), 0, "stray TC programs");
            }
            Active::Floor(dp) => {
                assert!(ruleset.trim().is_empty(), "stray nftables rules");
                let [.., floor] = dp.program_ids().unwrap();
                assert_eq!(tcx, [floor; 4], "the floor on both veths, both directions");
            }
            Active::Moat(m) => {
                assert!(ruleset.trim().is_empty(), "stray nftables rules");
                let [from, to, ..] = m.dp.program_ids().unwrap();
                assert_eq!(
                    tcx,
                    [from, to, from, to],
                    "moat's programs on both veths, both directions"
                );
                let ipcache = m.dp.ipcache().unwrap().len();
                assert_eq!(ipcache as u32, IPCACHE_PREFIXES, "ipcache prefixes");
                let policy = m.dp.policy().unwrap().len() as u32;
                assert_eq!(policy, 2 * m.others + 7, "policy entries");
                assert_eq!(m.dp.endpoints().unwrap().len(), 2, "endpoints");
            }
            Active::Iptables => {
                assert!(tcx.is_empty(), "stray TC programs");
                let out = run_cmd(&mut in_ns_cmd(&lab.node, &["iptables", "-S", "FORWARD"]));
                let rules = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A FORWARD"))
                    .count() as u32;
                assert_eq!(rules, OTHER_PEERS + 4, "iptables FORWARD rules");
                assert!(
                    String::from_utf8_lossy(&out.stdout).starts_with("-P FORWARD DROP"),
                    "FORWARD policy"
                );
            }
            Active::Nft => {
                assert!(tcx.is_empty(), "stray TC programs");
                let v = nft_json(lab, &["list", "set", "ip", "moat_bench", "peers"]);
                let elems = v["nftables"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find_map(|o| o["set"]["elem"].as_array())
                    .map_or(0, Vec::len) as u32;
                assert_eq!(elems, OTHER_PEERS + 1, "nftables set elements");
                assert_eq!(nft_rules(lab).len(), 4, "nftables rules");
            }
        }
    }

    fn before(&self, lab: &Lab) -> Before {
        let filter = match self {
            Active::None | Active::Floor(_) => FilterBefore::None,
            Active::Moat(m) => FilterBefore::Moat(MoatCounters::read(&m.dp)),
            Active::Iptables => FilterBefore::Rules(iptables_counters(lab)),
            Active::Nft => FilterBefore::Rules(nft_rules(lab)),
        };
        Before {
            veth: lab.server_veth_tx(),
            filter,
        }
    }

    /// The traffic of `metric` crossed the node and was accepted by the rule meant for it.
    fn check_after(&self, lab: &Lab, metric: Metric, out: &Outcome, before: &Before) {
        let veth = lab.server_veth_tx() - before.veth;
        assert!(
            veth >= out.min_packets,
            "{metric:?}: the node sent {veth} packets to the server, expected >= {}",
            out.min_packets
        );
        match (self, &before.filter) {
            (Active::Moat(m), FilterBefore::Moat(b)) => {
                let a = MoatCounters::read(&m.dp);
                let (srv, cli) = metric.rules();
                for rule in [srv, cli] {
                    let n = a.rule(rule, verdict::FORWARDED) - b.rule(rule, verdict::FORWARDED);
                    assert!(
                        n >= out.min_packets,
                        "{metric:?}: rule {rule} forwarded {n} packets, expected >= {}",
                        out.min_packets
                    );
                }
                let dropped = a.dropped() - b.dropped();
                assert_eq!(dropped, 0, "{metric:?}: moat dropped packets");
                // New connections emit events at both ends; the agent's reader keeps up.
                if out.connections > 0 {
                    assert!(a.events.0 > b.events.0, "{metric:?}: no events emitted");
                }
                assert_eq!(a.events.1, b.events.1, "{metric:?}: events lost");
                for dir in [direction::INGRESS, direction::EGRESS] {
                    let new = a.verdict(dir, verdict::FORWARDED, reason::POLICY)
                        - b.verdict(dir, verdict::FORWARDED, reason::POLICY);
                    assert!(
                        new >= out.connections,
                        "{metric:?}: {new} flows admitted by policy in direction {dir}, \
                         expected >= {}",
                        out.connections
                    );
                }
            }
            (Active::Iptables | Active::Nft, FilterBefore::Rules(b)) => {
                let a = if matches!(self, Active::Iptables) {
                    iptables_counters(lab)
                } else {
                    nft_rules(lab)
                };
                let rule = if metric == Metric::Udp { "udp" } else { "tcp" };
                let n = a[rule] - b[rule];
                assert!(
                    n >= out.min_packets,
                    "{metric:?}: the accepting rule counted {n} packets, expected >= {}",
                    out.min_packets
                );
            }
            // The floor has no counters: its programs are checked in place (`check_rules`),
            // and the veth counter proves the traffic crossed them.
            (Active::None | Active::Floor(_), FilterBefore::None) => {}
            _ => unreachable!("counters of another configuration"),
        }
    }

    /// A connection to a port no rule allows is dropped (no reset, no connection) — and for
    /// moat by the policy meant to drop it, at each end.
    fn check_denied(&self, lab: &Lab) {
        match self {
            Active::None | Active::Floor(_) => {
                assert_eq!(
                    probe(lab, DENIED_EGRESS_PORT),
                    Probe::Refused,
                    "unfiltered: a closed port answers with a reset"
                );
            }
            Active::Moat(m) => {
                for (port, rule) in [
                    (DENIED_EGRESS_PORT, RULE_CLIENT_ISOLATING),
                    (DENIED_INGRESS_PORT, RULE_SERVER_ISOLATING),
                ] {
                    let b = MoatCounters::read(&m.dp);
                    assert_eq!(probe(lab, port), Probe::Dropped, "moat, port {port}");
                    let a = MoatCounters::read(&m.dp);
                    assert!(
                        a.rule(rule, verdict::DROPPED) > b.rule(rule, verdict::DROPPED),
                        "port {port}: not dropped by the isolating policy (rule {rule})"
                    );
                }
            }
            Active::Iptables | Active::Nft => {
                assert_eq!(probe(lab, DENIED_EGRESS_PORT), Probe::Dropped, "baseline");
            }
        }
    }

    fn teardown(self, lab: &Lab) {
        match self {
            Active::None => {}
            // The datapath's handles go before its pins.
            datapath @ (Active::Floor(_) | Active::Moat(_)) => {
                drop(datapath);
                Datapath::reset(&lab.pins).expect("remove pins");
            }
            Active::Iptables | Active::Nft => {
                lab.nft(&["flush", "ruleset"]);
            }
        }
    }

    /// The distinct programs this configuration attached (none for the kernel's firewalls).
    fn program_ids(&self) -> Vec<u32> {
        match self {
            Active::Floor(dp) => {
                let [.., floor] = dp.program_ids().unwrap();
                vec![floor]
            }
            Active::Moat(m) => {
                let [from, to, ..] = m.dp.program_ids().unwrap();
                vec![from, to]
            }
            Active::None | Active::Iptables | Active::Nft => Vec::new(),
        }
    }
}

fn nft_json(lab: &Lab, args: &[&str]) -> Value {
    let mut a = vec!["-j"];
    a.extend_from_slice(args);
    serde_json::from_slice(&lab.nft(&a).stdout).unwrap()
}

/// Packet counters of the nftables baseline's rules, by comment.
fn nft_rules(lab: &Lab) -> BTreeMap<&'static str, u64> {
    let v = nft_json(lab, &["list", "chain", "ip", "moat_bench", "forward"]);
    let mut out = BTreeMap::new();
    for o in v["nftables"].as_array().unwrap() {
        let r = &o["rule"];
        let Some(comment) = r["comment"].as_str() else {
            continue;
        };
        let packets = r["expr"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .expect("counter");
        let name = match comment {
            "tcp" => "tcp",
            "udp" => "udp",
            "tcp replies" => "tcp replies",
            _ => "udp replies",
        };
        out.insert(name, packets);
    }
    out
}

/// Packet counters of the iptables baseline's accepting rules (the client's TCP and UDP).
fn iptables_counters(lab: &Lab) -> BTreeMap<&'static str, u64> {
    let out = run_cmd(&mut in_ns_cmd(
        &lab.node,
        &["iptables", "-w", "-nvxL", "FORWARD"],
    ));
    let mut m = BTreeMap::new();
    let (client, server) = (CLIENT.to_string(), SERVER.to_string());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // pkts bytes target prot opt in out source destination ...
        if f.len() >= 9 && f[7] == client && f[8] == server {
            let name = if f[3] == "17" || f[3] == "udp" {
                "udp"
            } else {
                "tcp"
            };
            m.insert(name, f[0].parse().unwrap());
        }
    }
    assert_eq!(m.len(), 2, "iptables accepting rules not found");
    m
}

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Connected,
    Refused,
    Dropped,
}

/// A TCP connection from the client pod to `port` on the server.
fn probe(lab: &Lab, port: u16) -> Probe {
    let _in = Entered::new(&lab.client);
    let addr = SocketAddr::from((SERVER, port));
    match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
        Ok(_) => Probe::Connected,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Probe::Refused,
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            Probe::Dropped
        }
        Err(e) => panic!("probe of port {port}: {e}"),
    }
}

// ---- the tools ----

/// Wait for `child`; its stdout.
fn wait_output(mut child: Guarded, limit: Duration) -> Vec<u8> {
    let t = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = Vec::new();
            std::io::Read::read_to_end(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(status.success(), "{}", String::from_utf8_lossy(&out));
            return out;
        }
        assert!(t.elapsed() < limit, "a benchmark tool hung");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn iperf(lab: &Lab, secs: u32, udp: bool) -> Outcome {
    let port = IPERF_PORT.to_string();
    let mut server = Guarded(
        in_ns_cmd(&lab.server, &["iperf3", "-s", "-1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (`make debs`)"),
    );
    wait_listening(&lab.server, "tcp", IPERF_PORT);
    let secs_s = secs.to_string();
    let payload = UDP_PAYLOAD.to_string();
    let server_addr = SERVER.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        &server_addr,
        "-p",
        &port,
        "-t",
        &secs_s,
        "-O",
        "1",
        "-J",
        // Client on CPU 0, server on CPU 1 (see the module doc).
        "-A",
        "0,1",
    ];
    if udp {
        args.extend_from_slice(&["-u", "-l", &payload, "-b", "0"]);
    }
    let client = Guarded(
        in_ns_cmd(&lab.client, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = wait_output(client, Duration::from_secs(secs as u64 + 30));
    server.stop();
    let v: Value = serde_json::from_slice(&out).expect("iperf3 JSON");
    assert!(v["error"].is_null(), "iperf3: {}", v["error"]);
    let end = &v["end"];
    if udp {
        // What the server received (iperf3 3.12 reports it to the client in sum_received).
        let r = &end["sum_received"];
        let received = r["bytes"].as_u64().unwrap() / UDP_PAYLOAD;
        Outcome {
            value: received as f64 / r["seconds"].as_f64().unwrap(),
            min_packets: received,
            connections: 1,
        }
    } else {
        let received = &end["sum_received"];
        let gbps = received["bits_per_second"].as_f64().unwrap() / 1e9;
        Outcome {
            value: gbps,
            // An skb carries at most 64 KiB (GSO/GRO): a lower bound on packets forwarded.
            min_packets: received["bytes"].as_u64().unwrap() / 65_536,
            connections: 1,
        }
    }
}

fn wrk(lab: &Lab, secs: u32, close: bool) -> Outcome {
    let dur = format!("{secs}s");
    let url = format!("http://{SERVER}:{HTTP_PORT}/index.html");
    // On CPU 0, nginx's worker on CPU 1 (see the module doc).
    let mut args = vec!["taskset", "-c", "0", "wrk", "-t1", "-c16", "-d", &dur];
    if close {
        args.extend_from_slice(&["-H", "Connection: close"]);
    }
    args.push(&url);
    let child = Guarded(
        in_ns_cmd(&lab.client, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("wrk (`make debs`)"),
    );
    let out = String::from_utf8(wait_output(child, Duration::from_secs(secs as u64 + 30))).unwrap();
    assert!(
        !out.contains("Non-2xx"),
        "wrk: responses other than 200:\n{out}"
    );
    let field = |prefix: &str| -> Option<f64> {
        out.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    };
    let rps = field("Requests/sec:").unwrap_or_else(|| panic!("wrk output:\n{out}"));
    let requests = out
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| n.parse::<u64>().ok())?
        })
        .unwrap_or_else(|| panic!("wrk output:\n{out}"));
    if let Some(line) = out.lines().find(|l| l.contains("Socket errors")) {
        // A handful of connection-level errors on teardown are wrk's, not the filter's;
        // more than one per thousand requests means the run is not what it claims.
        let errors: u64 = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        assert!(errors * 1000 <= requests, "wrk: {line}");
    }
    Outcome {
        value: rps,
        min_packets: requests,
        connections: if close { requests } else { 0 },
    }
}

fn measure(lab: &Lab, metric: Metric, secs: u32) -> Outcome {
    match metric {
        Metric::Tcp => iperf(lab, secs, false),
        Metric::Udp => iperf(lab, secs, true),
        Metric::HttpKeepAlive => wrk(lab, secs, false),
        Metric::HttpClose => wrk(lab, secs, true),
    }
}

// ---- where the CPU goes ----

/// Kernel time spent in programs `ids` and their runs, from the kernel's run-time statistics
/// (counted only while `aya::sys::enable_stats` is held).
fn program_time(ids: &[u32]) -> (Duration, u64) {
    aya::programs::loaded_programs()
        .map(|p| p.expect("program info"))
        .filter(|p| ids.contains(&p.id()))
        .fold((Duration::ZERO, 0), |(t, n), p| {
            (t + p.run_time(), n + p.run_count())
        })
}

/// CPU time each CPU spent busy so far (user, system, interrupts; not idle, not waiting for
/// I/O, not stolen by the hypervisor), from /proc/stat.
fn busy_cpus() -> Vec<Duration> {
    // SAFETY: no arguments, no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|n| n.parse().unwrap())
                .collect();
            // user nice system idle iowait irq softirq steal ...
            let ticks = f[0] + f[1] + f[2] + f[5] + f[6];
            Duration::from_nanos(ticks * 1_000_000_000 / hz)
        })
        .collect()
}

/// One measurement with the programs' run-time statistics on.
struct InSitu {
    /// Mean kernel time of one program run.
    ns_per_run: f64,
    /// The programs' time as a share of the machine's busy CPU time over the measurement.
    cpu_share: f64,
    /// The programs' time as a share of the busiest CPU's busy time: what they take from that
    /// CPU if they all ran there, as they nearly do when one CPU forwards all the traffic
    /// (UDP one way: the client's CPU runs both hooks in its softirq).
    busiest_cpu_share: f64,
}

/// Measures `metric` once under `cfg` with the kernel's per-program statistics on, to say how
/// much of the machine's work the programs themselves are: for CPU-bound traffic, a datapath
/// that cost nothing could gain at most that share over the one measured.
fn in_situ(lab: &Lab, cfg: &Config, metric: Metric, secs: u32) -> InSitu {
    let active = Active::setup(lab, cfg.filter);
    active.check_rules(lab);
    let ids = active.program_ids();
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let sample = || (program_time(&ids), busy_cpus());
    let ((t0, n0), b0) = sample();
    let before = active.before(lab);
    let out = measure(lab, metric, secs);
    let ((t1, n1), b1) = sample();
    drop(stats);
    active.check_after(lab, metric, &out, &before);
    active.teardown(lab);
    let (time, runs) = (t1 - t0, n1 - n0);
    assert!(
        runs > 0,
        "{metric:?}: the programs of {} never ran",
        cfg.name
    );
    let busy: Vec<f64> = b1
        .iter()
        .zip(&b0)
        .map(|(a, b)| (*a - *b).as_secs_f64())
        .collect();
    let t = time.as_secs_f64();
    InSitu {
        ns_per_run: time.as_nanos() as f64 / runs as f64,
        cpu_share: t / busy.iter().sum::<f64>(),
        busiest_cpu_share: t / busy.iter().copied().fold(0.0, f64::max),
    }
}

// ---- results ----

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// The items named in env var `var` (comma-separated), or all of them.
fn selected<'a, T>(var: &str, all: &'a [T], name: impl Fn(&T) -> &'static str) -> Vec<&'a T> {
    let picked: Vec<&T> = match std::env::var(var) {
        Ok(names) => all
            .iter()
            .filter(|t| names.split(',').any(|n| n.trim() == name(t)))
            .collect(),
        Err(_) => all.iter().collect(),
    };
    assert!(!picked.is_empty(), "{var} names nothing known");
    picked
}

fn params(filter: Filter) -> Value {
    match filter {
        Filter::None => json!({"filter": "none"}),
        Filter::Floor => json!({"filter": "tc-floor"}),
        Filter::Moat(n) => json!({"filter": "moat", "other_policy_entries_per_rule_set": n,
            "policy_entries": 2 * n + 7, "ipcache_prefixes": IPCACHE_PREFIXES}),
        Filter::Iptables => json!({"filter": "iptables-nft", "forward_rules": OTHER_PEERS + 4}),
        Filter::NftSet => json!({"filter": "nftables", "set_elements": OTHER_PEERS + 1}),
    }
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // SAFETY: no arguments, no side effects.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (network namespaces, eBPF)"
    );
    let runs = env_u32("MOAT_BENCH_RUNS", 5).max(1) as usize;
    let secs = env_u32("MOAT_BENCH_SECONDS", 10).max(1);
    let configs = selected("MOAT_BENCH_CONFIGS", &CONFIGS, |c| c.name);
    let metrics: Vec<Metric> = selected("MOAT_BENCH_METRICS", &METRICS, |m| m.name())
        .into_iter()
        .copied()
        .collect();

    let load_before = loadavg();
    let started = Instant::now();
    let lab = Lab::new();
    // figures[config][metric] = one value per run
    let mut figures: BTreeMap<&str, BTreeMap<Metric, Vec<f64>>> = BTreeMap::new();
    // Configurations alternate within each metric of each run, so that every ratio compares
    // figures taken about a minute apart on this shared, noisy machine.
    for run in 0..runs {
        for &metric in &metrics {
            for cfg in &configs {
                check_interrupted();
                let active = Active::setup(&lab, cfg.filter);
                active.check_rules(&lab);
                if run == 0 && metric == metrics[0] {
                    active.check_denied(&lab);
                }
                let before = active.before(&lab);
                let out = measure(&lab, metric, secs);
                check_interrupted();
                active.check_after(&lab, metric, &out, &before);
                active.check_rules(&lab);
                active.teardown(&lab);
                eprintln!(
                    "run {}/{runs} {:<29} {:<13} {:>12.2} {}  (load {})",
                    run + 1,
                    metric.name(),
                    cfg.name,
                    out.value,
                    metric.unit(),
                    loadavg()
                );
                figures
                    .entry(cfg.name)
                    .or_default()
                    .entry(metric)
                    .or_default()
                    .push(out.value);
            }
        }
    }
    // Once more per metric, for the configurations with programs of moat's, with the
    // kernel's run-time statistics on. They add two clock reads to every program run, so
    // these runs are reported beside the judged ones, never in them.
    // By name, as the results below look them up.
    let profiled: Vec<&Config> = configs
        .iter()
        .copied()
        .filter(|c| ["tc-floor", "moat-10k"].contains(&c.name))
        .collect();
    // in_situ[config][metric]
    let mut in_situ_figures: BTreeMap<&str, BTreeMap<Metric, InSitu>> = BTreeMap::new();
    for &metric in &metrics {
        for cfg in &profiled {
            check_interrupted();
            let f = in_situ(&lab, cfg, metric, secs);
            eprintln!(
                "in situ {:<29} {:<13} {:>6.1} ns per program run, {:.2}% of busy CPU, \
                 {:.2}% of the busiest CPU",
                metric.name(),
                cfg.name,
                f.ns_per_run,
                f.cpu_share * 100.0,
                f.busiest_cpu_share * 100.0
            );
            in_situ_figures
                .entry(cfg.name)
                .or_default()
                .insert(metric, f);
        }
    }
    let load_after = loadavg();
    drop(lab);

    // Ratios per run (each against its baseline measured a minute apart), then their median.
    let ratio = |cfg: &str, base: &str, m: Metric| -> Option<Vec<f64>> {
        let a = figures.get(cfg)?.get(&m)?;
        let b = figures.get(base)?.get(&m)?;
        Some(a.iter().zip(b).map(|(a, b)| a / b).collect())
    };
    let mut results = Vec::new();
    for cfg in &configs {
        for &m in &metrics {
            let v = &figures[cfg.name][&m];
            let (lo, hi) = min_max(v);
            results.push(json!({"name": format!("{}/{}", cfg.name, m.name()),
                "metric": m.unit(), "value": median(v), "min": lo, "max": hi,
                "runs": v.len(), "params": params(cfg.filter)}));
        }
    }
    for base in ["none", "tc-floor", "nft-set-10k"] {
        for cfg in &configs {
            if cfg.name == base {
                continue;
            }
            for &m in &metrics {
                let Some(r) = ratio(cfg.name, base, m) else {
                    continue;
                };
                let (lo, hi) = min_max(&r);
                results.push(
                    json!({"name": format!("{}/{}_vs_{base}", cfg.name, m.name()),
                    "metric": "ratio", "value": median(&r), "min": lo, "max": hi,
                    "runs": r.len(), "params": params(cfg.filter)}),
                );
            }
        }
    }
    for (cfg, by_metric) in &in_situ_figures {
        for (m, f) in by_metric {
            for (what, metric, value) in [
                ("bpf_ns_per_run", "ns_per_program_run", f.ns_per_run),
                ("bpf_cpu_share", "share_of_busy_cpu", f.cpu_share),
                (
                    "bpf_busiest_cpu_share",
                    "share_of_busiest_cpu",
                    f.busiest_cpu_share,
                ),
            ] {
                results.push(json!({"name": format!("{cfg}/{}/{what}", m.name()),
                    "metric": metric, "value": value, "min": value, "max": value, "runs": 1,
                    "params": {"in_situ": true}}));
            }
        }
    }
    // What moat's work in its hooks costs beyond the empty programs' at the same hooks, as a
    // share of the machine's CPU: the most a cheaper datapath could give back.
    let mut in_situ_lines = Vec::new();
    if let (Some(floor), Some(moat)) = (
        in_situ_figures.get("tc-floor"),
        in_situ_figures.get("moat-10k"),
    ) {
        for &m in &metrics {
            let (f, x) = (&floor[&m], &moat[&m]);
            let extra = x.cpu_share - f.cpu_share;
            let extra_busiest = x.busiest_cpu_share - f.busiest_cpu_share;
            for (what, metric, value) in [
                ("bpf_cpu_share_over_floor", "share_of_busy_cpu", extra),
                (
                    "bpf_busiest_cpu_share_over_floor",
                    "share_of_busiest_cpu",
                    extra_busiest,
                ),
            ] {
                results.push(json!({"name": format!("moat-10k/{}/{what}", m.name()),
                    "metric": metric, "value": value, "min": value, "max": value, "runs": 1,
                    "params": {"in_situ": true}}));
            }
            in_situ_lines.push(format!(
                "{:<29} {:>5.1} / {:>5.1} ns per run; {:>4.2}% / {:>4.2}% of busy CPU \
                 ({:+.2} points), {:>4.2}% / {:>4.2}% of the busiest ({:+.2})",
                m.name(),
                f.ns_per_run,
                x.ns_per_run,
                f.cpu_share * 100.0,
                x.cpu_share * 100.0,
                extra * 100.0,
                f.busiest_cpu_share * 100.0,
                x.busiest_cpu_share * 100.0,
                extra_busiest * 100.0
            ));
        }
    }
    // The smallest over the metrics of the median ratio `cfg` / `base`, and its metric.
    let worst = |cfg: &str, base: &str| -> Option<(f64, Metric)> {
        let mut worst: Option<(f64, Metric)> = None;
        for &m in &metrics {
            let r = median(&ratio(cfg, base, m)?);
            if worst.is_none_or(|(w, _)| r < w) {
                worst = Some((r, m));
            }
        }
        worst
    };
    // Where the targets' gap comes from: the hooks themselves, or what moat does in them.
    let mut floor_lines = Vec::new();
    for (name, cfg, base) in [
        ("tc_floor_vs_none_min", "tc-floor", "none"),
        ("moat_vs_floor_min", "moat-10k", "tc-floor"),
    ] {
        if let Some((value, m)) = worst(cfg, base) {
            results.push(json!({"name": name, "metric": "ratio", "value": value,
                "runs": runs, "params": {"of": cfg, "to": base, "smallest": m.name()}}));
            floor_lines.push(format!("{name} {value:.3} ({})", m.name()));
        }
    }
    let target = |name: &str, base: &str| -> Option<Value> {
        let (value, m) = worst("moat-10k", base)?;
        Some(
            json!({"name": name, "value": value, "op": ">=", "limit": 0.95,
            "met": value >= 0.95,
            "from": format!("smallest over the metrics ({}) of the median over runs of \
                moat-10k / {base} (measured a minute apart in the same run); smallest: {}",
                metrics.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "), m.name())}),
        )
    };
    let targets: Vec<Value> = [
        target("moat_vs_none_min", "none"),
        target("moat_vs_nftset_min", "nft-set-10k"),
    ]
    .into_iter()
    .flatten()
    .collect();

    // The table: absolute medians, and each configuration relative to no filter.
    let mut heading = format!("{:<13}", "config");
    for m in &metrics {
        heading.push_str(&format!(" {:>16}", m.heading()));
    }
    println!("{heading}");
    for cfg in &configs {
        let mut line = format!("{:<13}", cfg.name);
        for &m in &metrics {
            let v = median(&figures[cfg.name][&m]);
            let cell = match ratio(cfg.name, "none", m) {
                Some(r) if cfg.name != "none" => {
                    format!("{} ({:.2}x)", short(v, m), median(&r))
                }
                _ => short(v, m),
            };
            line.push_str(&format!(" {cell:>16}"));
        }
        println!("{line}");
    }
    for line in &floor_lines {
        println!("{line}");
    }
    if !in_situ_lines.is_empty() {
        println!(
            "in situ, tc-floor / moat-10k (kernel run-time statistics on, one run each, \
             not judged):"
        );
    }
    for line in &in_situ_lines {
        println!("  {line}");
    }
    for t in &targets {
        println!(
            "{} {:.3} (>= 0.95: {})",
            t["name"].as_str().unwrap(),
            t["value"].as_f64().unwrap(),
            if t["met"].as_bool().unwrap() {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    println!(
        "load average before {load_before}, after {load_after}; {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let out = json!({
        "bench": "throughput",
        "measured_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "method": format!("one lab node namespace routing between a client pod and a server \
            pod (veth pairs, nothing in the root namespace); {runs} runs, in each run every \
            metric measured for every configuration in turn (set up afresh), {secs} s each \
            (after 1 s of iperf3 warm-up): iperf3 TCP 1 stream \
            (Gbit/s received), iperf3 UDP -l 64 -b 0 (datagrams/s received), wrk -t1 -c16 \
            against nginx serving an 11-byte file with keep-alive and with Connection: close \
            (requests/s), all at saturation; value = median over runs; ratios are per-run \
            ratios against the same run's baseline, median over runs. tc-floor: moat's empty \
            program at the same four TCX hooks as moat, checked in place by id. Clients on CPU 0 \
            (iperf3 -A 0,1, wrk under taskset -c 0), servers on CPU 1 (one nginx worker). moat: \
            server ingress and client egress enforced, each flow allowed by one exact rule \
            among N other entries of the same rule set (one any-peer, every tenth a port \
            range), 100,000 ipcache prefixes, events (read by the agent's async reader) and \
            per-rule counters on. Each run checked: rule counts, the node's veth counter, the \
            accepting rule's counter (moat: both ends' rules, zero drops, one policy lookup per \
            new connection at each end, no event lost). \
            In situ (not judged): one more measurement per metric of tc-floor and moat-10k \
            with BPF_ENABLE_STATS on; bpf_ns_per_run = the programs' kernel run time / their \
            runs, bpf_cpu_share = that run time / the machine's busy CPU time (/proc/stat \
            user+nice+system+irq+softirq) over the measurement, bpf_busiest_cpu_share = that \
            run time / the busiest CPU's busy time (the programs' share of that CPU if every \
            run was on it); *_over_floor: moat-10k minus tc-floor"),
        "machine": {"cpus": cpus, "kernel": kernel.trim(), "load_before": load_before,
            "load_after": load_after},
        "results": results,
        "targets": targets,
    });
    let dir = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("throughput.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

fn short(v: f64, m: Metric) -> String {
    match m {
        Metric::Tcp => format!("{v:.1}"),
        _ => format!("{:.1}k", v / 1e3),
    }
}
