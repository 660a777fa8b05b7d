//! Tracing on real sockets: spans exported over OTLP/gRPC to a receiver in the test (a
//! tonic server with the OpenTelemetry protocol types), W3C context honoured and
//! propagated, ratio sampling, and a receiver that is down costing no request.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value::Value as Pv;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::otlp::Receiver;
use support::*;

async fn receiver() -> (SocketAddr, Receiver) {
    support::otlp::receiver(None).await
}

fn config(otlp: SocketAddr, ratio: f64, api: SocketAddr) -> String {
    support::otlp::config(&format!("http://{otlp}"), ratio, api)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn wait_spans(r: &Receiver, n: usize) -> Vec<(String, Span)> {
    for _ in 0..250 {
        let spans = r.spans.lock().unwrap().clone();
        if spans.len() >= n {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} spans: {:?}", r.spans.lock().unwrap());
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn spans_continue_the_clients_trace_and_the_upstream_sees_the_proxys_span() {
    let (otlp, r) = receiver().await;
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(otlp, 0.0, api.addr)).await;
    let parent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let reply = get(
        &http1_client(),
        proxy.addr("web"),
        "api.local",
        "/orders",
        &[("traceparent", &parent)],
    )
    .await;
    assert_eq!(reply.status, 200);
    // The upstream's parent is the proxy's attempt span, in the client's trace.
    let seen = reply.header("x-seen-traceparent").to_string();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], TRACE);
    assert_ne!(parts[2], CLIENT_SPAN);
    assert_eq!(parts[3], "01");

    // Sampled by the parent even with sample_ratio 0: a server and a client span.
    let spans = wait_spans(&r, 2).await;
    let server = spans
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("server span");
    let client = spans
        .iter()
        .find(|(_, s)| s.kind == 3)
        .expect("client span");
    assert!(server.0.contains("web-sidecar"), "{}", server.0);
    assert_eq!(hex(&server.1.trace_id), TRACE);
    assert_eq!(hex(&server.1.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&client.1.trace_id), TRACE);
    assert_eq!(client.1.parent_span_id, server.1.span_id);
    assert_eq!(hex(&client.1.span_id), parts[2]);
    // Wall-clock times (read once per request, the rest from the monotonic clock): the
    // attempt inside the request, the request within the last minute.
    let (s, c) = (&server.1, &client.1);
    assert!(
        s.start_time_unix_nano <= c.start_time_unix_nano
            && c.start_time_unix_nano <= c.end_time_unix_nano
            && c.end_time_unix_nano <= s.end_time_unix_nano,
        "server {s:?} client {c:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(
        s.start_time_unix_nano <= now && now - s.start_time_unix_nano < 60_000_000_000,
        "{} vs {now}",
        s.start_time_unix_nano
    );
    let attr = |s: &Span, k: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default()
    };
    assert!(attr(&server.1, "http.request.method").contains("GET"));
    assert!(attr(&server.1, "url.path").contains("/orders"));
    assert!(attr(&server.1, "http.response.status_code").contains("200"));
    assert!(attr(&client.1, "tern.service").contains("api"));
    assert!(attr(&client.1, "tern.endpoint").contains(&api.addr.to_string()));
    assert_eq!(
        attr(&client.1, "server.address"),
        format!("Some(StringValue({:?}))", api.addr.ip().to_string())
    );
    assert_eq!(
        attr(&client.1, "server.port"),
        format!("Some(IntValue({}))", api.addr.port())
    );
}

/// The client gives up while the upstream is still silent: both spans are exported anyway,
/// the server span saying why it has no status.
#[tokio::test]
async fn a_request_the_client_cancels_is_still_exported() {
    let (otlp, r) = receiver().await;
    // An upstream that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let proxy = Proxy::start(&config(otlp, 0.0, silent_addr)).await;
    let mut send = h2_connect(proxy.addr("web")).await;
    let req = hyper::Request::get("http://x/slow")
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    let gave_up = tokio::time::timeout(Duration::from_millis(300), send.send_request(req)).await;
    assert!(
        gave_up.is_err(),
        "the silent upstream answered: {gave_up:?}"
    );
    let spans = wait_spans(&r, 2).await;
    let server = spans
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("server span");
    assert!(
        spans.iter().any(|(_, s)| s.kind == 3),
        "no attempt span: {spans:?}"
    );
    assert_eq!(hex(&server.1.trace_id), TRACE);
    let outcome = server
        .1
        .attributes
        .iter()
        .find(|kv| kv.key == "tern.outcome")
        .and_then(|kv| kv.value.as_ref())
        .map(|v| format!("{:?}", v.value))
        .unwrap_or_default();
    assert!(outcome.contains("downstream_disconnect"), "{:?}", server.1);
    assert!(server.1.end_time_unix_nano >= server.1.start_time_unix_nano + 250_000_000);
    held.abort();
}

