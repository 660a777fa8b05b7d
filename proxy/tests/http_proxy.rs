//! HTTP through the proxy on real sockets: HTTP/1.1 and h2c downstream, routing, headers,
//! streaming bodies, failure answers and malformed input.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use support::*;

fn config(api: &[&Upstream], v2: &Upstream, extra: &str) -> String {
    let eps: String = api
        .iter()
        .map(|u| format!("      - {{ address: \"{}\" }}\n", u.addr))
        .collect();
    format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    request_header_timeout: 300ms
    routes:
      - match: {{ host: api.local, path_prefix: /v2, headers: {{ x-canary: "1" }} }}
        backends: [ {{ service: api-v2 }} ]
      - match: {{ host: api.local }}
        backends: [ {{ service: api }} ]
      - match: {{ path: /split }}
        backends: [ {{ service: api-v2, weight: 1 }}, {{ service: api, weight: 3 }} ]
{extra}
services:
  - name: api
    protocol: http1
    load_balancer: round_robin
    endpoints:
{eps}
  - name: api-v2
    protocol: http1
    endpoints: [ {{ address: "{v2}" }} ]
"#,
        v2 = v2.addr
    )
}

#[tokio::test]
async fn routes_by_host_path_and_header_and_preserves_host() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    let addr = proxy.addr("web");
    let client = http1_client();

    let r = get(
        &client,
        addr,
        "api.local:8080",
        "/v2/users",
        &[("x-canary", "1")],
    )
    .await;
    assert_eq!((r.status, r.header("x-upstream")), (StatusCode::OK, "v2"));
    assert_eq!(
        r.header("x-seen-host"),
        "api.local:8080",
        "Host is preserved"
    );
    assert_eq!(r.header("x-seen-path"), "/v2/users");
    assert_eq!(r.header("x-seen-xff"), "127.0.0.1");

    // Without the header, the canary route does not match: first-match falls to `api`.
    let r = get(&client, addr, "API.local", "/v2/users?q=1", &[]).await;
    assert_eq!(r.header("x-upstream"), "api");
    assert_eq!(r.header("x-seen-path"), "/v2/users?q=1");

    let r = get(&client, addr, "other.local", "/nothing", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(
        r.body
            .contains("no route for host other.local path /nothing on listener web"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn weighted_split_and_round_robin_spread() {
    let (a1, a2, v2) = (
        Upstream::start("a1").await,
        Upstream::start("a2").await,
        Upstream::start("v2").await,
    );
    let proxy = Proxy::start(&config(&[&a1, &a2], &v2, "")).await;
    let client = http1_client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let r = get(&client, proxy.addr("web"), "x", "/split", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        *seen.entry(r.header("x-upstream").to_string()).or_default() += 1;
    }
    // 1:3 between api-v2 and api; api's two endpoints alternate.
    let v2_share = seen["v2"] as f64 / 400.0;
    assert!((0.15..0.35).contains(&v2_share), "{seen:?}");
    assert!(seen["a1"].abs_diff(seen["a2"]) <= 2, "{seen:?}");
}

#[tokio::test]
async fn h2c_downstream_reaches_http1_upstream() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    // One HTTP/2 prior-knowledge connection; `:authority` names api.local.
    let mut h2 = h2_connect(proxy.addr("web")).await;
    let req = Request::get("http://api.local:81/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h2.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-upstream"], "api");
    assert_eq!(response.headers()["x-seen-version"], "HTTP/1.1");
    assert_eq!(response.headers()["x-seen-host"], "api.local:81");
    // Many concurrent streams over the same connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("http://api.local/c{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = h2.send_request(req).await.unwrap();
            let status = r.status();
            r.into_body().collect().await.unwrap();
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    let client = http1_client();
    let r = get(
        &client,
        proxy.addr("web"),
        "api.local",
        "/",
        &[
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("x-forwarded-for", "10.1.2.3"),
        ],
    )
    .await;
    assert_eq!(r.header("x-seen-hop"), "0");
    assert_eq!(r.header("x-seen-xff"), "10.1.2.3, 127.0.0.1");
    // The upstream answered with `connection: keep-alive`; it must not reach the client as-is.
    assert!(!r.headers.contains_key("keep-alive"));
}

#[tokio::test]
async fn chunked_request_body_streams_both_ways() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    // 64 chunks of 16 KiB: the body has no length, so it is chunked end to end.
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0..64)
        .map(|i| {
            Ok(http_body::Frame::data(Bytes::from(vec![
                b'a' + (i % 26)
                    as u8;
                16 * 1024
            ])))
        })
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = Request::post(format!("http://{}/upload", proxy.addr("web")))
        .header("host", "api.local")
        .body(body)
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 64 * 16 * 1024);
    assert_eq!(echoed[16 * 1024], b'b');
}

