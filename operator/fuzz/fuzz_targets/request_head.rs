//! Drives the proxy's request parsing and body framing over arbitrary bytes the way its
//! connection loop does (head, body, next pipelined head), asserting that nothing panics,
//! that no body forwards more than its framing declares, and that what the proxy would send
//! upstream re-parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_fuzz::framing::{
    BodyKind, ChunkLimits, ChunkedDecoder, HeadLimits, RequestContext, parse_request_head,
    parse_response_head,
};
use moat_fuzz::path::normalize_path;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    // Feed bodies in pieces of an input-dependent size, as reads would split them.
    let step = 1 + data.len() % 13;
    let mut rest = data;
    for _ in 0..64 {
        let head = match parse_request_head(rest, &limits) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        assert!(head.head_len <= rest.len() && head.head_len <= limits.max_bytes);
        assert!(head.version <= 1);
        if head.target.path.starts_with('/') {
            // The normalised path is a fixed point: no dot segments, no empty segments.
            assert_eq!(
                normalize_path(&head.target.path).as_deref(),
                Ok(head.target.path.as_str())
            );
            assert!(!head.target.path.contains("//"));
            assert!(!head.target.path.split('/').any(|s| s == "." || s == ".."));
        }
        // What goes upstream frames the body the same way and is one canonical head.
        let wire = head.serialize();
        let relaxed = HeadLimits {
            max_bytes: wire.len() + 1,
            max_headers: limits.max_headers,
        };
        let again = parse_request_head(&wire, &relaxed)
            .expect("serialised head parses")
            .expect("serialised head is complete");
        assert_eq!(again.head_len, wire.len());
        assert_eq!(again.body, head.body);
        assert_eq!(again.method, head.method);
        assert_eq!(again.target, head.target);
        assert_eq!(again.serialize(), wire);
        rest = &rest[head.head_len..];
        match head.body {
            BodyKind::Empty => {}
            BodyKind::Length(n) => {
                if (rest.len() as u64) < n {
                    break;
                }
                rest = &rest[n as usize..];
            }
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::new(ChunkLimits::default());
                let mut out = Vec::new();
                let mut used = 0;
                let mut failed = false;
                while used < rest.len() && !dec.is_done() {
                    let end = (used + step).min(rest.len());
                    match dec.decode(&rest[used..end], Some(&mut out)) {
                        Ok(n) => {
                            assert!(n <= end - used);
                            if n < end - used {
                                assert!(dec.is_done(), "stopped early without finishing");
                            }
                            used += n;
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed || !dec.is_done() {
                    break;
                }
                // Never more payload than was consumed, and the forwarded encoding is
                // canonical: decoding it again consumes all of it and reproduces it.
                assert!(dec.data_bytes() <= used as u64);
                assert!(out.len() <= used + 100 * 2);
                let mut check = ChunkedDecoder::new(ChunkLimits::default());
                let mut out2 = Vec::new();
                let n2 = check
                    .decode(&out, Some(&mut out2))
                    .expect("canonical body decodes");
                assert_eq!(n2, out.len());
                assert!(check.is_done());
                assert_eq!(check.data_bytes(), dec.data_bytes());
                assert_eq!(out2, out);
                rest = &rest[used..];
            }
            BodyKind::Close => panic!("a request body is never close-delimited"),
        }
        if !head.keep_alive || head.close_after {
            break;
        }
    }
    for (head, connect) in [(false, false), (true, false), (false, true)] {
        if let Ok(Some(r)) = parse_response_head(data, RequestContext { head, connect }, &limits) {
            assert!(r.head_len <= data.len());
            assert!((100..=999).contains(&r.status));
        }
    }
});
