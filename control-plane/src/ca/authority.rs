//! The signing half of the CA (pure, no IO): a root made in memory or loaded, and X.509-SVIDs
//! issued from CSRs. The CA decides every field of a leaf itself; from the CSR it takes only
//! the public key, and only once the CSR's signature proves the caller holds the private half.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use tern_proxy::identity::SpiffeId;

/// Certificates start up to a minute in the past so that a proxy whose clock is slightly
/// behind accepts them at once; short-lived leaves by 5% of their lifetime at most, since
/// proxies renew at a share of `not_after - not_before`.
const BACKDATE: Duration = Duration::from_secs(60);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 20)
}
/// A generated root lives ten years; the leaves it signs live `lifetime` (default 24 h).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// The CA's own serving certificate (for the Certify port), made at start.
const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// The mesh's root and how long the certificates it issues live.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    lifetime: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("making the root failed: {0}")]
    Generate(rcgen::Error),
    #[error("the root key does not parse (PEM PKCS#8 expected): {0}")]
    Key(rcgen::Error),
    #[error("the root certificate does not parse: {0}")]
    Certificate(String),
    #[error("the root certificate is not a CA certificate (basic constraints)")]
    NotCa,
    #[error("the root key is not the key of the root certificate")]
    KeyMismatch,
    #[error("the root certificate expired")]
    Expired,
    #[error("the trust domain {0:?} is not valid: {1}")]
    TrustDomain(String, String),
    #[error("the certificate lifetime {0:?} is outside 1 s ..= 90 days")]
    Lifetime(Duration),
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// Why a CSR was not signed (the caller's identity was already proven).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the CSR does not parse or its signature is wrong: {0}")]
    Csr(rcgen::Error),
    #[error("the CSR asks for {got:?}; it must name exactly the identity {want}")]
    CsrNames { got: Vec<String>, want: SpiffeId },
    #[error("{0} is not in this CA's trust domain {1:?}")]
    ForeignTrustDomain(SpiffeId, String),
    #[error("the CSR asks to be a CA")]
    AsksForCa,
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    #[error("the system's random source failed")]
    Random,
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first; a generated root has no intermediates.
    pub chain: Vec<Vec<u8>>,
    pub not_after: SystemTime,
}

impl Authority {
    /// A fresh root, in memory only (its key is never written anywhere): proxies must be
    /// given its certificate (`--ca-roots-out`), and a restart makes a new one.
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, AuthorityError> {
        check_trust_domain(trust_domain)?;
        check_lifetime(lifetime)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(AuthorityError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tern");
        dn.push(DnType::CommonName, format!("Tern mesh root {trust_domain}"));
        params.distinguished_name = dn;
        // Leaves only: no intermediate may be made under this root.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key).map_err(AuthorityError::Generate)?;
        let root_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_pem,
            lifetime,
        })
    }

    /// A root given as PEM files (a Kubernetes Secret, an offline root's intermediate).
    pub fn load(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        check_trust_domain(trust_domain)?;
        check_lifetime(lifetime)?;
        let key = KeyPair::from_pem(key_pem).map_err(AuthorityError::Key)?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e: rustls_pki_types::pem::Error| AuthorityError::Certificate(e.to_string()),
        )?;
        let der: rustls_pki_types::CertificateDer<'static> = der;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| AuthorityError::Certificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(AuthorityError::NotCa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(AuthorityError::KeyMismatch);
        }
        let not_after = cert.validity().not_after.timestamp();
        let now_unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if not_after <= i64::try_from(now_unix).unwrap_or(i64::MAX) {
            return Err(AuthorityError::Expired);
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| AuthorityError::Certificate(e.to_string()))?;
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_pem: cert_pem.to_owned(),
            lifetime,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchor proxies verify every peer (and this CA) against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Signs `csr_der` for `id`, whose holder the caller has proven to be. The CSR must name
    /// `id` as its only SAN (a CSR asking for anything else is refused, not corrected).
    pub fn sign(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<Issued, SignError> {
        if id.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain(
                id.clone(),
                self.trust_domain.clone(),
            ));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(SignError::Csr)?;
        let names: Vec<String> = csr.params.subject_alt_names.iter().map(san_text).collect();
        if names.len() != 1 || names[0] != format!("URI:{id}") {
            return Err(SignError::CsrNames {
                got: names,
                want: id.clone(),
            });
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(SignError::AsksForCa);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().try_into().map_err(SignError::Sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = now + self.lifetime;
        params.not_before = (now - backdate(self.lifetime)).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial()?);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(SignError::Sign)?;
        Ok(Issued {
            chain: vec![leaf.der().to_vec()],
            not_after,
        })
    }

    /// The CA's own TLS certificate and key (PEM, in memory) for the names proxies dial it by.
    pub fn serving_identity(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(String, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(AuthorityError::Generate)?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(AuthorityError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Tern mesh CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + SERVING_LIFETIME).into();
        params.serial_number = Some(serial()?);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(AuthorityError::Generate)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), AuthorityError> {
    SpiffeId::kubernetes(trust_domain, "ns", "sa")
        .map(drop)
        .map_err(|e| AuthorityError::TrustDomain(trust_domain.to_owned(), e.to_string()))
}

fn check_lifetime(lifetime: Duration) -> Result<(), AuthorityError> {
    if lifetime < Duration::from_secs(1) || lifetime > Duration::from_secs(90 * 86_400) {
        return Err(AuthorityError::Lifetime(lifetime));
    }
    Ok(())
}

/// 128 bits from the system's secure random source (unpredictable serials are what stopped
/// chosen-prefix collision attacks on CAs), positive as DER integers must be.
fn serial() -> Result<rcgen::SerialNumber, SignError> {
    let mut bytes = vec![0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| SignError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(rcgen::SerialNumber::from(bytes))
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(mail) => format!("email:{}", mail.as_str()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests;
