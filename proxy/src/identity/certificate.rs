//! The workload's certificate: a key made in memory, the CSR sent to the CA, the chain that
//! comes back checked against what was asked, and when to renew it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::SpiffeId;

/// Renewal starts at this share of the lifetime, moved by up to ±[`RENEW_JITTER`] so that
/// proxies started together do not all call the CA at the same instant.
const RENEW_AT: f64 = 0.70;
const RENEW_JITTER: f64 = 0.05;

/// A key pair that never leaves the process, and the CSR for it.
pub struct Request {
    pub key: KeyPair,
    pub csr_der: Vec<u8>,
}

/// A certificate the CA issued for our key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making a key pair or CSR failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA sent an empty certificate chain")]
    EmptyChain,
    #[error("the CA's leaf certificate does not parse: {0}")]
    Parse(String),
    #[error("the CA's certificate is for {got}, not {want}")]
    WrongIdentity { got: String, want: SpiffeId },
    #[error("the CA's certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the CA's certificate is not for the key this proxy made")]
    WrongKey,
    #[error("the CA's certificate expired at {0:?}")]
    Expired(SystemTime),
    #[error("rustls refused the key: {0}")]
    Key(rustls::Error),
}

impl Request {
    /// A fresh P-256 key and a CSR naming `id` as its only SAN.
    pub fn new(id: &SpiffeId) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(Request {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// Checks the chain the CA sent (the leaf names `id`, is for our key, is in date) and
    /// joins it with the key.
    pub fn finish(
        self,
        id: &SpiffeId,
        chain: Vec<Vec<u8>>,
        provider: &CryptoProvider,
        now: SystemTime,
    ) -> Result<WorkloadCert, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let info = LeafInfo::parse(leaf)?;
        if info.uris.len() != 1 {
            return Err(CertError::UriSanCount(info.uris.len()));
        }
        if info.uris[0] != id.as_str() {
            return Err(CertError::WrongIdentity {
                got: info.uris[0].clone(),
                want: id.clone(),
            });
        }
        if info.public_key != self.key.public_key_raw() {
            return Err(CertError::WrongKey);
        }
        if info.not_after <= now {
            return Err(CertError::Expired(info.not_after));
        }
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(CertError::Key)?;
        let chain = chain.into_iter().map(CertificateDer::from).collect();
        Ok(WorkloadCert {
            id: id.clone(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        })
    }
}

impl WorkloadCert {
    /// How long from `now` until renewal should start: about 70% into the lifetime.
    /// `jitter` is uniform in [0, 1).
    pub fn renew_in(&self, now: SystemTime, jitter: f64) -> Duration {
        renew_in(self.not_before, self.not_after, now, jitter)
    }

    /// Seconds since the Unix epoch at which the certificate expires (for metrics).
    pub fn expiry_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// The renewal delay (pure): `not_before + lifetime × (0.70 ± 0.05)`, from `now`; zero when
/// that moment has passed.
pub fn renew_in(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let share = RENEW_AT + RENEW_JITTER * (2.0 * jitter.clamp(0.0, 1.0) - 1.0);
    let at = not_before + lifetime.mul_f64(share);
    at.duration_since(now).unwrap_or_default()
}

/// What the proxy reads out of a peer's or its own leaf certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafInfo {
    pub uris: Vec<String>,
    pub public_key: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl LeafInfo {
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let uris = uri_sans(&cert);
        let time = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        Ok(LeafInfo {
            uris,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            serial: cert.raw_serial_as_string(),
        })
    }
}

/// The URI SANs of a certificate, in order.
pub fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID of a peer's leaf certificate: its one URI SAN, if that is a SPIFFE ID.
pub fn peer_id(leaf: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    match uri_sans(&cert).as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_starts_at_seventy_percent_give_or_take_five() {
        let (nb, na) = (at(1_000), at(1_000 + 86_400));
        assert_eq!(
            renew_in(nb, na, nb, 0.5),
            Duration::from_secs_f64(86_400.0 * 0.70)
        );
        assert_eq!(
            renew_in(nb, na, nb, 0.0),
            Duration::from_secs_f64(86_400.0 * 0.65)
        );
        let late = renew_in(nb, na, nb, 0.999_999);
        assert!(late < Duration::from_secs_f64(86_400.0 * 0.75) + Duration::from_secs(1));
        assert!(late > Duration::from_secs_f64(86_400.0 * 0.74));
        // Measured from now, and never negative.
        assert_eq!(
            renew_in(nb, na, at(1_000 + 3_600), 0.5),
            Duration::from_secs_f64(86_400.0 * 0.70 - 3_600.0)
        );
        assert_eq!(renew_in(nb, na, at(1_000 + 80_000), 0.5), Duration::ZERO);
    }

    /// A self-signed stand-in for the CA: signs the CSR with its own key and SANs.
    fn issue(request: &Request, sans: Vec<SanType>, days: i64) -> Vec<u8> {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(
            &rustls_pki_types::CertificateSigningRequestDer::from(request.csr_der.clone()),
        )
        .unwrap();
        csr.params.subject_alt_names = sans;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + time::Duration::days(days);
        csr.signed_by(&issuer).unwrap().der().to_vec()
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn a_certificate_for_our_key_and_identity_is_accepted() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let request = Request::new(&id).unwrap();
        let leaf = issue(
            &request,
            vec![SanType::URI(id.as_str().try_into().unwrap())],
            1,
        );
        let cert = request
            .finish(&id, vec![leaf.clone()], &provider(), SystemTime::now())
            .unwrap();
        assert_eq!(cert.id, id);
        assert_eq!(peer_id(&leaf), Some(id));
        let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(86_400 + 300));
    }

    #[test]
    fn certificates_for_another_identity_key_or_time_are_refused() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());

        let request = Request::new(&id).unwrap();
        let leaf = issue(&request, vec![uri("spiffe://cluster.local/ns/x/sa/y")], 1);
        let err = request.finish(&id, vec![leaf], &provider(), SystemTime::now());
        assert!(
            matches!(err, Err(CertError::WrongIdentity { .. })),
            "{err:?}"
        );

        let request = Request::new(&id).unwrap();
        let leaf = issue(&request, vec![uri(id.as_str()), uri("spiffe://a/b")], 1);
        let err = request.finish(&id, vec![leaf], &provider(), SystemTime::now());
        assert!(matches!(err, Err(CertError::UriSanCount(2))), "{err:?}");

        // Signed for someone else's key.
        let other = Request::new(&id).unwrap();
        let leaf = issue(&other, vec![uri(id.as_str())], 1);
        let request = Request::new(&id).unwrap();
        let err = request.finish(&id, vec![leaf], &provider(), SystemTime::now());
        assert!(matches!(err, Err(CertError::WrongKey)), "{err:?}");

        let request = Request::new(&id).unwrap();
        let leaf = issue(&request, vec![uri(id.as_str())], 1);
        let later = SystemTime::now() + Duration::from_secs(3 * 86_400);
        let err = request.finish(&id, vec![leaf], &provider(), later);
        assert!(matches!(err, Err(CertError::Expired(_))), "{err:?}");

        let request = Request::new(&id).unwrap();
        let err = request.finish(&id, vec![], &provider(), SystemTime::now());
        assert!(matches!(err, Err(CertError::EmptyChain)), "{err:?}");
    }
}
