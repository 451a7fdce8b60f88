//! Flows: the datapath's verdict events enriched with names (namespace/pod, labels) and the
//! policy rule that decided, kept in a bounded history and streamed to followers
//! (`/flows`, `moat observe`), in the spirit of `hubble observe`.
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ipnet::IpNet;
use moat_common::{Event, event_kind, family, reason, verdict};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::{
    compiler::RuleInfo,
    model::{Model, PolicyKind},
    selector::Labels,
};

/// How many flows the agent remembers for `--last N`.
pub const HISTORY: usize = 10_000;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: u32,
    /// Empty for addresses that are not pods (the node, the world, a CIDR).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// `host`, `remote-node`, `world`, or the pod's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entity: String,
}

/// The policy rule a verdict is attributed to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRule {
    pub id: u32,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub policy: String,
    pub direction: String,
    /// Rule index, or `default-deny`.
    pub rule: String,
}

/// L7 details of a flow reported by the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowHttp {
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// Nanoseconds of the kernel's monotonic coarse clock (ordering, not wall time).
    pub time_ns: u64,
    /// `FORWARDED`, `DROPPED`, `AUDIT` or `REDIRECTED`.
    pub verdict: String,
    pub reason: String,
    /// `ingress` or `egress`, from the deciding endpoint's point of view.
    pub direction: String,
    /// `drop`, `new-flow`, `audit` or `l7`.
    pub event: String,
    pub protocol: String,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<FlowRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_rule: Option<FlowRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<FlowHttp>,
    pub bytes: u32,
}

/// What the reconciler knows that turns numbers into names; replaced after each reconcile.
#[derive(Debug, Default)]
pub struct FlowContext {
    pods: BTreeMap<IpAddr, (String, String, Labels)>,
    nodes: BTreeMap<IpAddr, String>,
    local_node: String,
    cidrs: Vec<IpNet>,
    rules: BTreeMap<u32, RuleInfo>,
}

impl FlowContext {
    pub fn new(model: &Model, rules: &BTreeMap<u32, RuleInfo>, cidrs: Vec<IpNet>) -> Self {
        let mut pods = BTreeMap::new();
        for e in &model.endpoints {
            if e.host_network {
                continue;
            }
            for ip in &e.addresses {
                pods.insert(*ip, (e.namespace.clone(), e.name.clone(), e.labels.clone()));
            }
        }
        let nodes = model
            .nodes
            .iter()
            .flat_map(|n| n.addresses.iter().map(move |a| (*a, n.name.clone())))
            .collect();
        FlowContext {
            pods,
            nodes,
            local_node: model.local_node.clone(),
            cidrs,
            rules: rules.clone(),
        }
    }

    fn end(&self, ip: IpAddr, port: u16, identity: u32) -> FlowEnd {
        let mut end = FlowEnd {
            ip,
            port,
            identity,
            namespace: String::new(),
            pod: String::new(),
            labels: Labels::new(),
            entity: String::new(),
        };
        if let Some((ns, pod, labels)) = self.pods.get(&ip) {
            end.namespace = ns.clone();
            end.pod = pod.clone();
            end.labels = labels.clone();
        } else if let Some(node) = self.nodes.get(&ip) {
            end.entity = if *node == self.local_node {
                "host".into()
            } else {
                "remote-node".into()
            };
            end.pod = node.clone();
        } else if let Some(c) = self.cidrs.iter().find(|c| c.contains(&ip)) {
            end.entity = format!("cidr:{c}");
        } else {
            end.entity = "world".into();
        }
        end
    }

    pub fn rule(&self, id: u32) -> Option<FlowRule> {
        let r = self.rules.get(&id)?;
        Some(FlowRule {
            id,
            kind: r.kind.as_str().to_owned(),
            namespace: r.namespace.clone(),
            policy: r.name.clone(),
            direction: r.direction.clone(),
            rule: r.rule.clone(),
        })
    }

