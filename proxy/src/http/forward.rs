//! The request path: route (pure), pick a backend and an endpoint, forward, stream back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{ProxyBody, Tracked, full};
use super::headers::{add_forwarding, strip_hop_by_hop};
use super::pool::UpstreamBody;
use super::route;
use crate::config::UpstreamProtocol;
use crate::overload::MemoryGuard;
use crate::resilience::breaker::{Limit, Permit};
use crate::resilience::outlier::Observation;
use crate::resilience::retry::{Attempt, RetryPolicy, backoff, retry_reason};
use crate::snapshot::{Endpoint, ListenerRt, ListenerRtKind, RouteRt, ServiceRt};
use crate::store::Store;

/// What one downstream connection needs to serve requests.
#[derive(Debug)]
pub struct ConnContext {
    pub store: Store,
    pub listener: Arc<str>,
    /// The client's IP, formatted once per connection for `x-forwarded-for`.
    pub client_ip: HeaderValue,
    pub memory: Arc<MemoryGuard>,
}

impl ConnContext {
    pub fn new(
        store: Store,
        listener: Arc<str>,
        client: SocketAddr,
        memory: Arc<MemoryGuard>,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnContext {
            store,
            listener,
            client_ip,
            memory,
        }
    }
}

/// A response the proxy makes itself, with the reason in its body.
struct Refusal {
    status: StatusCode,
    reason: String,
    /// A circuit breaker or the memory guard said no: the answer carries
    /// `x-tern-overloaded: true`.
    overloaded: bool,
}

impl Refusal {
    fn new(status: StatusCode, reason: String) -> Self {
        Refusal {
            status,
            reason,
            overloaded: false,
        }
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
    // Shed before anything is read or allocated for the request: the point is to stop growing.
    if ctx.memory.is_overloaded() {
        listener.metrics.shed_requests.inc();
        let mut shed = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is near its memory limit; try again shortly\n".into(),
        );
        shed.overloaded = true;
        let response = refusal(shed);
        listener.metrics.count_status(response.status());
        return Ok(response);
    }
    let response = match forward(&ctx, &listener, req, start).await {
        Ok(response) => response,
        Err(refused) => refusal(refused),
    };
    listener.metrics.count_status(response.status());
    Ok(response)
}

