//! Request-target normalisation: the one view of a path that the rules are matched against
//! and that the upstream receives.
//!
//! HTTP rules are allow-lists, so the danger is a path the proxy reads one way and the server
//! another (`/public/..%2Fadmin`, `/public//../admin`). The proxy therefore matches a
//! normalised path **and forwards that same normalised path** upstream: whatever the server
//! makes of it, it is what the rule saw. The query string is never part of the match and is
//! forwarded unchanged.
//!
//! Normalisation of an origin-form target (`/path?query`), in order:
//! 1. The path is the part before the first `?`. A `#` anywhere is refused (clients never
//!    send fragments).
//! 2. Every path byte must be an RFC 3986 `pchar` or `/` (unreserved, sub-delims, `:`, `@`,
//!    `%`). Spaces, controls, non-ASCII bytes and `\ " < > [ ] ^ ` { | }` are refused: some
//!    servers read `\` as `/`, and raw non-ASCII has no single meaning.
//! 3. Percent-encoding: `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded
//!    (so `%2e%2e` is `..`); any other `%XX` stays encoded with upper-case hex (`%3a` ->
//!    `%3A`, `%25` stays `%25`: nothing is decoded twice). Refused: a `%` not followed by two
//!    hex digits, `%2F` (an encoded `/`: servers disagree on whether it separates segments)
//!    and `%00`.
//! 4. Empty segments are merged (`//` -> `/`), `.` segments are removed and `..` removes the
//!    segment before it (RFC 3986 5.2.4 on the merged path). A `..` that would climb above the
//!    root is refused rather than clamped: no honest client sends one.
//! 5. A trailing `/` is kept (`/a/` stays `/a/`; `/a/.` and `/a/b/..` become `/a/`).
//!
//! Refused targets are answered `400 Bad Request`. `OPTIONS *` keeps the path `*`; CONNECT's
//! authority-form target (`host:port`) is matched as the path string unchanged; the
//! absolute-form (`http://host/path`, meant for forward proxies) and any other form are
//! refused, because a transparent proxy only ever sees requests addressed to the origin.

/// Why a target cannot be normalised. Every variant means `400 Bad Request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form, `*` (OPTIONS) or authority-form (CONNECT).
    Form,
    /// A byte outside the allowed set, or a fragment.
    Byte,
    /// `%` without two hex digits.
    Percent,
    /// `%2F` or `%00`.
    EncodedSeparator,
    /// `..` above the root.
    AboveRoot,
}

impl PathError {
    /// Short reason, for logs and tests.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::Form => "request target form not accepted",
            PathError::Byte => "invalid byte in request path",
            PathError::Percent => "invalid percent-encoding in request path",
            PathError::EncodedSeparator => "encoded '/' or NUL in request path",
            PathError::AboveRoot => "'..' above the root in request path",
        }
    }
}

/// A request target split into what rules match (`path`) and what is forwarded
/// (`path` + `?` + `query`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The normalised path (or `*`, or CONNECT's authority).
    pub path: String,
    /// The raw query without the `?`, forwarded unchanged.
    pub query: Option<String>,
}

impl Target {
    /// Appends the request target as forwarded upstream to `out`.
    pub fn write_forward_form(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.path.as_bytes());
        if let Some(q) = &self.query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_path_byte(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'%'
        )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request target for `method` (see the module docs).
pub fn normalize_target(method: &str, raw: &str) -> Result<Target, PathError> {
    if method == "CONNECT" {
        // Authority-form: host:port, nothing else.
        let ok = !raw.is_empty()
            && !raw.starts_with('/')
            && raw.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']')
            });
        return if ok {
            Ok(Target {
                path: raw.to_string(),
                query: None,
            })
        } else {
            Err(PathError::Form)
        };
    }
    if raw == "*" {
        return if method == "OPTIONS" {
            Ok(Target {
                path: "*".into(),
                query: None,
            })
        } else {
            Err(PathError::Form)
        };
    }
    if !raw.starts_with('/') {
        return Err(PathError::Form);
    }
    if raw.contains('#') {
        return Err(PathError::Byte);
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if let Some(q) = query
        && !q.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(PathError::Byte);
    }
    Ok(Target {
        path: normalize_path(path)?,
        query: query.map(str::to_string),
    })
}

