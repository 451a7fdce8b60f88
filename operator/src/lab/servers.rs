//! The workload servers every lab pod runs: TCP echo, UDP echo, and the deathstar HTTP API.
//!
//! In the lab they run inside this process: the listening sockets are created on a thread
//! that has entered the pod's namespace (a socket keeps its namespace for life) and are then
//! served by one shared tokio runtime, so a 9-pod lab costs a handful of threads and no
//! processes. `moat serve` ([`serve`]) runs the same servers in the current namespace, which
//! is how the kind e2e runs the `moat` image as workload pods.
//!
//! Sockets bind the IPv6 wildcard without `IPV6_V6ONLY`, so one socket answers both families
//! (falling back to the IPv4 wildcard where IPv6 is off).

use super::LabError;
use super::netns;
use super::plan::{ServerKind, ServerSpec};
use crate::api::Protocol;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An idle echo connection is closed after this long.
const ECHO_IDLE: Duration = Duration::from_secs(30);

/// Servers of any number of pods, on one runtime. Dropping it stops them all and closes
/// every socket (must not be dropped from inside an async context).
pub struct Servers {
    rt: Option<tokio::runtime::Runtime>,
}

/// The listening sockets of one pod.
enum Bound {
    Tcp(ServerKind, TcpListener),
    Udp(UdpSocket),
}

fn bind_tcp(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
}

fn bind_udp(port: u16) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
}

fn bind_all(specs: &[ServerSpec]) -> Result<Vec<Bound>, LabError> {
    specs
        .iter()
        .filter(|s| matches!(s.protocol, Protocol::Tcp | Protocol::Udp))
        .map(|s| {
            let ctx = || format!("binding {} port {}", s.protocol.as_str(), s.port);
            let b = match s.protocol {
                Protocol::Udp => Bound::Udp(bind_udp(s.port).map_err(LabError::io(ctx()))?),
                _ => Bound::Tcp(s.kind, bind_tcp(s.port).map_err(LabError::io(ctx()))?),
            };
            Ok(b)
        })
        .collect()
}

impl Servers {
    pub fn new() -> Result<Servers, LabError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-lab-servers")
            .enable_all()
            .build()
            .map_err(LabError::io("building the server runtime"))?;
        Ok(Servers { rt: Some(rt) })
    }

    /// Start `specs` in the named namespace (None: the caller's own).
    pub fn start(&self, netns: Option<&str>, specs: &[ServerSpec]) -> Result<(), LabError> {
        let bound = match netns {
            Some(ns) => netns::in_netns(ns, || bind_all(specs))?,
            None => bind_all(specs)?,
        };
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let _guard = rt.enter();
        for b in bound {
            match b {
                Bound::Tcp(kind, l) => {
                    l.set_nonblocking(true)
                        .map_err(LabError::io("nonblocking listener"))?;
                    let l = tokio::net::TcpListener::from_std(l)
                        .map_err(LabError::io("registering a listener"))?;
                    rt.spawn(accept_loop(l, kind));
                }
                Bound::Udp(u) => {
                    u.set_nonblocking(true)
                        .map_err(LabError::io("nonblocking udp socket"))?;
                    let u = tokio::net::UdpSocket::from_std(u)
                        .map_err(LabError::io("registering a udp socket"))?;
                    rt.spawn(udp_echo(u));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_loop(l: tokio::net::TcpListener, kind: ServerKind) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match kind {
            ServerKind::Echo => tokio::spawn(tcp_echo(s)),
            ServerKind::Deathstar => tokio::spawn(super::deathstar::serve_conn(s)),
        };
    }
}

async fn tcp_echo(mut s: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(ECHO_IDLE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn udp_echo(u: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Ok((n, from)) = u.recv_from(&mut buf).await {
            let _ = u.send_to(&buf[..n], from).await;
        }
    }
}

/// What `moat serve` serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeSpec {
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub deathstar: Vec<u16>,
}

impl ServeSpec {
    /// The servers, a deathstar port replacing TCP echo on the same port.
    pub fn servers(&self) -> Vec<ServerSpec> {
        let mut v: Vec<ServerSpec> = self
            .tcp
            .iter()
            .filter(|p| !self.deathstar.contains(p))
            .map(|&port| ServerSpec {
                port,
                protocol: Protocol::Tcp,
                kind: ServerKind::Echo,
            })
            .chain(self.udp.iter().map(|&port| ServerSpec {
                port,
                protocol: Protocol::Udp,
                kind: ServerKind::Echo,
            }))
            .chain(self.deathstar.iter().map(|&port| ServerSpec {
                port,
                protocol: Protocol::Tcp,
                kind: ServerKind::Deathstar,
            }))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// `moat serve --tcp 80 --udp 80 --deathstar 80`: serve in the current namespace until
/// SIGINT or SIGTERM (handled explicitly, so it also stops as PID 1 of a container).
///
/// Call it from the main thread before any other thread exists: the signals are blocked
/// here and every thread started afterwards inherits the mask, so they are only ever taken by
/// the `sigwait` below.
pub fn serve(spec: &ServeSpec) -> Result<(), LabError> {
    let signals = super::cli::block_termination_signals()?;
    let servers = Servers::new()?;
    servers.start(None, &spec.servers())?;
    eprintln!("moat serve: {}", describe(&spec.servers()));
    let sig = signals.wait().map_err(|e| LabError::Io {
        context: "waiting for a signal".into(),
        source: e.into(),
    })?;
    eprintln!("moat serve: {sig:?}, stopping");
    drop(servers);
    Ok(())
}

/// `TCP/80 echo, UDP/80 echo, TCP/8080 deathstar`.
pub fn describe(specs: &[ServerSpec]) -> String {
    specs
        .iter()
        .map(|s| {
            format!(
                "{}/{} {}",
                s.protocol.as_str(),
                s.port,
                match s.kind {
                    ServerKind::Echo => "echo",
                    ServerKind::Deathstar => "deathstar",
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
