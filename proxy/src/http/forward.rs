//! The request path: route (pure), pick a backend and an endpoint, forward, stream back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{ProxyBody, Tracked, full};
use super::headers::{add_forwarding, strip_hop_by_hop};
use super::route;
use crate::config::UpstreamProtocol;
use crate::snapshot::{Endpoint, ListenerRtKind, ServiceRt};
use crate::store::Store;

/// What one downstream connection needs to serve requests.
#[derive(Debug)]
pub struct ConnContext {
    pub store: Store,
    pub listener: Arc<str>,
    pub client: SocketAddr,
    /// The client's IP, formatted once per connection for `x-forwarded-for`.
    pub client_ip: HeaderValue,
}

impl ConnContext {
    pub fn new(store: Store, listener: Arc<str>, client: SocketAddr) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnContext {
            store,
            listener,
            client,
            client_ip,
        }
    }
}

/// Serves one request. Never fails: every problem becomes a response with a short reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();

    // Decide under the snapshot guard, then drop it before any await.
    let decision = {
        let snapshot = ctx.store.load();
        let Some(listener) = snapshot.listeners.get(&ctx.listener).cloned() else {
            return Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("listener {} was removed\n", ctx.listener),
            ));
        };
        let ListenerRtKind::Http { routes } = &listener.kind else {
            return Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("listener {} is not http\n", ctx.listener),
            ));
        };
        match route::find(routes, &parts) {
            None => Err(listener),
            Some(r) => {
                let mut rng = fastrand::Rng::new();
                let service = Arc::clone(r.backends.pick(&mut rng));
                let endpoint = service.pick(&mut rng, start).cloned();
                Ok((listener, service, endpoint))
            }
        }
    };
    let (listener, service, endpoint) = match decision {
        Ok(d) => d,
        Err(listener) => {
            listener.metrics.no_route.inc();
            let host = route::request_host(&parts).unwrap_or("(none)");
            let msg = format!(
                "no route for host {host} path {} on listener {}\n",
                parts.uri.path(),
                ctx.listener
            );
            listener.metrics.count_status(StatusCode::NOT_FOUND);
            return Ok(error(StatusCode::NOT_FOUND, msg));
        }
    };
    let Some(endpoint) = endpoint else {
        service.metrics.no_endpoints.inc();
        listener
            .metrics
            .count_status(StatusCode::SERVICE_UNAVAILABLE);
        let msg = format!("service {} has no endpoints\n", service.config.name);
        return Ok(error(StatusCode::SERVICE_UNAVAILABLE, msg));
    };

    let request = match upstream_request(parts, body, &service, &endpoint, &ctx.client_ip) {
        Ok(r) => r,
        Err(reason) => {
            listener.metrics.count_status(StatusCode::BAD_REQUEST);
            return Ok(error(StatusCode::BAD_REQUEST, reason));
        }
    };

    let state = &endpoint.state;
    let in_flight = state.load.start();
    let sent = Instant::now();
    let (response, lease) = match state.pool.send(request).await {
        Ok(r) => r,
        Err(e) => {
            let (status, msg) = if e.is_connect() {
                state.load.record_failure(Instant::now());
                state.metrics.connect_failures.inc();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "upstream service {} unavailable: {e}\n",
                        service.config.name
                    ),
                )
            } else {
                state.metrics.resets.inc();
                let msg = format!(
                    "upstream service {} ({}) reset or closed the connection\n",
                    service.config.name, state.label
                );
                (StatusCode::BAD_GATEWAY, msg)
            };
            tracing::debug!(service = %service.config.name, endpoint = %state.label, error = %e, "upstream request failed");
            listener.metrics.count_status(status);
            return Ok(error(status, msg));
        }
    };
    let now = Instant::now();
    state.load.observe(now - sent, now);
    service.metrics.latency.observe((now - sent).as_secs_f64());
    state.metrics.count_status(response.status());
    listener.metrics.count_status(response.status());

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Tracked::new(
        body,
        lease,
        in_flight,
        listener.metrics.duration.clone(),
        start,
    );
    Ok(Response::from_parts(parts, Either::Left(body)))
}

/// Rewrites a downstream request for the chosen endpoint's protocol: HTTP/1.1 upstreams get
/// origin-form targets and `Host`; HTTP/2 upstreams get absolute URIs (`:authority`).
fn upstream_request(
    mut parts: http::request::Parts,
    body: Incoming,
    service: &ServiceRt,
    endpoint: &Endpoint,
    client_ip: &HeaderValue,
) -> Result<Request<Incoming>, String> {
    strip_hop_by_hop(&mut parts.headers);
    add_forwarding(&mut parts.headers, client_ip);
    match service.config.protocol {
        UpstreamProtocol::Http2 => {
            let authority = match parts.uri.authority() {
                Some(a) => a.clone(),
                None => match parts.headers.get(header::HOST) {
                    Some(h) => Authority::try_from(h.as_bytes())
                        .map_err(|_| "invalid Host header\n".to_string())?,
                    None => Authority::try_from(endpoint.state.label.as_str())
                        .map_err(|_| "invalid endpoint address\n".to_string())?,
                },
            };
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(authority);
            uri.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            parts.uri =
                Uri::from_parts(uri).map_err(|e| format!("invalid request target: {e}\n"))?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
        _ => {
            if let Some(authority) = parts.uri.authority() {
                // From HTTP/2 (or absolute-form): the authority becomes `Host`.
                if !parts.headers.contains_key(header::HOST)
                    && let Ok(host) = HeaderValue::from_str(authority.as_str())
                {
                    parts.headers.insert(header::HOST, host);
                }
                let path = parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                parts.uri = Uri::from(path);
            } else if !parts.headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&endpoint.state.label)
            {
                parts.headers.insert(header::HOST, host);
            }
            parts.version = Version::HTTP_11;
        }
    }
    Ok(Request::from_parts(parts, body))
}

fn error(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
