//! The request path: route (pure), pick a backend and an endpoint, forward, stream back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::body::{ProxyBody, Tracked, full};
use super::headers::{add_forwarding, strip_hop_by_hop};
use super::pool::UpstreamBody;
use super::route;
use super::upgrade::{UpgradeKind, keep_upgrade_headers, tunnel};
use crate::authz::Deny;
use crate::config::UpstreamProtocol;
use crate::identity::SpiffeId;
use crate::metrics::{ListenerMetrics, PeerMetrics};
use crate::overload::MemoryGuard;
use crate::resilience::breaker::{Limit, Permit};
use crate::resilience::outlier::Observation;
use crate::resilience::retry::{Attempt, RetryPolicy, backoff, retry_reason, safe_default};
use crate::snapshot::{Endpoint, ListenerRt, ListenerRtKind, RouteRt, ServiceRt};
use crate::store::Store;
use crate::telemetry::access_log::{self, AccessLog, Flag, Record};
use crate::telemetry::semconv;
use crate::telemetry::traces::{self, AttemptSpan, Attributes, ServerSpan, Tracing};

/// What one downstream connection needs to serve requests.
#[derive(Debug)]
pub struct ConnContext {
    pub store: Store,
    pub listener: Arc<str>,
    /// The client's IP, formatted once per connection for `x-forwarded-for`.
    pub client_ip: HeaderValue,
    pub client: std::net::IpAddr,
    /// Where tunnels opened by upgrades and CONNECT run, so that the drain waits for them.
    pub tasks: TaskTracker,
    /// Fires when the listener is retired or the process drains; tunnels then get the
    /// drain timeout.
    pub retired: CancellationToken,
    pub memory: Arc<MemoryGuard>,
    /// The SPIFFE ID the client proved with mTLS; `None` for plaintext.
    pub peer: Option<SpiffeId>,
    /// The listener's authorization refused this connection: every request gets 403.
    pub denied: Option<Deny>,
    /// The header that tells the app who called (`peer_identity_header`), with the value
    /// for this connection; whatever the client sent under that name is removed.
    pub peer_header: Option<(HeaderName, Option<HeaderValue>)>,
    /// Requests by caller, on listeners with mTLS on.
    pub peer_metrics: Option<PeerMetrics>,
    /// The server-span attributes that are the same for every request of the connection
    /// (client address, listener, peer identity), encoded on its first sampled request.
    pub span_attributes: OnceLock<Box<[u8]>>,
}

impl ConnContext {
    pub fn new(
        store: Store,
        listener: Arc<str>,
        client: SocketAddr,
        tasks: TaskTracker,
        retired: CancellationToken,
        memory: Arc<MemoryGuard>,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnContext {
            store,
            listener,
            client_ip,
            client: client.ip(),
            tasks,
            retired,
            memory,
            peer: None,
            denied: None,
            peer_header: None,
            peer_metrics: None,
            span_attributes: OnceLock::new(),
        }
    }

    pub fn with_peer_metrics(mut self, metrics: Option<PeerMetrics>) -> Self {
        self.peer_metrics = metrics;
        self
    }

    /// Counts an answered request on the listener and, with mTLS on, by its caller.
    fn count_status(&self, listener: &ListenerMetrics, status: StatusCode) {
        listener.count_status(status);
        if let Some(peer) = &self.peer_metrics {
            peer.count_status(status);
        }
    }

    /// Records what mTLS and authorization said about the connection.
    pub fn with_peer(
        mut self,
        peer: Option<SpiffeId>,
        denied: Option<Deny>,
        header: Option<&HeaderName>,
    ) -> Self {
        self.peer_header = header.map(|name| {
            let value = peer
                .as_ref()
                .and_then(|p| HeaderValue::from_str(p.as_str()).ok());
            (name.clone(), value)
        });
        self.peer = peer;
        self.denied = denied;
        self
    }
}

