//! The control plane's admin server: `/live`, `/ready`, `/metrics`, `/debug/nodes`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::nodes::Nodes;

/// What the admin pages read.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub nodes: Arc<Nodes>,
    pub ready: Arc<AtomicBool>,
}

/// Serves until `shutdown`; each connection is a tracked task with a header-read timeout.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tracker.spawn(
            async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
            .instrument(tracing::debug_span!("admin_conn")),
        );
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" if state.ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/ready" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: no mesh model published yet\n".into(),
        ),
        "/metrics" => {
            let mut out = String::with_capacity(16 * 1024);
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        "/debug/nodes" => {
            let body = serde_json::to_string_pretty(&state.nodes.list())
                .unwrap_or_else(|_| "[]".to_string());
            reply(StatusCode::OK, "application/json", body + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /metrics, /debug/nodes\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