    /// The flow an L7 verdict describes.
    pub fn l7_flow(&self, ev: &crate::l7::L7Event) -> Flow {
        use crate::l7::L7Verdict;
        let rule = ev.rule_id.and_then(|r| self.rule(r));
        Flow {
            time_ns: ev
                .time
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            verdict: match ev.verdict {
                L7Verdict::Allowed => "FORWARDED",
                _ => "DROPPED",
            }
            .into(),
            reason: match ev.verdict {
                L7Verdict::Allowed => "policy",
                L7Verdict::Denied => "l7-denied",
                L7Verdict::Invalid => "l7-invalid",
            }
            .into(),
            direction: ev.direction.map_or("", |d| d.as_str()).into(),
            event: "l7".into(),
            protocol: "TCP".into(),
            // The proxy reports addresses; names come from the context, identities stay 0.
            source: self.end(ev.src.ip(), ev.src.port(), 0),
            destination: self.end(ev.dst.ip(), ev.dst.port(), 0),
            rule,
            audit_rule: None,
            http: Some(FlowHttp {
                method: ev.method.clone(),
                path: ev.path.clone(),
                status: ev.status,
            }),
            bytes: 0,
        }
    }

    /// The flow an event describes.
    pub fn flow(&self, ev: &Event) -> Flow {
        let addr = |w: [u32; 4]| -> IpAddr {
            if ev.family == family::V4 {
                IpAddr::from(w[0].to_ne_bytes())
            } else {
                let mut o = [0u8; 16];
                for (i, word) in w.iter().enumerate() {
                    o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::from(o)
            }
        };
        Flow {
            time_ns: ev.timestamp_ns,
            verdict: verdict_name(ev.verdict).into(),
            reason: reason_name(ev.reason).into(),
            direction: if ev.direction == 0 {
                "ingress"
            } else {
                "egress"
            }
            .into(),
            event: match ev.kind {
                event_kind::DROP => "drop",
                event_kind::NEW_FLOW => "new-flow",
                _ => "audit",
            }
            .into(),
            protocol: protocol_name(ev.protocol, ev.family),
            source: self.end(addr(ev.src), ev.sport, ev.src_identity),
            destination: self.end(addr(ev.dst), ev.dport, ev.dst_identity),
            rule: self.rule(ev.rule_id),
            audit_rule: self.rule(ev.audit_rule_id),
            http: None,
            bytes: ev.packet_len,
        }
    }
}

pub fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::FORWARDED => "FORWARDED",
        verdict::DROPPED => "DROPPED",
        verdict::AUDIT => "AUDIT",
        _ => "REDIRECTED",
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::POLICY => "policy",
        reason::DEFAULT_DENY => "default-deny",
        reason::NOT_ISOLATED => "not-isolated",
        reason::ESTABLISHED => "established",
        reason::REPLY => "reply",
        reason::RELATED => "related",
        reason::HOST => "host",
        reason::SELF => "self",
        reason::MALFORMED => "malformed",
        reason::FRAGMENT => "fragment",
        reason::REVOKED => "revoked",
        reason::NO_PROXY => "no-proxy",
        reason::PREFILTER => "prefilter",
        reason::PROXY => "proxy",
        reason::NO_ENDPOINT => "no-endpoint",
        _ => "unknown",
    }
}

pub fn protocol_name(p: u8, fam: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        58 if fam == family::V6 => "ICMPv6".into(),
        other => format!("proto-{other}"),
    }
}

/// Short kind names for the one-line format.
pub fn kind_short(kind: &str) -> &str {
    match kind {
        k if k == PolicyKind::NetworkPolicy.as_str() => "netpol",
        k if k == PolicyKind::MoatNetworkPolicy.as_str() => "mnp",
        k if k == PolicyKind::MoatClusterNetworkPolicy.as_str() => "mcnp",
        other => other,
    }
}

