//! The status writer against a mocked API server, every request checked in order: the Lease
//! election (create, takeover after expiry measured locally, release), the recorded status
//! payloads (server-side apply: PATCH `…/status`, `application/apply-patch+yaml`,
//! `fieldManager=moat-agent`, `force=true`, the exact JSON body), no write when nothing
//! changed, `lastTransitionTime` kept while a condition holds, Events for invalid policies (once
//! per generation) and for overflows on this node (once per distinct message).
mod kube_fixture;

use std::{sync::Arc, time::Duration};

use http::Method;
use k8s_openapi::{api::networking::v1::NetworkPolicy, jiff::Timestamp};
use kube::runtime::{reflector, watcher};
use kube_fixture::*;
use moat::{
    agent::{
        kube_status::{self, StatusConfig},
        status::{AgentStatus, Overflow, PolicyReport},
    },
    api::{MoatClusterNetworkPolicy, MoatNetworkPolicy},
    model::{PolicyKind, PolicyRef},
    source::kube::PolicyStores,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const T0: &str = "2024-05-01T12:00:00Z";
const T1: &str = "2024-05-01T12:05:00Z";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/moat-system/leases/moat-status-writer";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/moat-system/leases?";

fn pref(kind: PolicyKind, ns: &str, name: &str) -> PolicyRef {
    PolicyRef {
        kind,
        namespace: ns.into(),
        name: name.into(),
    }
}

fn report(
    p: &PolicyRef,
    generation: i64,
    accepted: bool,
    message: &str,
    selected: usize,
) -> PolicyReport {
    PolicyReport {
        reference: p.to_string(),
        policy: p.clone(),
        generation: Some(generation),
        accepted,
        message: message.into(),
        selected_endpoints: selected,
    }
}

/// A clock the test moves.
fn clock(start: &str) -> (kube_status::Clock, Arc<std::sync::Mutex<Timestamp>>) {
    let now = Arc::new(std::sync::Mutex::new(start.parse::<Timestamp>().unwrap()));
    let n = now.clone();
    (Arc::new(move || *n.lock().unwrap()), now)
}

fn config(stores: Option<PolicyStores>, clock: kube_status::Clock) -> StatusConfig {
    let mut c = StatusConfig::new("moat-system");
    c.stores = stores;
    c.clock = clock;
    c.min_write_interval = Duration::ZERO;
    c.renew_every = Duration::from_secs(3600);
    c.resync_every = Duration::from_secs(7200);
    c
}

fn stores(mnps: Vec<Value>, nps: Vec<Value>) -> PolicyStores {
    let (np_r, mut np_w) = reflector::store::<NetworkPolicy>();
    let (mnp_r, mut mnp_w) = reflector::store::<MoatNetworkPolicy>();
    let (mcnp_r, mut mcnp_w) = reflector::store::<MoatClusterNetworkPolicy>();
    for v in nps {
        np_w.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(v).unwrap()));
    }
    for v in mnps {
        if v["kind"] == "MoatClusterNetworkPolicy" {
            mcnp_w.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(v).unwrap()));
        } else {
            mnp_w.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(v).unwrap()));
        }
    }
    PolicyStores {
        network_policies: np_r,
        moat_policies: mnp_r,
        moat_cluster_policies: mcnp_r,
    }
}

fn mnp(ns: &str, name: &str, uid: &str, status: Value) -> Value {
    json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy",
           "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "5"},
           "spec": {"podSelector": {}}, "status": status})
}

/// The status the compiler's PolicyOutcome::status gives, with transition times.
fn accepted_status(generation: i64, selected: i64, at: &str) -> Value {
    json!({
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Compiled",
             "message": "enforced as written", "observedGeneration": generation,
             "lastTransitionTime": at},
            {"type": "Invalid", "status": "False", "reason": "Compiled", "message": "",
             "observedGeneration": generation, "lastTransitionTime": at},
        ],
        "observedGeneration": generation,
        "selectedEndpoints": selected,
    })
}

fn invalid_status(generation: i64, message: &str, at: &str) -> Value {
    json!({
        "conditions": [
            {"type": "Accepted", "status": "False", "reason": "InvalidSpec", "message": message,
             "observedGeneration": generation, "lastTransitionTime": at},
            {"type": "Invalid", "status": "True", "reason": "InvalidSpec", "message": message,
             "observedGeneration": generation, "lastTransitionTime": at},
        ],
        "observedGeneration": generation,
        "selectedEndpoints": 0,
    })
}

