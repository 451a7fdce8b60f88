//! Shared by the L7 proxy tests: a recording upstream server, a raw HTTP client, policies
//! built as the compiler would emit them, and a harness that runs the proxy on loopback with
//! a fixed upstream (no privileges needed).
#![allow(dead_code)]

use ipnet::IpNet;
use moat::api::HeaderMatch;
use moat::compiler::{DesiredState, HttpMatcher, L7Key};
use moat::l7::{FixedUpstream, L7Event, L7Policy, L7Stats, Proxy, ProxyConfig};
use moat_common::{EndpointInfo, IpcacheValue, direction};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The flow every test connection pretends to be: a local client pod to a local server pod.
pub const CLIENT: &str = "10.0.0.1:40000";
pub const SERVER: &str = "10.0.0.2:80";
pub const CLIENT_ID: u32 = 300;
pub const SERVER_ID: u32 = 301;
pub const CLIENT_RULESET: u32 = 10;
pub const SERVER_RULESET: u32 = 20;

pub fn matcher(rule_id: u32) -> HttpMatcher {
    HttpMatcher::match_all(rule_id)
}

pub fn method(rule_id: u32, m: &str) -> HttpMatcher {
    HttpMatcher {
        method: Some(m.into()),
        ..matcher(rule_id)
    }
}

pub fn path(rule_id: u32, p: &str) -> HttpMatcher {
    HttpMatcher {
        path: Some(p.into()),
        ..matcher(rule_id)
    }
}

pub fn method_path(rule_id: u32, m: &str, p: &str) -> HttpMatcher {
    HttpMatcher {
        method: Some(m.into()),
        path: Some(p.into()),
        ..matcher(rule_id)
    }
}

pub fn prefix(rule_id: u32, p: &str) -> HttpMatcher {
    HttpMatcher {
        path_prefix: Some(p.into()),
        ..matcher(rule_id)
    }
}

pub fn regex(rule_id: u32, r: &str) -> HttpMatcher {
    HttpMatcher {
        path_regex: Some(r.into()),
        ..matcher(rule_id)
    }
}

pub fn header(rule_id: u32, name: &str, value: Option<&str>) -> HttpMatcher {
    HttpMatcher {
        headers: vec![HeaderMatch {
            name: name.to_ascii_lowercase(),
            value: value.map(str::to_string),
        }],
        ..matcher(rule_id)
    }
}

/// A compiled state with the client (10.0.0.1) and server (10.0.0.2) as local endpoints and
/// the given ingress (server) and egress (client) matchers on port 80 for the exact peer.
pub fn state(ingress: Option<Vec<HttpMatcher>>, egress: Option<Vec<HttpMatcher>>) -> DesiredState {
    let mut s = DesiredState::default();
    let ip = |a: &str| -> IpNet { format!("{a}/32").parse().unwrap() };
    s.maps.ipcache.insert(
        ip("10.0.0.1"),
        IpcacheValue {
            identity: CLIENT_ID,
            endpoint_id: 1,
            flags: 0,
        },
    );
    s.maps.ipcache.insert(
        ip("10.0.0.2"),
        IpcacheValue {
            identity: SERVER_ID,
            endpoint_id: 2,
            flags: 0,
        },
    );
    s.maps.endpoints.insert(
        "lxc-client".into(),
        EndpointInfo {
            endpoint_id: 1,
            identity: CLIENT_ID,
            ruleset_id: CLIENT_RULESET,
            ..Default::default()
        },
    );
    s.maps.endpoints.insert(
        "lxc-server".into(),
        EndpointInfo {
            endpoint_id: 2,
            identity: SERVER_ID,
            ruleset_id: SERVER_RULESET,
            ..Default::default()
        },
    );
    if let Some(ms) = ingress {
        s.l7.insert(
            L7Key {
                subject: SERVER_RULESET,
                peer: CLIENT_ID,
                direction: direction::INGRESS,
                first_port: 80,
                last_port: 80,
            },
            ms,
        );
    }
    if let Some(ms) = egress {
        s.l7.insert(
            L7Key {
                subject: CLIENT_RULESET,
                peer: SERVER_ID,
                direction: direction::EGRESS,
                first_port: 80,
                last_port: 80,
            },
            ms,
        );
    }
    s
}

