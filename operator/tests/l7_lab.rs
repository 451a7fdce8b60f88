//! L7 policy with real traffic in a two-node lab: the deathstar API behind HTTP rules,
//! reached from a pod on its node (steered by the source's `from_endpoint`) and from a pod on
//! the other node (steered by the destination node's `from_uplink`), through the agents' proxy.
mod agent_support;

use agent_support::*;
use moat::lab::Lab;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_millis(800);

const TOPOLOGY: &str = r#"
name: "l7 lab"
namespaces:
  default: {kubernetes.io/metadata.name: default}
pods:
  default/deathstar: {org: empire, class: deathstar}
  default/tiefighter: {org: empire, class: tiefighter}
  default/interceptor: {org: empire, class: tiefighter}
nodes:
  node-1: [default/deathstar, default/tiefighter]
  node-2: [default/interceptor]
deathstar:
  port: 80
  pods: [default/deathstar]
policies: []
probes: []
"#;

/// Ingress HTTP rules on the deathstar for Empire ships: each rule kind once.
fn l7_policy(extra_path: &str) -> String {
    format!(
        r#"apiVersion: moat.dev/v1alpha1
kind: MoatNetworkPolicy
metadata: {{name: deathstar-http, namespace: default}}
spec:
  podSelector:
    matchLabels: {{class: deathstar}}
  ingress:
  - from:
    - podSelector:
        matchLabels: {{org: empire}}
    ports:
    - {{port: 80, protocol: TCP}}
    http:
    - {{method: POST, path: /v1/request-landing}}
    - {{method: GET, pathPrefix: /v1/status}}
    - {{method: GET, pathRegex: "/v1/ships/[0-9]+"}}
    - {{method: GET, path: /, headers: [{{name: X-Clearance, value: sith}}]}}
    - {{method: GET, path: {extra_path}}}
"#
    )
}

/// Egress HTTP rules of the tiefighters toward the deathstar.
const EGRESS_HTTP: &str = r#"apiVersion: moat.dev/v1alpha1
kind: MoatNetworkPolicy
metadata: {name: tiefighter-http, namespace: default}
spec:
  podSelector:
    matchLabels: {class: tiefighter}
  egress:
  - to:
    - podSelector:
        matchLabels: {class: deathstar}
    ports:
    - {port: 80, protocol: TCP}
    http:
    - {method: POST, path: /v1/request-landing}
    - {method: GET, pathPrefix: /v1/}
"#;

/// Send one request on an open connection and read one Content-Length-framed response.
fn exchange(s: &mut TcpStream, method: &str, path: &str, headers: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n{headers}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    read_response(s)
}

fn read_response(s: &mut TcpStream) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return (0, String::new()),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn keep_alive_mix(s: &mut TcpStream, from: &str) {
    let cases = [
        ("POST", "/v1/request-landing", "", 200),
        ("PUT", "/v1/exhaust-port", "", 403),
        ("GET", "/v1/status/shields", "", 404),
        ("GET", "/v1/ships/42", "", 404),
        ("GET", "/v1/ships/x", "", 403),
        ("GET", "/", "", 403),
        ("GET", "/", "X-Clearance: sith\r\n", 200),
        ("GET", "/", "X-Clearance: jedi\r\n", 403),
        ("POST", "/v1/request-landing", "", 200),
    ];
    for (method, path, headers, want) in cases {
        let (status, body) = exchange(s, method, path, headers);
        assert_eq!(
            status, want,
            "{from}: {method} {path} {headers:?}: {body:?}"
        );
        if want == 403 {
            assert_eq!(body, "Access denied\r\n", "{from}: {method} {path}");
        }
    }
}

/// Each node counted its denials with the policy whose HTTP rules made them: the deathstar's
/// node (0) its ingress rules', the interceptor's node (1) its egress rules'.
fn denials_counted_by_each_side(lab: &Lab) {
    for (node, policy) in [(0, "deathstar-http"), (1, "tiefighter-http")] {
        let metrics = get(&lab.agents()[node].socket, "/metrics").1;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("moat_l7_requests_total")
                    && l.contains("verdict=\"denied\"")
                    && l.contains(&format!("policy=\"{policy}\""))),
            "node {node}: denials counted with policy {policy}: {metrics}"
        );
    }
}

#[test]
fn http_rules_same_node_and_cross_node() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "l7.yaml", &l7_policy("/v1/none"));
    lab.wait_programmed().unwrap();

    // The same node (source-side steering) and the other node (uplink steering), each on one
    // keep-alive connection mixing allowed and denied requests.
    for from in ["default/tiefighter", "default/interceptor"] {
        let mut conn = connect(&lab, from, "default/deathstar", 80, T)
            .unwrap_or_else(|| panic!("{from}: connect to the deathstar"));
        keep_alive_mix(&mut conn, from);
    }

    // Pipelined: two requests in one write, answered in order.
    let mut conn = connect(&lab, "default/tiefighter", "default/deathstar", 80, T).unwrap();
    conn.write_all(
        b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n\
          POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut conn).0, 403);
    assert_eq!(read_response(&mut conn).0, 200);

    // A policy change applies to the next request of an open connection.
    let (status, _) = exchange(&mut conn, "GET", "/v1/new", "");
    assert_eq!(status, 403, "not allowed yet");
    write_source_file(&lab, "l7.yaml", &l7_policy("/v1/new"));
    lab.wait_programmed().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let (status, _) = exchange(&mut conn, "GET", "/v1/new", "");
        if status != 403 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status, 404,
        "allowed on the open connection (the API has no /v1/new)"
    );

    // Semantic rule 7: a plain L3/L4 allow for the same peers and port beside the HTTP rule
    // makes every request on the overlap allowed.
    write_source_file(
        &lab,
        "allow-all.yaml",
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empire-l4, namespace: default}
spec:
  podSelector:
    matchLabels: {class: deathstar}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {org: empire}
    ports:
    - {port: 80, protocol: TCP}