#[tokio::test]
async fn keep_alive_reuses_one_downstream_connection() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    let request = b"GET /1 HTTP/1.1\r\nhost: api.local\r\n\r\nGET /2 HTTP/1.1\r\nhost: api.local\r\nconnection: close\r\n\r\n";
    let out = raw_exchange(proxy.addr("web"), request, Duration::from_secs(5)).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains("x-seen-path: /2"));
}

#[tokio::test]
async fn refused_endpoint_gets_503_naming_the_service_and_is_avoided() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let live = Upstream::start("live").await;
    let v2 = Upstream::start("v2").await;
    let fake_dead = Upstream::at(dead_addr, "dead");
    let proxy = Proxy::start(&config(&[&fake_dead, &live], &v2, "")).await;
    let client = http1_client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = get(&client, proxy.addr("web"), "api.local", "/", &[]).await;
        if r.status != StatusCode::OK {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                r.body.contains("upstream service api unavailable"),
                "{}",
                r.body
            );
        }
        statuses.push(r.status);
    }
    // At most the first pick hits the dead endpoint; after that it is avoided.
    let failures = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert!(failures <= 1, "{statuses:?}");
    assert!(live.hits() >= 9);
}

#[tokio::test]
async fn upstream_reset_gets_502_not_a_hang() {
    // An upstream that accepts and closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let v2 = Upstream::start("v2").await;
    let fake = Upstream::at(rude, "rude");
    let proxy = Proxy::start(&config(&[&fake], &v2, "")).await;
    let r = get(&http1_client(), proxy.addr("web"), "api.local", "/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.body.contains("upstream service api"), "{}", r.body);
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_slow_headers_time_out() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    let addr = proxy.addr("web");

    let out = raw_exchange(
        addr,
        b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");

    let huge = format!(
        "GET / HTTP/1.1\r\nhost: api.local\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw_exchange(addr, huge.as_bytes(), Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");

    // Headers never finished: the connection is closed after the 300 ms header timeout.
    let start = std::time::Instant::now();
    let out = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: api.lo",
        Duration::from_secs(5),
    )
    .await;
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "slow client held the connection for {waited:?}: {out:?}"
    );
    assert_eq!(a.hits(), 0, "nothing malformed reached the upstream");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (a, v2) = (Upstream::start("api").await, Upstream::start("v2").await);
    let proxy = Proxy::start(&config(&[&a], &v2, "")).await;
    let client = http1_client();
    for _ in 0..50 {
        assert_eq!(
            get(&client, proxy.addr("web"), "api.local", "/", &[])
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(a.hits(), 50);
    assert_eq!(
        a.conns.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one keep-alive connection serves all"
    );
}

/// An upstream that answers one request per connection and then closes it shortly after,
/// without announcing `connection: close`: the pooled connection dies while idle.
#[tokio::test]
async fn pooled_connection_closed_by_upstream_causes_no_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            });
        }
    });
    let v2 = Upstream::start("v2").await;
    let proxy = Proxy::start(&config(&[&Upstream::at(addr, "closer")], &v2, "")).await;
    let client = http1_client();
    for _ in 0..5 {
        let r = get(&client, proxy.addr("web"), "api.local", "/", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ok"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_by_tern_after_idle_timeout() {
    let a = Upstream::start("api").await;
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\nservices:\n  - name: api\n    protocol: http1\n    idle_timeout: 300ms\n    endpoints: [ {{ address: \"{}\" }} ]\n",
        a.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let idle = || {
        proxy.app.store().load().services["api"].endpoints[0]
            .pool
            .idle_count()
    };
    assert_eq!(
        get(&http1_client(), proxy.addr("web"), "x", "/", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(idle(), 1, "the connection went back to the pool");
    // The sweeper runs every second; 300 ms idle is past the timeout by then.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(idle(), 0, "Tern closed the idle connection");
    assert_eq!(
        get(&http1_client(), proxy.addr("web"), "x", "/", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        a.conns.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "a fresh connection was dialled"
    );
}
