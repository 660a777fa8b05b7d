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
use crate::snapshot::{Endpoint, ListenerRt, ListenerRtKind, ServiceRt};
use crate::store::Store;

/// What one downstream connection needs to serve requests.
#[derive(Debug)]
pub struct ConnContext {
    pub store: Store,
    pub listener: Arc<str>,
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
            client_ip,
        }
    }
}

/// A response the proxy makes itself, with the reason in its body.
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: String) -> Self {
        Refusal { status, reason }
    }
}

/// Serves one request. Never fails: every problem becomes a response with a short reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let Some(listener) = ctx.store.load().listeners.get(&ctx.listener).cloned() else {
        let reason = format!("listener {} was removed\n", ctx.listener);
        return Ok(refusal(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            reason,
        )));
    };
    let response = match forward(&ctx, &listener, req, start).await {
        Ok(response) => response,
        Err(refused) => refusal(refused),
    };
    listener.metrics.count_status(response.status());
    Ok(response)
}

async fn forward(
    ctx: &ConnContext,
    listener: &ListenerRt,
    req: Request<Incoming>,
    start: Instant,
) -> Result<Response<ProxyBody>, Refusal> {
    let ListenerRtKind::Http { routes } = &listener.kind else {
        let reason = format!("listener {} is not http\n", ctx.listener);
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason));
    };
    let (parts, body) = req.into_parts();
    let Some(route) = route::find(routes, &parts) else {
        listener.metrics.no_route.inc();
        let host = route::request_host(&parts).unwrap_or("(none)");
        let reason = format!(
            "no route for host {host} path {} on listener {}\n",
            parts.uri.path(),
            ctx.listener
        );
        return Err(Refusal::new(StatusCode::NOT_FOUND, reason));
    };
    let mut rng = fastrand::Rng::new();
    let service = route.backends.pick(&mut rng);
    let Some(endpoint) = service.pick(&mut rng, start) else {
        service.metrics.no_endpoints.inc();
        let reason = format!("service {} has no endpoints\n", service.config.name);
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason));
    };
    let request = upstream_request(parts, body, service, endpoint, &ctx.client_ip)
        .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;

    let state = &endpoint.state;
    let in_flight = state.load.start();
    let (response, lease) = match state.pool.send(request).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(service = %service.config.name, endpoint = %state.label, error = %e, "upstream request failed");
            return Err(if e.is_connect() {
                state.load.record_failure(Instant::now());
                state.metrics.connect_failures.inc();
                let reason = format!(
                    "upstream service {} unavailable: {e}\n",
                    service.config.name
                );
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason)
            } else {
                state.metrics.resets.inc();
                let reason = format!(
                    "upstream service {} ({}) reset or closed the connection\n",
                    service.config.name, state.label
                );
                Refusal::new(StatusCode::BAD_GATEWAY, reason)
            });
        }
    };
    // Measured from `start`: routing and picking take well under a microsecond, so one clock
    // read serves both the EWMA and the histogram.
    let now = Instant::now();
    let elapsed = now - start;
    state.load.observe(elapsed, now);
    service.metrics.latency.observe(elapsed.as_secs_f64());
    state.metrics.count_status(response.status());

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

fn refusal(refused: Refusal) -> Response<ProxyBody> {
    let mut response = Response::new(full(refused.reason));
    *response.status_mut() = refused.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