/// Request bodies up to this size are kept so that a retry can send them again; larger or
/// unknown-length (streaming) bodies are sent once and never retried.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// The request body as the attempts see it.
enum RequestBody {
    /// Streamed from the client: one attempt can have it.
    Stream(Option<Incoming>),
    /// Read whole (small, known size): every attempt gets a copy.
    Replay(Bytes),
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
    // `max_requests`: the slot is held until the response body ends.
    let permit = service
        .shared
        .breaker
        .try_acquire(Limit::Requests, service.config.circuit_breaker.max_requests)
        .map_err(|limit| overloaded(service, limit))?;
    let deadline = route.config.timeout.map(|t| start + t);
    let policy = route.config.retry.as_ref();
    if let Some(budget) = &route.budget {
        budget.deposit(start);
    }
    let mut body = match policy {
        Some(_) if replayable(&body) => {
            let limited = http_body_util::Limited::new(body, REPLAY_LIMIT as usize);
            let collected = match deadline {
                Some(at) => tokio::time::timeout_at(at, limited.collect())
                    .await
                    .map_err(|_| request_timeout(service, route))?,
                None => limited.collect().await,
            };
            let bytes = collected
                .map_err(|e| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}\n"),
                    )
                })?
                .to_bytes();
            RequestBody::Replay(bytes)
        }
        _ => RequestBody::Stream(Some(body)),
    };
    let method = parts.method.clone();
    let mut template = Some(parts);
    let mut tried: Vec<usize> = Vec::new();
    let mut retrier = Retrier {
        policy,
        retries: 0,
        slot: None,
    };
    loop {
        let attempt_start = Instant::now();
        let Some((index, endpoint)) = service.pick_avoiding(&mut rng, attempt_start, &tried) else {
            service.metrics.no_endpoints.inc();
            let reason = format!("service {} has no endpoints\n", service.config.name);
            return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason));
        };
        // Only a retry reads it: without a policy, no allocation per request.
        if policy.is_some() {
            tried.push(index);
        }
        let (parts, upstream_body) = match &mut body {
            RequestBody::Replay(bytes) => {
                let parts = match &template {
                    Some(t) => clone_parts(t),
                    None => return Err(internal("request template missing")),
                };
                (parts, Either::Right(Full::new(bytes.clone())))
            }
            RequestBody::Stream(b) => match (template.take(), b.take()) {
                (Some(parts), Some(b)) => (parts, Either::Left(b)),
                _ => return Err(internal("streamed request body already sent")),
            },
        };
        let request = upstream_request(parts, upstream_body, service, endpoint, &ctx.client_ip)
            .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;

        let state = &endpoint.state;
        let in_flight = state.load.start();
        let per_try = policy
            .and_then(|p| p.per_try_timeout)
            .map(|t| attempt_start + t);
        let limit = match (deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sent = match limit {
            Some(at) => tokio::time::timeout_at(at, state.pool.send(request)).await,
            None => Ok(state.pool.send(request).await),
        };
        let (reason, delay) = match sent {
            Ok(Ok((response, lease))) => {
                // One clock read serves the EWMA, the histogram and outlier detection.
                let now = Instant::now();
                let elapsed = now - attempt_start;
                state.load.observe(elapsed, now);
                service.metrics.latency.observe(elapsed.as_secs_f64());
                state.metrics.count_status(response.status());
                let status = response.status().as_u16();
                service.observe(
                    endpoint,
                    if status >= 500 {
                        Observation::Status(status)
                    } else {
                        Observation::Success
                    },
                    now,
                );
                let attempt = Attempt::Response {
                    status,
                    grpc_status: grpc_status(&response),
                };
                let retry = policy
                    .and_then(|p| retry_reason(p, &method, attempt))
                    .and_then(|reason| {
                        retrier
                            .allow(service, route, &body, deadline, &mut rng)
                            .map(|delay| (reason, delay))
                    });
                match retry {
                    Some(planned) => {
                        // This answer is dropped unread; its connection is not reused.
                        drop(response);
                        drop(lease);
                        planned
                    }
                    None => {
                        let (mut parts, body) = response.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        let body = Tracked::new(
                            body,
                            lease,
                            in_flight,
                            Some(permit),
                            listener.metrics.duration.clone(),
                            start,
                        );
                        return Ok(Response::from_parts(parts, Either::Left(body)));
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(service = %service.config.name, endpoint = %state.label, error = %e, "upstream request failed");
                if let Some(limit) = e.overloaded() {
                    return Err(overloaded(service, limit));
                }
                let now = Instant::now();
                let (attempt, refusal) = if e.is_connect() {
                    state.load.record_failure(now);
                    state.metrics.connect_failures.inc();
                    service.observe(endpoint, Observation::ConnectFailure, now);
                    let reason = format!(
                        "upstream service {} unavailable: {e}\n",
                        service.config.name
                    );
                    (
                        Attempt::ConnectFailure,
                        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason),
                    )
                } else {
                    state.metrics.resets.inc();
                    service.observe(endpoint, Observation::Reset, now);
                    let reason = format!(
                        "upstream service {} ({}) reset or closed the connection\n",
                        service.config.name, state.label
                    );
                    (
                        Attempt::Reset,
                        Refusal::new(StatusCode::BAD_GATEWAY, reason),
                    )
                };
                match policy
                    .and_then(|p| retry_reason(p, &method, attempt))
                    .and_then(|reason| {
                        retrier
                            .allow(service, route, &body, deadline, &mut rng)
                            .map(|delay| (reason, delay))
                    }) {
                    Some(planned) => planned,
                    None => return Err(refusal),
                }
            }
            Err(_elapsed) => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Err(request_timeout(service, route));
                }
                service.metrics.per_try_timeouts.inc();
                service.observe(endpoint, Observation::Reset, now);
                match policy
                    .and_then(|p| retry_reason(p, &method, Attempt::PerTryTimeout))
                    .and_then(|reason| {
                        retrier
                            .allow(service, route, &body, deadline, &mut rng)
                            .map(|delay| (reason, delay))
                    }) {
                    Some(planned) => planned,
                    None => {
                        let reason = format!(
                            "upstream service {} ({}) did not answer within the per-try timeout\n",
                            service.config.name, state.label
                        );
                        return Err(Refusal::new(StatusCode::GATEWAY_TIMEOUT, reason));
                    }
                }
            }
        };
        tracing::debug!(service = %service.config.name, reason = reason.as_str(), retry = retrier.retries, ?delay, "retrying");
        tokio::time::sleep(delay).await;
        retrier.take_slot(service)?;
        service.metrics.count_retry(reason.as_str());
    }
}

