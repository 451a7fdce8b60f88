//! HTTP/1.x message framing, sans I/O: request heads (httparse), response heads, and a
//! chunked-body decoder that re-encodes what it forwards.
//!
//! The rules are hyper's server rules (`hyper::proto::h1::role::Server::parse`), made stricter
//! where a proxy must be: a proxy that frames a request differently from its upstream is the
//! textbook request-smuggling bug, so every ambiguity is refused with `400` rather than
//! resolved, and what goes upstream is re-serialised in one canonical form.
//!
//! - `Transfer-Encoding` on HTTP/1.0: 400 (hyper).
//! - `Transfer-Encoding` whose final coding is not `chunked`: 400 (hyper). `chunked` applied
//!   twice: 400 (RFC 9112 6.1 forbids it; hyper lets it through).
//! - `Transfer-Encoding` with `Content-Length`: TE wins, the `Content-Length` is not forwarded,
//!   and the connection closes after this request (RFC 9112 6.3 item 3).
//! - `Content-Length`: ASCII digits only (no sign, no hex, no list); repeated identical
//!   values are accepted and forwarded once (hyper); different values: 400.
//! - Line endings: a bare LF anywhere in the head is refused (httparse accepts it; servers
//!   disagree about it).
//! - Heads over the byte or header-count limit: 431.
//! - More than one `Host`, or none on HTTP/1.1: 400 (RFC 9112 3.2).
//! - Chunked bodies: hex sizes of at most 16 digits without overflow, optional whitespace and
//!   extensions (bounded, no control bytes), CRLF only; trailers are parsed as header fields,
//!   bounded, and forwarded re-serialised. Extensions are dropped on re-encoding.
//!
//! The head forwarded upstream is the method, the normalised target ([`super::path`]), the
//! version and every header field in order and with its original name, minus a
//! `Content-Length` overridden by `Transfer-Encoding` and minus duplicate `Content-Length`s.

use super::path::{PathError, Target, normalize_target};

/// Bounds on a request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLimits {
    /// Bytes of the request line plus header fields (including CRLFs).
    pub max_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// A request refused before it reached the policy: the status to answer with, then close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// 400 or 431.
    pub status: u16,
    pub reason: &'static str,
}

impl Reject {
    fn bad(reason: &'static str) -> Self {
        Reject {
            status: 400,
            reason,
        }
    }
    fn too_large(reason: &'static str) -> Self {
        Reject {
            status: 431,
            reason,
        }
    }
}

impl From<PathError> for Reject {
    fn from(e: PathError) -> Self {
        Reject::bad(e.as_str())
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// A parsed, validated request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The normalised target rules match and the upstream receives.
    pub target: Target,
    /// Minor version: 0 or 1.
    pub version: u8,
    /// Header fields in order, original name case; values as received (trimmed by httparse).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: BodyKind,
    /// Whether the client expects the connection to stay open after this exchange.
    pub keep_alive: bool,
    /// TE and CL were both present: close after this request whatever the client wants.
    pub close_after: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// An `Upgrade` header on HTTP/1.1, or CONNECT: a 101 (2xx for CONNECT) turns the
    /// connection into a tunnel.
    pub upgrade: bool,
    /// Bytes of the head in the input, including the final empty line.
    pub head_len: usize,
}

impl RequestHead {
    /// Values of the header `name` (case-insensitive), in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether this is a CONNECT request.
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// The canonical head sent upstream.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head_len + 16);
        self.serialize_into(&mut out);
        out
    }