/// A request as the upstream parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An upstream HTTP/1.1 server that records every byte and every complete request it gets,
/// with a few behaviours chosen by path (see `respond`).
#[derive(Clone)]
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub raw: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<AtomicUsize>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = TestUpstream {
            addr: listener.local_addr().unwrap(),
            requests: Default::default(),
            raw: Default::default(),
            connections: Default::default(),
        };
        let u = up.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                u.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(u.clone().serve(s));
            }
        });
        up
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }

    pub fn targets(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.target))
            .collect()
    }

    async fn read_more(&self, s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let start = buf.len();
        buf.reserve(READ_CHUNK);
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                self.raw.lock().unwrap().extend_from_slice(&buf[start..]);
                true
            }
        }
    }

    async fn serve(self, mut s: TcpStream) {
        let mut buf = Vec::new();
        loop {
            // Head.
            let (method, target, headers, used) = loop {
                let mut hs = [httparse::EMPTY_HEADER; 128];
                let mut req = httparse::Request::new(&mut hs);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let headers: Vec<(String, String)> = req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect();
                        break (
                            req.method.unwrap().to_string(),
                            req.path.unwrap().to_string(),
                            headers,
                            n,
                        );
                    }
                    Ok(httparse::Status::Partial) => {
                        if !self.read_more(&mut s, &mut buf).await {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            };
            buf.drain(..used);
            let get = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(n))
                    .map(|(_, v)| v.clone())
            };
            if get("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
                && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
            {
                return;
            }
            // Body: the proxy only ever forwards chunked without Content-Length.
            let mut body = Vec::new();
            if get("transfer-encoding").is_some() {
                loop {
                    let Some(line_end) = find(&buf, b"\r\n") else {
                        if !self.read_more(&mut s, &mut buf).await {
                            return;
                        }
                        continue;
                    };
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&buf[..line_end])
                            .unwrap()
                            .split(';')
                            .next()
                            .unwrap()
                            .trim(),
                        16,
                    )
                    .unwrap();
                    if size == 0 {
                        // Trailers up to the empty line.
                        loop {
                            if let Some(p) = find(&buf[line_end..], b"\r\n\r\n") {
                                buf.drain(..line_end + p + 4);
                                break;
                            }
                            if !self.read_more(&mut s, &mut buf).await {
                                return;
                            }
                        }
                        break;
                    }
                    while buf.len() < line_end + 2 + size + 2 {
                        if !self.read_more(&mut s, &mut buf).await {
                            return;
                        }
                    }
                    assert_eq!(&buf[line_end + 2 + size..line_end + 4 + size], b"\r\n");
                    body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
                    buf.drain(..line_end + 4 + size);
                }
            } else if let Some(cl) = get("content-length") {
                let n: usize = cl.parse().unwrap();
                while buf.len() < n {
                    if !self.read_more(&mut s, &mut buf).await {
                        return;
                    }
                }
                body = buf.drain(..n).collect();
            }
            let rec = Recorded {
                method: method.clone(),
                target: target.clone(),
                headers: headers.clone(),
                body,
            };
            self.requests.lock().unwrap().push(rec.clone());
            if !self.respond(&mut s, &rec, &mut buf).await {
                return;
            }
        }
    }

    /// Answers one request; false: the connection is done.
    async fn respond(&self, s: &mut TcpStream, r: &Recorded, buf: &mut Vec<u8>) -> bool {
        let path = r.target.split('?').next().unwrap_or_default();
        let head = r.method == "HEAD";
        let summary = format!(
            "{} {} len={} sum={}\n",
            r.method,
            r.target,
            r.body.len(),
            checksum(&r.body)
        );
        let res: std::io::Result<()> = async {
            if r.method == "CONNECT" || (path == "/ws" && r.header("upgrade").is_some()) {
                if r.method == "CONNECT" {
                    s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
                } else {
                    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await?;
                }
                // Echo, uppercased, so the test sees the bytes went through the server.
                if !buf.is_empty() {
                    s.write_all(&buf.to_ascii_uppercase()).await?;
                    buf.clear();
                }
                let mut tmp = [0u8; 4096];
                loop {
                    let n = s.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.raw.lock().unwrap().extend_from_slice(&tmp[..n]);
                    s.write_all(&tmp[..n].to_ascii_uppercase()).await?;
                }
            }
            match path {
                "/chunked-response" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n").await
                }
                "/big" => {
                    let n: usize = r.target.split("n=").nth(1).unwrap().parse().unwrap();
                    s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes()).await?;
                    let data = pattern(n);
                    s.write_all(&data).await
                }
                "/close" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end").await?;
                    Err(std::io::ErrorKind::ConnectionAborted.into())
                }
                "/nocontent" => s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await,
                "/notmodified" => s.write_all(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n").await,
                _ => {
                    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n", summary.len()).into_bytes();
                    if !head {
                        out.extend_from_slice(summary.as_bytes());
                    }
                    s.write_all(&out).await
                }
            }
        }
        .await;
        res.is_ok()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A response as the client saw it.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP client: writes bytes as given, parses responses itself.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

