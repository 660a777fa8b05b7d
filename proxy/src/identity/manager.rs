//! The workload identity of a running proxy: the current certificate (swapped in whole, so
//! handshakes in progress keep the one they started with and no connection drops), the task
//! that fetches it at start and renews it at about 70% of its lifetime, and readiness.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::SpiffeId;
use super::ca_client::{CaClient, FetchError};
use super::certificate::WorkloadCert;
use crate::xds::backoff::Backoff;

/// A failed fetch is retried after 0.5 s doubling to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Never ask again sooner than this after a success, whatever the certificate's dates say
/// (a CA that issues already-due certificates must not be hammered).
const MIN_RENEW_GAP: Duration = Duration::from_millis(500);

/// Where certificates come from: the CA in production, a stand-in in tests.
pub trait Source: Send + Sync + 'static {
    fn fetch(
        &self,
        id: &SpiffeId,
        provider: &CryptoProvider,
    ) -> impl Future<Output = Result<WorkloadCert, FetchError>> + Send;
}

impl Source for CaClient {
    fn fetch(
        &self,
        id: &SpiffeId,
        provider: &CryptoProvider,
    ) -> impl Future<Output = Result<WorkloadCert, FetchError>> + Send {
        CaClient::fetch(self, id, provider)
    }
}

/// Counted in `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct IdentityCounters {
    pub renewals: Counter,
    pub failures: Counter,
    /// Unix seconds at which the held certificate expires (0 before the first).
    pub expiry: Gauge,
}

/// The proxy's identity and the trust anchors it checks peers against.
#[derive(Debug)]
pub struct Identity {
    pub id: SpiffeId,
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<CryptoProvider>,
    current: ArcSwapOption<WorkloadCert>,
    /// True once a certificate is held; readiness waits for it.
    held: watch::Sender<bool>,
    pub counters: IdentityCounters,
}

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("no certificate in the trust anchors file")]
    Empty,
    #[error("a trust anchor does not parse: {0}")]
    Parse(String),
}

impl Identity {
    pub fn new(
        id: SpiffeId,
        roots_pem: &str,
        counters: IdentityCounters,
    ) -> Result<Arc<Self>, RootsError> {
        let roots = roots_from_pem(roots_pem)?;
        Ok(Arc::new(Identity {
            id,
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            current: ArcSwapOption::empty(),
            held: watch::Sender::new(false),
            counters,
        }))
    }

    /// The certificate to present now, if one is held.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.load_full()
    }

    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Waits until a certificate is held.
    pub async fn wait_held(&self) {
        let mut rx = self.held.subscribe();
        let _ = rx.wait_for(|held| *held).await;
    }

    fn install(&self, cert: WorkloadCert) {
        tracing::info!(
            identity = %cert.id,
            serial = %cert.serial,
            expires_in_s = cert.not_after.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
            "workload certificate installed"
        );
        self.counters
            .expiry
            .set(i64::try_from(cert.expiry_unix()).unwrap_or(i64::MAX));
        self.current.store(Some(Arc::new(cert)));
        self.counters.renewals.inc();
        self.held.send_replace(true);
    }

    /// Fetches a certificate, then renews it at about 70% of each lifetime (jittered), until
    /// `stop`. A failed fetch is retried with backoff; the certificate held meanwhile stays in
    /// use until it expires, so a CA outage shorter than the remaining lifetime costs nothing.
    pub async fn run<S: Source>(self: Arc<Self>, source: S, stop: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let mut rng = fastrand::Rng::new();
        loop {
            let wait = match source.fetch(&self.id, &self.provider).await {
                Ok(cert) => {
                    backoff.reset();
                    let wait = cert
                        .renew_in(SystemTime::now(), rng.f64())
                        .max(MIN_RENEW_GAP);
                    self.install(cert);
                    wait
                }
                Err(e) => {
                    self.counters.failures.inc();
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "fetching the workload certificate failed");
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Parses PEM trust anchors.
pub fn roots_from_pem(pem: &str) -> Result<RootCertStore, RootsError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| RootsError::Parse(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| RootsError::Parse(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(RootsError::Empty);
    }
    Ok(roots)
}

#[cfg(test)]
mod tests;