    /// [`RequestHead::serialize`] appended to `out`: the proxy reuses one buffer per
    /// connection instead of allocating per request.
    pub fn serialize_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        self.target.write_forward_form(out);
        out.extend_from_slice(if self.version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        let mut wrote_cl = false;
        for (name, value) in &self.headers {
            if name.eq_ignore_ascii_case("content-length") {
                if self.body == BodyKind::Chunked || wrote_cl {
                    continue;
                }
                wrote_cl = true;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Header slots parsing takes from the stack; limits above this get a heap buffer. A heap
/// buffer per parse (3 KiB for 100 slots, twice per proxied request) was the proxy's
/// largest allocation and made glibc consolidate its free lists on every request.
const STACK_HEADERS: usize = 128;

/// `n` empty header slots: from `stack` when it is big enough, else allocated in `heap`.
fn header_slots<'a, 'b>(
    n: usize,
    stack: &'a mut [httparse::Header<'b>; STACK_HEADERS],
    heap: &'a mut Vec<httparse::Header<'b>>,
) -> &'a mut [httparse::Header<'b>] {
    if n <= STACK_HEADERS {
        &mut stack[..n]
    } else {
        *heap = vec![httparse::EMPTY_HEADER; n];
        heap
    }
}

/// Whether `head` (one full head, final empty line included) uses a bare LF anywhere.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// Comma-separated list elements of a header value, trimmed, empty elements skipped.
fn list_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

/// `Content-Length` value: ASCII digits, no overflow.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

fn connection_has(v: &[u8], token: &[u8]) -> bool {
    list_elements(v).any(|e| e.eq_ignore_ascii_case(token))
}

/// Parses a request head at the start of `buf`.
///
/// `Ok(None)`: incomplete, read more. A buffer of `limits.max_bytes` without a complete head
/// is `Err` 431, so the caller's buffer stays bounded.
pub fn parse_request_head(buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, Reject> {
    let (mut stack, mut heap) = ([httparse::EMPTY_HEADER; STACK_HEADERS], Vec::new());
    let mut req = httparse::Request::new(header_slots(limits.max_headers, &mut stack, &mut heap));
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_bytes {
                return Err(Reject::too_large("request head too large"));
            }
            // A bare LF already seen is refused at once rather than after the whole head.
            if let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n')
                && has_bare_lf(&buf[..=last_nl])
            {
                return Err(Reject::bad("bare LF in request head"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::too_large("too many header fields"));
        }
        Err(httparse::Error::Version) => return Err(Reject::bad("invalid HTTP version")),
        Err(httparse::Error::Token) => return Err(Reject::bad("invalid method or target")),
        Err(httparse::Error::HeaderName) => return Err(Reject::bad("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(Reject::bad("invalid header value")),
        Err(_) => return Err(Reject::bad("malformed request head")),
    };
    if head_len > limits.max_bytes {
        return Err(Reject::too_large("request head too large"));
    }
    if has_bare_lf(&buf[..head_len]) {
        return Err(Reject::bad("bare LF in request head"));
    }
    let method = req.method.unwrap_or_default().to_string();
    let version = req.version.unwrap_or(1);
    let is_11 = version == 1;
    let target = normalize_target(&method, req.path.unwrap_or_default())?;

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut chunked_last = false;
    let mut chunked_count = 0usize;
    let mut keep_alive = is_11;
    let mut expect_continue = false;
    let mut upgrade = method == "CONNECT";
    let mut hosts = 0usize;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if !is_11 {
                return Err(Reject::bad("Transfer-Encoding on HTTP/1.0"));
            }
            te_seen = true;
            let mut any = false;
            for e in list_elements(value) {
                any = true;
                chunked_last = e.eq_ignore_ascii_case(b"chunked");
                if chunked_last {
                    chunked_count += 1;
                }
            }
            if !any {
                return Err(Reject::bad("empty Transfer-Encoding"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value).ok_or(Reject::bad("invalid Content-Length"))?;
            if content_length.is_some_and(|p| p != n) {
                return Err(Reject::bad("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("connection") {
            if is_11 {
                if connection_has(value, b"close") {
                    keep_alive = false;
                }
            } else if connection_has(value, b"keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = is_11;
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
        headers.push((name.to_string(), value.to_vec()));
    }
    if hosts > 1 {
        return Err(Reject::bad("more than one Host"));
    }
    if hosts == 0 && is_11 {
        return Err(Reject::bad("HTTP/1.1 request without Host"));
    }
    let mut close_after = false;
    let body = if te_seen {
        if !chunked_last {
            return Err(Reject::bad("Transfer-Encoding does not end in chunked"));
        }
        if chunked_count > 1 {
            return Err(Reject::bad("chunked applied more than once"));
        }
        if content_length.is_some() {
            close_after = true;
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
        }
    };
    Ok(Some(RequestHead {
        method,
        target,
        version,
        headers,
        body,
        keep_alive: keep_alive && !close_after,
        close_after,
        expect_continue,
        upgrade,
        head_len,
    }))
}

/// A parsed response head: the proxy forwards the raw bytes and uses this for framing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub version: u8,
    pub body: BodyKind,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
    pub head_len: usize,
}

/// What the request was, for the response's framing (RFC 9112 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestContext {
    pub head: bool,
    pub connect: bool,
}

/// Parses a response head at the start of `buf`. `Err` means the upstream is broken: the
/// proxy answers 502 (if it has not started the final response) and closes.
pub fn parse_response_head(
    buf: &[u8],
    req: RequestContext,
    limits: &HeadLimits,
) -> Result<Option<ResponseHead>, &'static str> {
    let (mut stack, mut heap) = ([httparse::EMPTY_HEADER; STACK_HEADERS], Vec::new());
    let mut resp = httparse::Response::new(header_slots(limits.max_headers, &mut stack, &mut heap));
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_bytes {
                Err("response head too large")
            } else {
                Ok(None)
            };
        }
        Err(_) => return Err("malformed response head"),
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(1);
    if !(100..=999).contains(&status) {
        return Err("invalid response status");
    }
    let mut keep_alive = version == 1;
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut chunked_last = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            for e in list_elements(h.value) {
                chunked_last = e.eq_ignore_ascii_case(b"chunked");
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // A list of equal values ("5, 5") is tolerated from servers, as hyper's client does.
            for e in list_elements(h.value) {
                let n = parse_content_length(e).ok_or("invalid Content-Length in response")?;
                if content_length.is_some_and(|p| p != n) {
                    return Err("conflicting Content-Length in response");
                }
                content_length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            if version == 1 {
                if connection_has(h.value, b"close") {
                    keep_alive = false;
                }
            } else if connection_has(h.value, b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let no_body = req.head
        || (100..200).contains(&status)
        || status == 204
        || status == 304
        || (req.connect && (200..300).contains(&status));
    let body = if no_body {
        BodyKind::Empty
    } else if te_seen {
        if chunked_last {
            BodyKind::Chunked
        } else {
            keep_alive = false;
            BodyKind::Close
        }
    } else {
        match content_length {
            Some(0) => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
            None => {
                keep_alive = false;
                BodyKind::Close
            }
        }
    };
    Ok(Some(ResponseHead {
        status,
        version,
        body,
        keep_alive,
        head_len,
    }))
}

/// A chunked body that cannot be decoded: 400 for requests (502 for responses), then close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

/// Bounds on a chunked body's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Bytes of extensions on one chunk-size line.
    pub max_extension: usize,
    /// Bytes of extensions over the whole body (hyper bounds these too: a body of empty
    /// chunks with long extensions is pure overhead).
    pub max_extensions_total: usize,
    /// Bytes of the trailer section.
    pub max_trailers: usize,
    /// Header fields in the trailer section.
    pub max_trailer_fields: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_extension: 4096,
            max_extensions_total: 16 * 1024,
            max_trailers: 16 * 1024,
            max_trailer_fields: 100,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits (at least one).
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size.
    SizeLws {
        value: u64,
    },
    /// Inside `;ext`.
    Extension {
        value: u64,
        len: usize,
    },
    /// Expecting LF after the size line's CR.
    SizeLf {
        value: u64,
    },
    /// Chunk data left.
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: the trailer section, collected in `trailers`.
    Trailers,
    Done,
}

/// Decodes a chunked body and re-encodes it canonically (sizes in lower-case hex, no
/// extensions, CRLF) for forwarding. Never buffers more than the current input plus the
/// bounded trailer section.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    limits: ChunkLimits,
    ext_total: usize,
    trailers: Vec<u8>,
    /// Data bytes (without framing) seen so far.
    data_bytes: u64,
}

impl ChunkedDecoder {
    pub fn new(limits: ChunkLimits) -> Self {
        ChunkedDecoder {
            state: ChunkState::Size {
                value: 0,
                digits: 0,
            },
            limits,
            ext_total: 0,
            trailers: Vec::new(),
            data_bytes: 0,
        }
    }

    /// Whether the last chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Payload bytes decoded so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Consumes a prefix of `input` and appends the re-encoded bytes to `out` (if given).
    /// Returns how many input bytes were consumed: all of them unless the body ended
    /// earlier (the rest belongs to the next message).
    pub fn decode(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size { value, digits } => {
                    if let Some(h) = hex_digit(b) {
                        if digits >= 16 {
                            return Err(ChunkError("chunk size too large"));
                        }
                        self.state = ChunkState::Size {
                            value: value << 4 | u64::from(h),
                            digits: digits + 1,
                        };
                    } else if digits == 0 {
                        return Err(ChunkError("invalid chunk size"));
                    } else {
                        match b {
                            b' ' | b'\t' => self.state = ChunkState::SizeLws { value },
                            b';' => self.state = ChunkState::Extension { value, len: 0 },
                            b'\r' => self.state = ChunkState::SizeLf { value },
                            _ => return Err(ChunkError("invalid chunk size line")),
                        }
                    }
                    i += 1;
                }
                ChunkState::SizeLws { value } => {
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = ChunkState::Extension { value, len: 0 },
                        b'\r' => self.state = ChunkState::SizeLf { value },
                        _ => return Err(ChunkError("invalid chunk size line")),
                    }
                    i += 1;
                }
                ChunkState::Extension { value, len } => {
                    match b {
                        b'\r' => self.state = ChunkState::SizeLf { value },
                        b'\t' | b' '..=b'~' | 0x80..=0xff => {
                            self.ext_total += 1;
                            if len + 1 > self.limits.max_extension
                                || self.ext_total > self.limits.max_extensions_total
                            {
                                return Err(ChunkError("chunk extensions too large"));
                            }
                            self.state = ChunkState::Extension {
                                value,
                                len: len + 1,
                            };
                        }
                        _ => return Err(ChunkError("invalid byte in chunk extension")),
                    }
                    i += 1;
                }
                ChunkState::SizeLf { value } => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk size line without CRLF"));
                    }
                    i += 1;
                    if value == 0 {
                        self.state = ChunkState::Trailers;
                    } else {
                        if let Some(o) = out.as_deref_mut() {
                            o.extend_from_slice(format!("{value:x}\r\n").as_bytes());
                        }
                        self.state = ChunkState::Data { left: value };
                    }
                }
                ChunkState::Data { left } => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(left) as usize;
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(&input[i..i + take]);
                    }
                    i += take;
                    self.data_bytes += take as u64;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left }
                    };
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    i += 1;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    i += 1;
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(b"\r\n");
                    }
                    self.state = ChunkState::Size {
                        value: 0,
                        digits: 0,
                    };
                }
                ChunkState::Trailers => {
                    // Collect up to the end of the trailer section: CRLF right away, or the
                    // first CRLFCRLF.
                    let before = self.trailers.len();
                    let room = self.limits.max_trailers + 4 - before;
                    let chunk = &input[i..input.len().min(i + room)];
                    self.trailers.extend_from_slice(chunk);
                    let end = if self.trailers.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        find(&self.trailers, b"\r\n\r\n").map(|p| p + 4)
                    };
                    match end {
                        Some(end) => {
                            i += end - before;
                            self.trailers.truncate(end);
                            let fields = self.finish_trailers()?;
                            if let Some(o) = out.as_deref_mut() {
                                o.extend_from_slice(b"0\r\n");
                                o.extend_from_slice(&fields);
                                o.extend_from_slice(b"\r\n");
                            }
                            self.state = ChunkState::Done;
                        }
                        None => {
                            if self.trailers.len() > self.limits.max_trailers {
                                return Err(ChunkError("trailer section too large"));
                            }
                            if self.trailers.len() >= 2 && self.trailers[0] == b'\n' {
                                return Err(ChunkError("bare LF after last chunk"));
                            }
                            i += chunk.len();
                        }
                    }
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    /// Validates the collected trailer section and returns its fields re-serialised.
    fn finish_trailers(&mut self) -> Result<Vec<u8>, ChunkError> {
        let section = std::mem::take(&mut self.trailers);
        if section == b"\r\n" {
            return Ok(Vec::new());
        }
        if has_bare_lf(&section) {
            return Err(ChunkError("bare LF in trailers"));
        }
        let mut storage = vec![httparse::EMPTY_HEADER; self.limits.max_trailer_fields];
        match httparse::parse_headers(&section, &mut storage) {
            Ok(httparse::Status::Complete((n, fields))) if n == section.len() => {
                let mut out = Vec::with_capacity(section.len());
                for f in fields {
                    // Framing fields in trailers would be a second opinion on the framing.
                    if f.name.eq_ignore_ascii_case("content-length")
                        || f.name.eq_ignore_ascii_case("transfer-encoding")
                        || f.name.eq_ignore_ascii_case("host")
                    {
                        continue;
                    }
                    out.extend_from_slice(f.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(f.value);
                    out.extend_from_slice(b"\r\n");
                }
                Ok(out)
            }
            _ => Err(ChunkError("malformed trailer section")),
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, Reject> {
        parse_request_head(s.as_bytes(), &HeadLimits::default())
    }

    fn status(s: &str) -> u16 {
        match parse(s) {
            Ok(Some(_)) => 0,
            Ok(None) => 1,
            Err(r) => r.status,
        }
    }

    #[test]
    fn simple_get() {
        let h = parse("GET /a/../b?q HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target.path, "/b");
        assert_eq!(h.body, BodyKind::Empty);
        assert!(h.keep_alive);
        assert_eq!(h.head_len, 35);
        assert_eq!(h.serialize(), b"GET /b?q HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn framing_rules() {
        let h = parse(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        assert!(h.close_after && !h.keep_alive);
        assert!(
            !String::from_utf8(h.serialize())
                .unwrap()
                .contains("Content-Length")
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400
        );
        let h =
            parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body, BodyKind::Length(5));
        assert_eq!(
            h.serialize(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        );
        for cl in [
            "+5",
            "-5",
            "0x5",
            "5 5",
            "5,5",
            "",
            "99999999999999999999999",
        ] {
            let s = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {cl}\r\n\r\n");
            assert_eq!(status(&s), 400, "{cl:?}");
        }
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.0\r\n\r\n"), 0);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n"), 1);
    }

    #[test]
    fn keep_alive_rules() {
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn limits() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(20000)
        );
        assert_eq!(status(&big), 431);
        let many: String = (0..101).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            431
        );
    }

    fn decode_all(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(ChunkLimits::default());
        let mut out = Vec::new();
        let n = d.decode(input, Some(&mut out))?;
        Ok((n, out, d.is_done()))
    }

    #[test]
    fn chunked_decoding() {
        let (n, out, done) = decode_all(b"5;x=y\r\nhello\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!((n, done), (19, true));
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        let (_, out, done) = decode_all(b"A \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n").unwrap();
        assert!(done);
        assert_eq!(out, b"a\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n");
        assert!(decode_all(b"5\nhello\r\n").is_err());
        assert!(decode_all(b"fffffffffffffffff\r\n").is_err());
        assert!(decode_all(b"-5\r\n").is_err());
        assert!(decode_all(b"5\r\nhelloX\r\n").is_err());
        assert!(decode_all(b"0\r\nX-T: 1\nY: 2\r\n\r\n").is_err());
        let long_ext = format!("1;{}\r\n", "a".repeat(5000));
        assert!(decode_all(long_ext.as_bytes()).is_err());
    }

    #[test]
    fn chunked_decoding_byte_by_byte() {
        let input = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nXX";
        let mut d = ChunkedDecoder::new(ChunkLimits::default());
        let mut out = Vec::new();
        let mut used = 0;
        for i in 0..input.len() {
            if d.is_done() {
                break;
            }
            used += d.decode(&input[i..=i], Some(&mut out)).unwrap();
        }
        assert!(d.is_done());
        assert_eq!(used, input.len() - 2);
        assert_eq!(d.data_bytes(), 19);
        assert_eq!(
            out,
            b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let ctx = RequestContext {
            head: false,
            connect: false,
        };
        let l = HeadLimits::default();
        let r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", ctx, &l)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Length(3));
        let r = parse_response_head(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n",
            ctx,
            &l,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, BodyKind::Empty);
        let r = parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n", ctx, &l)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Close);
        assert!(!r.keep_alive);
        let head = RequestContext {
            head: true,
            connect: false,
        };
        let r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", head, &l)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Empty);
        assert!(
            parse_response_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                ctx,
                &l
            )
            .is_err()
        );
    }
}
