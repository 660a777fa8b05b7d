use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tern_proxy::identity::certificate::Request;
use tern_proxy::identity::manager::roots_from_pem;
use tern_proxy::tls::verify::ExpectIdentity;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn web() -> SpiffeId {
    "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The checks a proxy makes of a peer: chain to the root, the one URI SAN expected.
fn verify(root_pem: &str, leaf: &[u8], expected: &SpiffeId) -> Result<(), rustls::Error> {
    let roots = Arc::new(roots_from_pem(root_pem).unwrap());
    let verifier = ExpectIdentity::new(roots, &provider(), expected.clone());
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf.to_vec()),
            &[],
            &ServerName::try_from("tern.invalid").unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(drop)
}

#[test]
fn a_csr_for_the_proven_identity_gets_a_short_lived_svid_the_proxy_accepts() {
    let ca = Authority::generate("cluster.local", DAY).unwrap();
    let request = Request::new(&web()).unwrap();
    let csr = request.csr_der.clone();
    let now = SystemTime::now();
    let issued = ca.sign(&web(), &csr, now).unwrap();
    assert_eq!(issued.chain.len(), 1);
    verify(ca.root_pem(), &issued.chain[0], &web()).unwrap();
    // Another identity is not accepted with it, and another root does not trust it.
    let api: SpiffeId = "spiffe://cluster.local/ns/default/sa/api".parse().unwrap();
    assert!(verify(ca.root_pem(), &issued.chain[0], &api).is_err());
    let other = Authority::generate("cluster.local", DAY).unwrap();
    assert!(verify(other.root_pem(), &issued.chain[0], &web()).is_err());
    // The proxy's own checks pass (identity, its key, dates), and the lifetime is the CA's.
    let cert = request
        .finish(&web(), issued.chain, &provider(), now)
        .unwrap();
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(
        lifetime.abs_diff(DAY + backdate(DAY)) <= Duration::from_secs(1),
        "{lifetime:?}"
    );
}

#[test]
fn a_csr_naming_anything_but_the_proven_identity_is_refused() {
    let ca = Authority::generate("cluster.local", DAY).unwrap();
    let api: SpiffeId = "spiffe://cluster.local/ns/default/sa/api".parse().unwrap();
    // The CSR asks for api; the caller proved web.
    let csr = Request::new(&api).unwrap().csr_der;
    let err = ca.sign(&web(), &csr, SystemTime::now()).unwrap_err();
    assert!(matches!(err, SignError::CsrNames { .. }), "{err}");

    // Extra names ride along: refused, not trimmed.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["db.internal".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::URI(web().as_str().try_into().unwrap()));
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let err = ca.sign(&web(), &csr, SystemTime::now()).unwrap_err();
    assert!(
        matches!(&err, SignError::CsrNames { got, .. } if got.len() == 2),
        "{err}"
    );

    // Asking to be a CA.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(web().as_str().try_into().unwrap())];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let err = ca.sign(&web(), &csr, SystemTime::now()).unwrap_err();
    assert!(matches!(err, SignError::AsksForCa), "{err}");
}

#[test]
fn a_tampered_csr_or_a_foreign_trust_domain_is_refused() {
    let ca = Authority::generate("cluster.local", DAY).unwrap();
    let mut csr = Request::new(&web()).unwrap().csr_der;
    let last = csr.len() - 1;
    csr[last] ^= 0x55;
    let err = ca.sign(&web(), &csr, SystemTime::now()).unwrap_err();
    assert!(matches!(err, SignError::Csr(_)), "{err}");

    let foreign: SpiffeId = "spiffe://other.example/ns/default/sa/web".parse().unwrap();
    let csr = Request::new(&foreign).unwrap().csr_der;
    let err = ca.sign(&foreign, &csr, SystemTime::now()).unwrap_err();
    assert!(matches!(err, SignError::ForeignTrustDomain(..)), "{err}");

    assert!(matches!(
        Authority::generate("cluster.local", Duration::ZERO),
        Err(AuthorityError::Lifetime(_))
    ));
    assert!(matches!(
        Authority::generate("Not A Domain!", DAY),
        Err(AuthorityError::TrustDomain(..))
    ));
}

fn root_files(is_ca: bool) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = if is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.not_after = (SystemTime::now() + Duration::from_secs(3650 * 86_400)).into();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn a_root_from_files_signs_and_bad_files_say_why() {
    let (cert, key) = root_files(true);
    let ca = Authority::load("cluster.local", &cert, &key, DAY, SystemTime::now()).unwrap();
    let csr = Request::new(&web()).unwrap().csr_der;
    let issued = ca.sign(&web(), &csr, SystemTime::now()).unwrap();
    verify(&cert, &issued.chain[0], &web()).unwrap();

    let (_, other_key) = root_files(true);
    let err = Authority::load("cluster.local", &cert, &other_key, DAY, SystemTime::now());
    assert!(matches!(err, Err(AuthorityError::KeyMismatch)), "{err:?}");

    let (leaf, leaf_key) = root_files(false);
    let err = Authority::load("cluster.local", &leaf, &leaf_key, DAY, SystemTime::now());
    assert!(matches!(err, Err(AuthorityError::NotCa)), "{err:?}");

    let later = SystemTime::now() + Duration::from_secs(20_000 * 86_400);
    let err = Authority::load("cluster.local", &cert, &key, DAY, later);
    assert!(matches!(err, Err(AuthorityError::Expired)), "{err:?}");

    let err = Authority::load("cluster.local", "garbage", &key, DAY, SystemTime::now());
    assert!(
        matches!(err, Err(AuthorityError::Certificate(_))),
        "{err:?}"
    );
    let err = Authority::load("cluster.local", &cert, "garbage", DAY, SystemTime::now());
    assert!(matches!(err, Err(AuthorityError::Key(_))), "{err:?}");
}