/// A response the proxy makes itself, with the reason in its body.
struct Refusal {
    status: StatusCode,
    reason: String,
    /// A circuit breaker or the memory guard said no: the answer carries
    /// `x-tern-overloaded: true`.
    overloaded: bool,
    /// Why, for the access log.
    flag: Flag,
    /// Extra headers of the answer (`retry-after`, `x-tern-fault`).
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Refusal {
    fn new(status: StatusCode, reason: String) -> Self {
        let flag = match status {
            StatusCode::NOT_FOUND => Flag::NoRoute,
            StatusCode::BAD_REQUEST => Flag::BadRequest,
            StatusCode::GATEWAY_TIMEOUT => Flag::UpstreamTimeout,
            StatusCode::BAD_GATEWAY => Flag::UpstreamReset,
            StatusCode::SERVICE_UNAVAILABLE => Flag::UpstreamConnectFailure,
            _ => Flag::None,
        };
        Refusal {
            status,
            reason,
            overloaded: false,
            flag,
            headers: Vec::new(),
        }
    }

    fn with_header(mut self, name: &'static str, value: HeaderValue) -> Self {
        self.headers
            .push((header::HeaderName::from_static(name), value));
        self
    }

    fn with_flag(mut self, flag: Flag) -> Self {
        self.flag = flag;
        self
    }
}

/// A request's access log record on its way through the request path, with the log it goes
/// to. Present only when access logging is on: otherwise nothing is allocated for it.
pub struct LogSlot {
    pub log: Arc<AccessLog>,
    pub record: Record,
}

impl LogSlot {
    fn new(
        log: Arc<AccessLog>,
        ctx: &ConnContext,
        req: &Request<Incoming>,
        span: Option<&ServerSpan>,
    ) -> Self {
        let mut record = Record::new("http", Arc::clone(&ctx.listener), ctx.client);
        record.method = Some(req.method().clone());
        record.authority = match req.uri().authority() {
            Some(a) => Some(access_log::Authority::Uri(a.clone())),
            None => req
                .headers()
                .get(header::HOST)
                .cloned()
                .map(access_log::Authority::Host),
        };
        record.path = req.uri().path_and_query().cloned();
        record.protocol = Some(match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        });
        record.bytes_received = Some(req.body().size_hint().exact().unwrap_or(0));
        record.peer_identity = ctx.peer.clone();
        record.trace_id = match span {
            Some(span) => Some(u128::from_be_bytes(span.trace_id().to_bytes())),
            // Tracing off: the trace id the client sent, if any, still joins the line to it.
            None => req
                .headers()
                .get(&traces::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('-').nth(1))
                .filter(|id| id.len() == 32)
                .and_then(|id| u128::from_str_radix(id, 16).ok()),
        };
        LogSlot { log, record }
    }

    /// Finishes a record whose response is not streamed through a `Tracked` body.
    fn emit(mut self, status: StatusCode, flag: Flag, bytes_sent: u64, duration: Duration) {
        self.record.status = Some(status.as_u16());
        self.record.response_flags = flag.as_str();
        self.record.bytes_sent = bytes_sent;
        self.record.set_duration(duration);
        self.log.emit(self.record);
    }
}

/// Serves one request. Never fails: every problem becomes a response with a short reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let (listener, log, mut span) = {
        let snapshot = ctx.store.load();
        (
            snapshot.listeners.get(&ctx.listener).cloned(),
            snapshot.access_log.clone(),
            // Borrowed from the snapshot: only a sampled span holds on to the tracer.
            snapshot
                .tracing
                .as_ref()
                .map(|t| server_span(t, &ctx, &req, start)),
        )
    };
    let mut slot = log.map(|log| LogSlot::new(log, &ctx, &req, span.as_ref()));
    let Some(listener) = listener else {
        let reason = format!("listener {} was removed\n", ctx.listener);
        let refused =
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason).with_flag(Flag::ListenerDrained);
        return Ok(refused.answer(slot, span, start));
    };
    if let Some(deny) = ctx.denied {
        listener.metrics.authz_denied[deny.index()].inc();
        let refused = Refusal::new(StatusCode::FORBIDDEN, deny.explain(ctx.peer.as_ref()))
            .with_flag(Flag::Denied);
        let response = refused.answer(slot, span, start);
        ctx.count_status(&listener.metrics, response.status());
        return Ok(response);
    }
    // Shed before anything is read or allocated for the request: the point is to stop growing.
    let response = if ctx.memory.is_overloaded() {
        listener.metrics.shed_requests.inc();
        let mut shed = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is near its memory limit; try again shortly\n".into(),
        )
        .with_flag(Flag::Overloaded);
        shed.overloaded = true;
        shed.answer(slot, span, start)
    } else {
        match forward(&ctx, &listener, req, start, &mut slot, &mut span).await {
            Ok(response) => {
                // Not streamed through a tracked body (an upgrade's 101): finished now.
                finish(slot, span, response.status(), Flag::None, 0, start);
                response
            }
            Err(refused) => refused.answer(slot, span, start),
        }
    };
    ctx.count_status(&listener.metrics, response.status());
    Ok(response)
}

