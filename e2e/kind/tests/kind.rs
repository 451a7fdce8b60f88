//! moat on a real kind cluster (1 control plane, 2 workers, kindnet). Every test exits early
//! with a message unless `MOAT_E2E_KIND=1`; `make e2e-kind` sets it after checking for docker,
//! kind and kubectl. Tests run one at a time (they share the namespaces x, y, z).
//!
//! Caveat, measured against nothing here (no cluster on the development machines): kind >= 0.24
//! ships kindnet with its own NetworkPolicy controller. Upstream NetworkPolicies are then
//! enforced by both, so the scenario test additionally requires moat's own drop counters to
//! rise; the moat-CRD tests (Star Wars, status, restart) are enforced by moat alone.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use moat::{
    api::Protocol,
    model::Policy,
    scenario::{Probe, Scenario},
};
use moat_e2e_kind::{Ctx, PodSpec, require_kind, run_test, split, workers};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Loads a sample policy file, with every object moved to `ns`.
fn sample(file: &str, ns: &str) -> Result<Vec<Policy>> {
    let path = moat_e2e_kind::repo_root().join("config/samples").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.split("\n---")
        .filter(|doc| doc.lines().any(|l| l.starts_with("kind:")))
        .map(|doc| {
            let mut v: serde_json::Value = serde_json::to_value(
                Policy::from_yaml(doc).map_err(|e| anyhow::anyhow!("{file}: {e}"))?,
            )?;
            // Policy serializes as {"Kind": object}.
            let obj = v
                .as_object_mut()
                .and_then(|o| o.values_mut().next())
                .context("policy shape")?;
            if obj["kind"] != "MoatClusterNetworkPolicy" {
                obj["metadata"]["namespace"] = serde_json::json!(ns);
            }
            Policy::from_value(obj.clone()).map_err(|e| anyhow::anyhow!("{file}: {e}"))
        })
        .collect()
}

/// Star Wars pods in `ns`: deathstar on one worker, the ships on the other (cross-node).
async fn starwars(ctx: &Ctx, ns: &str) -> Result<BTreeMap<String, IpAddr>> {
    let w = workers(&ctx.client).await?;
    ctx.namespaces(&BTreeMap::from([(ns.to_string(), labels(&[]))]))
        .await?;
    let mut deathstar = PodSpec::echo(
        &format!("{ns}/deathstar"),
        labels(&[("org", "empire"), ("class", "deathstar")]),
        &w[0],
    );
    deathstar.args = ["serve", "--deathstar=80"].map(String::from).to_vec();
    let tie = PodSpec::echo(
        &format!("{ns}/tiefighter"),
        labels(&[("org", "empire"), ("class", "tiefighter")]),
        &w[1],
    );
    let xwing = PodSpec::echo(
        &format!("{ns}/xwing"),
        labels(&[("org", "alliance"), ("class", "xwing")]),
        &w[1],
    );
    ctx.start_pods(&[deathstar, tie, xwing]).await
}

