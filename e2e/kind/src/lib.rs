//! The kind e2e suite's helpers: a typed kind cluster (created once per test process from
//! `e2e/kind/kind-config.yaml`, image loaded, `kubectl apply -k config/`, DaemonSet waited for),
//! per-test namespace sets, workload pods running the moat image (`moat serve`), probes run
//! from inside pods (`kubectl exec`, bash's `/dev/tcp` and `/dev/udp`: the image ships bash and
//! nothing else is needed), policy status and metrics read through the API, and a dump of agent
//! logs, policies, events and flows when a test fails.
//!
//! Nothing runs unless `MOAT_E2E_KIND=1` (tests print why they skip). Environment:
//! - `MOAT_E2E_CLUSTER` (default `moat-e2e`): the kind cluster, reused if it exists;
//! - `MOAT_E2E_IMAGE` (default `moat:dev`): the image, built from the repo's Dockerfile unless
//!   `MOAT_E2E_SKIP_BUILD=1`, then `kind load`ed;
//! - `MOAT_E2E_KEEP=1`: keep namespaces (and the cluster) after the tests, for a look;
//! - `MOAT_E2E_ARTIFACTS` (default `target/e2e-kind`): where failure dumps go.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{LazyLock, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams},
    config::KubeConfigOptions,
};
use moat::{
    api::{MoatClusterNetworkPolicy, MoatNetworkPolicy, PolicyStatus, Protocol},
    model::{ContainerPort, Policy},
};
use serde_json::json;

pub const AGENT_NAMESPACE: &str = "moat-system";
pub const AGENT_DAEMONSET: &str = "moat-agent";
pub const METRICS_SERVICE: &str = "moat-agent-metrics";
/// Label on everything the suite creates.
pub const E2E_LABEL: &str = "moat.dev/e2e";
const FIELD_MANAGER: &str = "moat-e2e";

/// Whether the suite runs (`MOAT_E2E_KIND=1`).
pub fn enabled() -> bool {
    std::env::var("MOAT_E2E_KIND").as_deref() == Ok("1")
}

/// Return early from a test, saying why, unless the suite is enabled.
#[macro_export]
macro_rules! require_kind {
    () => {
        if !$crate::enabled() {
            eprintln!(
                "skipped: the kind e2e suite runs only with MOAT_E2E_KIND=1 (use `make e2e-kind`; needs docker, kind and kubectl)"
            );
            return;
        }
    };
}

pub fn cluster_name() -> String {
    std::env::var("MOAT_E2E_CLUSTER").unwrap_or_else(|_| "moat-e2e".into())
}

pub fn image() -> String {
    std::env::var("MOAT_E2E_IMAGE").unwrap_or_else(|_| "moat:dev".into())
}

fn keep() -> bool {
    std::env::var("MOAT_E2E_KEEP").as_deref() == Ok("1")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn context() -> String {
    format!("kind-{}", cluster_name())
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl() -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--context").arg(context());
    c
}

/// What is missing to run the suite, if anything.
pub fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if Command::new("docker")
        .arg("info")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("a reachable docker engine (`docker info` fails)".into());
    }
    for tool in ["kind", "kubectl"] {
        if Command::new(tool).arg("version").output().is_err() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    missing
}

/// The cluster, created and provisioned once per test process.
fn ensure_cluster() -> Result<()> {
    static SETUP: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    SETUP
        .get_or_init(|| provision().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("kind cluster setup failed: {e}"))
}

