//! The proxy is invisible to applications: upgrades and CONNECT tunnel through, header case
//! survives, framing is never ambiguous upstream, only provably unsent requests are retried
//! by default, a keep-alive race costs nothing, and long streams outlive route timeouts.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn one_service(upstream: SocketAddr, route_extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - backends: [ {{ service: app }} ]
{route_extra}
services:
  - name: app
    protocol: http1
    endpoints: [ {{ address: "{upstream}" }} ]
"#
    )
}

/// A hyper server that accepts any upgrade (101) and then echoes bytes until the client
/// half-closes, then closes its side.
async fn upgrade_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    let protocol = req.headers().get("upgrade").cloned();
                    let Some(protocol) = protocol else {
                        return Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(400)
                                .body(Full::new(Bytes::from_static(b"no upgrade\n")))
                                .unwrap(),
                        );
                    };
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let upgraded = on.await.unwrap();
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = vec![0u8; 4096];
                        loop {
                            let n = io.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                        let _ = io.shutdown().await;
                    });
                    Ok(Response::builder()
                        .status(101)
                        .header("connection", "Upgrade")
                        .header("upgrade", protocol)
                        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                        .body(Full::new(Bytes::new()))
                        .unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Reads an HTTP/1.1 response head from a raw stream.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("no response head")
            .unwrap();
        assert_eq!(n, 1, "closed before the end of the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn echo_round(stream: &mut TcpStream, text: &[u8]) {
    stream.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(back, text);
}

#[tokio::test]
async fn websocket_upgrade_tunnels_survive_a_route_change_and_half_close() {
    let upstream = upgrade_echo_server().await;
    let proxy = Proxy::start(&one_service(upstream, "")).await;
    let mut client = TcpStream::connect(proxy.addr("web")).await.unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("sec-websocket-accept"), "{head}");
    echo_round(&mut client, b"hello through the tunnel").await;

    // A route change applies to new requests; the open tunnel carries on.
    let changed =
        tern_proxy::config::parse_yaml(&one_service(upstream, "        timeout: 1s")).unwrap();
    proxy.app.apply(changed, "changed".into()).await.unwrap();
    echo_round(&mut client, b"still here after the change").await;

    // Half-close: the client stops writing; the echo server sees EOF and closes; the
    // client reads EOF.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("tunnel not closed after half-close")
        .unwrap();
    assert!(rest.is_empty());

    let m = proxy.metrics();
    assert!(
        m.contains("tern_http_upgrades_total{listener=\"web\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tern_tcp_bytes_total{listener=\"web\",direction=\"upstream\"} 51"),
        "{m}"
    );
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response() {
    let plain = Upstream::start("plain").await;
    let proxy = Proxy::start(&one_service(plain.addr, "")).await;
    let reply = raw_exchange(
        proxy.addr("web"),
        b"GET / HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    // The test upstream ignores the upgrade and answers 200; the proxy passes that on.
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn connect_tunnels_to_the_endpoint() {
    // An upstream HTTP proxy: answers CONNECT with 200 and then echoes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let seen = Arc::new(tokio::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await;
        *seen2.lock().await = head;
        s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .unwrap();
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    let proxy = Proxy::start(&one_service(upstream, "")).await;
    let mut client = TcpStream::connect(proxy.addr("web")).await.unwrap();
    client
        .write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_round(&mut client, b"\x00\x00\x00\x08\x04\xd2\x16\x2f").await;
    assert!(
        seen.lock()
            .await
            .starts_with("CONNECT db.internal:5432 HTTP/1.1"),
        "{}",
        seen.lock().await
    );
}

/// A raw upstream that records each request (head and body, framed by Content-Length or
/// chunked encoding as an HTTP server would) and answers each with `answer`.
async fn recording_server(answer: &'static [u8]) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got: Vec<u8> = Vec::new();
                loop {
                    if let Some(len) = complete_request(&got) {
                        let request: Vec<u8> = got.drain(..len).collect();
                        let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                        s.write_all(answer).await.unwrap();
                        continue;
                    }
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, rx)
}

/// The length of the first whole request in `bytes`, if there is one.
fn complete_request(bytes: &[u8]) -> Option<usize> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let body = &bytes[head_end..];
        let end = body.windows(5).position(|w| w == b"0\r\n\r\n")? + 5;
        return Some(head_end + end);
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (bytes.len() >= head_end + length).then_some(head_end + length)
}

#[tokio::test]
async fn header_case_is_preserved_both_ways_on_http1() {
    let (upstream, mut heads) =
        recording_server(b"HTTP/1.1 200 OK\r\nX-Legacy-Token: abc\r\nContent-Length: 2\r\n\r\nok")
            .await;
    let proxy = Proxy::start(&one_service(upstream, "")).await;
    let reply = raw_exchange(
        proxy.addr("web"),
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-Custom-Header: 1\r\nSOAPAction: urn:x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let head = heads.recv().await.unwrap();
    assert!(head.contains("X-Custom-Header: 1"), "upstream saw:\n{head}");
    assert!(head.contains("SOAPAction: urn:x"), "upstream saw:\n{head}");
    assert!(
        reply.contains("X-Legacy-Token: abc"),
        "client saw:\n{reply}"
    );
}

#[tokio::test]
async fn ambiguous_framing_never_reaches_the_upstream() {
    let (upstream, mut heads) =
        recording_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let proxy = Proxy::start(&one_service(upstream, "")).await;
    let addr = proxy.addr("web");

    // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3) and the proxy re-frames
    // what it parsed: the "smuggled" second request stays body bytes, never a request.
    let smuggle =
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                    2b\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\nX: y\r\n\r\n\r\n0\r\n\r\n";
    let reply = raw_exchange(addr, smuggle, Duration::from_millis(500)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let request = heads.recv().await.unwrap();
    assert!(request.starts_with("POST /a"), "{request}");
    assert!(
        !request.to_ascii_lowercase().contains("content-length: 4"),
        "{request}"
    );
    // The would-be request is there, as body bytes of the one request.
    assert!(request.contains("GET /smuggled"), "{request}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(other) = heads.try_recv() {
        assert!(
            !other.contains("GET /smuggled"),
            "a smuggled request reached the upstream:\n{other}"
        );
    }

    for bad in [
        // A transfer coding other than chunked last: the length is unknowable.
        &b"POST /b HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nxxxx"[..],
        // Two different lengths.
        &b"POST /c HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nxxxxx"[..],
    ] {
        let reply = raw_exchange(addr, bad, Duration::from_millis(500)).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
    assert!(
        heads.try_recv().is_err(),
        "a malformed request was forwarded"
    );
}

/// An upstream that counts requests and answers every one with 503.
async fn failing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(503)
                                .header("x-upstream", "failing")
                                .body(Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn two_endpoints(a: SocketAddr, b: SocketAddr, route_extra: &str) -> String {
    one_service(a, route_extra).replace(
        &format!("endpoints: [ {{ address: \"{a}\" }} ]"),
        &format!("load_balancer: round_robin\n    endpoints: [ {{ address: \"{a}\" }}, {{ address: \"{b}\" }} ]"),
    )
}

#[tokio::test]
async fn without_a_policy_only_unsent_requests_are_retried() {
    let (failing, hits) = failing_upstream().await;
    let good = Upstream::start("good").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let client = http1_client();

    // A 503 is the application's answer: a POST is not sent again (no double charge).
    let proxy = Proxy::start(&two_endpoints(failing, good.addr, "")).await;
    let addr = proxy.addr("web");
    let mut saw_503 = 0;
    for _ in 0..4 {
        let req = Request::post(format!("http://{addr}/pay"))
            .header("host", "app")
            .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
            .unwrap();
        if send(&client, req).await.status == StatusCode::SERVICE_UNAVAILABLE {
            saw_503 += 1;
        }
    }
    assert_eq!(saw_503, 2, "POSTs were retried after a 503");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Nor a GET, without a policy.
    let before = hits.load(Ordering::SeqCst);
    let mut gets_503 = 0;
    for _ in 0..4 {
        if get(&client, addr, "app", "/", &[]).await.status == StatusCode::SERVICE_UNAVAILABLE {
            gets_503 += 1;
        }
    }
    assert_eq!(gets_503, 2);
    assert_eq!(hits.load(Ordering::SeqCst) - before, 2);

    // With a policy, the GET is retried on the other endpoint.
    let policy = "        retry: { attempts: 1, on: [5xx], backoff: { base: 1ms, max: 2ms } }";
    let proxy = Proxy::start(&two_endpoints(failing, good.addr, policy)).await;
    for _ in 0..4 {
        let r = get(&client, proxy.addr("web"), "app", "/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
    }

    // A refused connection never reached anyone: retried on another endpoint by default.
    let proxy = Proxy::start(&two_endpoints(dead, good.addr, "")).await;
    for _ in 0..6 {
        let r = get(&client, proxy.addr("web"), "app", "/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let m = proxy.metrics();
    // Once refused, the endpoint is also marked unavailable for a while, so the balancer
    // stops picking it: at least one retry, not necessarily one per request.
    let line = "tern_retries_total{service=\"app\",reason=\"connect-failure\"} ";
    assert!(m.contains(line) && !m.contains(&format!("{line}0")), "{m}");
}

#[tokio::test]
async fn an_upstream_closing_a_pooled_connection_costs_the_client_nothing() {
    // Answers one request per connection with keep-alive semantics, then closes the socket
    // shortly after: the classic race with a pooled connection ("503 UC").
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(s);
            });
        }
    });
    let proxy = Proxy::start(&one_service(upstream, "")).await;
    let client = http1_client();
    for i in 0..5 {
        let req = Request::post(format!("http://{}/", proxy.addr("web")))
            .header("host", "app")
            .body(Full::new(Bytes::from_static(b"not idempotent")))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.body);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_long_stream_outlives_the_route_timeout() {
    // The route timeout bounds the wait for the response head, not a stream's life: a
    // server stream of 2.5 s through a route with a 1 s timeout arrives whole.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
                    tokio::spawn(async move {
                        for i in 0..5 {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = tx
                                .send(Ok(Frame::data(Bytes::from(format!("tick {i}\n")))))
                                .await;
                        }
                    });
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    Ok::<_, hyper::Error>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&one_service(upstream, "        timeout: 1s")).await;
    let client = http1_client();
    let req = Request::get(format!("http://{}/stream", proxy.addr("web")))
        .header("host", "app")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 5, "{body:?}");
}

/// An HTTP/2 server (the `h2` crate, which can refuse streams, unlike hyper's server) that
/// refuses every other stream with `REFUSED_STREAM` and answers the rest with 200.
async fn refusing_h2_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let r = refused.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(stream).await.unwrap();
                let mut n = 0usize;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    n += 1;
                    if n % 2 == 1 {
                        r.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let response = Response::builder().status(200).body(()).unwrap();
                        let _ = respond.send_response(response, true);
                    }
                }
            });
        }
    });
    (addr, refused)
}

#[tokio::test]
async fn refused_http2_streams_are_retried_without_a_policy() {
    let (upstream, refused) = refusing_h2_server().await;
    let yaml = one_service(upstream, "").replace("protocol: http1", "protocol: http2");
    let proxy = Proxy::start(&yaml).await;
    let client = http1_client();
    for i in 0..4 {
        // DELETE is not retried after a 5xx or reset; a refused stream was never processed.
        let req = Request::delete(format!("http://{}/item/{i}", proxy.addr("web")))
            .header("host", "app")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.body);
    }
    assert_eq!(refused.load(Ordering::SeqCst), 4);
}
