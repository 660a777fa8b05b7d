//! Resilience on real sockets: one endpoint in three fails, hangs or recovers, a service is
//! overloaded, a whole service fails; retries, budgets, timeouts, circuit breakers, outlier
//! detection and active health checks, each seen from a client.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

const OK: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

/// An upstream whose behaviour a test switches at run time: answer 200, answer 503 (the
/// health path too), or hang without answering. It counts requests and the most it ever
/// had in flight at once.
#[derive(Clone)]
struct Scripted {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicUsize>,
    health_hits: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(mode: u8) -> Scripted {
        Self::start_with(mode, false).await
    }

    async fn start_with(mode: u8, h2: bool) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Scripted {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(mode)),
            hits: Default::default(),
            health_hits: Default::default(),
            in_flight: Default::default(),
            peak: Default::default(),
        };
        let server = s.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| server.clone().answer(req));
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        s
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn answer(
        self,
        req: Request<Incoming>,
    ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
        let health = req.uri().path() == "/healthz";
        if health {
            self.health_hits.fetch_add(1, Ordering::SeqCst);
        } else {
            self.hits.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let _guard = Decrement(self.in_flight.clone());
        let delay = req
            .headers()
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let grpc = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mode = self.mode.load(Ordering::SeqCst);
        if mode == HANG && !health {
            std::future::pending::<()>().await;
        }
        if grpc {
            // Trailers-only: grpc-status in the headers of an empty response.
            let status = if mode == OK { "0" } else { "14" };
            return Ok(Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", status)
                .header("x-upstream", self.addr.to_string())
                .body(Empty::new().boxed())
                .unwrap());
        }
        let status = if mode == OK {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Ok(Response::builder()
            .status(status)
            .header("x-upstream", self.addr.to_string())
            .header("x-body-len", body.len().to_string())
            .body(Full::new(body).boxed())
            .unwrap())
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn endpoints(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The issue's configuration, with knobs for what each scenario varies.
fn config(addrs: &[SocketAddr], route: &str, service: &str) -> String {
    format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - backends: [ {{ service: api }} ]
{route}
services:
  - name: api
    protocol: http1
    load_balancer: round_robin
    connect_timeout: 1s
{service}
    endpoints: [ {eps} ]
"#,
        eps = endpoints(addrs)
    )
}

const RETRY: &str = "        timeout: 2s
        retry: { attempts: 3, on: [5xx, connect-failure, reset], per_try_timeout: 500ms,
                 backoff: { base: 25ms, max: 250ms }, budget: { ratio: 0.2, min_per_second: 10 } }";

const BREAKER_AND_OUTLIER: &str = "    circuit_breaker: { max_connections: 1024, max_pending_requests: 128, max_requests: 1024, max_retries: 3 }
    outlier_detection: { consecutive_5xx: 5, consecutive_gateway_failure: 5, consecutive_connect_failure: 5,
                         interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50 }";

/// The value of the first sample whose line starts with `prefix` (0 when absent).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn endpoint_states(proxy: &Proxy) -> Vec<serde_json::Value> {
    let admin = proxy
        .app
        .serve_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = get(&http1_client(), admin, "admin", "/endpoints", &[]).await;
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    json["services"][0]["endpoints"].as_array().unwrap().clone()
}

fn state_of(states: &[serde_json::Value], addr: SocketAddr) -> &serde_json::Value {
    states
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap()
}

/// Sends `total` GETs, `concurrency` at a time; returns each status with its latency.
async fn load(
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    headers: &[(&str, &str)],
) -> Vec<(StatusCode, Duration, String)> {
    let client = http1_client();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let mut req = Request::get(format!("http://{addr}/")).header("host", "api");
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                let started = Instant::now();
                let r = send(&client, req.body(Full::new(Bytes::new())).unwrap()).await;
                out.push((
                    r.status,
                    started.elapsed(),
                    r.header("x-tern-overloaded").to_string(),
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort();
    let index = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
    latencies[index.min(latencies.len() - 1)]
}

/// (a) One endpoint in three always answers 503: retries hide it from clients and outlier
/// detection takes it out of rotation after `consecutive_5xx` failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_endpoint_in_three_is_retried_around_and_ejected() {
    let good_a = Scripted::start(OK).await;
    let good_b = Scripted::start(OK).await;
    let bad = Scripted::start(FAIL).await;
    let proxy = Proxy::start(&config(
        &[good_a.addr, bad.addr, good_b.addr],
        RETRY,
        BREAKER_AND_OUTLIER,
    ))
    .await;

    let results = load(proxy.addr("web"), 2000, 16, &[]).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let failed: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).collect();
    assert!(
        ok * 1000 >= 2000 * 999,
        "only {ok} of 2000 succeeded: {failed:?}"
    );

    // Ejected after 5 consecutive 5xx; requests already in flight when it tipped over may
    // still land, at most one per concurrent client.
    assert!(bad.hits() >= 5, "the failing endpoint was never tried");
    assert!(
        bad.hits() <= 5 + 16,
        "the failing endpoint kept getting traffic: {} requests",
        bad.hits()
    );
    let states = endpoint_states(&proxy).await;
    let bad_state = state_of(&states, bad.addr);
    assert_eq!(bad_state["outlier"], "ejected", "{states:?}");
    assert_eq!(bad_state["ejections"], 1, "{states:?}");
    assert!(bad_state["ejection_seconds_left"].as_f64().unwrap() > 20.0);
    assert_eq!(state_of(&states, good_a.addr)["outlier"], "healthy");

    let m = proxy.metrics();
    assert_eq!(sample(&m, "tern_outlier_ejections_total{"), 1.0, "{m}");
    assert!(
        sample(&m, "tern_retries_total{") >= 5.0,
        "bad hits {}: {m}",
        bad.hits()
    );
    assert_eq!(sample(&m, "tern_endpoint_ejected{"), 1.0, "{m}");
}

/// (b) One endpoint hangs: the per-try timeout cuts each attempt on it and the retry goes to
/// another endpoint, so no request waits much longer than per-try timeout plus backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_costs_at_most_one_per_try_timeout() {
    let good_a = Scripted::start(OK).await;
    let good_b = Scripted::start(OK).await;
    let hung = Scripted::start(HANG).await;
    // No outlier detection: every third request meets the hanging endpoint.
    let route = "        timeout: 5s
        retry: { attempts: 2, on: [5xx, reset], per_try_timeout: 200ms,
                 backoff: { base: 10ms, max: 50ms }, budget: { ratio: 1.0, min_per_second: 100 } }";
    // `max_retries` sized for the load: eight clients meet the hanging endpoint together.
    let service = "    circuit_breaker: { max_retries: 100 }";
    let proxy = Proxy::start(&config(
        &[good_a.addr, hung.addr, good_b.addr],
        route,
        service,
    ))
    .await;

    let results = load(proxy.addr("web"), 300, 8, &[]).await;
    let failed: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert!(
        hung.hits() >= 50,
        "the hanging endpoint was hardly tried: {}",
        hung.hits()
    );
    let mut latencies: Vec<Duration> = results.iter().map(|r| r.1).collect();
    let p99 = percentile(&mut latencies, 0.99);
    // 200 ms per try + at most 50 ms backoff; the rest is slack for a loaded CI machine.
    assert!(p99 < Duration::from_millis(600), "p99 {p99:?}");
    let p50 = percentile(&mut latencies, 0.50);
    assert!(p50 < Duration::from_millis(150), "p50 {p50:?}");
    let m = proxy.metrics();
    assert!(
        sample(&m, "tern_timeouts_total{service=\"api\",kind=\"per_try\"}") >= 50.0,
        "{m}"
    );
}

/// (c) Overload: past `max_requests` and `max_pending_requests` the proxy answers 503 with
/// `x-tern-overloaded: true` at once instead of queueing, and the upstream never sees more
/// than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_fails_fast_with_the_header_and_never_exceeds_the_limit() {
    let slow = Scripted::start(OK).await;
    let service = "    circuit_breaker: { max_connections: 8, max_pending_requests: 2, max_requests: 4, max_retries: 3 }";
    let proxy = Proxy::start(&config(&[slow.addr], "", service)).await;

    let results = load(proxy.addr("web"), 200, 50, &[("x-delay-ms", "1500")]).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let refused: Vec<_> = results
        .iter()
        .filter(|r| r.0 == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(ok + refused.len(), 200);
    assert!(ok >= 4, "{ok} succeeded");
    assert!(refused.len() >= 150, "{} refused", refused.len());
    assert!(
        refused.iter().all(|r| r.2 == "true"),
        "a 503 without the header"
    );
    // Refusals did not wait for the upstream's 1.5 s.
    let mut refused_latency: Vec<Duration> = refused.iter().map(|r| r.1).collect();
    let p99 = percentile(&mut refused_latency, 0.99);
    assert!(p99 < Duration::from_millis(500), "refusals took {p99:?}");
    assert!(
        slow.peak.load(Ordering::SeqCst) <= 4,
        "upstream saw {}",
        slow.peak.load(Ordering::SeqCst)
    );
    let m = proxy.metrics();
    assert!(sample(&m, "tern_overloaded_total{") >= 150.0, "{m}");
}

/// (c, memory) The proxy process under repeated overload: RSS after many rounds stays where
/// it was after the first, because nothing queues past the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_keeps_memory_flat_in_the_proxy_process() {
    let slow = Scripted::start(OK).await;
    let dir = TempDir::new("overload");
    let port = free_port();
    let yaml = config(
        &[slow.addr],
        "",
        "    circuit_breaker: { max_connections: 16, max_pending_requests: 8, max_requests: 16, max_retries: 3 }",
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.0.join("tern.yaml");
    std::fs::write(&path, yaml).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    proxy.wait_ready().await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pid = proxy.child.id();

    let round = || load(addr, 1000, 100, &[("x-delay-ms", "200")]);
    let first = round().await;
    assert!(first.iter().any(|r| r.2 == "true"), "no overload reached");
    let after_first = rss_kib(pid);
    for _ in 0..4 {
        round().await;
    }
    let after_five = rss_kib(pid);
    assert!(
        after_five < after_first + 8 * 1024,
        "RSS grew from {after_first} KiB to {after_five} KiB"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// (d) Every endpoint fails: the budget keeps retries near `ratio` of the requests instead of
/// `attempts` times them, and each refusal to retry is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_is_not_hammered_beyond_the_retry_budget() {
    let bad: Vec<Scripted> = futures_join(3, FAIL).await;
    let addrs: Vec<SocketAddr> = bad.iter().map(|s| s.addr).collect();
    let route = "        retry: { attempts: 3, on: [5xx], backoff: { base: 1ms, max: 2ms },
                 budget: { ratio: 0.2, min_per_second: 1 } }";
    let service = "    circuit_breaker: { max_retries: 100 }";
    let proxy = Proxy::start(&config(&addrs, route, service)).await;

    let requests = 500;
    let results = load(proxy.addr("web"), requests, 8, &[]).await;
    assert!(
        results
            .iter()
            .all(|r| r.0 == StatusCode::SERVICE_UNAVAILABLE)
    );
    let upstream: usize = bad.iter().map(Scripted::hits).sum();
    let retries = upstream - requests;
    // 0.2 × 500 + 1/s over the 10 s window; without a budget this would be 3 × 500.
    assert!(
        retries <= 100 + 10,
        "{retries} retries for {requests} requests"
    );
    assert!(retries >= 90, "the budget allowed only {retries} retries");
    let m = proxy.metrics();
    // Every retry that reached an endpoint is counted (a retry can still die on its way,
    // e.g. on a pooled connection the endpoint closed, so allow a few more in the metric).
    let counted = sample(&m, "tern_retries_total{") as usize;
    assert!(
        counted >= retries && counted <= retries + 3,
        "{counted} counted, {retries} seen: {m}"
    );
    assert!(
        sample(&m, "tern_retry_budget_exhausted_total{") >= 300.0,
        "{m}"
    );
}

async fn futures_join(n: usize, mode: u8) -> Vec<Scripted> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Scripted::start(mode).await);
    }
    out
}