impl Flow {
    /// `x/a -> x/b TCP 80 FORWARDED by mnp x/allow#0`, in the spirit of `hubble observe`.
    pub fn line(&self) -> String {
        let end = |e: &FlowEnd| {
            if !e.namespace.is_empty() {
                format!("{}/{}", e.namespace, e.pod)
            } else if !e.pod.is_empty() {
                format!("{}:{}", e.entity, e.pod)
            } else {
                format!("{} ({})", e.ip, e.entity)
            }
        };
        let mut s = format!(
            "{} -> {} {} {} {}",
            end(&self.source),
            end(&self.destination),
            self.protocol,
            self.destination.port,
            self.verdict
        );
        if let Some(h) = &self.http {
            s.push_str(&format!(" {} {} {}", h.method, h.path, h.status));
        }
        match (&self.rule, self.verdict.as_str()) {
            (Some(r), _) => {
                let ns = if r.namespace.is_empty() {
                    String::new()
                } else {
                    format!("{}/", r.namespace)
                };
                s.push_str(&format!(
                    " by {} {ns}{}#{}",
                    kind_short(&r.kind),
                    r.policy,
                    r.rule
                ));
            }
            (None, _) => s.push_str(&format!(" ({})", self.reason)),
        }
        if let Some(r) = &self.audit_rule
            && self.verdict == "AUDIT"
        {
            s.push_str(&format!(
                " (audit: {} {}#{})",
                kind_short(&r.kind),
                r.policy,
                r.rule
            ));
        }
        s
    }
}

/// Server-side filters of `/flows` (query parameters) and `moat observe` flags.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct FlowFilter {
    pub verdict: Option<String>,
    /// Either end in this namespace.
    pub namespace: Option<String>,
    /// Either end is this pod (`ns/pod` or `pod`).
    pub pod: Option<String>,
    pub from_pod: Option<String>,
    pub to_pod: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    /// Keep streaming new flows.
    pub follow: bool,
    /// How many past flows to send first (default 20; with follow, 0 is fine).
    pub last: Option<usize>,
}

fn pod_matches(end: &FlowEnd, want: &str) -> bool {
    match want.split_once('/') {
        Some((ns, pod)) => end.namespace == ns && end.pod == pod,
        None => end.pod == want,
    }
}

impl FlowFilter {
    pub fn matches(&self, f: &Flow) -> bool {
        let eq = |a: &Option<String>, b: &str| a.as_ref().is_none_or(|a| a.eq_ignore_ascii_case(b));
        eq(&self.verdict, &f.verdict)
            && eq(&self.protocol, &f.protocol)
            && self.port.is_none_or(|p| p == f.destination.port)
            && self
                .namespace
                .as_ref()
                .is_none_or(|n| &f.source.namespace == n || &f.destination.namespace == n)
            && self
                .pod
                .as_ref()
                .is_none_or(|p| pod_matches(&f.source, p) || pod_matches(&f.destination, p))
            && self
                .from_pod
                .as_ref()
                .is_none_or(|p| pod_matches(&f.source, p))
            && self
                .to_pod
                .as_ref()
                .is_none_or(|p| pod_matches(&f.destination, p))
    }
}

/// One remembered flow (cheap to clone, so readers copy the history out of the lock).
#[derive(Clone)]
enum Entry {
    Built(Arc<Flow>),
    /// An L7 verdict with the names in force when it was made, turned into a flow when read
    /// or when those names are replaced (so the history holds on to one context, whatever
    /// the rate of changes): the proxy reports one verdict per request, tens of thousands a
    /// second under load, and building each at once (labels, names, strings, then freeing
    /// the oldest) cost a fifth of the agent's CPU per proxied request (`make bench-l7`).
    L7(Arc<(crate::l7::L7Event, Arc<FlowContext>)>),
}

impl Entry {
    fn flow(&self) -> Arc<Flow> {
        match self {
            Entry::Built(f) => f.clone(),
            Entry::L7(l7) => Arc::new(l7.1.l7_flow(&l7.0)),
        }
    }
}

/// The agent's flow history and live feed.
#[derive(Clone)]
pub struct FlowHub {
    history: Arc<Mutex<VecDeque<Entry>>>,
    live: broadcast::Sender<Arc<Flow>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        FlowHub {
            history: Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY))),
            live: broadcast::channel(4096).0,
        }
    }
}

/// How long the L7 feed collects verdicts before recording them: under load one wakeup per
/// batch instead of one per request; followers see L7 flows at most this much later.
const L7_BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

impl FlowHub {
    fn remember(&self, e: Entry) {
        let mut h = self.history.lock().expect("flow history lock");
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(e);
    }

