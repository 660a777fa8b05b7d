//! Dialling upstream endpoints: TCP connect with a timeout and `TCP_NODELAY`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

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