/// (e) An ejected endpoint that recovers comes back after its ejection time, on probation,
/// and is ejected again (for longer) if it fails again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_endpoint_returns_after_its_ejection() {
    let good = Scripted::start(OK).await;
    let flaky = Scripted::start(FAIL).await;
    let other = Scripted::start(OK).await;
    let service =
        "    outlier_detection: { consecutive_5xx: 3, interval: 100ms, base_ejection_time: 1s,
                         max_ejection_percent: 50 }";
    let proxy = Proxy::start(&config(
        &[good.addr, flaky.addr, other.addr],
        RETRY,
        service,
    ))
    .await;
    let addr = proxy.addr("web");

    let results = load(addr, 60, 1, &[]).await;
    assert!(results.iter().all(|r| r.0 == StatusCode::OK));
    let states = endpoint_states(&proxy).await;
    assert_eq!(
        state_of(&states, flaky.addr)["outlier"],
        "ejected",
        "{states:?}"
    );

    flaky.set(OK);
    let hits_while_ejected = flaky.hits();
    load(addr, 30, 1, &[]).await;
    assert_eq!(
        flaky.hits(),
        hits_while_ejected,
        "an ejected endpoint got traffic"
    );

    // After the 1 s ejection (plus the 100 ms sweep), it serves again.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    load(addr, 60, 1, &[]).await;
    assert!(
        flaky.hits() >= hits_while_ejected + 15,
        "the recovered endpoint got {} of 60",
        flaky.hits() - hits_while_ejected
    );
    let states = endpoint_states(&proxy).await;
    let s = state_of(&states, flaky.addr);
    assert_ne!(s["outlier"], "ejected", "{states:?}");

    // Failing again re-ejects it, for longer than the first time.
    flaky.set(FAIL);
    load(addr, 60, 1, &[]).await;
    let states = endpoint_states(&proxy).await;
    let s = state_of(&states, flaky.addr);
    assert_eq!(s["outlier"], "ejected", "{states:?}");
    assert_eq!(s["ejections"], 2, "{states:?}");
    assert!(
        s["ejection_seconds_left"].as_f64().unwrap() > 1.0,
        "{states:?}"
    );
}

