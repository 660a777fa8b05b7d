use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;
use crate::identity::certificate::Request;

/// A CA in the test: signs CSRs for a fixed lifetime; fails the first `fail_first` calls.
struct TestCa {
    issuer: rcgen::Issuer<'static, KeyPair>,
    root_pem: String,
    lifetime: Duration,
    fail_first: usize,
    calls: AtomicUsize,
    issued_at: Mutex<Vec<tokio::time::Instant>>,
}

impl TestCa {
    fn new(lifetime: Duration, fail_first: usize) -> Arc<Self> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Arc::new(TestCa {
            root_pem: cert.pem(),
            issuer: rcgen::Issuer::from_ca_cert_der(cert.der(), key).unwrap(),
            lifetime,
            fail_first,
            calls: AtomicUsize::new(0),
            issued_at: Mutex::new(Vec::new()),
        })
    }
}

impl Source for Arc<TestCa> {
    async fn fetch(
        &self,
        id: &SpiffeId,
        provider: &CryptoProvider,
    ) -> Result<WorkloadCert, FetchError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(FetchError::Timeout(Duration::from_secs(1)));
        }
        let request = Request::new(id).unwrap();
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(
            &rustls_pki_types::CertificateSigningRequestDer::from(request.csr_der.clone()),
        )
        .unwrap();
        csr.params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        // Wall-clock validity: frozen tokio time does not move SystemTime, so each
        // certificate is "fresh" and renewal is due ~70% of `lifetime` later in tokio time.
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now;
        csr.params.not_after = now + self.lifetime;
        let leaf = csr.signed_by(&self.issuer).unwrap().der().to_vec();
        self.issued_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        Ok(request.finish(id, vec![leaf], provider, SystemTime::now())?)
    }
}

fn id() -> SpiffeId {
    "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn renews_at_about_seventy_percent_of_each_lifetime() {
    let ca = TestCa::new(Duration::from_secs(100), 0);
    let identity = Identity::new(id(), &ca.root_pem, IdentityCounters::default()).unwrap();
    let stop = CancellationToken::new();
    let start = tokio::time::Instant::now();
    let task = tokio::spawn(Arc::clone(&identity).run(Arc::clone(&ca), stop.clone()));
    identity.wait_held().await;
    assert!(identity.is_held());
    assert_eq!(identity.current().unwrap().id, id());
    tokio::time::sleep(Duration::from_secs(400)).await;
    stop.cancel();
    task.await.unwrap();
    let issued = ca.issued_at.lock().unwrap().clone();
    // Renewals every 65-75 s of a 100 s lifetime: 6 in 400 s at 65-66 s each, 5 at 75 s.
    assert!(
        (6..=7).contains(&issued.len()),
        "{} certificates",
        issued.len()
    );
    for pair in issued.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_secs(64) && gap <= Duration::from_secs(76),
            "renewed after {gap:?}"
        );
    }
    assert_eq!(issued[0], start);
    assert_eq!(identity.counters.renewals.get(), issued.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn a_failing_ca_is_retried_with_backoff_and_readiness_waits() {
    let ca = TestCa::new(Duration::from_secs(3_600), 4);
    let identity = Identity::new(id(), &ca.root_pem, IdentityCounters::default()).unwrap();
    let stop = CancellationToken::new();
    let start = tokio::time::Instant::now();
    let task = tokio::spawn(Arc::clone(&identity).run(Arc::clone(&ca), stop.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!identity.is_held(), "no certificate yet: not ready");
    identity.wait_held().await;
    let waited = tokio::time::Instant::now() - start;
    // Four failures: 0.25-0.5 + 0.5-1 + 1-2 + 2-4 s of backoff.
    assert!(
        waited >= Duration::from_millis(3_750) && waited <= Duration::from_millis(7_500),
        "{waited:?}"
    );
    assert_eq!(ca.calls.load(Ordering::SeqCst), 5);
    assert_eq!(identity.counters.failures.get(), 4);
    stop.cancel();
    task.await.unwrap();
}

#[test]
fn trust_anchors_must_parse() {
    assert!(matches!(roots_from_pem(""), Err(RootsError::Empty)));
    let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(roots_from_pem(bad).is_err());
}
