//! Asking the mesh CA for a certificate: `tern.identity.v1.Identity/Certify` over TLS (the
//! token is a bearer secret, so never over plaintext), trusting only the mesh's roots.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use tern_proto::identity::v1::CertifyRequest;
use tern_proto::identity::v1::identity_client::IdentityClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::SpiffeId;
use super::certificate::{CertError, Request, WorkloadCert};

/// How long one Certify call (connect included) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CA is and how to prove who we are to it.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// `host:port` of the CA's TLS port.
    pub address: String,
    /// The name the CA's certificate must carry (a DNS name or an IP address).
    pub server_name: String,
    /// The mesh's trust anchors, PEM: they verify the CA and every peer.
    pub roots_pem: String,
    /// Read on every call: projected service account tokens are rotated by the kubelet.
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA address {address:?} is not usable: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connecting to the CA at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("the CA refused: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Certificate(#[from] CertError),
}

impl CaClient {
    /// One round: a fresh key, a CSR, the CA's answer checked and joined with the key.
    pub async fn fetch(
        &self,
        id: &SpiffeId,
        provider: &CryptoProvider,
    ) -> Result<WorkloadCert, FetchError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| FetchError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let request = Request::new(id)?;
        let message = CertifyRequest {
            identity: id.to_string(),
            token: token.trim().to_owned(),
            certificate_signing_request: request.csr_der.clone(),
        };
        let call = async {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&self.roots_pem))
                .domain_name(self.server_name.clone());
            let endpoint = Endpoint::from_shared(format!("https://{}", self.address))
                .and_then(|e| e.tls_config(tls))
                .map_err(|source| FetchError::Address {
                    address: self.address.clone(),
                    source,
                })?
                .connect_timeout(CALL_TIMEOUT);
            let channel = endpoint
                .connect()
                .await
                .map_err(|source| FetchError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
            IdentityClient::new(channel)
                .certify(message)
                .await
                .map_err(FetchError::Refused)
        };
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| FetchError::Timeout(CALL_TIMEOUT))??
            .into_inner();
        Ok(request.finish(id, response.certificate_chain, provider, SystemTime::now())?)
    }
}