/// Active health checks take a failing endpoint out before any request meets it, and put it
/// back after `healthy_threshold` good probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_gate_traffic_both_ways() {
    let good = Scripted::start(OK).await;
    let sick = Scripted::start(FAIL).await;
    let service =
        "    health_check: { http: { path: /healthz, expected_statuses: [200] }, interval: 100ms,
                    timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2 }";
    let proxy = Proxy::start(&config(&[good.addr, sick.addr], "", service)).await;
    let addr = proxy.addr("web");

    wait_for(|| sick.health_hits.load(Ordering::SeqCst) >= 3).await;
    let states = endpoint_states(&proxy).await;
    assert_eq!(
        state_of(&states, sick.addr)["health"],
        "unhealthy",
        "{states:?}"
    );
    assert_eq!(
        state_of(&states, good.addr)["health"],
        "healthy",
        "{states:?}"
    );
    let results = load(addr, 40, 2, &[]).await;
    let failed: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "traffic met the sick endpoint: {failed:?}, sick hits {}, states {:?}",
        sick.hits(),
        endpoint_states(&proxy).await
    );
    assert_eq!(sick.hits(), 0);

    sick.set(OK);
    let probes = sick.health_hits.load(Ordering::SeqCst);
    wait_for(|| sick.health_hits.load(Ordering::SeqCst) >= probes + 3).await;
    let results = load(addr, 40, 2, &[]).await;
    assert!(results.iter().all(|r| r.0 == StatusCode::OK));
    assert!(
        sick.hits() >= 10,
        "the recovered endpoint got {} of 40",
        sick.hits()
    );
    let m = proxy.metrics();
    assert!(m.contains("tern_endpoint_unhealthy"), "{m}");
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The route timeout answers 504 with a body naming it, and counts it.
#[tokio::test]
async fn route_timeout_answers_504_with_a_reason() {
    let slow = Scripted::start(OK).await;
    let proxy = Proxy::start(&config(&[slow.addr], "        timeout: 200ms", "")).await;
    let started = Instant::now();
    let r = get(
        &http1_client(),
        proxy.addr("web"),
        "api",
        "/",
        &[("x-delay-ms", "3000")],
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(r.body.contains("timeout"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(2));
    let m = proxy.metrics();
    assert_eq!(
        sample(&m, "tern_timeouts_total{service=\"api\",kind=\"request\"}"),
        1.0,
        "{m}"
    );
}

/// With a policy, an idempotent PUT is replayed to another endpoint with its body intact;
/// a POST is not retried on a 5xx (it may have been acted on), and neither is a body larger
/// than the replay buffer.
#[tokio::test]
async fn bodies_are_replayed_only_for_idempotent_methods_within_the_limit() {
    let bad = Scripted::start(FAIL).await;
    let good = Scripted::start(OK).await;
    let route = "        retry: { attempts: 1, on: [5xx], backoff: { base: 1ms, max: 2ms } }";
    // Round robin starts at the failing endpoint, then alternates.
    let proxy = Proxy::start(&config(&[bad.addr, good.addr], route, "")).await;
    let addr = proxy.addr("web");
    let client = http1_client();
    let request = |method: &str, body: Vec<u8>| {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}/"))
            .header("host", "api")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };

    let mut put_ok = 0;
    let mut post_failed = 0;
    for _ in 0..4 {
        let r = send(&client, request("PUT", vec![b'x'; 1000])).await;
        assert_eq!(r.status, StatusCode::OK, "PUT was not retried");
        assert_eq!(r.header("x-body-len"), "1000", "the replayed body changed");
        put_ok += 1;
        let r = send(&client, request("POST", b"charge".to_vec())).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            post_failed += 1;
        }
    }
    assert_eq!(put_ok, 4);
    assert!(
        post_failed >= 1,
        "POST never met the failing endpoint or was retried"
    );

    // 100 KiB is past the 64 KiB replay buffer: sent once, the 503 passes through.
    let before = bad.hits() + good.hits();
    let mut large_failed = 0;
    for _ in 0..4 {
        let r = send(&client, request("PUT", vec![b'y'; 100 * 1024])).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            large_failed += 1;
        } else {
            assert_eq!(r.header("x-body-len"), (100 * 1024).to_string());
        }
    }
    assert!(large_failed >= 1, "a large body was retried");
    assert_eq!(
        bad.hits() + good.hits() - before,
        4,
        "a large body was sent twice"
    );
}

