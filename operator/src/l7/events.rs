//! What the proxy reports: one [`L7Event`] per verdict on a bounded channel (flows, `moat
//! observe`), and counters the metrics endpoint reads (`moat_l7_requests_total`).
//!
//! Events are sent with `try_send`: a slow consumer loses events (counted in
//! [`L7Stats::events_dropped`]) but never slows requests down. Counters are exact.

use super::policy::Direction;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
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
    /// Connections accepted and served.
    pub connections_accepted: AtomicU64,
    /// Connections closed at accept because the concurrency cap was reached.
    pub connections_rejected: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Upstream connects that failed (answered 502).
    pub upstream_errors: AtomicU64,
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

/// Where verdicts go: counters always, events when a channel is attached.
#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    pub stats: std::sync::Arc<L7Stats>,
    pub events: Option<mpsc::Sender<L7Event>>,
}

impl Reporter {
    pub fn report(&self, ev: L7Event) {
        self.stats.count(RequestKey {
            rule_id: ev.rule_id,
            direction: ev.direction,
            verdict: ev.verdict,
            method: method_label(&ev.method),
        });
        if let Some(tx) = &self.events
            && tx.try_send(ev).is_err()
        {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
