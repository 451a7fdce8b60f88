//! The Star Wars `deathstar` HTTP API of Cilium's getting-started demo, served by moat itself
//! (no images, no interpreters): `POST /v1/request-landing` -> 200 `Ship landed`,
//! `PUT /v1/exhaust-port` -> 503 with the demo's panic, `GET /` and `GET /v1` -> 200 with the
//! API description; anything else 404.
//!
//! HTTP/1.1 with keep-alive, bounded request heads, `Content-Length` bodies read and
//! discarded; a chunked request body is refused (400) and the connection closed, since this
//! server never needs one and guessing framing is how smuggling starts.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted (read and discarded).
pub const MAX_BODY: usize = 1024 * 1024;
/// An idle connection is closed after this long.
pub const IDLE: Duration = Duration::from_secs(30);

pub const LANDED: &str = "Ship landed\n";

/// The panic the demo's deathstar answers `PUT /v1/exhaust-port` with.
pub const PANIC: &str = "Panic: deathstar exploded\n\ngoroutine 1 [running]:\n\
main.HandleGarbage(0x2080c3f50, 0x2, 0x4, 0x425c0, 0x5, 0xa)\n\
\t/code/src/github.com/empire/deathstar/\n\
\ttemp/main.go:9 +0x64\n\
main.main()\n\
\t/code/src/github.com/empire/deathstar/\n\
\ttemp/main.go:5 +0x85\n";

const API: &str = "{\"name\":\"Death Star\",\"model\":\"DS-1 Orbital Battle Station\",\
\"manufacturer\":\"Imperial Department of Military Research, Sienar Fleet Systems\",\
\"cost_in_credits\":\"1000000000000\",\"length\":\"120000\",\"crew\":\"342953\",\
\"passengers\":\"843342\",\"cargo_capacity\":\"1000000000000\",\"hyperdrive_rating\":\"4.0\",\
\"starship_class\":\"Deep Space Mobile Battlestation\",\"api\":[\"GET   /v1\",\
\"POST  /v1/request-landing\",\"PUT   /v1/cargobay\",\"GET   /v1/hyper-matter-reactor/status\",\
\"PUT   /v1/exhaust-port\"]}\n";

/// The answer to a request: status, reason phrase, content type, body.
pub fn respond(method: &str, path: &str) -> (u16, &'static str, &'static str, &'static str) {
    let path = path.split('?').next().unwrap_or(path);
    match (method, path) {
        ("POST", "/v1/request-landing") => (200, "OK", "text/plain", LANDED),
        ("PUT", "/v1/exhaust-port") => (503, "Service Unavailable", "text/plain", PANIC),
        ("GET", "/") | ("GET", "/v1") | ("GET", "/v1/") => (200, "OK", "application/json", API),
        ("PUT", "/v1/cargobay") => (200, "OK", "text/plain", "Cargo bay loaded\n"),
        ("GET", "/v1/hyper-matter-reactor/status") => {
            (200, "OK", "text/plain", "Hyper-matter reactor: nominal\n")
        }
        _ => (404, "Not Found", "text/plain", "Not Found\n"),
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub http10: bool,
    pub content_length: usize,
    pub close: bool,
    pub chunked: bool,
}

/// Parse a request head (everything before the blank line). None: malformed.
pub fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return None;
    }
    let http10 = version == "HTTP/1.0";
    let mut h = Head {
        method: method.to_string(),
        path: path.to_string(),
        http10,
        content_length: 0,
        close: http10,
        chunked: false,
    };
    let mut seen_length = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value.parse().ok()?;
                if seen_length && n != h.content_length {
                    return None;
                }
                seen_length = true;
                h.content_length = n;
            }
            "transfer-encoding" => h.chunked = true,
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    h.close = true;
                } else if v.contains("keep-alive") {
                    h.close = false;
                }
            }
            _ => {}
        }
    }
    Some(h)
}

fn response(status: u16, reason: &str, ctype: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Serve one connection until it closes, errs or idles out.
pub async fn serve_conn(mut s: TcpStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Read until a full head is buffered.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                let _ = s
                    .write_all(&response(
                        431,
                        "Request Header Fields Too Large",
                        "text/plain",
                        "",
                        true,
                    ))
                    .await;
                return;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(IDLE, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = parse_head(&buf[..end]);
        buf.drain(..end + 4);
        let Some(head) = head.filter(|h| !h.chunked && h.content_length <= MAX_BODY) else {
            let _ = s
                .write_all(&response(
                    400,
                    "Bad Request",
                    "text/plain",
                    "Bad Request\n",
                    true,
                ))
                .await;
            return;
        };
        // Discard the body.
        while buf.len() < head.content_length {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(IDLE, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head.content_length);
        let (status, reason, ctype, body) = respond(&head.method, &head.path);
        let body = if head.method == "HEAD" { "" } else { body };
        if s.write_all(&response(status, reason, ctype, body, head.close))
            .await
            .is_err()
            || head.close
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(respond("POST", "/v1/request-landing").0, 200);
        assert_eq!(respond("POST", "/v1/request-landing").3, "Ship landed\n");
        assert_eq!(respond("PUT", "/v1/exhaust-port").0, 503);
        assert!(
            respond("PUT", "/v1/exhaust-port")
                .3
                .starts_with("Panic: deathstar exploded")
        );
        assert_eq!(respond("GET", "/").0, 200);
        assert_eq!(respond("GET", "/nope").0, 404);
        assert_eq!(respond("GET", "/v1/exhaust-port").0, 404);
    }

    #[test]
    fn heads() {
        let h = parse_head(b"POST /v1/request-landing HTTP/1.1\r\nHost: x\r\nContent-Length: 3")
            .unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.content_length, 3);
        assert!(!h.close);
        assert!(parse_head(b"GET / HTTP/1.0").unwrap().close);
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2").is_none());
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked")
                .unwrap()
                .chunked
        );
        assert!(parse_head(b"garbage").is_none());
    }
}