/// Writes the access log record and ends the server span of a response that does not
/// stream through a `Tracked` body (which does this when its body ends).
fn finish(
    slot: Option<LogSlot>,
    span: Option<ServerSpan>,
    status: StatusCode,
    flag: Flag,
    bytes_sent: u64,
    start: Instant,
) {
    if slot.is_none() && span.is_none() {
        return;
    }
    let now = Instant::now();
    if let Some(slot) = slot {
        slot.emit(status, flag, bytes_sent, now - start);
    }
    if let Some(span) = span {
        span.end(now, status.as_u16(), flag.as_str());
    }
}

impl Refusal {
    /// The proxy's own answer, logged and traced.
    fn answer(
        self,
        slot: Option<LogSlot>,
        span: Option<ServerSpan>,
        start: Instant,
    ) -> Response<ProxyBody> {
        finish(
            slot,
            span,
            self.status,
            self.flag,
            self.reason.len() as u64,
            start,
        );
        refusal(self)
    }
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
    slot: &mut Option<LogSlot>,
    span: &mut Option<ServerSpan>,
) -> Result<Response<ProxyBody>, Refusal> {
    let (ListenerRtKind::Http { routes } | ListenerRtKind::Auto { routes, .. }) = &listener.kind
    else {
        let reason = format!("listener {} is not http\n", ctx.listener);
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason));
    };
    let (mut parts, body) = req.into_parts();
    if let Some((name, value)) = &ctx.peer_header {
        // The app must be able to trust this header: only the proxy sets it.
        parts.headers.remove(name);
        if let Some(value) = value {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
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
    // Rate limits and faults decide before a backend is picked: no upstream cost.
    if let Some(limiter) = &route.limiter
        && let Err(wait) = limiter.check(&rate_key(limiter.config(), ctx, &parts.headers), start)
    {
        listener
            .metrics
            .count_rate_limited(route_index(routes, route));
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let reason = format!("rate limited: retry in {secs} s\n");
        return Err(Refusal::new(StatusCode::TOO_MANY_REQUESTS, reason)
            .with_flag(Flag::RateLimited)
            .with_header("retry-after", HeaderValue::from(secs)));
    }
    if let Some(fault) = &route.config.fault {
        let decision = crate::traffic::fault::decide(fault, &parts.headers, &mut rng);
        if let Some(delay) = decision.delay {
            listener
                .metrics
                .count_fault(route_index(routes, route), "delay");
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = decision.abort {
            listener
                .metrics
                .count_fault(route_index(routes, route), "abort");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(
                Refusal::new(status, "fault injected by the route's policy\n".into())
                    .with_flag(Flag::FaultAbort)
                    .with_header("x-tern-fault", HeaderValue::from_static("abort")),
            );
        }
    }
    let service = route.backends.pick(&mut rng);
    // `max_requests`: the slot is held until the response body ends.
    let permit = service
        .shared
        .breaker
        .try_acquire(Limit::Requests, service.config.circuit_breaker.max_requests)
        .map_err(|limit| overloaded(service, limit))?;
    let deadline = route.config.timeout.map(|t| start + t);
    if let Some(kind) = UpgradeKind::requested(&parts.method, parts.version, &parts.headers) {
        let upgrade = Upgrade {
            kind,
            parts,
            body,
            permit,
            deadline,
            start,
        };
        return forward_upgrade(ctx, listener, service, upgrade).await;
    }
    let explicit = route.config.retry.as_ref();
    let policy = Some(explicit.unwrap_or_else(|| safe_default()));
    route.budget.deposit(start);
    let mut body = match explicit {
        // The safe default needs no buffer: only bodiless requests get it.
        None if body.is_end_stream() => RequestBody::Replay(Bytes::new()),
        None => RequestBody::Stream(Some(body)),
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
        Some(_) => RequestBody::Stream(Some(body)),
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
            service.metrics.counters.no_endpoints.inc();
            let reason = format!("service {} has no endpoints\n", service.config.name);
            return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason)
                .with_flag(Flag::NoHealthyUpstream));
        };
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
        let wire = endpoint.pool.wire_protocol();
        let mut request = upstream_request(parts, upstream_body, wire, endpoint, &ctx.client_ip)
            .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
        let attempt_span = span.as_ref().map(|s| {
            attempt_span(
                s,
                attempt_start,
                &method,
                service,
                endpoint,
                retrier.retries,
                request.headers_mut(),
            )
        });

        let state = &endpoint.state;
        let in_flight = state.start();
        let per_try = policy
            .and_then(|p| p.per_try_timeout)
            .map(|t| attempt_start + t);
        let limit = match (deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sent = match limit {
            Some(at) => tokio::time::timeout_at(at, endpoint.pool.send(request)).await,
            None => Ok(endpoint.pool.send(request).await),
        };
        // One clock read serves the attempt's span, the EWMA, the histogram and outlier
        // detection.
        let now = Instant::now();
        if let Some(a) = attempt_span {
            let server = span.as_mut();
            match &sent {
                Ok(Ok((response, _))) => a.end(server, now, Some(response.status().as_u16()), None),
                Ok(Err(e)) if e.is_connect() => a.end(server, now, None, Some("connect_failure")),
                Ok(Err(_)) => a.end(server, now, None, Some("reset")),
                Err(_) => a.end(server, now, None, Some("timeout")),
            }
        }
        let (reason, delay) = match sent {
            Ok(Ok((response, lease))) => {
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
                        let (mut parts, response_body) = response.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        let logged = slot.take().map(|mut s| {
                            s.record.status = Some(status);
                            s.record.upstream_service = Some(Arc::clone(&service.config.name));
                            s.record.upstream_endpoint = Some(state.addr);
                            s.record.retries = retrier.retries;
                            if let RequestBody::Replay(b) = &body {
                                s.record.bytes_received = Some(b.len() as u64);
                            }
                            (s.log, s.record)
                        });
                        if let Some(s) = span.as_mut().filter(|s| s.is_recording()) {
                            s.set_int(&semconv::RETRIES, i64::from(retrier.retries));
                        }
                        let body = Tracked::new(
                            response_body,
                            lease,
                            in_flight,
                            Some(permit),
                            listener.metrics.duration.clone(),
                            start,
                        )
                        .logged(logged)
                        .traced(span.take().map(|s| (s, status)));
                        return Ok(Response::from_parts(parts, Either::Left(body)));
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(service = %service.config.name, endpoint = %state.addr, error = %e, "upstream request failed");
                if let Some(limit) = e.overloaded() {
                    return Err(overloaded(service, limit));
                }
                let (attempt, refusal) = if e.never_processed() {
                    // Counted as a reset, but retried like a connect failure: the request
                    // never reached the application.
                    state.metrics.resets.inc();
                    service.observe(endpoint, Observation::Reset, now);
                    let reason = format!(
                        "upstream service {} ({}) refused the request before processing it\n",
                        service.config.name, state.addr
                    );
                    (
                        Attempt::ConnectFailure,
                        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason),
                    )
                } else if e.is_connect() {
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
                        service.config.name, state.addr
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
                if deadline.is_some_and(|d| now >= d) {
                    return Err(request_timeout(service, route));
                }
                service.metrics.counters.per_try_timeouts.inc();
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
                            service.config.name, state.addr
                        );
                        return Err(Refusal::new(StatusCode::GATEWAY_TIMEOUT, reason));
                    }
                }
            }
        };
        // Pushed only when retrying: a request that succeeds first time allocates nothing.
        tried.push(index);
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
        let now = Instant::now();
        if !route.budget.try_withdraw(now) {
            service.metrics.counters.budget_exhausted.inc();
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

/// An upgrade or CONNECT request on its way to an endpoint.
struct Upgrade {
    kind: UpgradeKind,
    parts: http::request::Parts,
    body: Incoming,
    permit: Permit,
    deadline: Option<Instant>,
    start: Instant,
}

/// Sends an upgrade or CONNECT request on a connection of its own (no retry: the request
/// is not replayable once the endpoint may have switched protocols) and, if the endpoint
/// accepts, hands both connections to a tunnel. Any other answer is passed back as is.
async fn forward_upgrade(
    ctx: &ConnContext,
    listener: &ListenerRt,
    service: &ServiceRt,
    upgrade: Upgrade,
) -> Result<Response<ProxyBody>, Refusal> {
    let Upgrade {
        kind,
        mut parts,
        body,
        permit,
        deadline,
        start,
    } = upgrade;
    if service.config.protocol == UpstreamProtocol::Http2 {
        let reason = format!(
            "service {} speaks HTTP/2; upgrades and CONNECT need an HTTP/1.1 upstream\n",
            service.config.name
        );
        return Err(Refusal::new(StatusCode::BAD_GATEWAY, reason));
    }
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(internal("upgrade handle missing"));
    };
    let protocol = match kind {
        UpgradeKind::Upgrade => parts.headers.get(header::UPGRADE).cloned(),
        UpgradeKind::Connect => None,
    };
    let target = parts.uri.clone();
    let mut rng = fastrand::Rng::new();
    let Some((_, endpoint)) = service.pick_avoiding(&mut rng, Instant::now(), &[]) else {
        service.metrics.counters.no_endpoints.inc();
        let reason = format!("service {} has no endpoints\n", service.config.name);
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason));
    };
    let mut request = upstream_request(
        parts,
        Either::Left(body),
        UpstreamProtocol::Http1,
        endpoint,
        &ctx.client_ip,
    )
    .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
    if kind == UpgradeKind::Connect {
        // Authority-form stays authority-form (`upstream_request` makes origin-form paths).
        *request.uri_mut() = target;
    }
    keep_upgrade_headers(protocol, request.headers_mut());

    let state = &endpoint.state;
    let in_flight = state.start();
    let sent = match deadline {
        Some(at) => tokio::time::timeout_at(at, endpoint.pool.send_upgrade(request))
            .await
            .map_err(|_| {
                service.metrics.counters.request_timeouts.inc();
                Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "upstream service {} did not answer the upgrade within the route timeout\n",
                        service.config.name
                    ),
                )
            })?,
        None => endpoint.pool.send_upgrade(request).await,
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(e) => {
            let now = Instant::now();
            let (observation, status) = if e.is_connect() {
                state.metrics.connect_failures.inc();
                (Observation::ConnectFailure, StatusCode::SERVICE_UNAVAILABLE)
            } else {
                state.metrics.resets.inc();
                (Observation::Reset, StatusCode::BAD_GATEWAY)
            };
            service.observe(endpoint, observation, now);
            let reason = format!("upstream service {} failed: {e}\n", service.config.name);
            return Err(Refusal::new(status, reason));
        }
    };
    state.metrics.count_status(response.status());
    if !kind.accepted(response.status()) {
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let body = Tracked::new(
            rbody,
            None,
            in_flight,
            Some(permit),
            listener.metrics.duration.clone(),
            start,
        );
        return Ok(Response::from_parts(rparts, Either::Left(body)));
    }
    let upstream = hyper::upgrade::on(&mut response);
    let (mut rparts, _) = response.into_parts();
    let protocol = rparts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut rparts.headers);
    if kind == UpgradeKind::Upgrade {
        keep_upgrade_headers(protocol, &mut rparts.headers);
    }
    drop(in_flight);
    listener.metrics.upgrades.inc();
    let span =
        tracing::debug_span!("tunnel", service = %service.config.name, endpoint = %state.addr);
    let drain_timeout = ctx.store.load().config.drain_timeout;
    let retired = ctx.retired.clone();
    let listener_metrics = listener.metrics.clone();
    ctx.tasks.spawn(
        async move {
            tokio::select! {
                () = tunnel(downstream, upstream, listener_metrics, permit) => {}
                () = crate::tcp::drain_deadline(&retired, drain_timeout) => {
                    tracing::info!(?drain_timeout, "listener drained: closing tunnel");
                }
            }
        }
        .instrument(span),
    );
    Ok(Response::from_parts(rparts, full(Bytes::new())))
}