/// Retries until `check` holds or 60 s pass (policy changes reach every node eventually).
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match check().await? {
            None => return Ok(()),
            Some(why) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("{what}: still failing after 60 s: {why}")
            }
            Some(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

#[tokio::test]
async fn starwars_l3l4_then_l7() {
    require_kind!();
    run_test("starwars", |ctx| async move {
        let ctx = &ctx;
        let ns = "starwars";
        let ips = starwars(ctx, ns).await?;
        let ds = ips[&format!("{ns}/deathstar")];
        let tie = &format!("{ns}/tiefighter");
        let xwing = &format!("{ns}/xwing");
        // No policy: everybody lands.
        let r = ctx.http(xwing, ds, "POST", "/v1/request-landing").await?;
        ensure!(
            matches!(r, Some((200, _))),
            "before any policy, xwing lands: {r:?}"
        );

        for p in sample("starwars-l3l4.yaml", ns)? {
            ctx.apply_policy(&p).await?;
        }
        eventually("L3/L4: tiefighter lands, xwing dropped", || async move {
            let t = ctx.http(tie, ds, "POST", "/v1/request-landing").await?;
            let x = ctx.http(xwing, ds, "POST", "/v1/request-landing").await?;
            Ok((!(matches!(t, Some((200, _))) && x.is_none()))
                .then(|| format!("tiefighter {t:?}, xwing {x:?}")))
        })
        .await?;

        for p in sample("starwars-l7.yaml", ns)? {
            ctx.apply_policy(&p).await?;
        }
        eventually(
            "L7: landing allowed, exhaust port denied, xwing dropped",
            || async move {
                let land = ctx.http(tie, ds, "POST", "/v1/request-landing").await?;
                let port = ctx.http(tie, ds, "PUT", "/v1/exhaust-port").await?;
                let x = ctx.http(xwing, ds, "POST", "/v1/request-landing").await?;
                let ok = matches!(land, Some((200, _)))
                    && matches!(&port, Some((403, body)) if body.contains("Access denied"))
                    && x.is_none();
                Ok((!ok).then(|| format!("landing {land:?}, exhaust-port {port:?}, xwing {x:?}")))
            },
        )
        .await
    })
    .await;
}

/// Probes one matrix: every ordered pair of distinct pods, compared with `expect`.
async fn matrix_mismatches(
    ctx: &Ctx,
    probe: &Probe,
    ips: &BTreeMap<String, IpAddr>,
) -> Result<Vec<String>> {
    let mut mismatches = Vec::new();
    let probes = ips.keys().map(|from| {
        let targets: Vec<(String, IpAddr)> = ips
            .iter()
            .filter(|(k, _)| *k != from)
            .map(|(k, ip)| (k.clone(), *ip))
            .collect();
        async move {
            (
                from.clone(),
                ctx.probe_from(from, &targets, probe.port, probe.protocol)
                    .await,
            )
        }
    });
    for (from, result) in futures::future::join_all(probes).await {
        for (to, reached) in result? {
            if reached != probe.reachable(&from, &to) {
                mismatches.push(format!(
                    "{from} -> {to} {}/{}: expected {}, observed {}",
                    probe.protocol.as_str(),
                    probe.port,
                    if probe.reachable(&from, &to) {
                        "reachable"
                    } else {
                        "blocked"
                    },
                    if reached { "reachable" } else { "blocked" }
                ));
            }
        }
    }
    Ok(mismatches)
}

#[tokio::test]
async fn conformance_scenarios_as_real_pods() {
    require_kind!();
    run_test("scenarios", |ctx| async move {
        let ctx = &ctx;
        let dir = moat_e2e_kind::repo_root().join("e2e/scenarios");
        let scenarios = Scenario::load_dir(&dir)?;
        ensure!(!scenarios.is_empty(), "no scenario in {}", dir.display());
        let w = workers(&ctx.client).await?;
        // One namespace set and one set of pods for every scenario: swap labels and policies.
        let first = &scenarios[0].1;
        ctx.namespaces(&first.namespaces).await?;
        // Named ports: the union of every scenario's (upstream gives every pod serve-<port>-<proto>).
        let mut pods = Vec::new();
        for (i, (key, l)) in first.pods.iter().enumerate() {
            let mut spec = PodSpec::echo(key, l.clone(), &w[i % w.len()]);
            let mut ports: Vec<_> = scenarios
                .iter()
                .flat_map(|(_, s)| s.container_ports(key))
                .collect();
            ports.sort();
            ports.dedup();
            spec.named_ports = ports;
            pods.push(spec);
        }
        let ips = ctx.start_pods(&pods).await?;
        let namespaces: Vec<String> = first.namespaces.keys().cloned().collect();
        let mut failures = Vec::new();
        let before = dropped(&ctx.scrape_metrics().await.unwrap_or_default());
        for (name, s) in &scenarios {
            if s.pods.keys().ne(first.pods.keys())
                || s.namespaces.keys().ne(first.namespaces.keys())
            {
                eprintln!("{name}: skipped: not the x/y/z a/b/c topology");
                continue;
            }
            ctx.delete_policies(&namespaces).await?;
            for (ns, l) in &s.namespaces {
                ctx.set_namespace_labels(ns, l).await?;
            }
            for (pod, l) in &s.pods {
                ctx.set_pod_labels(pod, l).await?;
            }
            let policies = s.policies(&|k| ips.get(k).copied())?;
            for p in &policies {
                ctx.apply_policy(p).await?;
            }
            for probe in &s.probes {
                if !matches!(probe.protocol, Protocol::Tcp | Protocol::Udp) {
                    eprintln!(
                        "{name}: {} probe skipped: not probeable from a pod's bash",
                        probe.protocol.as_str()
                    );
                    continue;
                }
                let ips = &ips;
                let r = eventually(
                    &format!("{name} {}/{}", probe.protocol.as_str(), probe.port),
                    || async move {
                        let m = matrix_mismatches(ctx, probe, ips).await?;
                        Ok((!m.is_empty()).then(|| m.join("\n")))
                    },
                )
                .await;
                match r {
                    Ok(()) => {
                        eprintln!("{name}: {}/{} matches", probe.protocol.as_str(), probe.port)
                    }
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
        }
        ctx.delete_policies(&namespaces).await?;
        ensure!(
            failures.is_empty(),
            "{} matrices differ:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
        // moat itself dropped packets (kindnet may enforce NetworkPolicies too).
        let mut after = 0.0;
        for _ in 0..20 {
            after = f64::max(after, dropped(&ctx.scrape_metrics().await?));
        }
        ensure!(
            after > before,
            "moat's DROPPED counters did not rise ({before} -> {after})"
        );
        Ok(())
    })
    .await;
}

/// Sum of `moat_verdicts_total{verdict="DROPPED"}` in one scrape.
fn dropped(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("moat_verdicts_total{") && l.contains("verdict=\"DROPPED\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn policy_status_conditions_through_the_api() {
    require_kind!();
    run_test("status", |ctx| async move {
        let ctx = &ctx;
        ctx.namespaces(&BTreeMap::from([("status".to_string(), labels(&[]))])).await?;
        let valid = Policy::from_yaml(
            "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {name: valid, namespace: status}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{entities: [cluster]}]\n",
        )
        .map_err(anyhow::Error::msg)?;
        // Deny with http is invalid (the compiler refuses it, the CRD schema cannot).
        let invalid = Policy::from_yaml(
            "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {name: invalid, namespace: status}\nspec:\n  podSelector: {}\n  ingress:\n  - action: Deny\n    ports: [{port: 80}]\n    http: [{method: GET}]\n",
        )
        .map_err(anyhow::Error::msg)?;
        ctx.apply_policy(&valid).await?;
        ctx.apply_policy(&invalid).await?;
        let s = ctx.wait_status("MoatNetworkPolicy", "status", "valid").await?;
        let cond = |s: &moat::api::PolicyStatus, t: &str| {
            s.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.message.clone()))
        };
        ensure!(cond(&s, "Accepted").is_some_and(|c| c.0 == "True"), "valid: {s:?}");
        ensure!(cond(&s, "Invalid").is_some_and(|c| c.0 == "False"), "valid: {s:?}");
        let s = ctx.wait_status("MoatNetworkPolicy", "status", "invalid").await?;
        ensure!(cond(&s, "Accepted").is_some_and(|c| c.0 == "False"), "invalid: {s:?}");
        ensure!(
            cond(&s, "Invalid").is_some_and(|c| c.0 == "True" && c.1.to_lowercase().contains("http")),
            "invalid, with a message naming the problem: {s:?}"
        );
        // And an Event on it.
        let events: &kube::Api<k8s_openapi::api::events::v1::Event> = &kube::Api::namespaced(ctx.client.clone(), "status");
        eventually("InvalidPolicy event", || async move {
            let list = events.list(&Default::default()).await?;
            let found = list.items.iter().any(|e| {
                e.reason.as_deref() == Some("InvalidPolicy")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("invalid")
            });
            Ok((!found).then(|| format!("{} events, none InvalidPolicy on `invalid`", list.items.len())))
        })
        .await
    })
    .await;
}

#[tokio::test]
async fn metrics_scraped_through_the_service() {
    require_kind!();
    run_test("metrics", |ctx| async move {
        let ctx = &ctx;
        let ns = "metrics";
        let w = workers(&ctx.client).await?;
        ctx.namespaces(&BTreeMap::from([(ns.to_string(), labels(&[]))])).await?;
        let server = PodSpec::echo(&format!("{ns}/server"), labels(&[("app", "server")]), &w[0]);
        let client = PodSpec::echo(&format!("{ns}/client"), labels(&[("app", "client")]), &w[0]);
        let ips = ctx.start_pods(&[server, client]).await?;
        let deny = Policy::from_yaml(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n"
        ))
        .map_err(anyhow::Error::msg)?;
        ctx.apply_policy(&deny).await?;
        let target = &[("server".to_string(), ips[&format!("{ns}/server")])];
        eventually("drops appear in moat's metrics", || async move {
            ctx.probe_from(&format!("{ns}/client"), target, 80, Protocol::Tcp).await?;
            let mut seen = String::new();
            for _ in 0..10 {
                let m = ctx.scrape_metrics().await?;
                for name in ["moat_build_info", "moat_verdicts_total", "moat_map_entries", "moat_map_capacity"] {
                    ensure!(m.contains(name), "{name} missing from /metrics");
                }
                if dropped(&m) > 0.0 {
                    return Ok(None);
                }
                seen = m.lines().filter(|l| l.starts_with("moat_verdicts_total")).collect::<Vec<_>>().join("\n");
            }
            Ok(Some(format!("no DROPPED verdicts yet:\n{seen}")))
        })
        .await
    })
    .await;
}

#[tokio::test]
async fn rolling_restart_keeps_established_flows_and_denials() {
    require_kind!();
    run_test("rolling-restart", |ctx| async move {
        let ctx = &ctx;
        let ns = "restart";
        let w = workers(&ctx.client).await?;
        ctx.namespaces(&BTreeMap::from([(ns.to_string(), labels(&[]))])).await?;
        let server = PodSpec::echo(&format!("{ns}/server"), labels(&[("app", "server")]), &w[0]);
        let client = PodSpec::echo(&format!("{ns}/client"), labels(&[("app", "client")]), &w[1]);
        let intruder = PodSpec::echo(&format!("{ns}/intruder"), labels(&[("app", "intruder")]), &w[1]);
        let ips = ctx.start_pods(&[server, client, intruder]).await?;
        let server_ip = ips[&format!("{ns}/server")];
        let allow = Policy::from_yaml(&format!(
            "apiVersion: moat.dev/v1alpha1\nkind: MoatNetworkPolicy\nmetadata: {{name: only-client, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: 80}}]\n"
        ))
        .map_err(anyhow::Error::msg)?;
        ctx.apply_policy(&allow).await?;
        let target = &[("server".to_string(), server_ip)];
        eventually("policy in force", || async move {
            let c = ctx.probe_from(&format!("{ns}/client"), target, 80, Protocol::Tcp).await?;
            let i = ctx.probe_from(&format!("{ns}/intruder"), target, 80, Protocol::Tcp).await?;
            Ok((!c["server"] || i["server"]).then(|| format!("client {c:?}, intruder {i:?}")))
        })
        .await?;

        // One long-lived connection, a round trip every 200 ms, failing on the first miss.
        let client_key = format!("{ns}/client");
        let (cns, cname) = split(&client_key);
        let conn_script = format!(
            "exec 3<>/dev/tcp/{server_ip}/80 || exit 2; i=0; while true; do i=$((i+1)); printf 'ping%06d' $i >&3; r=$(timeout 2 head -c 10 <&3) || {{ echo FAIL $i; exit 1; }}; [ \"$r\" = \"$(printf 'ping%06d' $i)\" ] || {{ echo BAD $i $r; exit 1; }}; sleep 0.2; done"
        );
        let mut conn = tokio::process::Command::new("kubectl")
            .args(["--context", &moat_e2e_kind::context(), "-n", cns, "exec", cname, "--", "bash", "-c", &conn_script])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(conn.try_wait()?.is_none(), "the long-lived connection did not start");

        // Rolling restart, as `kubectl rollout restart` does it.
        let ds: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
            kube::Api::namespaced(ctx.client.clone(), moat_e2e_kind::AGENT_NAMESPACE);
        let stamp = format!("{:?}", std::time::SystemTime::now());
        ds.patch(
            moat_e2e_kind::AGENT_DAEMONSET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"moat.dev/restartedAt": stamp}}}}})),
        )
        .await?;
        // During the rollout: the intruder stays out, every second.
        let rollout = moat_e2e_kind::wait_daemonset(&ctx.client, Duration::from_secs(300));
        tokio::pin!(rollout);
        let mut intrusions = Vec::new();
        loop {
            tokio::select! {
                r = &mut rollout => { r?; break; }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let i = ctx.probe_from(&format!("{ns}/intruder"), target, 80, Protocol::Tcp).await?;
                    if i["server"] { intrusions.push(format!("{:?}", std::time::SystemTime::now())); }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status = conn.try_wait()?;
        let _ = conn.start_kill();
        let out = conn.wait_with_output().await?;
        ensure!(
            status.is_none(),
            "the established connection broke during the rolling restart: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        ensure!(intrusions.is_empty(), "the denied flow got through during the restart at {intrusions:?}");
        Ok(())
    })
    .await;
}
