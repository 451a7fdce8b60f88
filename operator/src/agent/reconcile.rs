//! The reconciler: the one task that owns the datapath. It compiles every new source state,
//! diffs it against what the maps hold, applies the ordered batch, attaches and detaches
//! programs as local endpoints come and go, and publishes what it did.
//!
//! After a restart it reads the realized state back from the pins and diffs against that, so
//! an unchanged world costs no map write at all (counted in [`Reconciler::writes`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use moat_common::{capacity, policy_prefix};
use moat_datapath::{Datapath, PolicyEntryKey};
use tokio::sync::watch;
use tracing::{info, warn};

use super::status::{AgentStatus, Overflow, PolicyReport};
use crate::{
    compiler::{
        CompileConfig, Compiler, DesiredState, Maps,
        diff::{Delta, MapOp, RealizedState, diff, plan, transition_overflow},
    },
    flows::FlowContext,
    identity::Allocations,
    l7::L7Policy,
    metrics::{AgentMetrics, MapFill, Snapshot},
    model::Policy,
    source::SourceState,
};

/// Where the allocator's numbers are kept between runs (identities, endpoint, rule-set and
/// rule ids must not change across a restart, or a restart would rewrite the maps).
const ALLOCATIONS_FILE: &str = "allocations.json";

pub struct Reconciler {
    dp: Datapath,
    node: String,
    state_dir: PathBuf,
    /// The incremental compiler, whose allocations are the ones in use (its state is empty
    /// until the first compile).
    compiler: Compiler,
    /// The allocations as last saved.
    saved: Allocations,
    realized: RealizedState,
    /// Whether `realized` is the compiler's state: the compiler's delta then takes it to the
    /// next state, and nothing needs comparing.
    in_sync: bool,
    /// Resolved ifindex of every endpoint interface in `realized`.
    ifindex: BTreeMap<String, u32>,
    /// Interfaces with the endpoint programs attached.
    attached: BTreeSet<String>,
    uplinks: BTreeSet<String>,
    /// Uplinks from the command line; the source's own list wins when it names some.
    default_uplinks: Vec<String>,
    out: Publishers,
    metrics: AgentMetrics,
    writes: u64,
}

/// Where the reconciler publishes what it did, for the tasks that read it.
pub struct Publishers {
    pub status: watch::Sender<Arc<AgentStatus>>,
    pub flow_ctx: watch::Sender<Arc<FlowContext>>,
    pub l7_policy: watch::Sender<Arc<L7Policy>>,
}

