//! The mesh certificate authority: a root (made in memory or loaded from files), a Certify
//! API over TLS on its own port (default 15012), and the ways a caller proves its identity.
//!
//! Layout: `authority` signs (pure); `credentials` turns a token into a SPIFFE ID;
//! `service` is the gRPC method that joins the two.

pub mod authority;
pub mod credentials;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tern_proto::identity::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Identity as TlsIdentity, ServerTlsConfig};
use tracing::Instrument;

pub use authority::Authority;
pub use credentials::{BootstrapTokens, Credentials, TokenReviewer};

use crate::metrics::Metrics;

/// The name proxies check the CA's certificate for unless told otherwise.
pub const DEFAULT_SERVER_NAME: &str = "tern-ca";

/// Where the root comes from.
#[derive(Debug, Clone)]
pub enum RootSource {
    /// Made at start, kept in memory only.
    Generate,
    /// PEM files: the CA certificate and its PKCS#8 key.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone)]
pub struct CaOptions {
    pub address: SocketAddr,
    pub trust_domain: String,
    pub root: RootSource,
    /// How long issued certificates live.
    pub lifetime: Duration,
    /// Names the CA's serving certificate carries (proxies dial it by one of them).
    pub server_names: Vec<String>,
    pub credentials: Credentials,
    /// Where to write the root certificate (public) for proxies to trust.
    pub roots_out: Option<PathBuf>,
}

/// A serving CA.
#[derive(Debug, Clone)]
pub struct RunningCa {
    pub address: SocketAddr,
    pub root_pem: String,
}

/// Builds the root, binds the Certify port and serves it until `shutdown`.
pub async fn start(
    options: CaOptions,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningCa> {
    let authority = match &options.root {
        RootSource::Generate => Authority::generate(&options.trust_domain, options.lifetime)?,
        RootSource::Files { cert, key } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            Authority::load(
                &options.trust_domain,
                &read(cert)?,
                &read(key)?,
                options.lifetime,
                SystemTime::now(),
            )
            .with_context(|| format!("loading the CA root {}", cert.display()))?
        }
    };
    if options.credentials.bootstrap.is_empty() && options.credentials.token_review.is_none() {
        tracing::warn!(
            "the CA has no bootstrap tokens and no Kubernetes TokenReview: it will refuse every caller"
        );
    }
    let mut names = options.server_names.clone();
    if !options.address.ip().is_unspecified() {
        names.push(options.address.ip().to_string());
    }
    let (cert_pem, key_pem) = authority.serving_identity(&names, SystemTime::now())?;
    if let Some(path) = &options.roots_out {
        std::fs::write(path, authority.root_pem())
            .with_context(|| format!("writing the root certificate to {}", path.display()))?;
    }
    let root_pem = authority.root_pem().to_owned();
    let listener = TcpListener::bind(options.address)
        .await
        .with_context(|| format!("binding the CA port {}", options.address))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        trust_domain = %options.trust_domain,
        lifetime_s = options.lifetime.as_secs(),
        "mesh CA serving"
    );
    let service = service::CertifyService {
        authority: Arc::new(authority),
        credentials: options.credentials,
        metrics,
    };
    let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert_pem, key_pem));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("the CA's TLS config")?
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(16)
        .add_service(
            IdentityServer::new(service)
                .max_decoding_message_size(service::MAX_CSR_BYTES + 64 * 1024),
        );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tracker.spawn(
        async move {
            if let Err(e) = server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "CA server failed");
            }
        }
        .instrument(tracing::info_span!("ca_server")),
    );
    Ok(RunningCa { address, root_pem })
}
