//! Opaque TCP through the proxy: bytes both ways, half-close carried through, per-connection
//! balancing, and a refused endpoint skipped.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn echo_with_half_close_and_balancing_past_a_dead_endpoint() {
    let (e1, e2) = (tcp_echo().await, tcp_echo().await);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let yaml = format!(
        r#"
listeners:
  - name: raw
    address: 127.0.0.1:0
    protocol: tcp
    service: echo
services:
  - name: echo
    protocol: tcp
    endpoints: [ {{ address: "{e1}" }}, {{ address: "{dead_addr}" }}, {{ address: "{e2}" }} ]
"#
    );
    let proxy = Proxy::start(&yaml).await;
    for i in 0..12 {
        let mut stream = TcpStream::connect(proxy.addr("raw")).await.unwrap();
        let payload = vec![b'x'; 100_000 + i];
        stream.write_all(&payload).await.unwrap();
        // Half-close: the echo server sees EOF, finishes echoing, then closes its side.
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.len(), payload.len(), "connection {i}");
    }
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("tern_tcp_connections_total{listener=\"raw\"} 12"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_upstream_failures_total{service=\"echo\",endpoint=\"")
            && metrics.contains("reason=\"connect\"} 1"),
        "{metrics}"
    );
}