/// gRPC: a trailers-only `UNAVAILABLE` (14) is retried on another endpoint when the route
/// asks for `unavailable`, for any method (gRPC calls are POSTs).
#[tokio::test]
async fn grpc_unavailable_is_retried_from_trailers_only_responses() {
    let bad = Scripted::start_with(FAIL, true).await;
    let good = Scripted::start_with(OK, true).await;
    let yaml = config(
        &[bad.addr, good.addr],
        "        retry: { attempts: 2, on: [unavailable], backoff: { base: 1ms, max: 2ms } }",
        "",
    )
    .replace("protocol: http1", "protocol: http2");
    let proxy = Proxy::start(&yaml).await;
    let client = h2c_client();
    for _ in 0..6 {
        let req = Request::post(format!("http://{}/echo.Echo/Say", proxy.addr("web")))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(
            r.header("grpc-status"),
            "0",
            "UNAVAILABLE reached the client"
        );
        assert_eq!(r.header("x-upstream"), good.addr.to_string());
    }
    assert!(
        bad.hits() >= 3,
        "the failing endpoint got {} calls",
        bad.hits()
    );
    let m = proxy.metrics();
    assert!(sample(&m, "tern_retries_total{") >= 3.0, "{m}");
}

/// A connect failure is retried on another endpoint, and never counted as a request the
/// failing endpoint answered.
#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let good = Scripted::start(OK).await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let route =
        "        retry: { attempts: 2, on: [connect-failure], backoff: { base: 1ms, max: 2ms } }";
    let proxy = Proxy::start(&config(&[dead, good.addr], route, "")).await;
    let results = load(proxy.addr("web"), 20, 1, &[]).await;
    assert!(results.iter().all(|r| r.0 == StatusCode::OK));
    assert_eq!(good.hits(), 20);
}

/// A retry policy that cannot work is refused with the field named.
#[test]
fn invalid_policies_name_the_field() {
    let cases = [
        ("        retry: { attempts: 3, on: [sometimes] }", "on"),
        (
            "        retry: { attempts: 3, on: [5xx], budget: { ratio: 2.5, min_per_second: 1 } }",
            "ratio",
        ),
        (
            "        retry: { attempts: 3, on: [5xx], backoff: { base: 1s, max: 10ms } }",
            "backoff",
        ),
    ];
    for (route, field) in cases {
        let yaml = config(&["127.0.0.1:9".parse().unwrap()], route, "");
        let error = tern_proxy::config::parse_yaml(&yaml)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{route}: {error}");
    }
}
