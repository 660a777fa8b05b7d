//! A fake Kubernetes API server on 127.0.0.1:0 for the Kubernetes source's tests.
//!
//! It answers the requests kube's watcher makes for Services, EndpointSlices and Pods the way
//! the real API server does (selectors are recorded, not applied): lists carry `metadata.resourceVersion`; a watch from version `R`
//! replays the stored events newer than `R`, then streams new ones as chunked,
//! newline-delimited JSON; a watch from a version older than the compacted history gets an
//! `ERROR` event with a 410 `Expired` Status. One revision counter is shared by all kinds,
//! as in etcd. Every request is logged to stderr and recorded for assertions.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Every wait in these tests gives up after this long.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Services,
    EndpointSlices,
    Pods,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub kind: Option<Kind>,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

type Body = BoxBody<Bytes, Infallible>;

struct Shared {
    state: Mutex<State>,
    /// Every request so far, in arrival order; a watch channel so tests can wait on it.
    log: watch::Sender<Vec<Recorded>>,
    /// Kinds whose list requests are held until released.
    held: watch::Sender<Vec<Kind>>,
}

#[derive(Default)]
struct State {
    revision: u64,
    services: Store,
    slices: Store,
    pods: Store,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<(String, String), Value>,
    /// (revision, event line) of every announced change, oldest first.
    history: Vec<(u64, Bytes)>,
    /// Watches from a revision below this get 410 Gone: their events are no longer kept.
    compacted: u64,
    watchers: Vec<Watcher>,
}

struct Watcher {
    events: mpsc::UnboundedSender<Bytes>,
    bookmarks: bool,
}

impl Kind {
    fn of_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlices),
            "/api/v1/pods" => Some(Kind::Pods),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Services | Kind::Pods => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::Pods => "Pod",
        }
    }
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    pub fn is_list(&self, kind: Kind) -> bool {
        self.kind == Some(kind) && !self.is_watch()
    }

    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.kind == Some(kind) && self.is_watch()
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }
}

impl FakeApiServer {
    pub async fn start() -> anyhow::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            log: watch::Sender::new(Vec::new()),
            held: watch::Sender::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeApiServer {
            addr,
            shared,
            accept,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces `object` (keyed by namespace and name) and announces it to
    /// watchers; returns its new resourceVersion.
    pub fn apply(&self, kind: Kind, object: Value) -> u64 {
        let mut state = self.shared.lock();
        let (revision, store) = state.next_revision(kind);
        let (key, object) = stamp(object, revision);
        let event = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        store.announce(revision, event_line(event, kind, object));
        revision
    }

    /// Deletes an object and announces it; returns the revision of the deletion.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> anyhow::Result<u64> {
        let mut state = self.shared.lock();
        let (revision, store) = state.next_revision(kind);
        let key = (namespace.to_string(), name.to_string());
        let object = store
            .objects
            .remove(&key)
            .with_context(|| format!("no {kind:?} {namespace}/{name} to delete"))?;
        let (_, object) = stamp(object, revision);
        store.announce(revision, event_line("DELETED", kind, object));
        Ok(revision)
    }

    /// Changes an object while losing its event to compaction, as when a client has been
    /// away longer than the API server keeps history: a later watch from any earlier version
    /// gets 410 Gone, and only a new list shows the change.
    pub fn apply_compacted(&self, kind: Kind, object: Value) -> u64 {
        let mut state = self.shared.lock();
        let (revision, store) = state.next_revision(kind);
        let (key, object) = stamp(object, revision);
        store.objects.insert(key, object);
        store.history.clear();
        store.compacted = revision;
        revision
    }

    /// Sends a BOOKMARK at the current revision to the watches of `kind` that asked for
    /// bookmarks; returns that revision and how many watches got it.
    pub fn bookmark(&self, kind: Kind) -> (u64, usize) {
        let mut state = self.shared.lock();
        let revision = state.revision;
        let line = line(&json!({
            "type": "BOOKMARK",
            "object": {
                "apiVersion": kind.api_version(),
                "kind": kind.kind(),
                "metadata": { "resourceVersion": revision.to_string() },
            },
        }));
        let store = state.store(kind);
        store
            .watchers
            .retain(|w| !w.bookmarks || w.events.send(line.clone()).is_ok());
        let sent = store.watchers.iter().filter(|w| w.bookmarks).count();
        (revision, sent)
    }

    /// Ends every open watch of `kind` cleanly (the final chunk), as the API server does
    /// when a watch's timeout runs out; returns how many there were.
    pub fn close_watches(&self, kind: Kind) -> usize {
        let mut state = self.shared.lock();
        std::mem::take(&mut state.store(kind).watchers).len()
    }

    /// Makes list requests for `kind` wait until [`FakeApiServer::release_lists`].
    pub fn hold_lists(&self, kind: Kind) {
        self.shared.held.send_modify(|held| held.push(kind));
    }

    pub fn release_lists(&self, kind: Kind) {
        self.shared
            .held
            .send_modify(|held| held.retain(|k| *k != kind));
    }