fn provision() -> Result<()> {
    let missing = missing_tools();
    ensure!(missing.is_empty(), "missing: {}", missing.join(", "));
    let root = repo_root();
    let name = cluster_name();
    let clusters = run(Command::new("kind").args(["get", "clusters"]))?;
    if !clusters.lines().any(|l| l.trim() == name) {
        eprintln!("e2e: creating kind cluster {name}");
        run(Command::new("kind")
            .args([
                "create", "cluster", "--name", &name, "--wait", "180s", "--config",
            ])
            .arg(root.join("e2e/kind/kind-config.yaml")))?;
    }
    let image = image();
    if std::env::var("MOAT_E2E_SKIP_BUILD").as_deref() != Ok("1") {
        eprintln!("e2e: building {image}");
        run(Command::new("docker")
            .args(["build", "-t", &image])
            .arg(&root))?;
    }
    eprintln!("e2e: loading {image} into {name}");
    run(Command::new("kind").args(["load", "docker-image", &image, "--name", &name]))?;
    eprintln!("e2e: kubectl apply -k config/");
    let mut apply = kubectl();
    apply.args(["apply", "-k"]).arg(root.join("config"));
    run(&mut apply)?;
    // Pick up a rebuilt image under the same tag.
    run(kubectl().args([
        "-n",
        AGENT_NAMESPACE,
        "rollout",
        "restart",
        "daemonset",
        AGENT_DAEMONSET,
    ]))?;
    Ok(())
}

/// Serializes tests: the scenarios need the real namespace names x, y, z (selectors on
/// `kubernetes.io/metadata.name`), so two tests can never run side by side.
static SERIAL: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// One test's view of the cluster (cheap to clone; what it created is shared).
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    pub name: String,
    created: std::sync::Arc<std::sync::Mutex<Created>>,
}

#[derive(Default)]
struct Created {
    namespaces: Vec<String>,
    cluster_policies: Vec<String>,
}

/// Runs one test: cluster up, agents ready, the body; on failure a dump of the agents' logs,
/// policies, events and flows; cleanup unless `MOAT_E2E_KEEP=1`. Panics with the error.
pub async fn run_test<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let _serial = SERIAL.lock().await;
    let setup = async {
        tokio::task::spawn_blocking(ensure_cluster).await??;
        let config = Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(context()),
            ..KubeConfigOptions::default()
        })
        .await?;
        let client = Client::try_from(config)?;
        wait_daemonset(&client, Duration::from_secs(300)).await?;
        anyhow::Ok(client)
    };
    let client = match setup.await {
        Ok(c) => c,
        Err(e) => panic!("{name}: {e:#}"),
    };
    let ctx = Ctx {
        client,
        name: name.into(),
        created: Default::default(),
    };
    let result = body(ctx.clone()).await;
    if let Err(e) = &result {
        match dump(&ctx).await {
            Ok(dir) => eprintln!("{name}: failed; diagnostics in {}", dir.display()),
            Err(d) => eprintln!("{name}: failed; the diagnostics dump failed too: {d:#}"),
        }
        eprintln!("{name}: {e:#}");
    }
    if keep() {
        eprintln!(
            "{name}: MOAT_E2E_KEEP=1, leaving namespaces {:?}",
            ctx.created.lock().unwrap().namespaces
        );
    } else if let Err(e) = ctx.cleanup().await {
        eprintln!("{name}: cleanup: {e:#}");
    }
    if let Err(e) = result {
        panic!("{name}: {e:#}");
    }
}

/// Waits until every agent runs the current template and is ready.
pub async fn wait_daemonset(client: &Client, timeout: Duration) -> Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ds = api.get(AGENT_DAEMONSET).await?;
        let generation = ds.metadata.generation.unwrap_or_default();
        if let Some(s) = &ds.status {
            let desired = s.desired_number_scheduled;
            if s.observed_generation.unwrap_or_default() >= generation
                && desired > 0
                && s.updated_number_scheduled.unwrap_or_default() == desired
                && s.number_ready == desired
                && s.number_unavailable.unwrap_or_default() == 0
            {
                return Ok(());
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "DaemonSet {AGENT_NAMESPACE}/{AGENT_DAEMONSET} not ready within {timeout:?}: {:?}",
            ds.status
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Worker nodes (the control plane is tainted), sorted.
pub async fn workers(client: &Client) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut names: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|n| {
            !n.labels()
                .contains_key("node-role.kubernetes.io/control-plane")
        })
        .map(|n| n.name_any())
        .collect();
    names.sort();
    ensure!(
        names.len() >= 2,
        "the e2e cluster needs two workers, found {names:?}"
    );
    Ok(names)
}

/// A workload pod.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// `namespace/name`.
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    /// Arguments of `moat` (e.g. `serve --tcp=80`).
    pub args: Vec<String>,
    pub named_ports: Vec<ContainerPort>,
}

