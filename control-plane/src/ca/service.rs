//! `tern.identity.v1.Identity/Certify`: prove who you are, get a certificate for it.

use std::sync::Arc;
use std::time::SystemTime;

use tern_proto::identity::v1::identity_server::Identity;
use tern_proto::identity::v1::{CertifyRequest, CertifyResponse};
use tern_proxy::identity::SpiffeId;
use tonic::{Request, Response, Status};

use super::authority::{Authority, SignError};
use super::credentials::Credentials;
use crate::metrics::{Metrics, RefusalLabels};

/// CSRs are a few hundred bytes; anything much larger is not one.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

pub struct CertifyService {
    pub authority: Arc<Authority>,
    pub credentials: Credentials,
    pub metrics: Arc<Metrics>,
}

impl CertifyService {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .ca_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
        tracing::warn!(reason, message = status.message(), "Certify refused");
        status
    }
}

#[tonic::async_trait]
impl Identity for CertifyService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let message = request.into_inner();
        let asked: SpiffeId = message.identity.parse().map_err(|e| {
            self.refuse(
                "bad_request",
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        if message.certificate_signing_request.len() > MAX_CSR_BYTES {
            return Err(self.refuse(
                "bad_request",
                Status::invalid_argument("certificate_signing_request is too large"),
            ));
        }
        let trust_domain = self.authority.trust_domain();
        if asked.trust_domain() != trust_domain {
            return Err(self.refuse(
                "foreign_trust_domain",
                Status::permission_denied(format!(
                    "{asked} is not in the trust domain {trust_domain:?}"
                )),
            ));
        }
        let proven = self
            .credentials
            .identify(&message.token, trust_domain)
            .await
            .map_err(|e| self.refuse("unauthenticated", Status::unauthenticated(e.to_string())))?;
        if proven != asked {
            return Err(self.refuse(
                "wrong_identity",
                Status::permission_denied(format!("the token proves {proven}, not {asked}")),
            ));
        }
        let issued = self
            .authority
            .sign(
                &asked,
                &message.certificate_signing_request,
                SystemTime::now(),
            )
            .map_err(|e| match e {
                SignError::ForeignTrustDomain(..) => self.refuse(
                    "foreign_trust_domain",
                    Status::permission_denied(e.to_string()),
                ),
                SignError::Random | SignError::Sign(_) => {
                    self.refuse("internal", Status::internal(e.to_string()))
                }
                _ => self.refuse("bad_csr", Status::invalid_argument(e.to_string())),
            })?;
        self.metrics.ca_issued.inc();
        tracing::info!(identity = %asked, peer = ?peer, "certificate issued");
        let valid_until = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Response::new(CertifyResponse {
            certificate_chain: issued.chain,
            valid_until_unix_seconds: valid_until,
        }))
    }
}
