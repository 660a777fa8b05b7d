//! HTTP/1.1 upgrades (WebSocket and any other protocol named in `Upgrade`) and `CONNECT`,
//! proxied without configuration: the request goes to an endpoint on a connection of its
//! own, and once the endpoint accepts (101, or 2xx for CONNECT) both connections become one
//! opaque byte stream in each direction, half-closes included.
//!
//! Deciding what a request asks for and what the answer means are pure functions here; the
//! request path (`forward.rs`) does the sending and hands the two sockets to [`tunnel`].

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::metrics::ListenerMetrics;
use crate::resilience::breaker::Permit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeKind {
    /// `Connection: upgrade` + `Upgrade: PROTOCOL` (WebSocket and others); accepted by 101.
    Upgrade,
    /// `CONNECT host:port`; accepted by any 2xx.
    Connect,
}

impl UpgradeKind {
    /// What the request asks for. HTTP/1.1 only (HTTP/2 has no `Upgrade`; its extended
    /// CONNECT is not supported yet). `Upgrade: h2c` is not tunnelled: that is a request to
    /// change this hop's protocol, which a proxy may ignore (RFC 9110 §7.8), and the request
    /// is then forwarded as a plain one.
    pub fn requested(method: &Method, version: Version, headers: &HeaderMap) -> Option<Self> {
        if version != Version::HTTP_11 {
            return None;
        }
        if method == Method::CONNECT {
            return Some(UpgradeKind::Connect);
        }
        let upgrade = headers.get(header::UPGRADE)?.to_str().ok()?;
        if upgrade.trim().is_empty()
            || upgrade
                .split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
        {
            return None;
        }
        connection_has(headers, "upgrade").then_some(UpgradeKind::Upgrade)
    }

    /// Whether the endpoint's answer opens the tunnel.
    pub fn accepted(self, status: StatusCode) -> bool {
        match self {
            UpgradeKind::Upgrade => status == StatusCode::SWITCHING_PROTOCOLS,
            UpgradeKind::Connect => status.is_success(),
        }
    }
}

/// Whether a `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop, after the generic
/// hop-by-hop stripping removed them: `Connection: upgrade` and `Upgrade` as received.
pub fn keep_upgrade_headers(upgrade: Option<HeaderValue>, headers: &mut HeaderMap) {
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Joins the client's and the endpoint's upgraded connections and copies bytes both ways
/// until both sides have closed; a half-close on one side is passed on to the other. Runs as
/// a tracked task: the process drain waits for it up to the drain timeout.
pub async fn tunnel(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    metrics: ListenerMetrics,
    permit: Permit,
) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    metrics.tcp_connections.inc();
    metrics.tcp_active.inc();
    let mut client = TokioIo::new(downstream);
    let mut server = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((to_server, to_client)) => {
            metrics.tcp_bytes_upstream.inc_by(to_server);
            metrics.tcp_bytes_downstream.inc_by(to_client);
        }
        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
    metrics.tcp_active.dec();
    // The service's `max_requests` slot: a tunnel is a request that lasts.
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn websocket_and_connect_are_recognised() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            UpgradeKind::requested(&Method::GET, Version::HTTP_11, &ws),
            Some(UpgradeKind::Upgrade)
        );
        assert_eq!(
            UpgradeKind::requested(&Method::CONNECT, Version::HTTP_11, &HeaderMap::new()),
            Some(UpgradeKind::Connect)
        );
    }

    #[test]
    fn plain_requests_h2c_and_http2_are_not_tunnelled() {
        let no_connection = headers(&[("upgrade", "websocket")]);
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        let ws = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        for (method, version, h) in [
            (Method::GET, Version::HTTP_11, &HeaderMap::new()),
            (Method::GET, Version::HTTP_11, &no_connection),
            (Method::GET, Version::HTTP_11, &h2c),
            (Method::GET, Version::HTTP_2, &ws),
            (Method::CONNECT, Version::HTTP_2, &HeaderMap::new()),
        ] {
            assert_eq!(UpgradeKind::requested(&method, version, h), None, "{h:?}");
        }
    }

    #[test]
    fn only_the_right_answer_opens_the_tunnel() {
        assert!(UpgradeKind::Upgrade.accepted(StatusCode::SWITCHING_PROTOCOLS));
        assert!(!UpgradeKind::Upgrade.accepted(StatusCode::OK));
        assert!(UpgradeKind::Connect.accepted(StatusCode::OK));
        assert!(!UpgradeKind::Connect.accepted(StatusCode::FORBIDDEN));
    }

    #[test]
    fn upgrade_headers_survive_stripping() {
        let mut h = headers(&[("x-a", "1")]);
        keep_upgrade_headers(Some(HeaderValue::from_static("websocket")), &mut h);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }
}