impl PodSpec {
    /// A pod serving TCP and UDP echo on 80 and 81 (the scenarios' model).
    pub fn echo(key: &str, labels: BTreeMap<String, String>, node: &str) -> Self {
        PodSpec {
            key: key.into(),
            labels,
            node: node.into(),
            args: ["serve", "--tcp=80", "--tcp=81", "--udp=80", "--udp=81"]
                .map(String::from)
                .to_vec(),
            named_ports: Vec::new(),
        }
    }
}

pub fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}

impl Ctx {
    /// Fresh namespaces (deleted first if a previous run left them), labelled as given.
    pub async fn namespaces(&self, set: &BTreeMap<String, BTreeMap<String, String>>) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        for name in set.keys() {
            let _ = api.delete(name, &DeleteParams::background()).await;
        }
        for name in set.keys() {
            wait_gone(&api, name, Duration::from_secs(180)).await?;
        }
        for (name, labels) in set {
            let mut labels = labels.clone();
            labels.insert(E2E_LABEL.into(), "true".into());
            let ns: Namespace = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }))?;
            api.create(&PostParams::default(), &ns).await?;
            self.created.lock().unwrap().namespaces.push(name.clone());
        }
        Ok(())
    }

    /// Sets a namespace's labels to exactly these (plus the e2e label).
    pub async fn set_namespace_labels(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let current = api.get(name).await?;
        let patch = label_patch(current.labels(), labels, &["kubernetes.io/metadata.name"]);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Sets a pod's labels to exactly these.
    pub async fn set_pod_labels(&self, key: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let (ns, name) = split(key);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let current = api.get(name).await?;
        let patch = label_patch(current.labels(), labels, &[]);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Creates the pods and waits until each runs and has an address: `key -> IP`.
    pub async fn start_pods(&self, pods: &[PodSpec]) -> Result<BTreeMap<String, IpAddr>> {
        for p in pods {
            let (ns, name) = split(&p.key);
            let ports: Vec<serde_json::Value> = p
                .named_ports
                .iter()
                .map(|cp| json!({"name": cp.name, "containerPort": cp.port, "protocol": cp.protocol.as_str()}))
                .collect();
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": p.labels},
                "spec": {
                    "nodeName": p.node,
                    "terminationGracePeriodSeconds": 1,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "moat", "image": image(), "imagePullPolicy": "Never",
                        "args": p.args, "ports": ports,
                    }],
                },
            }))?;
            Api::<Pod>::namespaced(self.client.clone(), ns)
                .create(&PostParams::default(), &pod)
                .await
                .with_context(|| format!("creating pod {}", p.key))?;
        }
        let mut ips = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        for p in pods {
            let (ns, name) = split(&p.key);
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            loop {
                let pod = api.get(name).await?;
                let status = pod.status.unwrap_or_default();
                let running = status.phase.as_deref() == Some("Running");
                if let (true, Some(ip)) = (running, status.pod_ip.as_deref()) {
                    ips.insert(p.key.clone(), ip.parse()?);
                    break;
                }
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "pod {} not running: {status:?}",
                    p.key
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(ips)
    }

    /// Applies a policy (server-side apply), labelled for cleanup.
    pub async fn apply_policy(&self, policy: &Policy) -> Result<()> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match policy.clone() {
            Policy::NetworkPolicy(mut p) => {
                p.labels_mut().insert(E2E_LABEL.into(), "true".into());
                let ns = p.namespace().unwrap_or_else(|| "default".into());
                let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &ns);
                api.patch(&p.name_any(), &pp, &Patch::Apply(&p)).await?;
            }
            Policy::MoatNetworkPolicy(mut p) => {
                p.labels_mut().insert(E2E_LABEL.into(), "true".into());
                let ns = p.namespace().unwrap_or_else(|| "default".into());
                let api: Api<MoatNetworkPolicy> = Api::namespaced(self.client.clone(), &ns);
                api.patch(&p.name_any(), &pp, &Patch::Apply(&p)).await?;
            }
            Policy::MoatClusterNetworkPolicy(mut p) => {
                p.labels_mut().insert(E2E_LABEL.into(), "true".into());
                let api: Api<MoatClusterNetworkPolicy> = Api::all(self.client.clone());
                api.patch(&p.name_any(), &pp, &Patch::Apply(&p)).await?;
                self.created
                    .lock()
                    .unwrap()
                    .cluster_policies
                    .push(p.name_any());
            }
        }
        Ok(())
    }

    /// Deletes every policy the suite applied in `namespaces`, and its cluster policies.
    pub async fn delete_policies(&self, namespaces: &[String]) -> Result<()> {
        let lp = ListParams::default().labels(&format!("{E2E_LABEL}=true"));
        let dp = DeleteParams::default();
        for ns in namespaces {
            Api::<NetworkPolicy>::namespaced(self.client.clone(), ns)
                .delete_collection(&dp, &lp)
                .await?;
            Api::<MoatNetworkPolicy>::namespaced(self.client.clone(), ns)
                .delete_collection(&dp, &lp)
                .await?;
        }
        Api::<MoatClusterNetworkPolicy>::all(self.client.clone())
            .delete_collection(&dp, &lp)
            .await?;
        self.created.lock().unwrap().cluster_policies.clear();
        Ok(())
    }

    /// The status of a moat policy once it describes `metadata.generation`.
    pub async fn wait_status(&self, kind: &str, ns: &str, name: &str) -> Result<PolicyStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (generation, status) = match kind {
                "MoatNetworkPolicy" => {
                    let p = Api::<MoatNetworkPolicy>::namespaced(self.client.clone(), ns)
                        .get(name)
                        .await?;
                    (p.metadata.generation, p.status)
                }
                _ => {
                    let p = Api::<MoatClusterNetworkPolicy>::all(self.client.clone())
                        .get(name)
                        .await?;
                    (p.metadata.generation, p.status)
                }
            };
            if let Some(s) = status
                && s.observed_generation.is_some()
                && s.observed_generation == generation
            {
                return Ok(s);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{kind} {ns}/{name}: no status for generation {generation:?} within 60 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// `kubectl exec` a bash script in a pod; stdout.
    pub async fn exec(&self, key: &str, script: &str) -> Result<String> {
        let (ns, name) = split(key);
        let out = tokio::process::Command::new("kubectl")
            .args([
                "--context",
                &context(),
                "-n",
                ns,
                "exec",
                name,
                "--",
                "bash",
                "-c",
                script,
            ])
            .output()
            .await?;
        // A failing last command is fine (probes report through stdout).
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// From `from`, try every target on `port`/`protocol` in parallel: `name -> reachable`.
    /// TCP: connect and one echo round trip; UDP: one datagram and its echo (a fresh socket per
    /// try). Each try is bounded by 3 s.
    pub async fn probe_from(
        &self,
        from: &str,
        targets: &[(String, IpAddr)],
        port: u16,
        protocol: Protocol,
    ) -> Result<BTreeMap<String, bool>> {
        let dev = match protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            other => bail!(
                "{} probes are not supported from pods (bash has no {0} socket)",
                other.as_str()
            ),
        };
        let mut script = format!(
            "c() {{ if timeout 3 bash -c 'exec 3<>/dev/{dev}/$0/$1; printf moat >&3; [ \"$(head -c 4 <&3)\" = moat ]' \"$2\" {port} 2>/dev/null; then echo \"$1 ok\"; else echo \"$1 blocked\"; fi; }}\n"
        );
        for (name, ip) in targets {
            script.push_str(&format!("c {name} {ip} &\n"));
        }
        script.push_str("wait\n");
        let out = self.exec(from, &script).await?;
        let mut result = BTreeMap::new();
        for line in out.lines() {
            if let Some((name, verdict)) = line.rsplit_once(' ') {
                result.insert(name.to_owned(), verdict == "ok");
            }
        }
        for (name, _) in targets {
            ensure!(
                result.contains_key(name),
                "probe {from} -> {name}: no answer from the pod: {out}"
            );
        }
        Ok(result)
    }

    /// One HTTP/1.1 request from a pod: `Some((status, body))`, or `None` when nothing came
    /// back within 5 s (dropped).
    pub async fn http(
        &self,
        from: &str,
        ip: IpAddr,
        method: &str,
        path: &str,
    ) -> Result<Option<(u16, String)>> {
        let script = format!(
            "timeout 5 bash -c 'exec 3<>/dev/tcp/$0/80; printf \"%s %s HTTP/1.1\\r\\nHost: deathstar\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n\" \"$1\" \"$2\" >&3; cat <&3' {ip} {method} {path}"
        );
        let out = self.exec(from, &script).await?;
        let Some(status) = out
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
        else {
            return Ok(None);
        };
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok(Some((status, body)))
    }

    /// The agents' `/metrics`, scraped through the metrics Service (the API server's service
    /// proxy picks one agent per request).
    pub async fn scrape_metrics(&self) -> Result<String> {
        let req = http::Request::get(format!(
            "/api/v1/namespaces/{AGENT_NAMESPACE}/services/{METRICS_SERVICE}:metrics/proxy/metrics"
        ))
        .body(Vec::new())?;
        Ok(self.client.request_text(req).await?)
    }

    async fn cleanup(&self) -> Result<()> {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        let api: Api<Namespace> = Api::all(self.client.clone());
        for ns in created.namespaces {
            let _ = api.delete(&ns, &DeleteParams::background()).await;
        }
        let mcnp: Api<MoatClusterNetworkPolicy> = Api::all(self.client.clone());
        for name in created.cluster_policies {
            let _ = mcnp.delete(&name, &DeleteParams::default()).await;
        }
        Ok(())
    }
}

