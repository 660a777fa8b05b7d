//! Rate limiting and fault injection per route, on real sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn config(upstream: SocketAddr, route: &str) -> String {
    format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - backends: [ {{ service: api }} ]\n{route}\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{upstream}\" }} ]\n"
    )
}

#[tokio::test]
async fn a_route_allows_its_burst_then_answers_429_with_retry_after() {
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(
        api.addr,
        "        rate_limit: { requests_per_second: 2, burst: 10, key: none }",
    ))
    .await;
    let client = http1_client();
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..30 {
        let r = get(&client, proxy.addr("web"), "x", "/", &[]).await;
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited.push(r),
            other => panic!("{other}"),
        }
    }
    // The burst, plus at most one token refilled while the 30 requests ran.
    assert!((10..=11).contains(&ok), "{ok} allowed");
    assert_eq!(api.hits(), ok, "refused requests reached the upstream");
    let retry_after: u64 = limited[0].header("retry-after").parse().unwrap();
    assert!((1..=1).contains(&retry_after), "{retry_after}");
    let m = proxy.metrics();
    assert!(
        m.contains(&format!(
            "tern_rate_limited_total{{listener=\"web\",route=\"0\"}} {}",
            30 - ok
        )),
        "{m}"
    );
}

#[tokio::test]
async fn each_header_value_has_its_own_bucket() {
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(
        api.addr,
        "        rate_limit: { requests_per_second: 1, burst: 3, key: \"header:x-tenant\" }",
    ))
    .await;
    let client = http1_client();
    let count = |tenant: &'static str| {
        let client = client.clone();
        let addr = proxy.addr("web");
        async move {
            let mut ok = 0;
            for _ in 0..6 {
                if get(&client, addr, "x", "/", &[("x-tenant", tenant)])
                    .await
                    .status
                    == 200
                {
                    ok += 1;
                }
            }
            ok
        }
    };
    assert_eq!(count("a").await, 3);
    assert_eq!(count("b").await, 3);
}

#[tokio::test]
async fn faults_abort_and_delay_the_requests_they_are_meant_for() {
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(
        api.addr,
        "        fault: { abort: { percent: 100, status: 418 }, header: x-chaos }",
    ))
    .await;
    let client = http1_client();
    let r = get(&client, proxy.addr("web"), "x", "/", &[("x-chaos", "1")]).await;
    assert_eq!(r.status.as_u16(), 418);
    assert_eq!(r.header("x-tern-fault"), "abort");
    assert_eq!(api.hits(), 0);
    let r = get(&client, proxy.addr("web"), "x", "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(api.hits(), 1);

    let proxy = Proxy::start(&config(
        api.addr,
        "        fault: { delay: { percent: 100, duration: 300ms } }",
    ))
    .await;
    let started = Instant::now();
    let r = get(&client, proxy.addr("web"), "x", "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let m = proxy.metrics();
    assert!(
        m.contains("tern_faults_total{listener=\"web\",route=\"0\",kind=\"delay\"} 1"),
        "{m}"
    );
}

#[test]
fn bad_policies_name_the_field() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (route, field) in [
        (
            "        rate_limit: { requests_per_second: 0 }",
            "rate_limit.requests_per_second",
        ),
        (
            "        rate_limit: { requests_per_second: 5, burst: 0 }",
            "rate_limit.burst",
        ),
        (
            "        rate_limit: { requests_per_second: 5, key: cookie }",
            "rate_limit.key",
        ),
        (
            "        fault: { abort: { percent: 150, status: 503 } }",
            "fault.abort.percent",
        ),
        (
            "        fault: { abort: { percent: 1, status: 99 } }",
            "fault.abort.status",
        ),
        (
            "        fault: { delay: { percent: 1, duration: soon } }",
            "fault.delay.duration",
        ),
        ("        fault: {}", "fault"),
    ] {
        let e = tern_proxy::config::parse_yaml(&config(addr, route))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{route}: {e}");
    }
}
