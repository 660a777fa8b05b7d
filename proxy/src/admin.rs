//! The admin server: liveness, readiness, Prometheus metrics, the active config and the live
//! state of every endpoint.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::{OVERLOAD_LIMITS, STATUS_CLASSES, ServiceCounters};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::App;
use crate::balance::Load;
use crate::resilience::outlier::OutlierState;
use crate::store::Store;

pub async fn serve(listener: TcpListener, app: App) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "admin listener has no address; not serving");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(
            async move {
                let access = Arc::new(Access {
                    local,
                    peer,
                    shutdown: AtomicBool::new(false),
                });
                let (app_, access_) = (app.clone(), Arc::clone(&access));
                let service = service_fn(move |req| {
                    let response = respond(&app_, &req, &access_);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                // Only now, with the answer written (the response said `Connection: close`),
                // so that a caller never sees its connection cut by the exit it asked for.
                if access.shutdown.load(Ordering::Acquire) {
                    tracing::info!(%peer, "POST /shutdown");
                    app.request_shutdown();
                }
            }
            .instrument(tracing::debug_span!("admin_conn", %peer)),
        );
    }
}

/// Who is asking, for the one admin action that changes state.
#[derive(Debug)]
struct Access {
    local: SocketAddr,
    peer: SocketAddr,
    /// Set by an accepted `POST /shutdown`; acted on once the answer is sent.
    shutdown: AtomicBool,
}

