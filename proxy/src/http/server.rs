//! Serving one downstream connection: HTTP/1.1 or HTTP/2 (prior knowledge), detected from
//! the first bytes (which must come within the header timeout), with header timeouts and
//! limits, and graceful shutdown on drain.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::Io;
use tokio_util::sync::CancellationToken;

use super::forward::{ConnContext, handle};

/// Request heads larger than this get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A connection builder configured for a proxy hop.
pub fn builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        // Legacy apps depend on the header case they sent; hyper keeps it per message and
        // the upstream client (`pool.rs`) writes it back out.
        .preserve_header_case(true)
        // One flat buffer per response instead of a header/body iovec pair: measured +4-10%
        // HTTP/1.1 throughput on loopback against writev (benches/README.md).
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// The HTTP/2 connection preface; hyper-util's version detection reads this many bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often a client trickling the preface is looked at again (`peek` does not wait for
/// more bytes than it already has).
const TRICKLE_POLL: Duration = Duration::from_millis(10);

/// Serves a connection until the client closes it, or finishes in-flight requests and closes
/// it (HTTP/2 GOAWAY, HTTP/1 close after the current response) once `drain` fires.
///
/// A client that says nothing for `header_timeout` is dropped before hyper sees it: hyper
/// times out HTTP/1 heads (also between keep-alive requests, so idle HTTP/1 connections close
/// after that long), but its HTTP/1-or-2 detection waits for the first bytes forever.
pub async fn serve(
    builder: &auto::Builder<TokioExecutor>,
    header_timeout: Duration,
    stream: Io,
    ctx: Arc<ConnContext>,
    drain: CancellationToken,
) {
    // Over TLS the client has spoken already (the handshake) and bytes cannot be peeked
    // below the decryption; an idle TLS client is left to the HTTP timeouts.
    if let Io::Plain(tcp) = &stream {
        let spoke = tokio::select! {
            spoke = first_bytes(tcp, header_timeout) => spoke,
            () = drain.cancelled() => false,
        };
        if !spoke {
            tracing::debug!("client sent no request in time; closing");
            return;
        }
    }
    let service = service_fn(move |req| handle(Arc::clone(&ctx), req));
    // With upgrades: a 101 or a CONNECT 200 hands the connection to a tunnel (`upgrade.rs`).
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream connection ended with an error");
    }
}

/// Waits, up to `timeout`, until the client has sent enough to tell HTTP/1 from HTTP/2.
/// False when it closed or stayed silent.
async fn first_bytes(stream: &TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        if version_known(&buf[..n]) {
            return true;
        }
        if Instant::now() + TRICKLE_POLL >= deadline {
            return false;
        }
        tokio::time::sleep(TRICKLE_POLL).await;
    }
}

/// True once `bytes` are either a whole HTTP/2 preface or no longer a prefix of one.
pub fn version_known(bytes: &[u8]) -> bool {
    bytes.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_known_once_the_bytes_leave_the_h2_preface() {
        assert!(version_known(b"GET / HTTP/1.1\r\n"));
        assert!(version_known(b"PO"));
        assert!(version_known(H2_PREFACE));
        assert!(!version_known(b"P"));
        assert!(!version_known(b"PRI * HTTP/2.0"));
    }
}
