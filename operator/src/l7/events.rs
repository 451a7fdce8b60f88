//! What the proxy reports: one [`L7Event`] per verdict on a bounded channel (flows, `moat
//! observe`), and counters the metrics endpoint reads (`moat_l7_requests_total`).
//!
//! Counters are exact. Events are rate-limited per worker thread, as the datapath limits its
//! events per CPU ([`EventLimit`]; held back ones counted in [`L7Stats::events_suppressed`]),
//! and sent with `try_send`: a slow consumer loses events (counted in
//! [`L7Stats::events_dropped`]) but never slows requests down. An event held back is never
//! built: under load, one per request means two strings, a clock read and a channel send in
//! the proxy, and an entry in the agent's flow history, per request.

use super::policy::Direction;
use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc;

/// The outcome of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L7Verdict {
    /// Every governing rule set allowed it; it was forwarded.
    Allowed,
    /// A governing rule set (or fail-closed: none) denied it; answered 403.
    Denied,
    /// Refused before policy: malformed or ambiguous framing (400) or an oversized head (431).
    Invalid,
}

impl L7Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            L7Verdict::Allowed => "allowed",
            L7Verdict::Denied => "denied",
            L7Verdict::Invalid => "invalid",
        }
    }
}

/// One verdict of the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Event {
    pub time: SystemTime,
    /// Client address (IPv4 as IPv4).
    pub src: SocketAddr,
    /// Original destination.
    pub dst: SocketAddr,
    /// The request method (empty if the head could not be parsed).
    pub method: String,
    /// The normalised path (the raw target, cut at 1 KiB, if it could not be normalised).
    pub path: String,
    /// The status answered to the client (the upstream's for allowed requests; 502 if the
    /// upstream failed).
    pub status: u16,
    pub verdict: L7Verdict,
    /// The rule that allowed the request (for `Allowed`); for `Denied`, the first HTTP rule
    /// of the side that denied it (whose policy the denial is charged to); none otherwise.
    pub rule_id: Option<u32>,
    /// Which side's rules the event is about; `None`: no side governs the flow (fail closed)
    /// or the request was invalid.
    pub direction: Option<Direction>,
}

/// Methods as counter labels: the standard ones, everything else `OTHER`, so a client cannot
/// grow the label set.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "OTHER",
    }
}

/// Key of the request counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// The allowing rule, or for a denial the denying side's first rule; `None` for denials
    /// of flows no side governs, and for invalid requests.
    pub rule_id: Option<u32>,
    pub direction: Option<Direction>,
    pub verdict: L7Verdict,
    pub method: &'static str,
}

/// Counters shared between the proxy and the metrics code.
#[derive(Debug, Default)]
pub struct L7Stats {
    requests: RwLock<HashMap<RequestKey, AtomicU64>>,
    /// Events lost because the channel was full or closed.
    pub events_dropped: AtomicU64,
    /// Events held back by the rate limit ([`EventLimit`]).
    pub events_suppressed: AtomicU64,
    /// Connections accepted and served.
    pub connections_accepted: AtomicU64,
    /// Connections closed at accept because the concurrency cap was reached.
    pub connections_rejected: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Upstream connects that failed (answered 502).
    pub upstream_errors: AtomicU64,
    /// Times the agent started the proxy again after it stopped or panicked.
    pub restarts: AtomicU64,
}

impl L7Stats {
    /// Adds one request to its counter.
    pub fn count(&self, key: RequestKey) {
        if let Some(c) = self
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// All request counters, sorted.
    pub fn requests(&self) -> Vec<(RequestKey, u64)> {
        let mut v: Vec<(RequestKey, u64)> = self
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
            .collect();
        v.sort();
        v
    }

    /// Sum of the request counters with `verdict`.
    pub fn total(&self, verdict: L7Verdict) -> u64 {
        self.requests()
            .iter()
            .filter(|(k, _)| k.verdict == verdict)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The event rate limit of each proxy worker thread: a token bucket of `burst` events,
/// refilled at `rate` per second. The defaults are the datapath's per-CPU ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimit {
    pub rate: u32,
    pub burst: u32,
}

impl Default for EventLimit {
    fn default() -> Self {
        let d = moat_common::Config::DEFAULT;
        EventLimit {
            rate: d.event_rate,
            burst: d.event_burst,
        }
    }
}

/// A worker thread's bucket: tokens left and when it was last refilled.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

thread_local! {
    /// Each worker serves its connections on its own thread, so a thread-local bucket is a
    /// per-worker one that no other thread writes.
    static BUCKET: Cell<Option<Bucket>> = const { Cell::new(None) };
}

impl EventLimit {
    /// Takes a token from this thread's bucket (full at first use) if one is left.
    fn admit(&self, now: Instant) -> bool {
        let burst = f64::from(self.burst);
        let mut b = BUCKET.get().unwrap_or(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(self.rate)).min(burst);
        b.at = now;
        let admitted = b.tokens >= 1.0;
        if admitted {
            b.tokens -= 1.0;
        }
        BUCKET.set(Some(b));
        admitted
    }
}

/// Where verdicts go: counters always, events when a channel is attached.
#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    pub stats: std::sync::Arc<L7Stats>,
    pub events: Option<mpsc::Sender<L7Event>>,
    pub limit: EventLimit,
}

impl Reporter {
    /// Counts the verdict `key`, then sends the event `build` makes if the rate limit lets
    /// it through.
    pub fn report(&self, key: RequestKey, build: impl FnOnce() -> L7Event) {
        self.stats.count(key);
        let Some(tx) = &self.events else {
            return;
        };
        if !self.limit.admit(Instant::now()) {
            self.stats.events_suppressed.fetch_add(1, Ordering::Relaxed);
        } else if tx.try_send(build()).is_err() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_starts_full_and_refills_at_the_rate() {
        // A thread of its own: the bucket is per thread.
        std::thread::spawn(|| {
            let limit = EventLimit {
                rate: 100,
                burst: 3,
            };
            let t0 = Instant::now();
            let taken = (0..5).filter(|_| limit.admit(t0)).count();
            assert_eq!(taken, 3, "the burst, then nothing");
            // 10 ms at 100/s: one more token.
            assert!(limit.admit(t0 + Duration::from_millis(10)));
            assert!(!limit.admit(t0 + Duration::from_millis(10)));
            // A long pause refills no more than the burst.
            let later = t0 + Duration::from_secs(60);
            assert_eq!((0..5).filter(|_| limit.admit(later)).count(), 3);
        })
        .join()
        .unwrap();
    }
}