#[tokio::test]
async fn ratio_zero_exports_nothing_for_unsampled_or_new_traces_but_still_propagates() {
    let (otlp, r) = receiver().await;
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(otlp, 0.0, api.addr)).await;
    let client = http1_client();
    // A new trace, and a parent that said "not sampled".
    let fresh = get(&client, proxy.addr("web"), "x", "/", &[]).await;
    let unsampled = format!("00-{TRACE}-{CLIENT_SPAN}-00");
    let kept = get(
        &client,
        proxy.addr("web"),
        "x",
        "/",
        &[("traceparent", &unsampled)],
    )
    .await;
    assert_eq!((fresh.status.as_u16(), kept.status.as_u16()), (200, 200));
    // Context still flows, flagged unsampled.
    assert!(
        fresh.header("x-seen-traceparent").ends_with("-00"),
        "{}",
        fresh.header("x-seen-traceparent")
    );
    assert!(kept.header("x-seen-traceparent").contains(TRACE));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        r.spans.lock().unwrap().is_empty(),
        "unsampled spans were exported"
    );
}

#[tokio::test]
async fn b3_headers_are_accepted_and_w3c_goes_onward() {
    let (otlp, r) = receiver().await;
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(otlp, 0.0, api.addr)).await;
    let reply = get(
        &http1_client(),
        proxy.addr("web"),
        "x",
        "/",
        &[("b3", &format!("{TRACE}-{CLIENT_SPAN}-1"))],
    )
    .await;
    assert!(
        reply
            .header("x-seen-traceparent")
            .starts_with(&format!("00-{TRACE}-"))
    );
    let spans = wait_spans(&r, 2).await;
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) == TRACE));
}

#[tokio::test]
async fn a_collector_that_is_down_costs_no_request() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(dead, 1.0, api.addr)).await;
    let client = http1_client();
    for _ in 0..200 {
        assert_eq!(
            get(&client, proxy.addr("web"), "x", "/", &[]).await.status,
            200
        );
    }
    // The export failures are counted, not felt.
    let [_, dropped, failures] = export_counters(&proxy, |c| c[1] > 0 && c[2] > 0).await;
    assert!(
        failures > 0 && dropped > 0,
        "{dropped} dropped, {failures} failures"
    );
}

#[test]
fn tracing_config_is_validated() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let e = tern_proxy::config::parse_yaml(&config(addr, 1.5, addr))
        .unwrap_err()
        .to_string();
    assert!(e.contains("telemetry.tracing.sample_ratio"), "{e}");
    let bad = config(addr, 0.1, addr).replace("http://127.0.0.1:9", "127.0.0.1:9");
    let e = tern_proxy::config::parse_yaml(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("telemetry.tracing.otlp_endpoint"), "{e}");
}

/// Span records are reused once exported: the spans of requests that follow failed ones
/// carry nothing of them (no stale attribute, error status or name), every key once.
#[tokio::test]
async fn reused_span_records_carry_nothing_of_the_previous_request() {
    let (otlp, r) = receiver().await;
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(otlp, 1.0, api.addr)).await;
    let client = http1_client();
    let server_spans = |r: &Receiver| {
        r.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.kind == 2)
            .count()
    };
    for round in ["/failed", "/fine"] {
        let status = if round == "/failed" { "503" } else { "200" };
        let before = server_spans(&r);
        for _ in 0..20 {
            get(
                &client,
                proxy.addr("web"),
                "api.local",
                round,
                &[("x-status", status)],
            )
            .await;
        }
        // Exported (and so handed back for reuse) before the next round starts.
        for _ in 0..250 {
            if server_spans(&r) >= before + 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let spans = r.spans.lock().unwrap().clone();
    let fine: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| {
            s.kind == 2
                && s.attributes.iter().any(|kv| {
                    kv.key == "url.path" && format!("{:?}", kv.value).contains("\"/fine\"")
                })
        })
        .collect();
    assert_eq!(fine.len(), 20, "{spans:?}");
    for server in fine {
        let attempts: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.trace_id == server.trace_id && s.kind == 3)
            .collect();
        assert_eq!(attempts.len(), 1, "{spans:?}");
        for (span, name) in [(server, "GET"), (attempts[0], "GET api")] {
            assert_eq!(span.name, name);
            assert!(span.status.as_ref().is_none_or(|s| s.code == 0), "{span:?}");
            let mut keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
            assert!(!keys.contains(&"error.type"), "{span:?}");
            let n = keys.len();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), n, "a key twice: {span:?}");
        }
    }
}