/// Normalises an origin-form path (no query); see the module docs.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    if is_normal(path) {
        return Ok(path.to_string());
    }
    normalize_any(path)
}

/// Whether `path` is its own normal form: it starts with `/`, has only path bytes and no
/// `%`, and no empty, `.` or `..` segment except an empty last one (a trailing `/`). What
/// clients send almost always is; this check then replaces three allocations.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == "." || seg == ".." {
            return false;
        }
        if !seg.bytes().all(|b| b != b'%' && is_path_byte(b)) {
            return false;
        }
    }
    true
}

/// [`normalize_path`] for any path.
fn normalize_any(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::Form);
    }
    // Step 3: percent-decoding of unreserved characters only.
    let mut decoded = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !is_path_byte(b) {
            return Err(PathError::Byte);
        }
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_val),
                bytes.get(i + 2).copied().and_then(hex_val),
            ) else {
                return Err(PathError::Percent);
            };
            let v = h << 4 | l;
            if v == b'/' || v == 0 {
                return Err(PathError::EncodedSeparator);
            }
            if is_unreserved(v) {
                decoded.push(v as char);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                decoded.push('%');
                decoded.push(HEX[(v >> 4) as usize] as char);
                decoded.push(HEX[(v & 15) as usize] as char);
            }
            i += 3;
        } else {
            decoded.push(b as char);
            i += 1;
        }
    }
    // Step 4 and 5: segments.
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if trailing || norm.is_empty() {
        norm.push('/');
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b",
            "/a/b/",
            "/v1/request-landing",
            "/a:b@c;d=e,f",
        ] {
            assert_eq!(n(p).unwrap(), p);
        }
    }

    #[test]
    fn dots_and_slashes() {
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/../b").unwrap(), "/b");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("//a///b//").unwrap(), "/a/b/");
        assert_eq!(n("/public//../admin").unwrap(), "/admin");
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/../..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/...").unwrap(), "/a/...");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(n("/%61%62c").unwrap(), "/abc");
        assert_eq!(n("/a/%2e%2E/b").unwrap(), "/b");
        assert_eq!(n("/a%3ab").unwrap(), "/a%3Ab");
        assert_eq!(n("/100%25").unwrap(), "/100%25");
        assert_eq!(n("/%252e%252e").unwrap(), "/%252e%252e");
        assert_eq!(n("/a%2Fb").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%2fb").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%00").unwrap_err(), PathError::EncodedSeparator);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::Percent);
        assert_eq!(n("/a%4").unwrap_err(), PathError::Percent);
    }

    #[test]
    fn bad_bytes() {
        for p in ["/a b", "/a\\b", "/a\"", "/\u{e9}", "/a|b", "/a{b}", "/a^"] {
            assert_eq!(n(p).unwrap_err(), PathError::Byte, "{p}");
        }
    }

    #[test]
    fn targets() {
        let t = normalize_target("GET", "/a/../b?x=/../y&z").unwrap();
        assert_eq!(t.path, "/b");
        let mut forwarded = Vec::new();
        t.write_forward_form(&mut forwarded);
        assert_eq!(forwarded, b"/b?x=/../y&z");
        assert_eq!(normalize_target("OPTIONS", "*").unwrap().path, "*");
        assert_eq!(normalize_target("GET", "*").unwrap_err(), PathError::Form);
        assert_eq!(
            normalize_target("GET", "http://x/a").unwrap_err(),
            PathError::Form
        );
        assert_eq!(
            normalize_target("CONNECT", "db:5432").unwrap().path,
            "db:5432"
        );
        assert_eq!(
            normalize_target("CONNECT", "/x").unwrap_err(),
            PathError::Form
        );
        assert_eq!(
            normalize_target("GET", "/a#f").unwrap_err(),
            PathError::Byte
        );
    }

    #[test]
    fn normalisation_is_idempotent() {
        for p in ["/a/./b/../c//d/", "/%7euser/%41", "/x/%3a/.."] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once);
        }
    }

    proptest::proptest! {
        /// The shortcut for paths that are already normal changes no result.
        #[test]
        fn shortcut_agrees_with_full_normalisation(p in "[/a.%2eF ]{0,12}") {
            proptest::prop_assert_eq!(normalize_path(&p), normalize_any(&p));
        }
    }
}
