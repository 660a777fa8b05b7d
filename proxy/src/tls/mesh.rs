//! Mesh mTLS for a proxy: one server config for inbound ports, client configs per expected
//! upstream identity, both presenting whatever certificate the identity holds at handshake
//! time (rotation swaps it under them; open connections keep theirs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::io::Io;
use super::verify::{ExpectIdentity, TrustDomainClients};
use crate::identity::certificate::peer_id;
use crate::identity::{Identity, SpiffeId};

/// What a connection between proxies carries, told by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// HTTP, multiplexed: every HTTP request between proxies travels this way.
    H2,
    /// HTTP/1.1 upgrades (WebSocket) and CONNECT, one connection each.
    Http1,
    /// Opaque TCP.
    Opaque,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http1 => b"http/1.1",
            Alpn::Opaque => b"tern.opaque",
        }
    }

    pub fn of(negotiated: Option<&[u8]>) -> Option<Alpn> {
        [Alpn::H2, Alpn::Http1, Alpn::Opaque]
            .into_iter()
            .find(|a| Some(a.id()) == negotiated)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no workload certificate yet")]
    NoCertificate,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the peer presented no SPIFFE identity")]
    NoPeerIdentity,
    #[error("building the TLS config failed: {0}")]
    Config(String),
}

/// The proxy's mTLS: its identity, an acceptor, and cached connectors.
pub struct MeshTls {
    identity: Arc<Identity>,
    acceptor: TlsAcceptor,
    connectors: Mutex<HashMap<(SpiffeId, Alpn), TlsConnector>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", &self.identity.id)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Hands rustls the certificate held now.
#[derive(Debug)]
struct Current(Arc<Identity>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| Arc::clone(&c.key))
    }
}

impl ResolvesClientCert for Current {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| Arc::clone(&c.key))
    }

    fn has_certs(&self) -> bool {
        self.0.is_held()
    }
}

impl MeshTls {
    pub fn new(
        identity: Arc<Identity>,
        handshake_timeout: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::clone(&identity.provider);
        let verifier = TrustDomainClients::new(
            Arc::clone(&identity.roots),
            Arc::clone(&provider),
            vec![identity.id.trust_domain().to_owned()],
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Current(Arc::clone(&identity))));
        server.alpn_protocols = [Alpn::H2, Alpn::Http1, Alpn::Opaque]
            .iter()
            .map(|a| a.id().to_vec())
            .collect();
        Ok(Arc::new(MeshTls {
            identity,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connectors: Mutex::new(HashMap::new()),
            handshake_timeout,
        }))
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Terminates a client's mTLS: the connection and the peer's proven identity.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(Io, SpiffeId), TlsError> {
        if !self.identity.is_held() {
            return Err(TlsError::NoCertificate);
        }
        let stream = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| TlsError::Timeout(self.handshake_timeout))?
            .map_err(TlsError::Handshake)?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| peer_id(leaf))
            .ok_or(TlsError::NoPeerIdentity)?;
        Ok((Io::Server(Box::new(stream)), peer))
    }

    /// Wraps a dialled connection in mTLS, checking the upstream is `expected`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        peer_ip: IpAddr,
        expected: &SpiffeId,
        alpn: Alpn,
    ) -> Result<Io, TlsError> {
        if !self.identity.is_held() {
            return Err(TlsError::NoCertificate);
        }
        let connector = self.connector(expected, alpn)?;
        let stream = tokio::time::timeout(
            self.handshake_timeout,
            connector.connect(ServerName::IpAddress(peer_ip.into()), tcp),
        )
        .await
        .map_err(|_| TlsError::Timeout(self.handshake_timeout))?
        .map_err(TlsError::Handshake)?;
        Ok(Io::Client(Box::new(stream)))
    }

    /// One client config per (identity, ALPN), kept so that sessions resume.
    fn connector(&self, expected: &SpiffeId, alpn: Alpn) -> Result<TlsConnector, TlsError> {
        let mut connectors = self
            .connectors
            .lock()
            .map_err(|_| TlsError::Config("connector cache poisoned".into()))?;
        if let Some(c) = connectors.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let provider = Arc::clone(&self.identity.provider);
        let verifier = ExpectIdentity::new(
            Arc::clone(&self.identity.roots),
            &provider,
            expected.clone(),
        );
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Current(Arc::clone(&self.identity))));
        config.alpn_protocols = vec![alpn.id().to_vec()];
        // Upstreams are named by identity, not by host name.
        config.enable_sni = false;
        let connector = TlsConnector::from(Arc::new(config));
        connectors.insert((expected.clone(), alpn), connector.clone());
        Ok(connector)
    }
}