/// The retry state of one request: how many were made, and the `max_retries` slot held.
struct Retrier<'a> {
    policy: Option<&'a RetryPolicy>,
    retries: u32,
    slot: Option<Permit>,
}

impl Retrier<'_> {
    /// Whether one more retry may go, and after what delay. Checks, in order: the attempts
    /// left, a replayable body, the service's `max_retries`, the route's budget, and the time
    /// left before the route timeout. Every refusal but the first two is counted.
    fn allow(
        &mut self,
        service: &ServiceRt,
        route: &RouteRt,
        body: &RequestBody,
        deadline: Option<Instant>,
        rng: &mut fastrand::Rng,
    ) -> Option<Duration> {
        let policy = self.policy?;
        if self.retries >= policy.attempts || !matches!(body, RequestBody::Replay(_)) {
            return None;
        }
        // A quick look now; the slot itself is taken after the backoff (`take_slot`).
        if self.slot.is_none()
            && service.shared.breaker.current(Limit::Retries)
                >= service.config.circuit_breaker.max_retries
        {
            service.metrics.count_overloaded(Limit::Retries);
            return None;
        }
        let budget = route.budget.as_ref()?;
        let now = Instant::now();
        if !budget.try_withdraw(now) {
            service.metrics.budget_exhausted.inc();
            return None;
        }
        let delay = backoff(policy.backoff_base, policy.backoff_max, self.retries, rng);
        if deadline.is_some_and(|d| now + delay >= d) {
            return None;
        }
        self.retries += 1;
        Some(delay)
    }

    /// Takes the `max_retries` slot for the attempt about to go (a request keeps one slot
    /// across its retries). Taken after the backoff, not before: `max_retries` bounds
    /// retries loading the upstream, and one waiting out its backoff loads nothing. Holding
    /// it through the backoff made a single failing endpoint overflow the cap whenever a few
    /// clients met it at once, while their other requests finished in a millisecond.
    fn take_slot(&mut self, service: &ServiceRt) -> Result<(), Refusal> {
        if self.slot.is_some() {
            return Ok(());
        }
        let permit = service
            .shared
            .breaker
            .try_acquire(Limit::Retries, service.config.circuit_breaker.max_retries)
            .map_err(|limit| overloaded(service, limit))?;
        self.slot = Some(permit);
        Ok(())
    }
}

/// Small bodies of known length (and bodiless requests) can be read whole and replayed.
fn replayable(body: &Incoming) -> bool {
    body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT)
}

fn clone_parts(t: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = t.method.clone();
    parts.uri = t.uri.clone();
    parts.version = t.version;
    parts.headers = t.headers.clone();
    parts
}

/// `grpc-status` in response headers: a trailers-only gRPC response.
fn grpc_status<B>(response: &Response<B>) -> Option<u32> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn overloaded(service: &ServiceRt, limit: Limit) -> Refusal {
    service.metrics.count_overloaded(limit);
    let mut r = Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "service {} is overloaded: circuit breaker {} reached\n",
            service.config.name,
            limit.as_str()
        ),
    );
    r.overloaded = true;
    r
}

fn request_timeout(service: &ServiceRt, route: &RouteRt) -> Refusal {
    service.metrics.request_timeouts.inc();
    let limit = route.config.timeout.unwrap_or_default();
    Refusal::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "upstream service {} did not answer within the route timeout of {limit:?}\n",
            service.config.name
        ),
    )
}

fn internal(what: &str) -> Refusal {
    Refusal::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error: {what}\n"),
    )
}

/// Rewrites a downstream request for the chosen endpoint's protocol: HTTP/1.1 upstreams get
/// origin-form targets and `Host`; HTTP/2 upstreams get absolute URIs (`:authority`).
fn upstream_request(
    mut parts: http::request::Parts,
    body: UpstreamBody,
    service: &ServiceRt,
    endpoint: &Endpoint,
    client_ip: &HeaderValue,
) -> Result<Request<UpstreamBody>, String> {
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
    if refused.overloaded {
        response
            .headers_mut()
            .insert("x-tern-overloaded", HeaderValue::from_static("true"));
    }
    response
}
