//! The L7 proxy over real loopback TCP: rules of every kind on keep-alive and pipelined
//! connections, policy changes on open connections, semantic rule 7, bodies in every framing,
//! upgrades and tunnels, limits, timeouts, shutdown, events and counters.

mod l7_support;

use l7_support::*;
use moat::compiler::{HttpMatcher, L7Key};
use moat::l7::{Direction, L7Verdict, ProxyConfig, RequestKey};
use moat_common::{direction, identity};
use std::sync::atomic::Ordering;
use std::time::Duration;

const SHORT: Duration = Duration::from_millis(300);

async fn expect_status(c: &mut Client, status: u16) -> Resp {
    let r = c.response().await.expect("a response");
    assert_eq!(r.status, status, "body: {}", r.text());
    r
}

#[tokio::test]
async fn l7_method_rule_on_keep_alive_connection() {
    let h = Harness::start(&state(Some(vec![method(1, "GET")]), None)).await;
    let mut c = h.client().await;
    c.send(&get("/a")).await;
    let r = expect_status(&mut c, 200).await;
    assert_eq!(r.text(), "GET /a len=0 sum=14695981039346656037\n");
    c.send(&req("POST", "/a", "", "hello")).await;
    let r = expect_status(&mut c, 403).await;
    assert_eq!(r.text(), "Access denied\r\n");
    assert_eq!(r.header("content-length"), Some("15"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    c.send(&get("/b")).await;
    expect_status(&mut c, 200).await;
    c.send(&req("DELETE", "/b", "", "")).await;
    expect_status(&mut c, 403).await;
    c.send(&req("get", "/b", "", "")).await;
    expect_status(&mut c, 403).await;
    c.send(&req("HEAD", "/b", "", "")).await;
    let r = c.response_to(true).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(r.body.is_empty());
    c.send(&get("/c")).await;
    expect_status(&mut c, 200).await;
    assert_eq!(h.upstream.targets(), ["GET /a", "GET /b", "GET /c"]);
    assert_eq!(
        h.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let raw = String::from_utf8(h.upstream.raw()).unwrap();
    assert!(!raw.contains("POST") && !raw.contains("DELETE") && !raw.contains("hello"));
}

#[tokio::test]
async fn l7_exact_path_rule_matches_normalised_path() {
    let h = Harness::start(&state(Some(vec![path(1, "/v1/x")]), None)).await;
    let mut c = h.client().await;
    for (p, status) in [
        ("/v1/x", 200),
        ("/v1/x/", 403),
        ("/v1/./x", 200),
        ("/v1//x", 200),
        ("/v1/y/../x", 200),
        ("/v1/%78", 200),
        ("/v1/y", 403),
        ("/v1/x?a=b/../c", 200),
        ("/V1/x", 403),
    ] {
        c.send(&get(p)).await;
        expect_status(&mut c, status).await;
    }
    assert_eq!(
        h.upstream.targets(),
        [
            "GET /v1/x",
            "GET /v1/x",
            "GET /v1/x",
            "GET /v1/x",
            "GET /v1/x",
            "GET /v1/x?a=b/../c"
        ]
    );
}

#[tokio::test]
async fn l7_prefix_rule_and_traversal() {
    let h = Harness::start(&state(Some(vec![prefix(1, "/public/")]), None)).await;
    let mut c = h.client().await;
    for (p, status) in [
        ("/public/a", 200),
        ("/public/", 200),
        ("/public", 403),
        ("/publicity", 403),
        ("/public/../admin", 403),
        ("/public/%2e%2e/admin", 403),
        ("/public//../admin", 403),
        ("/public/a/b/../c", 200),
    ] {
        c.send(&get(p)).await;
        expect_status(&mut c, status).await;
    }
    // An encoded slash cannot be normalised: 400 and the connection closes.
    c.send(&get("/public/..%2Fadmin")).await;
    expect_status(&mut c, 400).await;
    assert!(c.closed_within(SHORT).await);
    assert_eq!(
        h.upstream.targets(),
        ["GET /public/a", "GET /public/", "GET /public/a/c"]
    );
}

#[tokio::test]
async fn l7_regex_rule_is_anchored() {
    let h = Harness::start(&state(Some(vec![regex(1, "/items/[0-9]+")]), None)).await;
    let mut c = h.client().await;
    for (p, status) in [
        ("/items/12", 200),
        ("/items/12/x", 403),
        ("/x/items/12", 403),
        ("/items/ab", 403),
        ("/items/7?x=1", 200),
    ] {
        c.send(&get(p)).await;
        expect_status(&mut c, status).await;
    }
    assert_eq!(h.upstream.targets(), ["GET /items/12", "GET /items/7?x=1"]);
}

#[tokio::test]
async fn l7_header_rules_present_and_equal() {
    let m = HttpMatcher {
        headers: vec![
            moat::api::HeaderMatch {
                name: "x-token".into(),
                value: None,
            },
            moat::api::HeaderMatch {
                name: "x-env".into(),
                value: Some("prod".into()),
            },
        ],
        ..matcher(1)
    };
    let h = Harness::start(&state(Some(vec![m]), None)).await;
    let mut c = h.client().await;
    for (extra, status) in [
        ("X-Token: a\r\nX-Env: prod\r\n", 200),
        ("x-token:\r\nX-ENV: prod\r\n", 200),
        ("X-Env: prod\r\n", 403),
        ("X-Token: a\r\nX-Env: Prod\r\n", 403),
        ("X-Token: a\r\nX-Env: prod2\r\n", 403),
        ("X-Token: a\r\nX-Env: dev\r\nX-Env: prod\r\n", 200),
        ("X-Token: a\r\nX-Env:   prod  \r\n", 200),
    ] {
        c.send(&req("GET", "/h", extra, "")).await;
        expect_status(&mut c, status).await;
    }
    assert_eq!(h.upstream.requests().len(), 4);
}

#[tokio::test]
async fn l7_pipelined_requests_in_one_write() {
    let h = Harness::start(&state(
        Some(vec![method(1, "GET"), path(2, "/upload")]),
        None,
    ))
    .await;
    let mut c = h.client().await;
    let mut batch = Vec::new();
    batch.extend(get("/one"));
    batch.extend(req("PUT", "/nope", "", "secret-body"));
    batch.extend(req("POST", "/upload", "", "payload"));
    batch.extend(b"DELETE /nope HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nGET \r\n0\r\n\r\n");
    batch.extend(get("/two"));
    c.send(&batch).await;
    for s in [200, 403, 200, 403, 200] {
        expect_status(&mut c, s).await;
    }
    let reqs = h.upstream.requests();
    assert_eq!(
        h.upstream.targets(),
        ["GET /one", "POST /upload", "GET /two"]
    );
    assert_eq!(reqs[1].body, b"payload");
    assert!(!String::from_utf8_lossy(&h.upstream.raw()).contains("secret-body"));
}

#[tokio::test]
async fn l7_policy_change_applies_to_open_connection() {
    let allow = state(Some(vec![path(1, "/a")]), None);
    let h = Harness::start(&allow).await;
    let mut c = h.client().await;
    c.send(&get("/a")).await;
    expect_status(&mut c, 200).await;
    c.send(&get("/b")).await;
    expect_status(&mut c, 403).await;
    // Widen: /b allowed now, same connection.
    h.set_policy(&state(Some(vec![path(1, "/a"), path(2, "/b")]), None));
    c.send(&get("/b")).await;
    expect_status(&mut c, 200).await;
    // Revoke everything: the rules are gone, the flow is no longer governed: fail closed.
    h.set_policy(&state(None, None));
    c.send(&get("/a")).await;
    expect_status(&mut c, 403).await;
    h.set_policy(&allow);
    c.send(&get("/a")).await;
    expect_status(&mut c, 200).await;
    assert_eq!(h.upstream.targets(), ["GET /a", "GET /b", "GET /a"]);
}

#[tokio::test]
async fn l7_rule_7_match_all_beside_http_rule() {
    // What the compiler emits for a plain Allow overlapping an HTTP rule: a match-all.
    let mut h = Harness::start(&state(Some(vec![method(5, "GET"), matcher(9)]), None)).await;
    let mut c = h.client().await;
    c.send(&get("/anything")).await;
    expect_status(&mut c, 200).await;
    c.send(&req("PUT", "/x/y", "X: 1\r\n", "data")).await;
    expect_status(&mut c, 200).await;
    drop(c);
    let ev = h.events(2).await;
    assert_eq!(ev[0].rule_id, Some(5), "lowest matching rule id reported");
    assert_eq!(ev[1].rule_id, Some(9));
    assert!(ev.iter().all(|e| e.verdict == L7Verdict::Allowed));
}

#[tokio::test]
async fn l7_both_ends_decide() {
    // The client's egress allows GET only, the server's ingress allows /a only.
    let mut h = Harness::start(&state(
        Some(vec![path(20, "/a")]),
        Some(vec![method(10, "GET")]),
    ))
    .await;
    let mut c = h.client().await;
    c.send(&get("/a")).await;
    expect_status(&mut c, 200).await;
    c.send(&get("/b")).await;
    expect_status(&mut c, 403).await;
    c.send(&req("POST", "/a", "", "x")).await;
    expect_status(&mut c, 403).await;
    assert_eq!(h.upstream.targets(), ["GET /a"]);
    let ev = h.events(4).await;
    let brief: Vec<_> = ev
        .iter()
        .map(|e| (e.direction, e.verdict, e.rule_id, e.status))
        .collect();
    assert_eq!(
        brief,
        [
            (Some(Direction::Egress), L7Verdict::Allowed, Some(10), 200),
            (Some(Direction::Ingress), L7Verdict::Allowed, Some(20), 200),
            (Some(Direction::Ingress), L7Verdict::Denied, Some(20), 403),
            (Some(Direction::Egress), L7Verdict::Denied, Some(10), 403),
        ]
    );
    let reqs = h.stats.requests();
    assert!(reqs.contains(&(
        RequestKey {
            rule_id: Some(20),
            direction: Some(Direction::Ingress),
            verdict: L7Verdict::Allowed,
            method: "GET"
        },
        1
    )));
    assert_eq!(h.stats.total(L7Verdict::Denied), 2);
}

#[tokio::test]
async fn l7_ungoverned_flow_fails_closed_without_connecting() {
    let mut h = Harness::start(&state(None, None)).await;
    let mut c = h.client().await;
    c.send(&get("/")).await;
    expect_status(&mut c, 403).await;
    c.send(&get("/x")).await;
    expect_status(&mut c, 403).await;
    assert_eq!(
        h.upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let ev = h.events(2).await;
    assert!(
        ev.iter()
            .all(|e| e.direction.is_none() && e.verdict == L7Verdict::Denied)
    );
    assert_eq!(ev[0].src, CLIENT.parse().unwrap());
    assert_eq!(ev[0].dst, SERVER.parse().unwrap());
}

#[tokio::test]
async fn l7_any_peer_slot_and_port_ranges() {
    let mut s = state(None, None);
    s.l7.insert(
        L7Key {
            subject: SERVER_RULESET,
            peer: identity::ANY,
            direction: direction::INGRESS,
            first_port: 70,
            last_port: 90,
        },
        vec![path(3, "/any")],
    );
    let h = Harness::start(&s).await;
    let mut c = h.client().await;
    c.send(&get("/any")).await;
    expect_status(&mut c, 200).await;
    c.send(&get("/other")).await;
    expect_status(&mut c, 403).await;
    // The same slot on other ports does not govern port 80: fail closed.
    s.l7.clear();
    s.l7.insert(
        L7Key {
            subject: SERVER_RULESET,
            peer: identity::ANY,
            direction: direction::INGRESS,
            first_port: 81,
            last_port: 90,
        },
        vec![matcher(3)],
    );
    h.set_policy(&s);
    c.send(&get("/any")).await;
    expect_status(&mut c, 403).await;
}

#[tokio::test]
async fn l7_chunked_bodies_both_ways() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    let mut c = h.client().await;
    c.send(
        b"POST /up HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n",
    )
    .await;
    let r = expect_status(&mut c, 200).await;
    assert!(r.text().starts_with("POST /up len=16"));
    let rec = &h.upstream.requests()[0];
    assert_eq!(rec.body, b"hello 0123456789");
    assert_eq!(rec.header("content-length"), None);
    let raw = String::from_utf8(h.upstream.raw()).unwrap();
    assert!(
        raw.contains("\r\n\r\n5\r\nhello\r\n1\r\n \r\na\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n"),
        "{raw}"
    );
    c.send(&get("/chunked-response")).await;
    let r = expect_status(&mut c, 200).await;
    assert_eq!(r.body, b"hello world");
    c.send(&get("/after")).await;
    expect_status(&mut c, 200).await;
}

#[tokio::test]
async fn l7_large_bodies_stream() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    let c = h.client().await;
    let n = 8 << 20;
    let data = pattern(n);
    let mut up =
        format!("PUT /big-up HTTP/1.1\r\nHost: s\r\nContent-Length: {n}\r\n\r\n").into_bytes();
    up.extend_from_slice(&data);
    let (mut rd, mut wr) = c.stream.into_split();
    // Write and read concurrently: nothing may require the whole body in memory.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        wr.write_all(&up).await.unwrap();
        let mut chunked =
            b"POST /big-chunked HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in data.chunks(100_000) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        wr.write_all(&chunked).await.unwrap();
        wr.write_all(&get(&format!("/big?n={n}"))).await.unwrap();
        wr
    });
    let mut acc = Vec::new();
    let mut tmp = vec![0u8; 65536];
    use tokio::io::AsyncReadExt;
    let expected_tail_len = n;
    loop {
        let k = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut tmp))
            .await
            .unwrap()
            .unwrap();
        assert!(k > 0);
        acc.extend_from_slice(&tmp[..k]);
        if acc.len() > expected_tail_len && acc.ends_with(&pattern(n)[n - 64..]) {
            break;
        }
    }
    let wr = writer.await.unwrap();
    let sum = checksum(&pattern(n));
    let text = String::from_utf8_lossy(&acc[..acc.len() - n]).into_owned();
    assert!(
        text.contains(&format!("PUT /big-up len={n} sum={sum}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("POST /big-chunked len={n} sum={sum}")),
        "{text}"
    );
    assert!(acc.ends_with(&pattern(n)));
    drop((rd, wr));
}

#[tokio::test]
async fn l7_responses_without_body_and_interim() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    let mut c = h.client().await;
    c.send(&req("HEAD", "/x", "", "")).await;
    let r = c.response_to(true).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-length").is_some());
    c.send(&get("/nocontent")).await;
    expect_status(&mut c, 204).await;
    c.send(&get("/notmodified")).await;
    expect_status(&mut c, 304).await;
    // Expect: 100-continue: the interim response comes through, then the final one.
    c.send(b"POST /x HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    expect_status(&mut c, 100).await;
    c.send(b"abcde").await;
    let r = expect_status(&mut c, 200).await;
    assert!(r.text().starts_with("POST /x len=5"));
    c.send(&get("/end")).await;
    expect_status(&mut c, 200).await;
    assert_eq!(h.upstream.requests().len(), 5);
}

#[tokio::test]
async fn l7_close_delimited_response_closes_client() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    let mut c = h.client().await;
    c.send(&get("/close")).await;
    let r = expect_status(&mut c, 200).await;
    assert_eq!(r.body, b"until the end");
}