/// The bucket key of a request under a route's rate limit.
fn rate_key(
    config: &crate::traffic::rate_limit::RateLimitConfig,
    ctx: &ConnContext,
    headers: &http::HeaderMap,
) -> String {
    use crate::traffic::rate_limit::RateKey;
    match &config.key {
        RateKey::ClientIp => ctx.client_ip.to_str().unwrap_or("").to_string(),
        RateKey::Header(name) => headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        // Plaintext callers share one bucket.
        RateKey::PeerIdentity => ctx
            .peer
            .as_ref()
            .map_or_else(|| "unauthenticated".to_string(), ToString::to_string),
        RateKey::None => String::new(),
    }
}

fn route_index(routes: &[RouteRt], route: &RouteRt) -> usize {
    routes
        .iter()
        .position(|r| std::ptr::eq(r, route))
        .unwrap_or(0)
}

/// The server span of a request, with the HTTP semantic-convention attributes known at its
/// start (written only when the request is sampled, from borrowed text: no allocation per
/// attribute).
fn server_span(
    tracer: &Arc<Tracing>,
    ctx: &ConnContext,
    req: &Request<Incoming>,
    start: Instant,
) -> ServerSpan {
    tracer.server_span(req.headers(), start, |a, name| {
        let host = req
            .uri()
            .host()
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(host_of)
            })
            .unwrap_or_default();
        semconv::method(a, req.method());
        a.str_key(&semconv::URL_PATH, req.uri().path());
        a.str_key(&semconv::SERVER_ADDRESS, host);
        semconv::scheme_and_version(a, req.version());
        a.raw(ctx.span_attributes.get_or_init(|| {
            let mut once = Attributes::with_capacity(128);
            // Formatted once per connection already (for x-forwarded-for).
            once.str("client.address", ctx.client_ip.to_str().unwrap_or_default());
            once.str("tern.listener", &ctx.listener);
            if let Some(peer) = &ctx.peer {
                once.str("tern.peer.identity", peer.as_str());
            }
            once.into_boxed()
        }));
        name.push_str(req.method().as_str());
    })
}