/// What other tasks may ask of the reconciler (it alone touches the maps).
pub enum Request {
    /// Counters and map fill for a metrics scrape.
    Snapshot(tokio::sync::oneshot::Sender<Snapshot>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] moat_datapath::Error),
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Reconciler {
    /// Open (or adopt) the datapath pinned at `pin_root` and read back what it holds.
    pub fn new(
        dp: Datapath,
        node: String,
        state_dir: &Path,
        compile_cfg: CompileConfig,
        default_uplinks: Vec<String>,
        out: Publishers,
        metrics: AgentMetrics,
    ) -> Result<Self, ReconcileError> {
        std::fs::create_dir_all(state_dir).map_err(|source| ReconcileError::State {
            path: state_dir.to_owned(),
            source,
        })?;
        let alloc = load_allocations(&state_dir.join(ALLOCATIONS_FILE))?;
        let mut r = Reconciler {
            dp,
            node,
            state_dir: state_dir.to_owned(),
            compiler: Compiler::new(compile_cfg, alloc.clone()),
            saved: alloc,
            realized: RealizedState::default(),
            in_sync: false,
            ifindex: BTreeMap::new(),
            attached: BTreeSet::new(),
            uplinks: BTreeSet::new(),
            default_uplinks,
            out,
            metrics,
            writes: 0,
        };
        r.read_back()?;
        Ok(r)
    }

    /// Answer a request from another task.
    pub fn handle(&self, req: Request) {
        match req {
            Request::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let dp = &self.dp;
        let rules = self.compiler.state().rules.clone();
        let m = &self.realized.maps;
        let exact_ip = m
            .ipcache
            .keys()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .count();
        let fill = |map, entries: usize, capacity: u32| MapFill {
            map,
            entries: entries as u64,
            capacity: capacity.into(),
        };
        Snapshot {
            verdicts: dp.verdict_counters().unwrap_or_default(),
            rules: dp
                .rule_counters_for(rules.keys().copied())
                .unwrap_or_default(),
            rule_info: Arc::new(rules),
            events: dp.event_stats().unwrap_or_default(),
            maps: vec![
                fill("ipcache_exact", exact_ip, capacity::IPCACHE_EXACT),
                fill(
                    "ipcache_prefixes",
                    m.ipcache.len() - exact_ip,
                    capacity::IPCACHE_PREFIXES,
                ),
                fill("endpoints", m.endpoints.len(), capacity::ENDPOINTS),
                fill("policy_exact", m.exact.len(), capacity::POLICY_EXACT),
                fill(
                    "policy_prefixes",
                    m.prefixes.len(),
                    capacity::POLICY_PREFIXES,
                ),
                fill("prefilter", m.prefilter.len(), capacity::PREFILTER),
                fill(
                    "conntrack",
                    dp.conntrack_len().unwrap_or(0),
                    capacity::CONNTRACK,
                ),
            ],
            endpoints: m.endpoints.len() as u64,
            identities: self.out.status.borrow().identities as u64,
            map_writes: self.writes,
            overflows: self.out.status.borrow().overflows.len() as u64,
            // Filled by the metrics endpoint, which holds the proxy's counters.
            l7: Default::default(),
            l7_proxy: Default::default(),
        }
    }

    /// Rebuild `realized` from the kernel: maps, attachments.
    fn read_back(&mut self) -> Result<(), ReconcileError> {
        let dp = &self.dp;
        let mut maps = Maps {
            ipcache: dp.ipcache()?,
            prefilter: dp.prefilter()?,
            ..Maps::default()
        };
        for (k, v) in dp.policy()? {
            if k.prefix_len == policy_prefix::FULL {
                maps.exact.insert(k.key, v);
            } else {
                maps.prefixes.insert((k.key, k.prefix_len), v);
            }
        }
        self.ifindex.clear();
        for (ifindex, info) in dp.endpoints()? {
            match interface_name(ifindex) {
                Some(name) => {
                    maps.endpoints.insert(name.clone(), info);
                    self.ifindex.insert(name, ifindex);
                }
                // The interface is gone (its pod was deleted while we were away).
                None => {
                    self.dp
                        .apply(&[moat_datapath::MapOp::EndpointRemove(ifindex)])?;
                    self.writes += 1;
                }
            }
        }
        self.attached.clear();
        self.uplinks.clear();
        for (ifname, hook) in self.dp.attachments()? {
            if hook == "prefilter" || hook == "from_uplink" {
                self.uplinks.insert(ifname);
            } else {
                self.attached.insert(ifname);
            }
        }
        self.realized = RealizedState {
            maps,
            revision: self.dp.revision()?,
        };
        Ok(())
    }

    /// Make the datapath enforce `source`, and publish the outcome.
    pub fn reconcile(&mut self, source: &SourceState) {
        let started = Instant::now();
        let mut errors = source.errors.clone();
        let delta = match self.compiler.compile(&source.model) {
            Ok(delta) => delta,
            Err(e) => {
                errors.push(format!("compile: {e}"));
                self.publish(source, None, errors, false);
                return;
            }
        };
        // Numbers the maps are about to refer to must survive a crash right after.
        let alloc = self.compiler.allocations();
        if *alloc != self.saved {
            if let Err(e) = save_allocations(&self.state_dir.join(ALLOCATIONS_FILE), alloc) {
                errors.push(e.to_string());
                self.in_sync = false;
                self.publish(source, Some(self.compiler.state()), errors, false);
                return;
            }
            self.saved = alloc.clone();
        }

        let desired = self.compiler.state();
        // Endpoint interfaces not as last seen: new or recreated (their ifindex), or absent.
        let mut unsettled = Vec::new();
        for name in desired.maps.endpoints.keys() {
            match ifindex_of(name) {
                Some(i) => {
                    if self.ifindex.get(name) != Some(&i) {
                        unsettled.push((name.clone(), Some(i)));
                    }
                }
                None => unsettled.push((name.clone(), None)),
            }
        }
        for (name, i) in &unsettled {
            if let Some(i) = i {
                self.track_interface(name, *i, &mut errors);
            }
        }
        // Endpoints whose interface does not exist (yet) cannot be programmed.
        let filtered = unsettled.iter().any(|(_, i)| i.is_none()).then(|| {
            let mut maps = self.compiler.state().maps.clone();
            for (name, i) in &unsettled {
                if i.is_none() {
                    errors.push(format!(
                        "interface {name} of a local endpoint is not present on node {}",
                        self.node
                    ));
                    maps.endpoints.remove(name);
                }
            }
            maps
        });
        // The converge below borrows the reconciler whole; the compiler sits it out.
        let compiler = std::mem::take(&mut self.compiler);
        let desired = compiler.state();
        let maps = filtered.as_ref().unwrap_or(&desired.maps);
        // A recreated interface lost its realized entry: then compare, do not trust the delta.
        let delta = (self.in_sync && unsettled.is_empty()).then_some(&delta);
        let programmed = self.converge(maps, delta, source, &mut errors);
        if filtered.is_some() {
            self.in_sync = false;
        }
        let elapsed = started.elapsed();
        self.metrics
            .reconcile_duration
            .observe(elapsed.as_secs_f64());
        if let (true, Some(observed)) = (programmed, source.observed) {
            self.metrics
                .apply_latency
                .observe(observed.elapsed().as_secs_f64());
        }
        let cidrs = desired
            .maps
            .ipcache
            .iter()
            .filter(|(_, v)| v.identity >= moat_common::identity::FIRST_CIDR)
            .map(|(n, _)| *n)
            .collect();
        self.out
            .l7_policy
            .send_replace(Arc::new(L7Policy::from_state(desired)));
        self.out.flow_ctx.send_replace(Arc::new(FlowContext::new(
            &source.model,
            &desired.rules,
            cidrs,
        )));
        info!(
            revision = self.realized.revision,
            ms = elapsed.as_secs_f64() * 1e3,
            programmed,
            "reconciled"
        );
        self.publish(source, Some(desired), errors, programmed);
        self.compiler = compiler;
    }

    /// Remember `name`'s ifindex. An interface recreated under the same name (a pod
    /// restarted) has a new ifindex: its old entry goes, and it is written and attached anew.
    fn track_interface(&mut self, name: &str, ifindex: u32, errors: &mut Vec<String>) {
        let old = self.ifindex.insert(name.to_owned(), ifindex);
        if let Some(old) = old.filter(|&o| o != ifindex) {
            if let Err(e) = self.dp.apply(&[moat_datapath::MapOp::EndpointRemove(old)]) {
                errors.push(e.to_string());
            }
            self.writes += 1;
            self.realized.maps.endpoints.remove(name);
            self.attached.remove(name);
        }
    }

    /// Detach, write, attach, in the order that never leaves an interface with a program but
    /// no endpoint entry (which fails closed) or an entry with a program of a deleted pod.
    /// `delta`, when given, takes `realized` to `maps` (see `in_sync`).
    fn converge(
        &mut self,
        maps: &Maps,
        delta: Option<&Delta>,
        source: &SourceState,
        errors: &mut Vec<String>,
    ) -> bool {
        // Interfaces leaving: detach before their entries go.
        let leaving: Vec<String> = self
            .attached
            .iter()
            .filter(|i| !maps.endpoints.contains_key(*i))
            .cloned()
            .collect();
        for ifname in leaving {
            match self.dp.detach_endpoint(&ifname) {
                Ok(()) => {
                    self.attached.remove(&ifname);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }

        let ops = match delta {
            Some(delta) => plan(delta, maps, &self.realized),
            None => diff(maps, &self.realized),
        };
        self.in_sync = false;
        if let Some(o) = transition_overflow(&ops, &self.realized) {
            errors.push(format!(
                "change not applied, the previous state stays enforced: while endpoints switch, \
                 old and new entries coexist and {o}; apply it in smaller steps"
            ));
            return false;
        }
        let (mut ok, mut skipped) = (true, false);
        for op in &ops {
            let Some(dp_op) = self.translate(op) else {
                skipped = true;
                continue;
            };
            match self.dp.apply(std::slice::from_ref(&dp_op)) {
                Ok(()) => {
                    self.writes += 1;
                    op.apply(&mut self.realized);
                }
                Err(e) => {
                    errors.push(format!("applying {op:?}: {e}"));
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            // Start the next attempt from what the kernel really holds.
            if let Err(e) = self.read_back() {
                errors.push(e.to_string());
            }
        }
        self.in_sync = ok && !skipped;

        // Interfaces arriving: attach once their entries exist.
        for ifname in maps.endpoints.keys() {
            if !self.attached.contains(ifname) {
                match self.dp.attach_endpoint(ifname) {
                    Ok(()) => {
                        self.attached.insert(ifname.clone());
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        ok = false;
                    }
                }
            }
        }

        let uplinks: BTreeSet<String> = if source.uplinks.is_empty() {
            self.default_uplinks.iter().cloned().collect()
        } else {
            source.uplinks.iter().cloned().collect()
        };
        for gone in self
            .uplinks
            .difference(&uplinks)
            .cloned()
            .collect::<Vec<_>>()
        {
            if let Err(e) = self.dp.detach_uplink(&gone) {
                errors.push(e.to_string());
            }
            self.uplinks.remove(&gone);
        }
        for uplink in &uplinks {
            match self.dp.attach_uplink(uplink) {
                Ok(()) => {
                    self.uplinks.insert(uplink.clone());
                }
                Err(e) => {
                    errors.push(e.to_string());
                    ok = false;
                }
            }
        }
        ok
    }

    /// The compiler's operation in the loader's terms (interface names become ifindexes).
    fn translate(&self, op: &MapOp) -> Option<moat_datapath::MapOp> {
        use moat_datapath::MapOp as D;
        let entry = |key, prefix_len| PolicyEntryKey { key, prefix_len };
        Some(match op {
            MapOp::PrefilterUpsert(n, r) => D::PrefilterUpsert(*n, *r),
            MapOp::PrefilterDelete(n) => D::PrefilterRemove(*n),
            MapOp::IpcacheUpsert(n, v) => D::IpcacheUpsert(*n, *v),
            MapOp::IpcacheDelete(n) => D::IpcacheRemove(*n),
            MapOp::EndpointUpsert(name, info) => D::EndpointSet(*self.ifindex.get(name)?, *info),
            MapOp::EndpointDelete(name) => D::EndpointRemove(*self.ifindex.get(name)?),
            MapOp::PolicyExactUpsert(k, v) => D::PolicyUpsert(entry(*k, policy_prefix::FULL), *v),
            MapOp::PolicyExactDelete(k) => D::PolicyRemove(entry(*k, policy_prefix::FULL)),
            MapOp::PolicyPrefixUpsert(k, l, v) => D::PolicyUpsert(entry(*k, *l), *v),
            MapOp::PolicyPrefixDelete(k, l) => D::PolicyRemove(entry(*k, *l)),
            MapOp::SetRevision(r) => D::SetRevision(*r),
        })
    }

    fn publish(
        &self,
        source: &SourceState,
        desired: Option<&DesiredState>,
        errors: Vec<String>,
        programmed: bool,
    ) {
        for e in &errors {
            warn!("{e}");
        }
        let generations: BTreeMap<_, _> = source
            .model
            .policies
            .iter()
            .map(|p| (p.reference(), generation(p)))
            .collect();
        let mut policies = Vec::new();
        let mut overflows = Vec::new();
        for (r, outcome) in desired.map(|d| &d.policies).into_iter().flatten() {
            if !outcome.accepted && outcome.message.contains("capacity") {
                overflows.push(Overflow {
                    reference: r.to_string(),
                    policy: r.clone(),
                    message: outcome.message.clone(),
                });
            }
            policies.push(PolicyReport {
                reference: r.to_string(),
                policy: r.clone(),
                generation: generations.get(r).copied().flatten(),
                accepted: outcome.accepted,
                message: outcome.message.clone(),
                selected_endpoints: outcome.selected_endpoints,
            });
        }
        let previous = self.out.status.borrow().clone();
        let status = AgentStatus {
            node: self.node.clone(),
            source_digest: Some(source.digest.clone()),
            programmed_digest: if programmed {
                Some(source.digest.clone())
            } else {
                previous.programmed_digest.clone()
            },
            revision: self.realized.revision,
            ready: programmed,
            local_endpoints: self.realized.maps.endpoints.len(),
            identities: desired.map_or(0, |d| {
                d.maps
                    .ipcache
                    .values()
                    .map(|v| v.identity)
                    .collect::<BTreeSet<_>>()
                    .len()
            }),
            map_writes: self.writes,
            policies,
            overflows,
            errors,
        };
        self.out.status.send_replace(Arc::new(status));
    }
}

fn generation(p: &Policy) -> Option<i64> {
    match p {
        Policy::NetworkPolicy(p) => p.metadata.generation,
        Policy::MoatNetworkPolicy(p) => p.metadata.generation,
        Policy::MoatClusterNetworkPolicy(p) => p.metadata.generation,
    }
}

fn ifindex_of(name: &str) -> Option<u32> {
    moat_datapath::ifindex(name)
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

fn load_allocations(path: &Path) -> Result<Allocations, ReconcileError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ReconcileError::State {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
        Err(source) => Err(ReconcileError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Write-then-rename, so a crash never leaves a torn file.
fn save_allocations(path: &Path, alloc: &Allocations) -> Result<(), ReconcileError> {
    let err = |source| ReconcileError::State {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(alloc).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
