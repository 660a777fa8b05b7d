//! `protocol: auto` listeners on real sockets: HTTP/1, HTTP/2 and opaque bytes on one port,
//! and server-speaks-first protocols answered quickly the first time and at once after.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn auto_config(http: SocketAddr, tcp: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: mixed
    address: 127.0.0.1:0
    protocol: auto
    service: raw
    routes:
      - backends: [ {{ service: web }} ]
{extra}
services:
  - name: web
    protocol: http1
    endpoints: [ {{ address: "{http}" }} ]
  - name: raw
    protocol: tcp
    endpoints: [ {{ address: "{tcp}" }} ]
"#
    )
}

/// A server-speaks-first server (an SMTP-like greeting), then an echo.
async fn greeting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 mail.local ESMTP ready\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn read_greeting(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 28];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("no greeting")
        .unwrap();
    assert_eq!(&buf, b"220 mail.local ESMTP ready\r\n");
    started.elapsed()
}

fn detections(m: &str, outcome: &str) -> u64 {
    let prefix =
        format!("tern_protocol_detections_total{{listener=\"mixed\",outcome=\"{outcome}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn server_first_protocols_wait_once_then_not_at_all() {
    let web = Upstream::start("web").await;
    let smtp = greeting_server().await;
    let proxy = Proxy::start(&auto_config(web.addr, smtp, "")).await;
    let addr = proxy.addr("mixed");

    let first = read_greeting(addr).await;
    assert!(
        first < Duration::from_millis(200),
        "first greeting after {first:?}"
    );
    let second = read_greeting(addr).await;
    eprintln!("server-first greeting: first connection {first:?}, remembered {second:?}");
    // Remembered: no detection wait at all, only the connection itself.
    assert!(
        second < Duration::from_millis(50),
        "second greeting after {second:?}"
    );
    assert!(second < first, "first {first:?}, second {second:?}");

    let m = proxy.metrics();
    assert_eq!(detections(&m, "server_first"), 1, "{m}");
    assert_eq!(detections(&m, "server_first_remembered"), 1, "{m}");
}

#[tokio::test]
async fn one_port_serves_http1_http2_tls_and_opaque_bytes() {
    let web = Upstream::start("web").await;
    let echo = tcp_echo().await;
    let proxy = Proxy::start(&auto_config(web.addr, echo, "")).await;
    let addr = proxy.addr("mixed");

    let r = get(&http1_client(), addr, "web", "/h1", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), "web");
    let r = get(&h2c_client(), addr, "web", "/h2", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-seen-path"), "/h2");

    // A Redis command and the start of a TLS ClientHello go to the TCP service untouched.
    for bytes in [
        &b"*1\r\n$4\r\nPING\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00][..],
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, bytes);
    }

    let m = proxy.metrics();
    assert_eq!(detections(&m, "http1"), 1, "{m}");
    assert_eq!(detections(&m, "http2"), 1, "{m}");
    assert_eq!(detections(&m, "opaque"), 1, "{m}");
    assert_eq!(detections(&m, "tls"), 1, "{m}");
    assert_eq!(detections(&m, "server_first"), 0, "{m}");
}

#[tokio::test]
async fn opaque_ports_are_never_sniffed() {
    let web = Upstream::start("web").await;
    let echo = tcp_echo().await;
    let port = free_port();
    let yaml = format!(
        "opaque_ports: [{port}]\n{}",
        auto_config(web.addr, echo, "")
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let proxy = Proxy::start(&yaml).await;
    // Even a request line goes to the TCP service untouched.
    let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    let mut s = TcpStream::connect(proxy.addr("mixed")).await.unwrap();
    s.write_all(request).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, request);
    assert_eq!(web.hits(), 0);
    let m = proxy.metrics();
    assert_eq!(detections(&m, "opaque_port"), 1, "{m}");
    assert_eq!(detections(&m, "http1"), 0, "{m}");
}

#[test]
fn auto_listeners_are_validated() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let without_service = auto_config(addr, addr, "").replace("    service: raw\n", "");
    let e = tern_proxy::config::parse_yaml(&without_service)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listeners[0].service"), "{e}");

    let bad_timeout = auto_config(addr, addr, "").replace(
        "    service: raw\n",
        "    service: raw\n    detect_timeout: 0s\n",
    );
    let e = tern_proxy::config::parse_yaml(&bad_timeout)
        .unwrap_err()
        .to_string();
    assert!(e.contains("detect_timeout"), "{e}");

    let http_service =
        auto_config(addr, addr, "").replace("service: raw\n    routes", "service: web\n    routes");
    let e = tern_proxy::config::parse_yaml(&http_service)
        .unwrap_err()
        .to_string();
    assert!(e.contains("speaks HTTP"), "{e}");
}