/// The host of a `Host` header value: without the port, and an IPv6 literal without its
/// brackets (`[::1]:80` -> `::1`), as `server.address` wants it.
fn host_of(authority: &str) -> &str {
    // Byte searches: `split_once(char)` runs the general UTF-8 char searcher, several times
    // the cost on a short ASCII name.
    let cut = |s: &'_ str, at: u8| s.as_bytes().iter().position(|&b| b == at);
    if let Some(v6) = authority.strip_prefix('[') {
        return cut(v6, b']').map_or(v6, |i| &v6[..i]);
    }
    cut(authority, b':').map_or(authority, |i| &authority[..i])
}

/// The client span of one upstream attempt; it writes `traceparent` into `headers`.
fn attempt_span(
    span: &ServerSpan,
    start: Instant,
    method: &http::Method,
    service: &ServiceRt,
    endpoint: &Endpoint,
    retries: u32,
    headers: &mut http::HeaderMap,
) -> AttemptSpan {
    span.attempt(headers, start, |a, name| {
        let addr = endpoint.state.addr;
        semconv::method(a, method);
        a.raw(endpoint.state.span_attributes.get_or_init(|| {
            let mut once = Attributes::with_capacity(96);
            let mut text = String::with_capacity(48);
            crate::text::push_socket_addr(&mut text, addr);
            // The ip is the text's prefix (without brackets for IPv6).
            let ip = text.rsplit_once(':').map_or("", |(ip, _)| {
                ip.trim_start_matches('[').trim_end_matches(']')
            });
            once.str("server.address", ip);
            once.int("server.port", i64::from(addr.port()));
            once.str("tern.endpoint", &text);
            // The endpoint's state belongs to this service (it is carried over a reload
            // by service name), so the service's name is constant here too.
            once.str("tern.service", &service.config.name);
            once.into_boxed()
        }));
        if retries > 0 {
            a.int("http.request.resend_count", i64::from(retries));
        }
        name.push_str(method.as_str());
        name.push(' ');
        name.push_str(&service.config.name);
    })
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
    // Extensions carry hyper's record of the original header case, among others.
    parts.extensions = t.extensions.clone();
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
    r.flag = Flag::Overloaded;
    r
}