"#,
    );
    lab.wait_programmed().unwrap();
    let mut conn = connect(&lab, "default/interceptor", "default/deathstar", 80, T).unwrap();
    let (status, body) = exchange(&mut conn, "PUT", "/v1/exhaust-port", "");
    assert_eq!(
        status, 503,
        "rule 7: the L3/L4 allow lets the request through: {body:?}"
    );

    let metrics = get(&lab.agents()[0].socket, "/metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("moat_l7_requests_total") && l.contains("verdict=\"denied\"")),
        "denials counted"
    );
    // The proxy's own counters: the connections it served, none refused, no event held back.
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    assert!(value("moat_l7_connections_total") >= 1.0);
    assert_eq!(value("moat_l7_connections_rejected_total"), 0.0);
    assert_eq!(value("moat_l7_events_suppressed_total"), 0.0);
    assert_eq!(value("moat_l7_proxy_restarts_total"), 0.0);
    let (active, total) = (
        value("moat_l7_connections_active"),
        value("moat_l7_connections_total"),
    );
    assert!((0.0..=total).contains(&active), "{active} of {total}");
}

/// Egress HTTP rules of the tiefighters toward the deathstar, whose own ingress policy only
/// admits Empire pods: the proxy's upstream to another node must present the client's
/// address (that node's policy sees no marks, only addresses), and its replies must come back
/// to the proxy (`from_uplink`'s reply steering). Then the deathstar's ingress HTTP rules on
/// top: a cross-node request passes both nodes' proxies.
#[test]
fn egress_http_rules_toward_another_node_keep_the_client_identity() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "egress.yaml", EGRESS_HTTP);
    write_source_file(
        &lab,
        "ingress.yaml",
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deathstar-empire, namespace: default}
spec:
  podSelector:
    matchLabels: {class: deathstar}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {org: empire}
    ports:
    - {port: 80, protocol: TCP}
"#,
    );
    lab.wait_programmed().unwrap();
    for from in ["default/tiefighter", "default/interceptor"] {
        let mut conn = connect(&lab, from, "default/deathstar", 80, T)
            .unwrap_or_else(|| panic!("{from}: connect to the deathstar"));
        for (method, path, want) in [
            ("POST", "/v1/request-landing", 200),
            ("PUT", "/v1/exhaust-port", 403),
            ("GET", "/v1/status/shields", 404),
            ("POST", "/v1/request-landing", 200),
        ] {
            let (status, body) = exchange(&mut conn, method, path, "");
            assert_eq!(status, want, "{from}: {method} {path}: {body:?}");
        }
    }

    // Both sides: the deathstar's ingress HTTP rules behind the interceptor's egress rules: a
    // request passes only if both allow.
    write_source_file(&lab, "ingress.yaml", &l7_policy("/v1/none"));
    lab.wait_programmed().unwrap();
    let mut conn = connect(&lab, "default/interceptor", "default/deathstar", 80, T).unwrap();
    for (method, path, headers, want) in [
        ("POST", "/v1/request-landing", "", 200),
        ("GET", "/v1/status/shields", "", 404),
        ("GET", "/v1/ships/x", "", 403),
        ("GET", "/", "X-Clearance: sith\r\n", 403),
        ("PUT", "/v1/exhaust-port", "", 403),
    ] {
        let (status, body) = exchange(&mut conn, method, path, headers);
        assert_eq!(status, want, "interceptor: {method} {path}: {body:?}");
    }
    denials_counted_by_each_side(&lab);
}

/// The same paths over IPv6 (the agent's fwmark routing and the socket lookups are per
/// family): ingress HTTP rules from the same node and from the other node, then the
/// interceptor's egress HTTP rules in front of them, which takes its proxy's upstream across
/// the nodes from the client's IPv6 address and its replies back through `from_uplink`.
#[test]
fn http_rules_over_ipv6() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "l7.yaml", &l7_policy("/v1/none"));
    lab.wait_programmed().unwrap();
    let deathstar = SocketAddr::new(ip6(&lab, "default/deathstar"), 80);
    let connect6 = |lab: &Lab, from: &str| {
        connect_addr(&pod_ns(lab, from), deathstar, T)
            .unwrap_or_else(|| panic!("{from}: connect to the deathstar over IPv6"))
    };
    for from in ["default/tiefighter", "default/interceptor"] {
        keep_alive_mix(&mut connect6(&lab, from), from);
    }

    write_source_file(&lab, "egress.yaml", EGRESS_HTTP);
    lab.wait_programmed().unwrap();
    for from in ["default/tiefighter", "default/interceptor"] {
        let mut conn = connect6(&lab, from);
        for (method, path, want) in [
            ("POST", "/v1/request-landing", 200),
            ("GET", "/v1/status/shields", 404),
            ("GET", "/v1/ships/x", 403),
            ("PUT", "/v1/exhaust-port", 403),
        ] {
            let (status, body) = exchange(&mut conn, method, path, "");
            assert_eq!(status, want, "{from}: {method} {path}: {body:?}");
        }
    }
    denials_counted_by_each_side(&lab);
}