/// The export counters of `proxy` (exported, dropped, failures), once `done` holds for
/// them (or after five seconds).
async fn export_counters(proxy: &Proxy, done: impl Fn(&[u64; 3]) -> bool) -> [u64; 3] {
    let read = || {
        [
            "tern_trace_spans_exported_total",
            "tern_trace_spans_dropped_total",
            "tern_trace_export_failures_total",
        ]
        .map(|series| proxy.metric(series) as u64)
    };
    let mut c = read();
    for _ in 0..250 {
        if done(&c) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        c = read();
    }
    c
}

/// What the receiver answers is read, not assumed: a partial success counts its rejected
/// spans as dropped and the rest as exported; a failed call (a gRPC status in the response
/// headers, "trailers-only") counts a failure and drops the batch. Requests never notice.
#[tokio::test]
async fn rejected_and_failed_exports_are_counted_as_such() {
    use support::otlp::Answer;
    let (otlp, r) = receiver().await;
    // One span of each batch is rejected. A request's two spans usually share a batch, but
    // a slow machine may split them; the counts below hold either way.
    *r.answer.lock().unwrap() = Answer::Reject(1, "span too large".into());
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&config(otlp, 1.0, api.addr)).await;
    let client = http1_client();
    assert_eq!(
        get(&client, proxy.addr("web"), "x", "/", &[]).await.status,
        200
    );
    let [exported, dropped, failures] = export_counters(&proxy, |c| c[0] + c[1] >= 2).await;
    assert_eq!(
        exported + dropped,
        2,
        "{exported} exported, {dropped} dropped"
    );
    assert!(dropped >= 1, "{dropped}");
    assert_eq!(failures, 0);

    *r.answer.lock().unwrap() = Answer::Fail(tonic::Code::ResourceExhausted);
    assert_eq!(
        get(&client, proxy.addr("web"), "x", "/", &[]).await.status,
        200
    );
    let after = export_counters(&proxy, |c| c[0] + c[1] >= 4).await;
    assert_eq!(after[0], exported, "nothing more is exported");
    assert_eq!(after[1], dropped + 2);
    assert!((1..=2).contains(&after[2]), "{after:?}");
}

/// Retries are visible: every attempt is a client span under the request's server span,
/// the retried ones with their resend count, each with the status it got.
#[tokio::test]
async fn each_attempt_of_a_retried_request_is_a_child_span() {
    let (otlp, r) = receiver().await;
    let api = Upstream::start("api").await;
    let yaml = format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "http://{otlp}", sample_ratio: 1.0 }}
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - backends: [ {{ service: api }} ]
        retry: {{ attempts: 3, on: [5xx], backoff: {{ base: 1ms, max: 2ms }} }}
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{}" }} ]
"#,
        api.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let reply = get(
        &http1_client(),
        proxy.addr("web"),
        "api.local",
        "/",
        &[("x-status", "503")],
    )
    .await;
    assert_eq!(reply.status, 503);
    let attempts = api.hits();
    assert!(attempts >= 2, "retried: {attempts} attempts");
    let spans = wait_spans(&r, attempts + 1).await;
    assert_eq!(spans.len(), attempts + 1, "{spans:?}");
    let server: Vec<_> = spans.iter().filter(|(_, s)| s.kind == 2).collect();
    assert_eq!(server.len(), 1);
    let server = &server[0].1;
    let mut resends = Vec::new();
    for (_, s) in spans.iter().filter(|(_, s)| s.kind == 3) {
        assert_eq!(s.parent_span_id, server.span_id);
        assert_eq!(s.trace_id, server.trace_id);
        let int = |key: &str| {
            s.attributes.iter().find(|kv| kv.key == key).map(|kv| {
                match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Pv::IntValue(i)) => *i,
                    other => panic!("{key}: {other:?}"),
                }
            })
        };
        assert_eq!(int("http.response.status_code"), Some(503));
        resends.push(int("http.request.resend_count").unwrap_or(0));
    }
    resends.sort();
    assert_eq!(resends, (0..attempts as i64).collect::<Vec<_>>());
}
