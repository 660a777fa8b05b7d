//! One health probe over a fresh connection: a TCP connect, or an HTTP/1.1 GET whose status
//! must be one of the expected ones. Never uses the request pool, so a probe says something
//! about the endpoint and not about a pooled connection.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{HealthCheckConfig, ProbeKind};

/// Probes `addr`; true means healthy. Bounded by the check's timeout.
pub async fn probe(config: &HealthCheckConfig, addr: SocketAddr) -> bool {
    tokio::time::timeout(config.timeout, probe_once(&config.kind, addr))
        .await
        .unwrap_or(false)
}

async fn probe_once(kind: &ProbeKind, addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let (path, expected) = match kind {
        ProbeKind::Tcp => return true,
        ProbeKind::Http {
            path,
            expected_statuses,
        } => (path, expected_statuses),
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return false;
    };
    // The connection task ends with this probe (the request asks for close).
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::get(path.as_str())
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "tern-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::new());
    let ok = match request {
        Ok(req) => match send.send_request(req).await {
            Ok(resp) => expected.contains(&resp.status().as_u16()),
            Err(_) => false,
        },
        Err(_) => false,
    };
    driver.abort();
    ok
}