/// `POST /shutdown` stops the whole proxy, so only a process on this host (in Kubernetes:
/// in this pod) may ask: either the admin server listens on loopback only, or the caller
/// connected from loopback.
pub fn shutdown_allowed(local: SocketAddr, peer: SocketAddr) -> bool {
    is_loopback(local.ip()) || is_loopback(peer.ip())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn shutdown<B>(req: &Request<B>, access: &Access) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /shutdown to drain and stop the proxy\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    if !shutdown_allowed(access.local, access.peer) {
        return text(
            StatusCode::FORBIDDEN,
            "POST /shutdown is accepted from loopback only\n".into(),
        );
    }
    access.shutdown.store(true, Ordering::Release);
    let mut r = text(StatusCode::ACCEPTED, "draining\n".into());
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

fn respond<B>(app: &App, req: &Request<B>, access: &Access) -> Response<Full<Bytes>> {
    if req.uri().path() == "/shutdown" {
        return shutdown(req, access);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported (and POST /shutdown)\n".into(),
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if app.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" if app.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let mut out = String::with_capacity(16 * 1024);
            match prometheus_client::encoding::text::encode(&mut out, app.registry()) {
                Ok(()) => {
                    let accept = req
                        .headers()
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let (body, content_type) = if crate::exposition::wants_openmetrics(accept) {
                        (
                            out,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                    } else {
                        (
                            crate::exposition::to_classic(&out),
                            "text/plain; version=0.0.4; charset=utf-8",
                        )
                    };
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(content_type),
                    );
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        "/config_dump" => {
            let snapshot = app.store().load();
            json_response(json!({
                "version": snapshot.version,
                "source": snapshot.source,
                "listeners_bound": app.bound_addresses(),
                "xds": app.xds_status(),
                "config": &*snapshot.config.raw,
            }))
        }
        "/endpoints" => json_response(endpoints_json(app.store())),
        "/explain" => explain(app, req),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config_dump /endpoints /explain (POST /shutdown)\n"
                .into(),
        ),
    }
}

fn endpoints_json(store: &Store) -> serde_json::Value {
    let snapshot = store.load();
    let now = Instant::now();
    let mut services: Vec<_> = snapshot.services.values().collect();
    services.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let services: Vec<_> = services
        .into_iter()
        .map(|s| {
            let endpoints: Vec<_> = s
                .endpoints
                .iter()
                .map(|e| {
                    let load = &e.state.load;
                    let outlier = e.state.outlier.state(now);
                    let remaining = match outlier {
                        OutlierState::Ejected { remaining } => Some(remaining.as_secs_f64()),
                        _ => None,
                    };
                    json!({
                        "address": e.state.addr.to_string(),
                        "weight": e.weight,
                        "in_flight": load.in_flight(),
                        "ewma_ms": load.ewma(now).as_secs_f64() * 1000.0,
                        "available": load.is_available(now),
                        "outlier": outlier.as_str(),
                        "ejection_seconds_left": remaining,
                        "ejections": e.state.outlier.total_ejections(),
                        "health": e.state.health.state().as_str(),
                    })
                })
                .collect();
            json!({
                "service": &*s.config.name,
                "load_balancer": s.balancer.kind().as_str(),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "version": snapshot.version, "services": services })
}

/// `GET /explain?listener=..&host=..&path=..&header=k:v`: JSON, or text with `format=text`
/// or `Accept: text/plain`.
fn explain<B>(app: &App, req: &Request<B>) -> Response<Full<Bytes>> {
    let question = match crate::explain::Question::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let snapshot = app.store().load();
    match crate::explain::explain(&snapshot, &question, app.xds_status(), Instant::now()) {
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Ok(answer) => {
            let wants_text = question.text
                || req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.starts_with("text/plain"));
            if wants_text {
                text(StatusCode::OK, crate::explain::render_text(&answer))
            } else {
                json_response(answer)
            }
        }
    }
}

fn json_response(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(&value).unwrap_or_else(|_| "{}".into());
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Exports live per-endpoint load (in flight, EWMA) read from the active snapshot at scrape
/// time, so the request path keeps a single counter and metrics never go stale.
#[derive(Debug)]
pub struct EndpointCollector {
    store: Store,
}

impl EndpointCollector {
    pub fn new(store: Store) -> Self {
        EndpointCollector { store }
    }
}

/// Reads one gauge value from an endpoint's load.
type LoadGauge<'a> = dyn Fn(&Load) -> f64 + 'a;
/// Reads one of a service's counters.
type CounterOf = fn(&ServiceCounters) -> u64;
/// Reads one gauge value from an endpoint's shared state.
type StateGauge = dyn Fn(&crate::snapshot::EndpointState) -> f64;

impl Collector for EndpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = Arc::clone(&self.store.load());
        let now = Instant::now();
        let in_flight = |load: &Load| f64::from(load.in_flight());
        let ewma = |load: &Load| load.ewma(now).as_secs_f64();
        let gauges: [(&str, &str, &LoadGauge); 2] = [
            (
                "tern_upstream_in_flight",
                "Requests or connections in flight to an endpoint",
                &in_flight,
            ),
            (
                "tern_upstream_ewma_seconds",
                "Peak-EWMA latency estimate of an endpoint",
                &ewma,
            ),
        ];
        // Endpoint state: 1 when ejected by outlier detection / failing health checks.
        let flags: [(&str, &str, &StateGauge); 2] = [
            (
                "tern_endpoint_ejected",
                "1 while outlier detection keeps the endpoint out of balancing",
                &|e| f64::from(u8::from(e.outlier.is_marked_ejected())),
            ),
            (
                "tern_endpoint_unhealthy",
                "1 while the endpoint fails its active health checks",
                &|e| f64::from(u8::from(e.health.is_unhealthy())),
            ),
        ];
        // Service counters live in the services' shared state (see `metrics::ServiceCounters`).
        let mut services: Vec<_> = snapshot.services.values().collect();
        services.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        let simple: [(&str, &str, CounterOf); 3] = [
            (
                "tern_no_endpoints",
                "Requests or connections for a service that had no endpoint to send to",
                |c| c.no_endpoints.get(),
            ),
            (
                "tern_retry_budget_exhausted",
                "Retries not made because the route's retry budget was spent",
                |c| c.budget_exhausted.get(),
            ),
            (
                "tern_tls_upstream_failures",
                "Outbound mTLS handshakes to a service's endpoints that failed (wrong identity, untrusted, timeout)",
                |c| c.tls_failures.get(),
            ),
        ];
        for (name, help, value) in simple {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &services {
                let labels = [("service", &*s.config.name)];
                ConstCounter::new(value(&s.shared.counters))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tern_overloaded",
            "Requests or connections refused by a circuit breaker, by limit",
            None,
            MetricType::Counter,
        )?;
        for s in &services {
            for (count, limit) in s.shared.counters.overloaded.iter().zip(OVERLOAD_LIMITS) {
                let labels = [("service", &*s.config.name), ("limit", limit)];
                ConstCounter::new(count.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tern_timeouts",
            "Requests that timed out, by kind (request: the route timeout; per_try)",
            None,
            MetricType::Counter,
        )?;
        for s in &services {
            let c = &s.shared.counters;
            for (count, kind) in [
                (&c.request_timeouts, "request"),
                (&c.per_try_timeouts, "per_try"),
            ] {
                let labels = [("service", &*s.config.name), ("kind", kind)];
                ConstCounter::new(count.get()).encode(family.encode_family(&labels)?)?;
            }
        }

        // The endpoint label, formatted once per scrape (endpoints keep only their address).
        let rows: Vec<_> = snapshot
            .services
            .values()
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(move |e| (s, e, e.state.addr.to_string()))
            })
            .collect();
        for (name, help, value) in flags {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (s, e, label) in &rows {
                let labels = [("service", &*s.config.name), ("endpoint", label.as_str())];
                ConstGauge::new(value(&e.state)).encode(family.encode_family(&labels)?)?;
            }
        }
        // Endpoint counters live in the endpoints' state (see `metrics::Count`).
        let mut family = encoder.encode_descriptor(
            "tern_upstream_requests",
            "Responses received from upstream endpoints, by service, endpoint and status class",
            None,
            MetricType::Counter,
        )?;
        for (s, e, label) in &rows {
            for (count, class) in e.state.metrics.requests.iter().zip(STATUS_CLASSES) {
                let labels = [
                    ("service", &*s.config.name),
                    ("endpoint", label.as_str()),
                    ("status_class", class),
                ];
                ConstCounter::new(count.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tern_upstream_failures",
            "Upstream requests or connections that failed without a response, by reason",
            None,
            MetricType::Counter,
        )?;
        for (s, e, label) in &rows {
            let m = &e.state.metrics;
            for (count, reason) in [(&m.connect_failures, "connect"), (&m.resets, "reset")] {
                let labels = [
                    ("service", &*s.config.name),
                    ("endpoint", label.as_str()),
                    ("reason", reason),
                ];
                ConstCounter::new(count.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tern_outlier_ejections",
            "Times an endpoint was ejected by outlier detection",
            None,
            MetricType::Counter,
        )?;
        for (s, e, label) in &rows {
            let labels = [("service", &*s.config.name), ("endpoint", label.as_str())];
            ConstCounter::new(e.state.metrics.ejections.get())
                .encode(family.encode_family(&labels)?)?;
        }
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (s, e, label) in &rows {
                let labels = [("service", &*s.config.name), ("endpoint", label.as_str())];
                ConstGauge::new(value(&e.state.load)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(local: &str, peer: &str) -> Access {
        Access {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            shutdown: AtomicBool::new(false),
        }
    }

    #[test]
    fn shutdown_is_for_loopback_callers_or_a_loopback_admin_only() {
        let ok = |l: &str, p: &str| shutdown_allowed(l.parse().unwrap(), p.parse().unwrap());
        assert!(ok("127.0.0.1:15000", "127.0.0.1:5000"));
        assert!(ok("0.0.0.0:15000", "127.0.0.1:5000"));
        assert!(ok("[::]:15000", "[::1]:5000"));
        assert!(ok("[::]:15000", "[::ffff:127.0.0.1]:5000"));
        assert!(!ok("0.0.0.0:15000", "10.0.0.7:5000"));
        assert!(!ok("[::]:15000", "[2001:db8::1]:5000"));
    }

    #[test]
    fn shutdown_wants_post_and_answers_403_to_remote_callers() {
        let app = crate::app::App::new();
        let req = |m: Method| {
            Request::builder()
                .method(m)
                .uri("/shutdown")
                .body(())
                .unwrap()
        };

        let remote = access("0.0.0.0:15000", "10.0.0.7:5000");
        assert_eq!(
            respond(&app, &req(Method::POST), &remote).status(),
            StatusCode::FORBIDDEN
        );
        assert!(!remote.shutdown.load(Ordering::Acquire));

        let local = access("127.0.0.1:15000", "127.0.0.1:5000");
        let get = respond(&app, &req(Method::GET), &local);
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[header::ALLOW], "POST");
        assert!(!local.shutdown.load(Ordering::Acquire));
        assert_eq!(
            respond(&app, &req(Method::POST), &local).status(),
            StatusCode::ACCEPTED
        );
        assert!(local.shutdown.load(Ordering::Acquire));
    }

    #[test]
    fn metrics_include_families_and_collectors() {
        let app = crate::app::App::new();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, app.registry()).unwrap();
        assert!(
            out.contains("tern_config_reloads_total{result=\"failed\"} 0"),
            "{out}"
        );
        assert!(out.contains("tern_upstream_in_flight"), "{out}");
    }
}