const WAIT: Duration = Duration::from_secs(10);
/// Bytes read at most per call, into a buffer's spare capacity: an array of this size on the
/// stack would live in every future that awaits a read, which overflowed the test thread's
/// stack in debug builds.
const READ_CHUNK: usize = 64 * 1024;

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Best effort: the proxy may already have closed.
    pub async fn try_send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    async fn more(&mut self) -> bool {
        self.buf.reserve(READ_CHUNK);
        match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) if n > 0 => true,
            Ok(_) => false,
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// Reads exactly `n` raw bytes (after a tunnel was established).
    pub async fn raw(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.more().await, "closed before {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    /// The next response; `None` if the connection closed first. `head` is whether the
    /// request was HEAD (no body).
    pub async fn response_to(&mut self, head: bool) -> Option<Resp> {
        let (status, headers, used) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf).expect("valid response head") {
                httparse::Status::Complete(n) => {
                    break (
                        r.code.unwrap(),
                        r.headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect::<Vec<_>>(),
                        n,
                    );
                }
                httparse::Status::Partial => {
                    if !self.more().await {
                        return None;
                    }
                }
            }
        };
        self.buf.drain(..used);
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if head || (100..200).contains(&status) || status == 204 || status == 304 {
        } else if get("transfer-encoding").is_some() {
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf, b"\r\n") {
                        break p;
                    }
                    assert!(self.more().await, "closed inside chunked body");
                };
                let line = String::from_utf8(self.buf[..line_end].to_vec()).unwrap();
                let size =
                    usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    loop {
                        if let Some(p) = find(&self.buf[line_end..], b"\r\n\r\n") {
                            self.buf.drain(..line_end + p + 4);
                            break;
                        }
                        assert!(self.more().await, "closed inside trailers");
                    }
                    break;
                }
                while self.buf.len() < line_end + 4 + size {
                    assert!(self.more().await, "closed inside chunk");
                }
                body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 4 + size);
            }
        } else if let Some(cl) = get("content-length") {
            let n: usize = cl.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.more().await, "closed inside body");
            }
            body = self.buf.drain(..n).collect();
        } else {
            while self.more().await {}
            body = std::mem::take(&mut self.buf);
        }
        Some(Resp {
            status,
            headers,
            body,
        })
    }

    pub async fn response(&mut self) -> Option<Resp> {
        self.response_to(false).await
    }

    /// Whether the peer closes the connection within `d` (without anything else arriving).
    pub async fn closed_within(&mut self, d: Duration) -> bool {
        let mut tmp = [0u8; 1024];
        match tokio::time::timeout(d, self.stream.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&tmp[..n])),
            Err(_) => false,
        }
    }
}

/// The proxy and its upstream, running.
pub struct Harness {
    pub addr: SocketAddr,
    pub upstream: TestUpstream,
    pub policy: watch::Sender<Arc<L7Policy>>,
    pub stats: Arc<L7Stats>,
    pub events: mpsc::Receiver<L7Event>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Harness {
    pub async fn start(state: &DesiredState) -> Self {
        Self::start_with(state, ProxyConfig::unprivileged()).await
    }

    pub async fn start_with(state: &DesiredState, cfg: ProxyConfig) -> Self {
        let upstream = TestUpstream::start().await;
        let (tx, rx) = watch::channel(Arc::new(L7Policy::from_state(state)));
        let (etx, erx) = mpsc::channel(1024);
        let resolver = FixedUpstream {
            client: Some(CLIENT.parse().unwrap()),
            original_dst: SERVER.parse().unwrap(),
            upstream: upstream.addr,
        };
        let proxy = Proxy::bind(cfg, rx, Arc::new(resolver))
            .unwrap()
            .with_events(etx);
        let addr = proxy.local_addr().unwrap();
        let stats = proxy.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy.run(shutdown.clone()));
        Harness {
            addr,
            upstream,
            policy: tx,
            stats,
            events: erx,
            shutdown,
            task,
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub fn set_policy(&self, state: &DesiredState) {
        self.policy
            .send_replace(Arc::new(L7Policy::from_state(state)));
    }

    /// The next `n` events, and no more yet. An allowed request's event carries the
    /// response's status, so the proxy sends it once the response head is through: it may
    /// still be on its way when the client has read the response.
    pub async fn events(&mut self, n: usize) -> Vec<L7Event> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(e)) => v.push(e),
                _ => panic!("{} events within {WAIT:?}, expected {n}: {v:?}", v.len()),
            }
        }
        if let Ok(extra) = self.events.try_recv() {
            panic!("more than {n} events: {v:?}, then {extra:?}");
        }
        v
    }
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: server\r\n\r\n").into_bytes()
}

pub fn req(method: &str, path: &str, extra: &str, body: &str) -> Vec<u8> {
    let cl = if body.is_empty() && !matches!(method, "POST" | "PUT") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!("{method} {path} HTTP/1.1\r\nHost: server\r\n{extra}{cl}\r\n{body}").into_bytes()
}
