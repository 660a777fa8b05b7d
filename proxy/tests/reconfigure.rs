//! Config changes applied to a running proxy: listeners added, moved and removed, endpoints
//! changed, while connections opened before the change keep working.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn yaml(
    web: SocketAddr,
    raw: Option<SocketAddr>,
    http_ep: SocketAddr,
    tcp_ep: SocketAddr,
) -> String {
    let raw = raw
        .map(|a| {
            format!("  - name: raw\n    address: \"{a}\"\n    protocol: tcp\n    service: echo\n")
        })
        .unwrap_or_default();
    format!(
        "drain_timeout: 1s\nlisteners:\n  - name: web\n    address: \"{web}\"\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\n{raw}services:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{http_ep}\" }} ]\n  - name: echo\n    protocol: tcp\n    endpoints: [ {{ address: \"{tcp_ep}\" }} ]\n"
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn moved_and_removed_listeners_drain_their_connections() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let echo = tcp_echo().await;
    let (web1, web2, raw) = (local(free_port()), local(free_port()), local(free_port()));
    let app = tern_proxy::app::App::new();
    let parse = |y: &str| tern_proxy::config::parse_yaml(y).unwrap();
    app.apply(parse(&yaml(web1, Some(raw), a.addr, echo)), "v1".into())
        .await
        .unwrap();

    // A TCP connection and a keep-alive HTTP connection opened under the first config.
    let mut tcp = TcpStream::connect(raw).await.unwrap();
    tcp.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tcp.read_exact(&mut buf).await.unwrap();
    let mut h2 = h2_connect(web1).await;
    // One exchange first, so the connection is surely accepted (not left in the backlog).
    let req = http::Request::get("http://x/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(
        h2.send_request(req).await.unwrap().headers()["x-upstream"],
        "a"
    );

    // A slow HTTP/1 request in flight on the old address when the change lands.
    let slow = tokio::spawn(raw_exchange(
        web1,
        b"GET / HTTP/1.1\r\nHost: x\r\nx-delay-ms: 600\r\n\r\n",
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;

    // Move `web`, drop `raw`, switch the HTTP endpoint to b.
    app.apply(parse(&yaml(web2, None, b.addr, echo)), "v2".into())
        .await
        .unwrap();
    assert_eq!(app.bound_addresses().get("raw"), None);
    assert_eq!(app.bound_addresses()["web"], web2);

    // New connections: the new address serves, the old ones are closed.
    let r = get(&http1_client(), web2, "x", "/", &[]).await;
    assert_eq!((r.status, r.header("x-upstream")), (StatusCode::OK, "b"));
    assert!(
        TcpStream::connect(web1).await.is_err(),
        "old web address no longer accepts"
    );
    assert!(
        TcpStream::connect(raw).await.is_err(),
        "removed listener no longer accepts"
    );

    // The in-flight request finishes, told to go elsewhere (`Connection: close`), and the
    // connection then closes (`raw_exchange` reads to the end).
    let reply = slow.await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );

    // The HTTP/2 connection got a GOAWAY: no new stream on it.
    let req = http::Request::get("http://x/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req))
        .await
        .unwrap();
    assert!(
        refused.is_err(),
        "a drained HTTP/2 connection took a new request"
    );

    // The TCP connection of the removed listener keeps flowing for the drain timeout (1 s)
    // and is then closed, not cut at once.
    tcp.write_all(b"after!").await.unwrap();
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the drained TCP connection was never closed"
    );
}

#[tokio::test]
async fn route_and_endpoint_changes_keep_connections_open() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let echo = tcp_echo().await;
    let (web, raw) = (local(free_port()), local(free_port()));
    let app = tern_proxy::app::App::new();
    let parse = |y: &str| tern_proxy::config::parse_yaml(y).unwrap();
    app.apply(parse(&yaml(web, Some(raw), a.addr, echo)), "v1".into())
        .await
        .unwrap();
    let mut http = TcpStream::connect(web).await.unwrap();
    let mut tcp = TcpStream::connect(raw).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    http.write_all(request).await.unwrap();
    let first = read_response(&mut http).await;
    assert!(first.contains("x-upstream: a"), "{first}");

    // Same listeners, another endpoint: nothing is retired.
    app.apply(parse(&yaml(web, Some(raw), b.addr, echo)), "v2".into())
        .await
        .unwrap();
    http.write_all(request).await.unwrap();
    let second = read_response(&mut http).await;
    assert!(
        second.contains("x-upstream: b"),
        "the same connection follows the new endpoint: {second}"
    );
    assert!(
        !second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );

    // Past the drain timeout, the TCP connection is still open.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    tcp.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");
}

/// Reads one response with an empty body (the test upstream's GET answer) off a raw stream.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        // An empty chunked body: "0\r\n\r\n".
        let mut end = [0u8; 5];
        stream.read_exact(&mut end).await.unwrap();
    }
    head
}

#[tokio::test]
async fn a_bind_failure_rejects_the_whole_change() {
    let a = Upstream::start("a").await;
    let echo = tcp_echo().await;
    let web = local(free_port());
    let app = tern_proxy::app::App::new();
    let parse = |y: &str| tern_proxy::config::parse_yaml(y).unwrap();
    app.apply(parse(&yaml(web, None, a.addr, echo)), "v1".into())
        .await
        .unwrap();
    // Something else holds the port the new `raw` listener wants.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    let err = app
        .apply(parse(&yaml(web, Some(taken), a.addr, echo)), "v2".into())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("listener raw: cannot bind"),
        "{err}"
    );
    assert_eq!(app.store().load().source, "v1", "the running config stays");
    assert_eq!(
        get(&http1_client(), web, "x", "/", &[]).await.status,
        StatusCode::OK
    );
}
