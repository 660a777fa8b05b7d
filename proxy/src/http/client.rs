//! Upstream HTTP clients: one connection pool per endpoint (keep-alive reuse for HTTP/1.1,
//! one multiplexed connection for HTTP/2), connecting to the endpoint's fixed address.
//!
//! Each endpoint owns its client, so the request URI's authority can carry the original
//! `Host`/`:authority` while the connection always goes to the address the balancer chose.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;

pub type UpstreamClient = Client<FixedConnector, Incoming>;

/// HTTP/2 keep-alive pings detect a dead upstream connection without a request timing out.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the pooled client of one endpoint.
pub fn upstream_client(
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
) -> UpstreamClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .set_host(false)
        .retry_canceled_requests(true);
    if protocol == UpstreamProtocol::Http2 {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .http2_keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .http2_adaptive_window(true);
    }
    builder.build(FixedConnector {
        addr,
        connect_timeout,
    })
}

/// A connector that ignores the URI and dials one address, with a timeout and `TCP_NODELAY`.
#[derive(Debug, Clone, Copy)]
pub struct FixedConnector {
    addr: SocketAddr,
    connect_timeout: Duration,
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let FixedConnector {
            addr,
            connect_timeout,
        } = *self;
        // Boxed once per new connection, not per request.
        Box::pin(async move { connect_tcp(addr, connect_timeout).await.map(TokioIo::new) })
    }
}

/// Dials `addr` with a timeout; the stream has `TCP_NODELAY` set.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Ok(Ok(stream)) => {
            // Small request/response exchanges must not wait on Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}