/// What the API server answers a status apply with: the whole object.
fn patched(ns: &str, name: &str) -> Reply {
    if ns.is_empty() {
        Reply::ok(
            json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatClusterNetworkPolicy",
                         "metadata": {"name": name, "resourceVersion": "20"}, "spec": {}}),
        )
    } else {
        Reply::ok(mnp(ns, name, "uid", json!({})))
    }
}

fn apply_uri(path: &str) -> String {
    format!("{path}/status?&force=true&fieldManager=moat-agent")
}

fn assert_apply(rec: &Recorded, kind: &str, status: Value) {
    assert_eq!(
        rec.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "{}",
        rec.line()
    );
    assert_eq!(
        rec.body,
        json!({"apiVersion": "moat.dev/v1alpha1", "kind": kind, "status": status}),
        "exact apply body of {}",
        rec.line()
    );
}

fn assert_event(rec: &Recorded, reason: &str, regarding: Value, note_has: &[&str]) {
    let b = &rec.body;
    assert_eq!(b["reason"], reason, "{b}");
    assert_eq!(b["type"], "Warning");
    assert_eq!(b["reportingController"], "moat-agent");
    assert_eq!(b["reportingInstance"], "node-1");
    assert_eq!(b["regarding"], regarding, "{b}");
    let note = b["note"].as_str().unwrap();
    for want in note_has {
        assert!(note.contains(want), "{want:?} missing from note {note:?}");
    }
}

fn lease_body(holder: &str, rv: &str, renew: &str, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "moat-status-writer", "namespace": "moat-system", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "acquireTime": renew,
                    "renewTime": renew, "leaseTransitions": transitions}})
}

