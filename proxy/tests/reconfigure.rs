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
        "listeners:\n  - name: web\n    address: \"{web}\"\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\n{raw}services:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{http_ep}\" }} ]\n  - name: echo\n    protocol: tcp\n    endpoints: [ {{ address: \"{tcp_ep}\" }} ]\n"
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn listeners_move_and_go_while_open_connections_continue() {
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

    // Connections accepted before the change are still served; the TCP stream is untouched.
    tcp.write_all(b"after!").await.unwrap();
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    let req = http::Request::get("http://x/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    // The old listener's name still exists (it moved), so the request follows the new routes.
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-upstream"], "b");
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
