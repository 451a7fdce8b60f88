//! A corpus of request-smuggling and malformed-request vectors, each sent raw to the proxy
//! and checked three ways: the statuses the client gets, whether the proxy closes the
//! connection, and exactly which requests the upstream server parsed (never `/secret`, never
//! anything beyond the allowed requests).
//!
//! Policy: `GET /allowed` and `POST /upload` are allowed; everything else is denied.

mod l7_support;

use l7_support::*;
use std::time::Duration;

struct Vector {
    name: &'static str,
    raw: Vec<u8>,
    /// Statuses answered, in order.
    statuses: &'static [u16],
    /// The requests the upstream parsed, as "METHOD target".
    upstream: &'static [&'static str],
    /// The proxy closes the connection after the answers.
    closed: bool,
}

fn v(
    name: &'static str,
    raw: impl AsRef<[u8]>,
    statuses: &'static [u16],
    upstream: &'static [&'static str],
    closed: bool,
) -> Vector {
    Vector {
        name,
        raw: raw.as_ref().to_vec(),
        statuses,
        upstream,
        closed,
    }
}

const SMUGGLED: &str = "GET /secret HTTP/1.1\r\nHost: s\r\n\r\n";

fn corpus() -> Vec<Vector> {
    let big_header = format!(
        "GET /allowed HTTP/1.1\r\nHost: s\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    let many_headers: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let long_ext = format!(
        "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\na\r\n0\r\n\r\n",
        "e".repeat(5000)
    );
    vec![
        v(
            "CL.TE: TE wins, the connection closes, the rest is never parsed",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[200],
            &["POST /upload"],
            true,
        ),
        v(
            "TE.CL: the chunked body is data, forwarded without Content-Length",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
                SMUGGLED.len()
            ),
            &[200],
            &["POST /upload"],
            true,
        ),
        v(
            "TE: chunked, identity (last coding not chunked)",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
            true,
        ),
        v(
            "TE: identity",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
            &[400],
            &[],
            true,
        ),
        v(
            "TE: xchunked",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "TE: chunked twice",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "TE header then a second TE header with identity",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "TE with obs-fold",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
            true,
        ),
        v(
            "TE with a space before the colon",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "duplicate Content-Length, different values",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            &[400],
            &[],
            true,
        ),
        v(
            "duplicate Content-Length, same value (accepted, forwarded once)",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            &[200],
            &["POST /upload"],
            false,
        ),
        v(
            "Content-Length list",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 3, 3\r\n\r\nabc",
            &[400],
            &[],
            true,
        ),
        v(
            "Content-Length with a sign",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: +3\r\n\r\nabc",
            &[400],
            &[],
            true,
        ),
        v(
            "Content-Length in hex",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 0x3\r\n\r\nabc",
            &[400],
            &[],
            true,
        ),
        v(
            "Content-Length with inner whitespace",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 1 3\r\n\r\nabc",
            &[400],
            &[],
            true,
        ),
        v(
            "Content-Length overflowing u64",
            "POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: 18446744073709551616\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "HTTP/1.0 with Transfer-Encoding",
            format!(
                "POST /upload HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
            true,
        ),
        v(
            "chunk size overflow",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\na\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "negative chunk size",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\na\r\n0\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "chunk longer than its size",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc{SMUGGLED}\r\n0\r\n\r\n"
            ),
            &[400],
            &[],
            true,
        ),
        v(
            "bare LF after the chunk size",
            format!(
                "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
            true,
        ),
        v("oversized chunk extension", long_ext, &[400], &[], true),
        v(
            "bare LF line endings in the head",
            "GET /allowed HTTP/1.1\nHost: s\n\n",
            &[400],
            &[],
            true,
        ),
        v(
            "bare CR inside a header value",
            "GET /allowed HTTP/1.1\r\nHost: s\r\nX: a\rb\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "header line without colon",
            "GET /allowed HTTP/1.1\r\nHost: s\r\nNoColon\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "invalid method token",
            "G@T /allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "lower-case method (valid token, no rule)",
            "get /allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[403],
            &[],
            false,
        ),
        v(
            "absolute-form request target",
            "GET http://s/allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "NUL byte in a header value",
            "GET /allowed HTTP/1.1\r\nHost: s\r\nX: a\0b\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "NUL byte in the target",
            "GET /allowed\0 HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v("oversized head", big_header, &[431], &[], true),
        v(
            "too many header fields",
            format!("GET /allowed HTTP/1.1\r\nHost: s\r\n{many_headers}\r\n"),
            &[431],
            &[],
            true,
        ),
        v(
            "unsupported version",
            "GET /allowed HTTP/1.2\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "two Host headers",
            "GET /allowed HTTP/1.1\r\nHost: s\r\nHost: evil\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "HTTP/1.1 without Host",
            "GET /allowed HTTP/1.1\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "encoded slash in the path",
            "GET /allowed%2F..%2Fsecret HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "dot segments resolve before matching",
            "GET /allowed/../secret HTTP/1.1\r\nHost: s\r\n\r\n",
            &[403],
            &[],
            false,
        ),
        v(
            "encoded dot segments resolve before matching",
            "GET /secret/%2e%2e/allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[200],
            &["GET /allowed"],
            false,
        ),
        v(
            "dot-dot above the root",
            "GET /../allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "invalid percent-encoding",
            "GET /allowed%G1 HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "Expect: 100-continue on a denied request: 403 and close, the body is never parsed",
            format!(
                "POST /secret HTTP/1.1\r\nHost: s\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[403],
            &[],
            true,
        ),
        v(
            "denied request whose Content-Length body looks like a request",
            format!(
                "POST /secret HTTP/1.1\r\nHost: s\r\nContent-Length: {}\r\n\r\n{SMUGGLED}GET /allowed HTTP/1.1\r\nHost: s\r\n\r\n",
                SMUGGLED.len()
            ),
            &[403, 200],
            &["GET /allowed"],
            false,
        ),
        v(
            "denied request whose chunked body looks like a request",
            format!(
                "POST /secret HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\nGET /allowed HTTP/1.1\r\nHost: s\r\n\r\n",
                SMUGGLED.len()
            ),
            &[403, 200],
            &["GET /allowed"],
            false,
        ),
        v(
            "denied request with a malformed chunked body",
            "POST /secret HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            &[403],
            &[],
            true,
        ),
        v(
            "denied upgrade never becomes a tunnel (h2c smuggling)",
            format!(
                "GET /secret HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n{SMUGGLED}"
            ),
            &[403, 403],
            &[],
            false,
        ),
        v(
            "denied CONNECT",
            "CONNECT secret:443 HTTP/1.1\r\nHost: secret:443\r\n\r\n",
            &[403],
            &[],
            false,
        ),
        v(
            "allowed request then a pipelined smuggled one",
            format!("GET /allowed HTTP/1.1\r\nHost: s\r\n\r\n{SMUGGLED}"),
            &[200, 403],
            &["GET /allowed"],
            false,
        ),
        v(
            "leading whitespace before the method",
            " GET /allowed HTTP/1.1\r\nHost: s\r\n\r\n",
            &[400],
            &[],
            true,
        ),
        v(
            "malformed trailer section",
            "POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nBad Trailer\r\n\r\n",
            &[400],
            &[],
            true,
        ),
    ]
}

async fn run(vector: Vector) -> Result<(), String> {
    let h = Harness::start(&state(
        Some(vec![
            method_path(1, "GET", "/allowed"),
            method_path(2, "POST", "/upload"),
        ]),
        None,
    ))
    .await;
    let mut c = h.client().await;
    c.try_send(&vector.raw).await;
    let mut got = Vec::new();
    for _ in vector.statuses {
        match c.response().await {
            Some(r) => got.push(r.status),
            None => break,
        }
    }
    let closed = if got.len() == vector.statuses.len() {
        c.closed_within(Duration::from_millis(400)).await
    } else {
        true
    };
    // Let the upstream finish parsing whatever reached it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let upstream = h.upstream.targets();
    let mut problems = Vec::new();
    if got != vector.statuses {
        problems.push(format!("statuses {got:?}, want {:?}", vector.statuses));
    }
    if closed != vector.closed {
        problems.push(format!("closed {closed}, want {}", vector.closed));
    }
    if upstream != vector.upstream {
        problems.push(format!(
            "upstream parsed {upstream:?}, want {:?}",
            vector.upstream
        ));
    }
    if upstream.iter().any(|t| t.contains("/secret")) {
        problems.push("upstream parsed /secret".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", vector.name, problems.join("; ")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_smuggling_corpus() {
    let vectors = corpus();
    assert!(vectors.len() >= 20);
    let mut set = tokio::task::JoinSet::new();
    for vector in vectors {
        set.spawn(run(vector));
    }
    let mut failures = Vec::new();
    let mut passed = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(()) => passed += 1,
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} passed, failures:\n{}",
        passed,
        failures.join("\n")
    );
}