fn label_patch(
    current: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
    keep: &[&str],
) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    for k in current.keys() {
        if !want.contains_key(k) && !keep.contains(&k.as_str()) && k != E2E_LABEL {
            labels.insert(k.clone(), serde_json::Value::Null);
        }
    }
    for (k, v) in want {
        labels.insert(k.clone(), json!(v));
    }
    json!({"metadata": {"labels": labels}})
}

async fn wait_gone(api: &Api<Namespace>, name: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while api.get_opt(name).await?.is_some() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "namespace {name} still terminating after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Agent logs, policies with status, events and each agent's recent flows, under
/// `$MOAT_E2E_ARTIFACTS/<test>/`.
pub async fn dump(ctx: &Ctx) -> Result<PathBuf> {
    let base = std::env::var("MOAT_E2E_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/e2e-kind"));
    let dir = base.join(&ctx.name);
    std::fs::create_dir_all(&dir)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), AGENT_NAMESPACE);
    let agents = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=moat-agent"))
        .await?;
    for p in agents {
        let name = p.name_any();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let logs = pods
            .logs(
                &name,
                &LogParams {
                    container: Some("agent".into()),
                    tail_lines: Some(2000),
                    ..LogParams::default()
                },
            )
            .await
            .unwrap_or_else(|e| format!("logs unavailable: {e}"));
        std::fs::write(dir.join(format!("agent-{node}.log")), logs)?;
        let flows = run(kubectl().args([
            "-n",
            AGENT_NAMESPACE,
            "exec",
            &name,
            "-c",
            "agent",
            "--",
            "moat",
            "observe",
            "--last",
            "500",
        ]))
        .unwrap_or_else(|e| format!("flows unavailable: {e:#}"));
        std::fs::write(dir.join(format!("flows-{node}.txt")), flows)?;
    }
    let policies = run(kubectl().args([
        "get",
        "networkpolicies,moatnetworkpolicies,moatclusternetworkpolicies",
        "-A",
        "-o",
        "yaml",
    ]))
    .unwrap_or_else(|e| format!("{e:#}"));
    std::fs::write(dir.join("policies.yaml"), policies)?;
    let events = run(kubectl().args(["get", "events", "-A", "--sort-by=.lastTimestamp"]))
        .unwrap_or_else(|e| format!("{e:#}"));
    std::fs::write(dir.join("events.txt"), events)?;
    let pods_wide = run(kubectl().args(["get", "pods", "-A", "-o", "wide"]))
        .unwrap_or_else(|e| format!("{e:#}"));
    std::fs::write(dir.join("pods.txt"), pods_wide)?;
    Ok(dir)
}
