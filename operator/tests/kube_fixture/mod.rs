//! A mocked API server for the kube-facing parts of the agent, in the style of kube-rs'
//! controller-rs fixtures: a `tower_test::mock::pair` stands in for the API server, and the
//! test scripts the exact requests it expects, in order, with the responses to give.
//!
//! Two shapes:
//! - [`Sequential`]: one client task (the status writer): every request is checked against the
//!   next expected one, globally in order.
//! - [`Routed`]: several watchers at once (the kube source): requests are routed by path to a
//!   script per resource, each checked in order; once a resource's script is exhausted its
//!   further requests are parked (left pending, like a watch with nothing to say).
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};

pub type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub type SendResponse = tower_test::mock::SendResponse<Response<Body>>;

/// A client talking to the mock, and the mock's handle.
pub fn mock_client() -> (Client, ApiServerHandle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// A request as the API server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, exactly as sent.
    pub uri: String,
    pub content_type: Option<String>,
    /// The body parsed as JSON (`Null` when empty).
    pub body: Value,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.uri)
    }
}

pub async fn record(req: Request<Body>) -> Recorded {
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {uri}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    Recorded {
        method,
        uri,
        content_type,
        body,
    }
}

/// What the mock answers.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A status code and a JSON body.
    Json(u16, Value),
    /// A watch response: these watch events, newline-delimited, then the end of the stream.
    Events(Vec<Value>),
    /// The request body echoed back (create/replace), with this status and a resourceVersion.
    Echo(u16, &'static str),
    /// Never answer (a watch with nothing to say).
    Park,
}

impl Reply {
    pub fn ok(v: Value) -> Reply {
        Reply::Json(200, v)
    }
    /// An API `Status` error.
    pub fn status(code: u16, reason: &str) -> Reply {
        Reply::Json(
            code,
            json!({
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": format!("mock: {reason}"), "reason": reason, "code": code,
            }),
        )
    }
    fn send(self, rec: &Recorded, send: SendResponse, parked: &mut Vec<SendResponse>) {
        let (code, bytes) = match self {
            Reply::Json(code, v) => (code, serde_json::to_vec(&v).unwrap()),
            Reply::Events(evs) => {
                let mut out = Vec::new();
                for e in evs {
                    out.extend(serde_json::to_vec(&e).unwrap());
                    out.push(b'\n');
                }
                (200, out)
            }
            Reply::Echo(code, rv) => {
                let mut v = rec.body.clone();
                v["metadata"]["resourceVersion"] = json!(rv);
                (code, serde_json::to_vec(&v).unwrap())
            }
            Reply::Park => {
                parked.push(send);
                return;
            }
        };
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .unwrap(),
        );
    }
}

/// One expected request: method and exact path+query, and the reply.
#[derive(Clone, Debug)]
pub struct Step {
    pub method: Method,
    pub uri: String,
    pub reply: Reply,
}

pub fn step(method: Method, uri: impl Into<String>, reply: Reply) -> Step {
    Step {
        method,
        uri: uri.into(),
        reply,
    }
}

/// A list response.
pub fn list(api_version: &str, kind: &str, rv: &str, items: Vec<Value>) -> Reply {
    Reply::ok(json!({
        "apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": rv}, "items": items,
    }))
}

pub fn watch_event(type_: &str, object: Value) -> Value {
    json!({"type": type_, "object": object})
}

/// The `410 Gone` a watch reports when its resourceVersion is too old.
pub fn gone() -> Value {
    watch_event(
        "ERROR",
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 100 (200)", "reason": "Expired", "code": 410,
        }),
    )
}

/// Requests checked one by one, globally in order.
pub struct Sequential {
    pub handle: ApiServerHandle,
    pub log: Vec<Recorded>,
    parked: Vec<SendResponse>,
}

impl Sequential {
    pub fn new(handle: ApiServerHandle) -> Self {
        Sequential {
            handle,
            log: Vec::new(),
            parked: Vec::new(),
        }
    }

    /// The next request must be `method uri`; answer it with `reply` and return it.
    pub async fn expect(&mut self, method: Method, uri: &str, reply: Reply) -> Recorded {
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.handle.next_request(),
        );
        let (req, send) = next
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {method} {uri}; so far: {:#?}",
                    self.lines()
                )
            })
            .unwrap_or_else(|| panic!("client gone before {method} {uri}"));
        let rec = record(req).await;
        assert_eq!(
            (rec.method.clone(), rec.uri.as_str()),
            (method.clone(), uri),
            "unexpected request; so far: {:#?}",
            self.lines()
        );
        reply.send(&rec, send, &mut self.parked);
        self.log.push(rec.clone());
        rec
    }

    /// No request arrives within `wait`.
    pub async fn expect_quiet(&mut self, wait: std::time::Duration) {
        if let Ok(Some((req, _))) = tokio::time::timeout(wait, self.handle.next_request()).await {
            let rec = record(req).await;
            panic!("expected no request, got {} {}", rec.line(), rec.body);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.iter().map(Recorded::line).collect()
    }
}

/// Requests routed by path to per-resource scripts, each checked in order.
pub struct Routed {
    scripts: BTreeMap<String, VecDeque<Step>>,
    /// Every request received, in arrival order.
    pub log: Vec<Recorded>,
    parked: Vec<SendResponse>,
}

impl Routed {
    pub fn new() -> Self {
        Routed {
            scripts: BTreeMap::new(),
            log: Vec::new(),
            parked: Vec::new(),
        }
    }

    /// The script of one collection path (e.g. `/api/v1/pods`).
    pub fn script(mut self, path: &str, steps: Vec<Step>) -> Self {
        self.scripts.insert(path.into(), steps.into());
        self
    }

    /// Serve until every script is exhausted, then keep parking (the returned task runs until
    /// the client goes away). `done` fires once all scripts are exhausted.
    pub fn serve(
        mut self,
        mut handle: ApiServerHandle,
        done: tokio::sync::oneshot::Sender<Vec<Recorded>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut done = Some(done);
            while let Some((req, send)) = handle.next_request().await {
                let rec = record(req).await;
                let path = rec.path().to_owned();
                let script = self
                    .scripts
                    .get_mut(&path)
                    .unwrap_or_else(|| panic!("request to an unscripted path: {}", rec.line()));
                match script.pop_front() {
                    Some(s) => {
                        assert_eq!(
                            (rec.method.clone(), rec.uri.as_str()),
                            (s.method.clone(), s.uri.as_str()),
                            "unexpected request for {path}"
                        );
                        s.reply.send(&rec, send, &mut self.parked);
                    }
                    None => {
                        // Exhausted: only watches may come again, and they get nothing.
                        assert!(
                            rec.uri.contains("watch=true"),
                            "unscripted request {}",
                            rec.line()
                        );
                        self.parked.push(send);
                    }
                }
                self.log.push(rec);
                if self.scripts.values().all(|s| s.is_empty())
                    && let Some(d) = done.take()
                {
                    let _ = d.send(self.log.clone());
                }
            }
        })
    }
}

impl Default for Routed {
    fn default() -> Self {
        Self::new()
    }
}