fn request_timeout(service: &ServiceRt, route: &RouteRt) -> Refusal {
    service.metrics.counters.request_timeouts.inc();
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
    wire: UpstreamProtocol,
    endpoint: &Endpoint,
    client_ip: &HeaderValue,
) -> Result<Request<UpstreamBody>, String> {
    strip_hop_by_hop(&mut parts.headers);
    add_forwarding(&mut parts.headers, client_ip);
    match wire {
        UpstreamProtocol::Http2 => {
            let authority = match parts.uri.authority() {
                Some(a) => a.clone(),
                None => match parts.headers.get(header::HOST) {
                    Some(h) => Authority::try_from(h.as_bytes())
                        .map_err(|_| "invalid Host header\n".to_string())?,
                    None => Authority::try_from(endpoint.state.addr.to_string().as_str())
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
                && let Ok(host) = HeaderValue::from_str(&endpoint.state.addr.to_string())
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
    for (name, value) in refused.headers {
        response.headers_mut().insert(name, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_drops_the_port_and_ipv6_brackets() {
        for (authority, host) in [
            ("api.local", "api.local"),
            ("api.local:8080", "api.local"),
            ("10.0.0.7:80", "10.0.0.7"),
            ("[::1]:8080", "::1"),
            ("[fe80::1]", "fe80::1"),
            ("[broken", "broken"),
            ("", ""),
        ] {
            assert_eq!(host_of(authority), host, "{authority}");
        }
    }
}