    /// All requests so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.borrow().clone()
    }

    /// Waits for a request, at index `since` or later, that satisfies `matches`.
    pub async fn wait_for_request(
        &self,
        since: usize,
        what: &str,
        matches: impl Fn(&Recorded) -> bool,
    ) -> anyhow::Result<Recorded> {
        let mut log = self.shared.log.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            log.wait_for(|log| log.iter().skip(since).any(&matches))
                .await
                .map(|log| log.iter().skip(since).find(|r| matches(r)).cloned())
        })
        .await;
        match found {
            Ok(Ok(Some(request))) => Ok(request),
            _ => bail!(
                "no request for {what} within {WAIT:?}; requests: {:#?}",
                self.requests()
            ),
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, request: Recorded) {
        self.log.send_modify(|log| log.push(request));
    }
}

impl State {
    fn store(&mut self, kind: Kind) -> &mut Store {
        match kind {
            Kind::Services => &mut self.services,
            Kind::EndpointSlices => &mut self.slices,
            Kind::Pods => &mut self.pods,
        }
    }

    fn next_revision(&mut self, kind: Kind) -> (u64, &mut Store) {
        self.revision += 1;
        let revision = self.revision;
        (revision, self.store(kind))
    }
}

impl Store {
    fn announce(&mut self, revision: u64, line: Bytes) {
        self.history.push((revision, line.clone()));
        self.watchers
            .retain(|w| w.events.send(line.clone()).is_ok());
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            // A client going away mid-watch is normal here.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    eprintln!("fake-apiserver: {} {}", request.method(), request.uri());
    let recorded = Recorded {
        kind: Kind::of_path(&path),
        path,
        query,
    };
    let Some(kind) = recorded.kind else {
        shared.record(recorded);
        return status(StatusCode::NOT_FOUND, "NotFound", "no such resource");
    };
    if recorded.is_watch() {
        watch(shared, kind, recorded)
    } else {
        list(shared, kind, recorded).await
    }
}

async fn list(shared: &Shared, kind: Kind, recorded: Recorded) -> Response<Body> {
    shared.record(recorded);
    let mut held = shared.held.subscribe();
    // The sender lives in `shared`, so this only ends by release.
    let _ = held.wait_for(|held| !held.contains(&kind)).await;
    let mut state = shared.lock();
    let revision = state.revision;
    let items: Vec<Value> = state
        .store(kind)
        .objects
        .values()
        .map(|object| {
            // Like the real server, list items carry no apiVersion/kind.
            let mut object = object.clone();
            if let Some(fields) = object.as_object_mut() {
                fields.remove("apiVersion");
                fields.remove("kind");
            }
            object
        })
        .collect();
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind()),
        "metadata": { "resourceVersion": revision.to_string() },
        "items": items,
    });
    eprintln!("fake-apiserver:   -> {} items at {revision}", items.len());
    json_response(StatusCode::OK, &body)
}

fn watch(shared: &Shared, kind: Kind, recorded: Recorded) -> Response<Body> {
    let from: u64 = recorded
        .resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = recorded
        .query
        .get("allowWatchBookmarks")
        .map(String::as_str)
        == Some("true");
    let (events, rx) = mpsc::unbounded_channel();
    {
        let mut state = shared.lock();
        let store = state.store(kind);
        if from < store.compacted {
            let gone = json!({
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", store.compacted),
                    "reason": "Expired",
                    "code": 410,
                },
            });
            eprintln!(
                "fake-apiserver:   -> ERROR 410 Expired (compacted at {})",
                store.compacted
            );
            // Ignored: the receiver is right here.
            let _ = events.send(line(&gone));
        } else {
            let replay: Vec<Bytes> = store
                .history
                .iter()
                .filter(|(revision, _)| *revision > from)
                .map(|(_, line)| line.clone())
                .collect();
            eprintln!(
                "fake-apiserver:   -> watching, replaying {} events",
                replay.len()
            );
            for line in replay {
                let _ = events.send(line);
            }
            store.watchers.push(Watcher { events, bookmarks });
        }
        // Recorded only now, so a test that saw this request knows the watch is live.
        shared.record(recorded);
    }
    let body = StreamBody::new(UnboundedReceiverStream::new(rx).map(|line| Ok(Frame::data(line))));
    let mut response = Response::new(BodyExt::boxed(body));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Sets `metadata.resourceVersion`; returns the object's (namespace, name) key too.
fn stamp(mut object: Value, revision: u64) -> ((String, String), Value) {
    object["metadata"]["resourceVersion"] = json!(revision.to_string());
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    ((text("namespace"), text("name")), object)
}

fn event_line(event: &str, kind: Kind, mut object: Value) -> Bytes {
    // Watch events, unlike list items, carry apiVersion and kind.
    object["apiVersion"] = json!(kind.api_version());
    object["kind"] = json!(kind.kind());
    line(&json!({ "type": event, "object": object }))
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}