#[tokio::test]
async fn leader_writes_exact_status_patches_and_events_and_nothing_twice() {
    let (client, handle) = mock_client();
    let mut api = Sequential::new(handle);

    let web = pref(PolicyKind::MoatNetworkPolicy, "x", "web");
    let same = pref(PolicyKind::MoatNetworkPolicy, "x", "same");
    let big = pref(PolicyKind::MoatNetworkPolicy, "x", "big");
    let bad = pref(PolicyKind::MoatClusterNetworkPolicy, "", "bad");
    let np = pref(PolicyKind::NetworkPolicy, "x", "np");
    let overflow_msg = "not enforced: map policy would need 70000 entries, capacity 65536 (over capacity with this policy added); shrink this policy";
    let status = AgentStatus {
        node: "node-1".into(),
        policies: vec![
            report(&web, 2, true, "", 3),
            report(&same, 1, true, "", 0),
            report(&big, 1, false, overflow_msg, 0),
            report(
                &bad,
                1,
                false,
                "egress rule 1: http is not allowed on a Deny rule",
                0,
            ),
            report(
                &np,
                4,
                false,
                "ingress rule 1 port 1: endPort 70000 is above 65535",
                0,
            ),
        ],
        overflows: vec![Overflow {
            reference: big.to_string(),
            policy: big.clone(),
            message: overflow_msg.into(),
        }],
        ..AgentStatus::default()
    };
    // x/same already shows exactly what would be written: no patch for it.
    let st = stores(
        vec![
            mnp("x", "web", "uid-web", json!({})),
            mnp(
                "x",
                "same",
                "uid-same",
                accepted_status(1, 0, "2024-01-01T00:00:00Z"),
            ),
            mnp("x", "big", "uid-big", json!({})),
            json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatClusterNetworkPolicy",
                   "metadata": {"name": "bad", "uid": "uid-bad", "resourceVersion": "5"}, "spec": {}}),
        ],
        vec![
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "np", "namespace": "x", "uid": "uid-np"},
                    "spec": {"podSelector": {}}}),
        ],
    );
    let (clk, now) = clock(T0);
    let (tx, rx) = watch::channel(Arc::new(status.clone()));
    let task = tokio::spawn(kube_status::run(
        client,
        "node-1".into(),
        rx,
        config(Some(st), clk),
    ));

    // Election: no Lease yet, so create one naming this node.
    api.expect(Method::GET, LEASE, Reply::status(404, "NotFound"))
        .await;
    let created = api
        .expect(Method::POST, LEASES, Reply::Echo(201, "1"))
        .await;
    assert_eq!(created.body["spec"]["holderIdentity"], "node-1");
    assert_eq!(created.body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created.body["spec"]["leaseTransitions"], 0);
    assert_eq!(
        created.body["spec"]["renewTime"],
        "2024-05-01T12:00:00.000000Z"
    );

    // The overflow on this node: an Event naming the node (every agent does this).
    let ev = api
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/x/events?",
            Reply::Echo(201, "2"),
        )
        .await;
    assert_event(
        &ev,
        "PolicyOverflow",
        json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy", "name": "big",
               "namespace": "x", "uid": "uid-big"}),
        &["node node-1", "capacity 65536"],
    );

    // Policies in order: NetworkPolicy (no status in v1: an Event only), then the moat kinds.
    let ev = api
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/x/events?",
            Reply::Echo(201, "3"),
        )
        .await;
    assert_event(
        &ev,
        "InvalidPolicy",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "name": "np",
               "namespace": "x", "uid": "uid-np"}),
        &["endPort 70000"],
    );
    // x/big overflows on this node but is valid: its status says so (node-independent).
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/namespaces/x/moatnetworkpolicies/big"),
            patched("x", "big"),
        )
        .await;
    assert_apply(&p, "MoatNetworkPolicy", accepted_status(1, 0, T0));
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/namespaces/x/moatnetworkpolicies/web"),
            patched("x", "web"),
        )
        .await;
    assert_apply(&p, "MoatNetworkPolicy", accepted_status(2, 3, T0));
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/moatclusternetworkpolicies/bad"),
            patched("", "bad"),
        )
        .await;
    assert_apply(
        &p,
        "MoatClusterNetworkPolicy",
        invalid_status(1, "egress rule 1: http is not allowed on a Deny rule", T0),
    );
    // Cluster-scoped objects' Events go to `default`.
    let ev = api
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/default/events?",
            Reply::Echo(201, "4"),
        )
        .await;
    assert_event(
        &ev,
        "InvalidPolicy",
        json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatClusterNetworkPolicy", "name": "bad",
               "uid": "uid-bad"}),
        &["http is not allowed on a Deny rule"],
    );
    api.expect_quiet(Duration::from_millis(300)).await;

    // The reconciler publishes again (new revision), policies unchanged: no request at all.
    *now.lock().unwrap() = T1.parse().unwrap();
    tx.send(Arc::new(AgentStatus {
        revision: 7,
        ..status.clone()
    }))
    .unwrap();
    api.expect_quiet(Duration::from_millis(300)).await;

    // x/web at a new generation, still accepted: one patch; the conditions did not change
    // status, so lastTransitionTime stays T0. x/bad at a new generation: a new Event — the
    // Recorder folds a repeat of the same reason on the same object into a series (PATCH).
    let mut next = status.clone();
    next.policies[0] = report(&web, 3, true, "", 4);
    next.policies[3] = report(
        &bad,
        2,
        false,
        "egress rule 1: http is not allowed on a Deny rule",
        0,
    );
    tx.send(Arc::new(next)).unwrap();
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/namespaces/x/moatnetworkpolicies/web"),
            patched("x", "web"),
        )
        .await;
    assert_apply(&p, "MoatNetworkPolicy", accepted_status(3, 4, T0));
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/moatclusternetworkpolicies/bad"),
            patched("", "bad"),
        )
        .await;
    assert_apply(
        &p,
        "MoatClusterNetworkPolicy",
        invalid_status(2, "egress rule 1: http is not allowed on a Deny rule", T0),
    );
    let ev_name = ev.body["metadata"]["name"].as_str().unwrap().to_owned();
    let series = api
        .expect(
            Method::PATCH,
            &format!("/apis/events.k8s.io/v1/namespaces/default/events/{ev_name}?"),
            Reply::ok(json!({})),
        )
        .await;
    assert_eq!(series.body["series"]["count"], 2);
    api.expect_quiet(Duration::from_millis(300)).await;

    // x/web becomes invalid: both conditions flip, so their transition time is now (T1).
    let mut next2 = AgentStatus {
        revision: 9,
        ..status.clone()
    };
    next2.policies[0] = report(&web, 4, false, "ingress rule 2: unknown entity", 0);
    next2.policies[3] = report(
        &bad,
        2,
        false,
        "egress rule 1: http is not allowed on a Deny rule",
        0,
    );
    tx.send(Arc::new(next2)).unwrap();
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/namespaces/x/moatnetworkpolicies/web"),
            patched("x", "web"),
        )
        .await;
    assert_apply(
        &p,
        "MoatNetworkPolicy",
        invalid_status(4, "ingress rule 2: unknown entity", T1),
    );
    let ev = api
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/x/events?",
            Reply::Echo(201, "6"),
        )
        .await;
    assert_event(
        &ev,
        "InvalidPolicy",
        json!({"apiVersion": "moat.dev/v1alpha1", "kind": "MoatNetworkPolicy", "name": "web",
               "namespace": "x", "uid": "uid-web"}),
        &["unknown entity"],
    );
    api.expect_quiet(Duration::from_millis(300)).await;

    // The reconciler is gone: the writer releases the Lease (empty holder) and stops.
    drop(tx);
    api.expect(
        Method::GET,
        LEASE,
        Reply::ok(lease_body("node-1", "9", "2024-05-01T12:00:00Z", 0)),
    )
    .await;
    let released = api
        .expect(Method::PUT, &format!("{LEASE}?"), Reply::Echo(200, "10"))
        .await;
    assert!(
        released.body["spec"].get("holderIdentity").is_none(),
        "{}",
        released.body
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn follower_writes_nothing_then_takes_over_an_expired_lease() {
    let (client, handle) = mock_client();
    let mut api = Sequential::new(handle);
    let bad = pref(PolicyKind::MoatClusterNetworkPolicy, "", "bad");
    let status = AgentStatus {
        node: "node-1".into(),
        policies: vec![report(&bad, 1, false, "bad cidr", 0)],
        ..AgentStatus::default()
    };
    let (clk, _now) = clock(T0);
    let mut cfg = config(None, clk);
    cfg.lease_duration = Duration::from_secs(15);
    cfg.renew_every = Duration::from_secs(5);
    let (tx, rx) = watch::channel(Arc::new(status));
    let task = tokio::spawn(kube_status::run(client, "node-1".into(), rx, cfg));
    let t0 = tokio::time::Instant::now();
    // node-2 holds it and its resourceVersion never moves: node-2 is gone. This agent waits a
    // full lease duration on its own clock (4 looks, 5 s apart: 0, 5, 10, 15 s), writing nothing.
    for _ in 0..3 {
        api.expect(
            Method::GET,
            LEASE,
            Reply::ok(lease_body("node-2", "7", "2020-01-01T00:00:00Z", 3)),
        )
        .await;
    }
    let put_uri = format!("{LEASE}?");
    api.expect(
        Method::GET,
        LEASE,
        Reply::ok(lease_body("node-2", "7", "2020-01-01T00:00:00Z", 3)),
    )
    .await;
    let took = api
        .expect(Method::PUT, &put_uri, Reply::Echo(200, "8"))
        .await;
    assert!(t0.elapsed() >= Duration::from_secs(15));
    assert_eq!(took.body["spec"]["holderIdentity"], "node-1");
    assert_eq!(took.body["spec"]["leaseTransitions"], 4);
    assert_eq!(
        took.body["spec"]["acquireTime"],
        "2024-05-01T12:00:00.000000Z"
    );
    assert_eq!(
        took.body["metadata"]["resourceVersion"], "7",
        "replace is conditional on what was read"
    );
    // Now the leader: the status and the Event.
    let p = api
        .expect(
            Method::PATCH,
            &apply_uri("/apis/moat.dev/v1alpha1/moatclusternetworkpolicies/bad"),
            patched("", "bad"),
        )
        .await;
    assert_apply(
        &p,
        "MoatClusterNetworkPolicy",
        invalid_status(1, "bad cidr", T0),
    );
    api.expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/default/events?",
        Reply::Echo(201, "2"),
    )
    .await;
    // Renewal 5 s later; another agent renewed first (409): no longer leader, nothing written.
    api.expect(
        Method::GET,
        LEASE,
        Reply::ok(lease_body("node-1", "8", T0, 4)),
    )
    .await;
    api.expect(Method::PUT, &put_uri, Reply::status(409, "Conflict"))
        .await;
    tx.send(Arc::new(AgentStatus {
        node: "node-1".into(),
        policies: vec![report(&bad, 2, false, "still a bad cidr", 0)],
        ..AgentStatus::default()
    }))
    .unwrap();
    // Next look at the Lease: node-3 holds it now.
    api.expect(
        Method::GET,
        LEASE,
        Reply::ok(lease_body("node-3", "9", T0, 5)),
    )
    .await;
    drop(tx);
    // Not the leader: nothing to release.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    api.expect_quiet(Duration::from_millis(100)).await;
}
