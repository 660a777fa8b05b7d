//! The YAML file's shape, exactly as users write it: parsed strictly, validated later.
//!
//! These types only describe syntax; `validate.rs` turns them into the typed [`super::Config`].
//! They also serialize back, which is what `/config_dump` shows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    /// How long in-flight work may continue after SIGTERM, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Destination ports whose traffic is never sniffed by auto listeners: forwarded as
    /// opaque TCP at once. Unset: `detect::DEFAULT_OPAQUE_PORTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque_ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Box<RawTelemetry>>,
    /// Resident memory the proxy should stay under, e.g. `512MiB`: past 90% of it, new
    /// connections are refused and new requests answered 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<RawSize>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub services: Vec<RawService>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<RawAccessLog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<RawTracing>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// OTLP/gRPC receiver, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: String,
    /// Fraction of new traces sampled (default 0.01); a sampled parent is always honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<f64>,
    /// `service.name` of the exported spans (default `tern-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// `stdout` or a file path.
    pub path: String,
    /// `json` (default) or `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// For `text`: `%FIELD%` placeholders; default `access_log::DEFAULT_TEMPLATE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// A byte size as written: `512MiB`, or a bare number of bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub address: String,
    pub protocol: RawListenerProtocol,
    /// HTTP listeners: first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// TCP listeners: the service every connection goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// How long a client may take to send its request headers, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_timeout: Option<String>,
    /// `inbound` (default): on shutdown, stop accepting and drain at once. `outbound` (the
    /// app's own calls out): keep serving until the drain deadline, so the app can finish
    /// its shutdown calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<RawDirection>,
    /// Auto listeners: how long to wait for the client's first bytes before treating the
    /// connection as a server-speaks-first protocol (default `100ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout: Option<String>,
    /// Connections open at once on this listener (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Mutual TLS with the mesh identity, and who may call (needs `--identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<RawMtls>,
    /// `false`: no socket is bound; connections whose original destination is `address`
    /// are handed to this listener by an `original_destination` listener (Envoy's
    /// `bind_to_port: false`). `0.0.0.0:PORT` matches any address on PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<bool>,
    /// Read each connection's original destination (`SO_ORIGINAL_DST`, set by iptables
    /// REDIRECT) and hand it to the unbound listener for that address; connections for no
    /// such listener are served by this one (Envoy's `use_original_dst`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<bool>,
    /// Terminate TLS for clients outside the mesh (a gateway), with certificates from files
    /// chosen by SNI and reloaded when the files change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawGatewayTls>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatewayTls {
    /// The first is the default (clients without SNI, or with a name no certificate has).
    pub certificates: Vec<RawGatewayCert>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatewayCert {
    /// PEM: the certificate, then its intermediates.
    pub cert: String,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// The SNI names it answers (`*.example.com` for one label); default: its DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    /// `strict` (mTLS only), `permissive` (mTLS or plaintext) or `disabled` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RawMtlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<RawAuthorization>,
    /// Tell the app who called: this request header gets the peer's SPIFFE ID (any value
    /// the client sent in it is removed first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMtlsMode {
    Strict,
    Permissive,
    Disabled,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorization {
    /// `allow` or `deny`: what happens to callers no list names (default `deny` once an
    /// `authorization` is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<RawVerdict>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawVerdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawDirection {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawListenerProtocol {
    Http,
    Tcp,
    /// Detected per connection: HTTP/1 and HTTP/2 are routed with `routes`; TLS, other
    /// bytes and server-speaks-first protocols go to `service` as opaque TCP.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<RawMatch>,
    pub backends: Vec<RawBackend>,
    /// Until the response headers, retries included, e.g. `2s`. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RawRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<RawFault>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    /// Requests allowed at once from a full bucket (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `client_ip` (default), `header:NAME`, `peer_identity` or `none` (one bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<RawFaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<RawFaultAbort>,
    /// Only requests carrying this header get faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFaultDelay {
    pub percent: f64,
    pub duration: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFaultAbort {
    pub percent: f64,
    pub status: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Retries after the first try (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Conditions: 5xx, gateway-error, connect-failure, reset, retriable-status-codes,
    /// cancelled, deadline-exceeded, resource-exhausted, unavailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<RawBackoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RawBudget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub protocol: RawServiceProtocol,
    #[serde(default)]
    pub load_balancer: RawLoadBalancer,
    /// Time allowed to establish an upstream connection, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Pooled upstream connections idle longer than this are closed by Tern, e.g. `4s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<RawCircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<RawOutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    /// The SPIFFE ID its endpoints' proxies present: set, Tern speaks mTLS to them (HTTP
    /// as HTTP/2 over one multiplexed connection) and checks that identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// No endpoints: each connection goes to its own original destination (pass-through
    /// of intercepted traffic; Envoy's `ORIGINAL_DST` cluster). TCP services only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<RawOriginalDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOriginalDestination {
    /// Dial this address with the original port instead of the original address (inbound
    /// interception: `127.0.0.1` reaches the app in the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_failure: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_connect_failure: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RawHttpCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<RawTcpCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpCheck {
    pub path: String,
    /// Default: [200].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcpCheck {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawServiceProtocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawLoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    PeakEwma,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}