    pub fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        self.remember(Entry::Built(flow.clone()));
        // No follower is not an error.
        let _ = self.live.send(flow);
    }

    /// Records an L7 verdict; built at once only if someone follows the live feed.
    fn push_l7(&self, ev: crate::l7::L7Event, ctx: &Arc<FlowContext>) {
        if self.live.receiver_count() > 0 {
            self.push(ctx.l7_flow(&ev));
        } else {
            self.remember(Entry::L7(Arc::new((ev, ctx.clone()))));
        }
    }

    /// Builds the L7 flows recorded under `old`, the context just replaced.
    fn build_l7(&self, old: &Arc<FlowContext>) {
        let mut h = self.history.lock().expect("flow history lock");
        for e in h.iter_mut() {
            if let Entry::L7(l7) = e
                && Arc::ptr_eq(&l7.1, old)
            {
                *e = Entry::Built(Arc::new(l7.1.l7_flow(&l7.0)));
            }
        }
    }

    /// The last `n` flows matching `filter`, oldest first. L7 flows are built outside the
    /// lock, so a reader never holds up the feeds.
    pub fn last(&self, filter: &FlowFilter, n: usize) -> Vec<Arc<Flow>> {
        let h: Vec<Entry> = self
            .history
            .lock()
            .expect("flow history lock")
            .iter()
            .cloned()
            .collect();
        let mut out: Vec<_> = h
            .iter()
            .rev()
            .map(Entry::flow)
            .filter(|f| filter.matches(f))
            .take(n)
            .collect();
        out.reverse();
        out
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }

    /// Turn the proxy's verdicts into flows for as long as the channel lasts.
    pub async fn run_l7(
        self,
        mut events: tokio::sync::mpsc::Receiver<crate::l7::L7Event>,
        ctx: watch::Receiver<Arc<FlowContext>>,
    ) {
        const BATCH: usize = 1024;
        let mut batch = Vec::with_capacity(BATCH);
        let mut current: Option<Arc<FlowContext>> = None;
        loop {
            let n = events.recv_many(&mut batch, BATCH).await;
            if n == 0 {
                break;
            }
            let c = ctx.borrow().clone();
            if let Some(old) = current.replace(c.clone())
                && !Arc::ptr_eq(&old, &c)
            {
                self.build_l7(&old);
            }
            for ev in batch.drain(..) {
                self.push_l7(ev, &c);
            }
            // While this task sleeps it is not waiting on the channel, so the proxy's sends
            // wake nobody (the channel holds what arrives meanwhile). A full batch means
            // more is waiting: no pause then.
            if n < BATCH {
                tokio::time::sleep(L7_BATCH_WINDOW).await;
            }
        }
    }

    /// Turn datapath events into flows for as long as the stream lasts.
    pub async fn run(
        self,
        mut events: moat_datapath::AsyncEventStream,
        ctx: watch::Receiver<Arc<FlowContext>>,
    ) {
        while let Ok(ev) = events.next().await {
            let flow = ctx.borrow().flow(&ev);
            self.push(flow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l7_event(path: &str) -> crate::l7::L7Event {
        crate::l7::L7Event {
            time: std::time::SystemTime::now(),
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            method: "GET".into(),
            path: path.into(),
            status: 200,
            verdict: crate::l7::L7Verdict::Allowed,
            rule_id: None,
            direction: None,
        }
    }

    #[test]
    fn l7_flows_are_built_when_read_and_keep_no_old_context() {
        let hub = FlowHub::default();
        let old = Arc::new(FlowContext::default());
        hub.push_l7(l7_event("/a"), &old);
        let read = hub.last(&FlowFilter::default(), 10);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].http.as_ref().map(|h| h.path.as_str()), Some("/a"));
        assert_eq!(Arc::strong_count(&old), 2, "the history holds the context");
        hub.build_l7(&old);
        assert_eq!(Arc::strong_count(&old), 1, "built: the context is let go");
        let again = hub.last(&FlowFilter::default(), 10);
        assert_eq!(again.len(), 1);
        assert_eq!(*again[0], *read[0]);
    }
}
