//! Certificate checks for mesh mTLS: a peer's chain must lead to the mesh roots and its one
//! URI SAN must be the SPIFFE ID expected of it (outbound) or one of the trusted domains
//! (inbound). DNS names play no part: proxies are named by identity, not by address.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DistinguishedName, Error, SignatureScheme};

use crate::identity::SpiffeId;
use crate::identity::certificate::peer_id;

/// Checks an upstream proxy's certificate against the identity the config says it has.
#[derive(Debug)]
pub struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

impl ExpectIdentity {
    pub fn new(roots: Arc<RootCertStore>, provider: &CryptoProvider, expected: SpiffeId) -> Self {
        ExpectIdentity {
            roots,
            algorithms: provider.signature_verification_algorithms,
            expected,
        }
    }
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match peer_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => {
                tracing::debug!(expected = %self.expected, got = %id, "upstream presented another identity");
                Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            }
            None => Err(Error::InvalidCertificate(CertificateError::NotValidForName)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks a downstream proxy's client certificate: the chain (webpki, client-auth usage)
/// and a SPIFFE ID in one of the trusted domains. Who of those may call is authorization's
/// business, after the handshake.
#[derive(Debug)]
pub struct TrustDomainClients {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

impl TrustDomainClients {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        trust_domains: Vec<String>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            // Permissive ports tell plaintext from TLS before the handshake; once a client
            // speaks TLS to a mesh port it must present a certificate.
            .build()?;
        Ok(TrustDomainClients {
            inner,
            trust_domains,
        })
    }
}

impl ClientCertVerifier for TrustDomainClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match peer_id(end_entity) {
            Some(id) if self.trust_domains.iter().any(|d| d == id.trust_domain()) => {
                Ok(ClientCertVerified::assertion())
            }
            _ => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
