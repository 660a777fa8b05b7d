//! Configuration: the YAML model, its validation into typed config, and loading from files.

mod duration;
mod load;
mod model;
mod size;
mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use duration::parse_duration;
pub use load::{ConfigError, load_file, parse_yaml};
pub use model::*;
pub use size::{parse_memory_limit, parse_size};

pub use crate::health::{HealthCheckConfig, ProbeKind};
pub use crate::resilience::breaker::BreakerConfig;
pub use crate::resilience::budget::BudgetConfig;
pub use crate::resilience::outlier::OutlierConfig;
pub use crate::resilience::retry::{RetryOn, RetryPolicy};

/// Default time in-flight work gets to finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client gets to send complete request headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed to establish an upstream connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pooled upstream connections are closed after this much idleness, below the 5 s keep-alive
/// of Node.js and similar servers, so that Tern is the side that closes (no "503 UC" race).
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Default cap on connections open at once on one listener: far above what one sidecar's app
/// sees, low enough that a flood cannot take every file descriptor.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Most connections a listener may be configured to hold.
pub const MAX_MAX_CONNECTIONS: u32 = 1_000_000;
/// The smallest `memory_limit` accepted; anything below is a unit mistake.
pub const MIN_MEMORY_LIMIT: u64 = 1 << 20;

/// A validated configuration: every name resolves, every address parses.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: Option<SocketAddr>,
    pub drain_timeout: Duration,
    /// Sorted; see `RawConfig::opaque_ports`.
    pub opaque_ports: Vec<u16>,
    pub access_log: Option<crate::telemetry::access_log::AccessLogConfig>,
    pub tracing: Option<crate::telemetry::traces::TracingConfig>,
    /// Bytes of resident memory the process should stay under: past 90% of it, new
    /// connections are refused and new requests get 503. `None`: no guard.
    pub memory_limit: Option<u64>,
    pub listeners: Vec<Listener>,
    pub services: Vec<Service>,
    /// The file as parsed, for `/config_dump`.
    pub raw: Arc<RawConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: Arc<str>,
    pub address: SocketAddr,
    pub header_timeout: Duration,
    /// Connections open at once; past it, new ones are closed as soon as accepted.
    pub max_connections: u32,
    /// Serves until the drain deadline on shutdown (the app's outbound calls) instead of
    /// draining at once.
    pub outbound: bool,
    pub kind: ListenerKind,
    pub mtls: ListenerMtls,
    /// False: not bound; reached through an `original_destination` listener.
    pub bind: bool,
    /// Hands each connection to the unbound listener for its original destination.
    pub original_destination: bool,
    /// Terminates TLS for outside clients with these certificates.
    pub tls: Option<GatewayTlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTlsConfig {
    pub certificates: Vec<GatewayCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Lower-case; empty means the certificate's DNS names.
    pub server_names: Vec<String>,
}

/// How a listener treats mutual TLS, and who may call it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListenerMtls {
    pub mode: MtlsMode,
    pub authorization: Option<crate::authz::Authorization>,
    pub peer_identity_header: Option<HeaderName>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plaintext only.
    #[default]
    Disabled,
    /// mTLS or plaintext (told apart by the first byte), for migrations.
    Permissive,
    /// mTLS only: a plaintext client is closed.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Disabled => "disabled",
            MtlsMode::Permissive => "permissive",
            MtlsMode::Strict => "strict",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    Http {
        routes: Vec<Route>,
    },
    Tcp {
        service: Arc<str>,
    },
    /// Protocol detected per connection (see `detect.rs`).
    Auto {
        routes: Vec<Route>,
        service: Arc<str>,
        detect_timeout: Duration,
    },
}

impl Listener {
    /// This listener's settings without its routes, for the runtime listener, which holds
    /// the routes resolved (a gateway may have thousands; one copy each is enough).
    pub fn settings(&self) -> Listener {
        let kind = match &self.kind {
            ListenerKind::Http { .. } => ListenerKind::Http { routes: Vec::new() },
            ListenerKind::Tcp { service } => ListenerKind::Tcp {
                service: Arc::clone(service),
            },
            ListenerKind::Auto {
                service,
                detect_timeout,
                ..
            } => ListenerKind::Auto {
                routes: Vec::new(),
                service: Arc::clone(service),
                detect_timeout: *detect_timeout,
            },
        };
        Listener {
            name: Arc::clone(&self.name),
            address: self.address,
            header_timeout: self.header_timeout,
            max_connections: self.max_connections,
            outbound: self.outbound,
            kind,
            mtls: self.mtls.clone(),
            bind: self.bind,
            original_destination: self.original_destination,
            tls: self.tls.clone(),
        }
    }
}

impl ListenerKind {
    pub fn protocol(&self) -> &'static str {
        match self {
            ListenerKind::Http { .. } => "http",
            ListenerKind::Tcp { .. } => "tcp",
            ListenerKind::Auto { .. } => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub matcher: RouteMatch,
    pub backends: Vec<Backend>,
    /// Time allowed from the request's arrival to the response headers, retries included
    /// (504 past it). `None`: no limit, so streams are never cut.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub rate_limit: Option<crate::traffic::rate_limit::RateLimitConfig>,
    pub fault: Option<crate::traffic::fault::FaultConfig>,
}

/// What a request must look like for a route to apply; every present part must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteMatch {
    /// Lower-case host without port; `*.example.com` matches any subdomain.
    pub host: Option<String>,
    pub path: Option<PathMatch>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub service: Arc<str>,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub load_balancer: LoadBalancerKind,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub endpoints: Vec<EndpointConfig>,
    pub circuit_breaker: BreakerConfig,
    pub outlier_detection: Option<OutlierConfig>,
    pub health_check: Option<HealthCheckConfig>,
    /// Set: endpoints are meshed proxies that must present this identity over mTLS.
    pub identity: Option<crate::identity::SpiffeId>,
    /// Set: no endpoints; each connection is dialled to its original destination.
    pub original_destination: Option<OriginalDestination>,
}

/// Where a pass-through service dials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginalDestination {
    /// Replaces the original address (the port is kept).
    pub host: Option<std::net::IpAddr>,
}

impl OriginalDestination {
    /// The address to dial for a connection whose original destination is `original`.
    pub fn target(&self, original: SocketAddr) -> SocketAddr {
        match self.host {
            Some(ip) => SocketAddr::new(ip, original.port()),
            None => original,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancerKind {
    RoundRobin,
    LeastRequest,
    PeakEwma,
}

impl LoadBalancerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancerKind::RoundRobin => "round_robin",
            LoadBalancerKind::LeastRequest => "least_request",
            LoadBalancerKind::PeakEwma => "peak_ewma",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub weight: u32,
}
