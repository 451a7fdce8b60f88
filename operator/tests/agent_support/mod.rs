//! Shared by the lab tests with agents (agent_standalone, observability, l7_lab): building a
//! lab with agents, talking from inside pod namespaces (sockets keep the namespace they were
//! made in), polling agents' control sockets, and raw HTTP on a stream.
#![allow(dead_code)]

use moat::agent::status::AgentStatus;
use moat::control::client;
use moat::lab::agents::{self, Agent, AgentSpec};
use moat::lab::plan::PodPlan;
use moat::lab::state::LabState;
use moat::lab::{Lab, LabOptions, LabScenario, ProbeOptions, netns};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn scenario(text: &str) -> LabScenario {
    LabScenario::from_yaml(Path::new("inline.yaml"), text).expect("scenario parses")
}

pub fn opts(extra_args: &[&str]) -> LabOptions {
    let mut o = LabOptions::with_agent(env!("CARGO_BIN_EXE_moat"));
    o.probe = ProbeOptions {
        timeout: Duration::from_millis(700),
        ..ProbeOptions::default()
    };
    let a = o.agent.as_mut().expect("with_agent");
    a.extra_args = extra_args.iter().map(OsString::from).collect();
    a.ready_timeout = Duration::from_secs(60);
    o
}

pub fn up(s: &LabScenario, extra_args: &[&str]) -> Lab {
    Lab::up(s, &opts(extra_args)).expect("lab up with agents")
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn status_of(socket: &Path) -> AgentStatus {
    rt().block_on(client::status(socket)).expect("agent status")
}

pub fn get(socket: &Path, path: &str) -> (u16, String) {
    let (code, body) = rt()
        .block_on(client::get(socket, path))
        .expect("control GET");
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Poll `f` every 20 ms until it returns Some, or panic after `within` with `what`.
pub fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lab's plan for `pod`.
fn plan_of<'a>(lab: &'a Lab, pod: &str) -> &'a PodPlan {
    lab.plan().pod(pod).unwrap_or_else(|| panic!("pod {pod}"))
}

pub fn ip(lab: &Lab, pod: &str) -> IpAddr {
    IpAddr::V4(plan_of(lab, pod).ip4)
}

pub fn ip6(lab: &Lab, pod: &str) -> IpAddr {
    IpAddr::V6(plan_of(lab, pod).ip6)
}

pub fn pod_ns(lab: &Lab, pod: &str) -> String {
    plan_of(lab, pod).netns.clone()
}

pub fn node_ns(lab: &Lab, node: usize) -> String {
    lab.plan().nodes[node].netns.clone()
}

/// A TCP connection from inside `from`'s namespace to `to:port` (None: not established
/// within `timeout`).
pub fn connect(lab: &Lab, from: &str, to: &str, port: u16, timeout: Duration) -> Option<TcpStream> {
    let addr = SocketAddr::new(ip(lab, to), port);
    connect_addr(&pod_ns(lab, from), addr, timeout)
}

pub fn connect_addr(ns: &str, addr: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    netns::in_netns(ns, || Ok(TcpStream::connect_timeout(&addr, timeout).ok()))
        .expect("namespace thread")
        .inspect(|s| {
            s.set_read_timeout(Some(timeout)).unwrap();
            s.set_write_timeout(Some(timeout)).unwrap();
            s.set_nodelay(true).unwrap();
        })
}

/// One echo round trip on an open connection.
pub fn echo(s: &mut TcpStream, payload: &[u8]) -> bool {
    if s.write_all(payload).is_err() {
        return false;
    }
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).is_ok() && got == payload
}

/// A TCP connect plus one echo round trip.
pub fn tcp_reach(lab: &Lab, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
    connect(lab, from, to, port, timeout).is_some_and(|mut s| echo(&mut s, b"ping\n"))
}

/// A UDP socket bound in `from`'s namespace.
pub fn udp_socket(lab: &Lab, from: &str, timeout: Duration) -> UdpSocket {
    let u = netns::in_netns(&pod_ns(lab, from), || {
        Ok(moat::lab::probe::fresh_udp_socket(false).expect("udp socket"))
    })
    .expect("namespace thread");
    u.set_read_timeout(Some(timeout)).unwrap();
    u
}

/// One datagram from a fresh source port and its echo.
pub fn udp_reach(lab: &Lab, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
    let u = udp_socket(lab, from, timeout);
    let dst = SocketAddr::new(ip(lab, to), port);
    if u.send_to(b"ping", dst).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(u.recv_from(&mut buf), Ok((4, _)))
}

/// Write a file into the source directory atomically (as an editor's write-rename would).
pub fn write_source_file(lab: &Lab, name: &str, text: &str) {
    let dir = lab.source_dir().expect("lab with agents");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub fn remove_source_file(lab: &Lab, name: &str) {
    std::fs::remove_file(lab.source_dir().unwrap().join(name)).unwrap();
}

/// Remove every policy file (everything but endpoints.yaml) from the source directory.
pub fn clear_policy_files(lab: &Lab) {
    for e in std::fs::read_dir(lab.source_dir().unwrap()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "endpoints.yaml" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

/// Start another agent for node `node` with the same pin root, state dir and socket the lab
/// used (after the lab's own was killed). Stopped on drop.
pub struct ExtraAgent(pub Agent);

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        self.0.stop(Duration::from_secs(5));
    }
}

pub fn respawn_agent(lab: &Lab, node: usize, extra_args: &[&str]) -> ExtraAgent {
    let plan = lab.plan();
    let n = &plan.nodes[node];
    let old = lab
        .agents()
        .iter()
        .find(|a| a.node == n.name)
        .expect("agent of the node");
    let mut cfg = agents::AgentConfig::new(env!("CARGO_BIN_EXE_moat"));
    cfg.extra_args = extra_args.iter().map(OsString::from).collect();
    let runtime_dir: PathBuf = LabState::runtime_dir(lab.id());
    let a = agents::spawn(
        &cfg,
        &AgentSpec {
            node: &n.name,
            netns: &n.netns,
            source_dir: lab.source_dir().unwrap(),
            pin_root: &old.pin_root,
            runtime_dir: &runtime_dir,
        },
    )
    .expect("respawn agent");
    ExtraAgent(a)
}

/// The digest of the lab's source directory as it is now.
pub fn dir_digest(lab: &Lab) -> String {
    agents::source_digest(lab.source_dir().unwrap()).unwrap()
}

/// Wait until the agent on `socket` reports the current source digest as programmed.
pub fn wait_digest(lab: &Lab, socket: &Path) -> AgentStatus {
    let want = dir_digest(lab);
    poll(
        &format!("agent at {} to program {want}", socket.display()),
        Duration::from_secs(60),
        || {
            let rt = rt();
            match rt.block_on(client::status(socket)) {
                Ok(s) if s.programmed_digest.as_deref() == Some(want.as_str()) => Some(s),
                _ => None,
            }
        },
    )
}
