//! Mesh mTLS: certificate checks by SPIFFE identity, the server and client configs that
//! present the workload certificate, and one stream type for plaintext and TLS.

pub mod gateway;
pub mod inbound;
pub mod io;
pub mod mesh;
pub mod verify;

pub use io::Io;
pub use mesh::{Alpn, MeshTls, TlsError};
