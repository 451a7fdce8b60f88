//! Network namespaces for real-packet tests: a node namespace and pod namespaces joined by
//! veth pairs, built with iproute2 (`ip -n`, which never enters a mount namespace, so bpffs
//! stays visible). Nothing is created in the caller's namespace. Everything is deleted on drop,
//! also when the test fails.
use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// Run `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set a sysctl inside `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    in_ns(ns, move || {
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
    });
}

/// Run `f` on a new thread that has entered network namespace `ns` (setns moves only the
/// calling thread, so the caller's namespace is untouched).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

/// A short unique tag for names (interface names are limited to 15 bytes).
pub fn unique_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:x}",
        std::process::id() % 0xfff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One pod: its namespace, host-side interface and addresses.
pub struct Pod {
    pub ns: String,
    pub host_if: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

/// A node namespace with pods on routed veth pairs, as a CNI without a bridge sets them up.
pub struct Node {
    pub ns: String,
    pub pods: Vec<Pod>,
    /// The node's own address (on its loopback).
    pub ip4: IpAddr,
}

impl Node {
    /// A node with pods numbered 2.. on 10.244.<subnet>.0/24 and fd00:10:244:<subnet>::/64.
    pub fn new(pods: usize, subnet: u8) -> Node {
        let tag = unique_tag();
        let ns = format!("moat-t{tag}-n");
        ip(&["netns", "add", &ns]);
        let mut node = Node {
            ns: ns.clone(),
            pods: Vec::new(),
            ip4: format!("10.244.{subnet}.1").parse().unwrap(),
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.244.{subnet}.1/32"),
            "dev",
            "lo",
        ]);
        sysctl(&ns, "net.ipv4.ip_forward", "1");
        sysctl(&ns, "net.ipv6.conf.all.forwarding", "1");
        for i in 0..pods {
            let pns = format!("moat-t{tag}-p{i}");
            let host_if = format!("lxc{tag}p{i}");
            let ip4 = format!("10.244.{subnet}.{}", i + 2);
            let ip6 = format!("fd00:10:244:{subnet}::{}", i + 2);
            ip(&["netns", "add", &pns]);
            node.pods.push(Pod {
                ns: pns.clone(),
                host_if: host_if.clone(),
                ip4: ip4.parse().unwrap(),
                ip6: ip6.parse().unwrap(),
            });
            ip(&[
                "-n", &ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pns,
            ]);
            ip(&["-n", &pns, "link", "set", "lo", "up"]);
            ip(&["-n", &pns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", &host_if, "up"]);
            ip(&[
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{ip4}/32"),
                "dev",
                "eth0",
            ]);
            ip(&[
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            ip(&[
                "-n", &pns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ]);
            ip(&["-n", &ns, "addr", "add", "169.254.1.1/32", "dev", &host_if]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_if,
                "nodad",
            ]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("{ip4}/32"),
                "dev",
                &host_if,
                // The node talks to its pods from its own address (the host identity).
                "src",
                &format!("10.244.{subnet}.1"),
            ]);
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_if,
            ]);
        }
        node
    }

    /// The ifindex of a pod's host-side interface.
    pub fn ifindex(&self, pod: usize) -> u32 {
        let name = self.pods[pod].host_if.clone();
        in_ns(&self.ns, move || {
            moat_datapath::ifindex(&name).expect("ifindex")
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and the veth peers with them).
        for p in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &p.ns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Start TCP and UDP echo servers on `port` in `ns` (both families), serving until the
/// namespace goes away.
pub fn echo_servers(ns: &str, port: u16) {
    let (tcp, udp) = in_ns(ns, move || {
        let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
        let udp = UdpSocket::bind(("::", port)).expect("bind udp");
        (tcp, udp)
    });
    thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Can `ns` open a TCP connection to `addr` and get an echo back?
pub fn tcp_reaches(ns: &str, addr: SocketAddr) -> bool {
    in_ns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return false;
        };
        s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"moat").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"moat"
    })
}

/// A TCP connection opened from `ns` (the socket stays in that namespace, usable from any
/// thread).
pub fn tcp_connect(ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(ns, move || {
        let s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        Ok(s)
    })
}

/// One echo round trip on an open connection.
pub fn echo_ok(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// Does a UDP datagram from `ns` (fresh source port each time) to `addr` get echoed?
pub fn udp_reaches(ns: &str, addr: SocketAddr) -> bool {
    in_ns(ns, move || {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
        let mut buf = [0u8; 16];
        s.send_to(b"moat", addr).is_ok()
            && matches!(s.recv_from(&mut buf), Ok((4, from)) if from == addr)
    })
}

/// Does `ping -c1` from `ns` to `addr` get a reply?
pub fn ping_reaches(ns: &str, addr: IpAddr) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-c1",
            "-W1",
            "-q",
            &addr.to_string(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
