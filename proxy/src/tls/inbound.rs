//! The first step of an inbound connection on a listener with mTLS: terminate TLS (strict),
//! or tell TLS from plaintext by the first byte (permissive), and say who the peer is.

use std::time::Duration;

use tokio::net::TcpStream;

use super::{Io, MeshTls, TlsError};
use crate::config::MtlsMode;
use crate::identity::SpiffeId;

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// How a connection arrived.
#[derive(Debug)]
pub enum Arrival {
    /// Plaintext: no identity (mode `disabled`, or a plaintext client on a permissive port).
    Plain(TcpStream),
    /// mTLS terminated; the peer proved this identity.
    Mutual(Io, SpiffeId),
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("plaintext connection on a strict mTLS port")]
    Plaintext,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Terminates mTLS as `mode` says. `wait` bounds how long a permissive port waits for the
/// client's first byte: a client that says nothing (a server-speaks-first protocol) is
/// plaintext by definition, since a TLS client always speaks first.
pub async fn arrive(
    mode: MtlsMode,
    tls: Option<&MeshTls>,
    stream: TcpStream,
    wait: Duration,
) -> Result<Arrival, InboundError> {
    let Some(tls) = tls else {
        // `App::apply` refuses mTLS listeners on a proxy without identity; disabled it is.
        return Ok(Arrival::Plain(stream));
    };
    match mode {
        MtlsMode::Disabled => Ok(Arrival::Plain(stream)),
        MtlsMode::Strict => {
            if first_byte(&stream, wait).await == Some(TLS_HANDSHAKE) {
                let (io, peer) = tls.accept(stream).await?;
                Ok(Arrival::Mutual(io, peer))
            } else {
                Err(InboundError::Plaintext)
            }
        }
        MtlsMode::Permissive => {
            if first_byte(&stream, wait).await == Some(TLS_HANDSHAKE) {
                let (io, peer) = tls.accept(stream).await?;
                Ok(Arrival::Mutual(io, peer))
            } else {
                Ok(Arrival::Plain(stream))
            }
        }
    }
}

/// The first byte the client sent, without consuming it; `None` when it sent nothing in
/// time or closed.
async fn first_byte(stream: &TcpStream, wait: Duration) -> Option<u8> {
    let mut buf = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut buf)).await {
        Ok(Ok(1)) => Some(buf[0]),
        _ => None,
    }
}