#[tokio::test]
async fn l7_http10_keep_alive() {
    let h = Harness::start(&state(Some(vec![method(1, "GET")]), None)).await;
    let mut c = h.client().await;
    c.send(b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let r = expect_status(&mut c, 403).await;
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(b"GET /b HTTP/1.0\r\n\r\n").await;
    expect_status(&mut c, 200).await;
    assert!(c.closed_within(Duration::from_secs(2)).await);
    assert_eq!(h.upstream.targets(), ["GET /b"]);
}

#[tokio::test]
async fn l7_websocket_upgrade_only_when_allowed() {
    let h = Harness::start(&state(Some(vec![path(1, "/ws")]), None)).await;
    let mut c = h.client().await;
    let upgrade = |p: &str| {
        format!("GET {p} HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .into_bytes()
    };
    c.send(&upgrade("/chat")).await;
    expect_status(&mut c, 403).await;
    // Denied upgrade: still plain HTTP on this connection.
    c.send(&upgrade("/ws")).await;
    let r = expect_status(&mut c, 101).await;
    assert_eq!(r.header("upgrade"), Some("websocket"));
    c.send(b"frame-one").await;
    assert_eq!(c.raw(9).await, b"FRAME-ONE");
    // Not HTTP any more: a request-looking frame passes as bytes.
    c.send(b"GET /chat HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.raw(22).await, b"GET /CHAT HTTP/1.1\r\n\r\n");
    assert_eq!(h.upstream.targets(), ["GET /ws"]);
}

#[tokio::test]
async fn l7_connect_tunnel_only_when_allowed() {
    let h = Harness::start(&state(
        Some(vec![HttpMatcher {
            method: Some("CONNECT".into()),
            path: Some("db:5432".into()),
            ..matcher(1)
        }]),
        None,
    ))
    .await;
    let mut c = h.client().await;
    c.send(b"CONNECT other:22 HTTP/1.1\r\nHost: other:22\r\n\r\n")
        .await;
    expect_status(&mut c, 403).await;
    c.send(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\nearly")
        .await;
    let r = c.response_to(true).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(c.raw(5).await, b"EARLY");
    c.send(b"more").await;
    assert_eq!(c.raw(4).await, b"MORE");
    assert_eq!(h.upstream.targets(), ["CONNECT db:5432"]);
}

#[tokio::test]
async fn l7_connection_cap_closes_excess() {
    let cfg = ProxyConfig {
        max_connections: 1,
        ..ProxyConfig::unprivileged()
    };
    let h = Harness::start_with(&state(Some(vec![matcher(1)]), None), cfg).await;
    let mut first = h.client().await;
    first.send(&get("/1")).await;
    expect_status(&mut first, 200).await;
    let mut second = h.client().await;
    second.try_send(&get("/2")).await;
    assert!(second.closed_within(Duration::from_secs(2)).await);
    assert_eq!(
        h.stats
            .connections_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    first.send(&get("/3")).await;
    expect_status(&mut first, 200).await;
    drop(first);
    // The slot frees once the first connection is gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = h.client().await;
    third.send(&get("/4")).await;
    expect_status(&mut third, 200).await;
}

#[tokio::test]
async fn l7_idle_and_header_timeouts() {
    let cfg = ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        header_timeout: Duration::from_millis(300),
        ..ProxyConfig::unprivileged()
    };
    let h = Harness::start_with(&state(Some(vec![matcher(1)]), None), cfg).await;
    let mut c = h.client().await;
    c.send(&get("/x")).await;
    expect_status(&mut c, 200).await;
    assert!(
        c.closed_within(Duration::from_secs(3)).await,
        "idle connection closed"
    );
    let mut slow = h.client().await;
    slow.send(b"GET /x HTTP/1.1\r\nHost:").await;
    assert!(
        slow.closed_within(Duration::from_secs(3)).await,
        "slow head closed"
    );
    assert_eq!(h.upstream.requests().len(), 1);
}

#[tokio::test]
async fn l7_graceful_shutdown() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    let mut c = h.client().await;
    c.send(&get("/x")).await;
    expect_status(&mut c, 200).await;
    h.shutdown.cancel();
    assert!(c.closed_within(Duration::from_secs(3)).await);
    tokio::time::timeout(Duration::from_secs(3), h.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(h.addr).await.is_err());
}

/// Connections handed to several worker threads are each served to the end, and shutdown
/// closes them on every worker.
#[tokio::test]
async fn l7_workers_serve_their_connections_and_all_drain_on_shutdown() {
    let cfg = ProxyConfig {
        workers: 3,
        ..ProxyConfig::unprivileged()
    };
    let h = Harness::start_with(&state(Some(vec![matcher(1)]), None), cfg).await;
    let mut clients = Vec::new();
    for _ in 0..7 {
        let mut c = h.client().await;
        c.send(&get("/x")).await;
        expect_status(&mut c, 200).await;
        clients.push(c);
    }
    for c in &mut clients {
        c.send(&get("/x")).await;
        expect_status(c, 200).await;
    }
    assert_eq!(h.upstream.requests().len(), 14);
    h.shutdown.cancel();
    for c in &mut clients {
        assert!(c.closed_within(Duration::from_secs(3)).await);
    }
    tokio::time::timeout(Duration::from_secs(3), h.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let stats = &h.stats;
    assert_eq!(stats.connections_accepted.load(Ordering::Relaxed), 7);
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn l7_upstream_down_is_502() {
    let h = Harness::start(&state(Some(vec![matcher(1)]), None)).await;
    // Point the resolver at a closed port by restarting with a dead upstream.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (tx, rx) = tokio::sync::watch::channel(h.policy.borrow().clone());
    let proxy = moat::l7::Proxy::bind(
        ProxyConfig::unprivileged(),
        rx,
        std::sync::Arc::new(moat::l7::FixedUpstream {
            client: Some(CLIENT.parse().unwrap()),
            original_dst: SERVER.parse().unwrap(),
            upstream: dead_addr,
        }),
    )
    .unwrap();
    let addr = proxy.local_addr().unwrap();
    let stats = proxy.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(proxy.run(stop.clone()));
    let mut c = Client::connect(addr).await;
    c.send(&get("/x")).await;
    expect_status(&mut c, 502).await;
    assert!(c.closed_within(SHORT).await);
    assert_eq!(
        stats
            .upstream_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    stop.cancel();
    drop(tx);
}

#[tokio::test]
async fn l7_event_channel_overflow_is_counted() {
    let upstream = TestUpstream::start().await;
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(
        moat::l7::L7Policy::from_state(&state(None, None)),
    ));
    let (etx, _erx) = tokio::sync::mpsc::channel(1);
    let proxy = moat::l7::Proxy::bind(
        ProxyConfig::unprivileged(),
        rx,
        std::sync::Arc::new(moat::l7::FixedUpstream {
            client: Some(CLIENT.parse().unwrap()),
            original_dst: SERVER.parse().unwrap(),
            upstream: upstream.addr,
        }),
    )
    .unwrap()
    .with_events(etx);
    let addr = proxy.local_addr().unwrap();
    let stats = proxy.stats();
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    let mut c = Client::connect(addr).await;
    for _ in 0..3 {
        c.send(&get("/x")).await;
        expect_status(&mut c, 403).await;
    }
    assert_eq!(
        stats
            .events_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(stats.total(L7Verdict::Denied), 3);
}

#[tokio::test]
async fn l7_events_are_rate_limited_and_counters_stay_exact() {
    let cfg = ProxyConfig {
        // One worker: its bucket is the only one.
        workers: 1,
        event_limit: moat::l7::EventLimit { rate: 0, burst: 3 },
        ..ProxyConfig::unprivileged()
    };
    let mut h = Harness::start_with(&state(None, None), cfg).await;
    let mut c = h.client().await;
    for i in 0..10 {
        c.send(&get(&format!("/{i}"))).await;
        expect_status(&mut c, 403).await;
    }
    let paths: Vec<String> = h.events(3).await.into_iter().map(|e| e.path).collect();
    assert_eq!(paths, ["/0", "/1", "/2"], "the burst, then nothing");
    let suppressed = h
        .stats
        .events_suppressed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(suppressed, 7);
    assert_eq!(h.stats.total(L7Verdict::Denied), 10);
}

#[tokio::test]
async fn l7_dual_stack_listener_reports_ipv4_as_ipv4() {
    // The production resolver on a plain dual-stack listener: the "original destination" is
    // the listener itself, and the flow is governed by nothing, so it is denied (never looped).
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(moat::l7::L7Policy::empty()));
    let (etx, mut erx) = tokio::sync::mpsc::channel(16);
    let cfg = ProxyConfig {
        listen: "[::]:0".parse().unwrap(),
        ..ProxyConfig::unprivileged()
    };
    let proxy = moat::l7::Proxy::bind(cfg, rx, std::sync::Arc::new(moat::l7::Transparent))
        .unwrap()
        .with_events(etx);
    let port = proxy.local_addr().unwrap().port();
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let mut c = Client::connect(addr.parse().unwrap()).await;
        c.send(&get("/")).await;
        expect_status(&mut c, 403).await;
        let ev = erx.recv().await.unwrap();
        assert_eq!(ev.dst, addr.parse().unwrap());
        assert_eq!(ev.src.ip(), ev.dst.ip());
        assert_eq!(ev.direction, None);
    }
}

#[tokio::test]
async fn l7_privileged_socket_options_when_available() {
    // IP_TRANSPARENT on the listener and SO_MARK on upstream sockets need CAP_NET_ADMIN: run
    // the full path with them when the test has it (CI runs as root), skip otherwise.
    let cfg = ProxyConfig {
        listen: "[::]:0".parse().unwrap(),
        transparent: true,
        upstream_mark: Some(moat_common::mark::PROXY_UPSTREAM),
        ..ProxyConfig::unprivileged()
    };
    let upstream = TestUpstream::start().await;
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(
        moat::l7::L7Policy::from_state(&state(Some(vec![matcher(1)]), None)),
    ));
    let resolver = moat::l7::FixedUpstream {
        client: Some(CLIENT.parse().unwrap()),
        original_dst: SERVER.parse().unwrap(),
        upstream: upstream.addr,
    };
    let proxy = match moat::l7::Proxy::bind(cfg, rx, std::sync::Arc::new(resolver)) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: no CAP_NET_ADMIN ({e})");
            return;
        }
        Err(e) => panic!("bind: {e}"),
    };
    let port = proxy.local_addr().unwrap().port();
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    let mut c = Client::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    c.send(&get("/marked")).await;
    expect_status(&mut c, 200).await;
    assert_eq!(upstream.targets(), ["GET /marked"]);
}
