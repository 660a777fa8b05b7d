//! Prometheus metrics. Handles are resolved when a snapshot is built, so the request path
//! only touches atomics: no label formatting or map lookups per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets from 0.1 ms to 10 s: a proxy's added latency lives at the low end.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum StatusClass {
    C1xx,
    C2xx,
    C3xx,
    C4xx,
    C5xx,
}

const CLASSES: [StatusClass; 5] = [
    StatusClass::C1xx,
    StatusClass::C2xx,
    StatusClass::C3xx,
    StatusClass::C4xx,
    StatusClass::C5xx,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerClassLabels {
    pub listener: String,
    pub status_class: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: String,
    /// The route's index in its listener.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub listener: String,
    pub route: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub listener: String,
    pub reason: &'static str,
}

/// Inbound traffic on a listener with mTLS on, by who called: the SPIFFE ID the client
/// proved, or `unauthenticated` (plaintext on a permissive port). The values are bounded by
/// the identities the mesh's CA issues, not by anything a client can make up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub listener: String,
    pub client_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerClassLabels {
    pub listener: String,
    pub client_id: String,
    pub status_class: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub listener: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub listener: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub listener: String,
    pub direction: Direction,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the downstream client to the upstream.
    Upstream,
    /// From the upstream back to the client.
    Downstream,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub listener: String,
    pub kind: ShedKind,
}

/// What the memory guard turned away.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ShedKind {
    Connection,
    Request,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Failed,
}

/// Label values written as fixed strings.
macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $text:literal),+ $(,)? })+) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(match self { $($ty::$variant => $text),+ })
            }
        }
    )+};
}

label_values! {
    StatusClass { C1xx => "1xx", C2xx => "2xx", C3xx => "3xx", C4xx => "4xx", C5xx => "5xx" }
    Direction { Upstream => "upstream", Downstream => "downstream" }
    ReloadResult { Ok => "ok", Failed => "failed" }
    ShedKind { Connection => "connection", Request => "request" }
}

/// Every metric family of the proxy.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<ListenerClassLabels, Counter>,
    request_duration: Family<ListenerLabels, Histogram>,
    no_route: Family<ListenerLabels, Counter>,
    upstream_latency: Family<ServiceLabels, Histogram>,
    tcp_connections: Family<ListenerLabels, Counter>,
    tcp_active: Family<ListenerLabels, Gauge>,
    tcp_bytes: Family<TcpBytesLabels, Counter>,
    upgrades: Family<ListenerLabels, Counter>,
    detections: Family<DetectLabels, Counter>,
    rate_limited: Family<RouteLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    authz_denied: Family<AuthzLabels, Counter>,
    tls_accepts: Family<TlsLabels, Counter>,
    peer_requests: Family<PeerClassLabels, Counter>,
    peer_connections: Family<PeerLabels, Counter>,
    /// The workload certificate's renewals, failures and expiry.
    pub identity: crate::identity::IdentityCounters,
    /// Gateway certificate reloads by listener and result.
    pub gateway_reloads: Family<TlsLabels, Counter>,
    listener_overflow: Family<ListenerLabels, Counter>,
    memory_shed: Family<ShedLabels, Counter>,
    /// Resident memory at the memory guard's last read.
    pub resident_memory: Gauge,
    /// 1 while the memory guard sheds new work.
    pub memory_overloaded: Gauge,
    reloads: Family<ReloadLabels, Counter>,
    xds_nacks: Counter,
    retries: Family<RetryLabels, Counter>,
    /// Shared by every access log writer the process runs.
    pub access_log: crate::telemetry::access_log::LogCounters,
    /// Shared by every tracer the process runs.
    pub traces: crate::telemetry::traces::TraceCounters,
}

/// Handles for one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub requests: [Counter; 5],
    pub duration: Histogram,
    pub no_route: Counter,
    pub tcp_connections: Counter,
    pub tcp_active: Gauge,
    pub tcp_bytes_upstream: Counter,
    pub tcp_bytes_downstream: Counter,
    /// HTTP/1.1 upgrades (WebSocket and others) and CONNECT tunnels opened.
    pub upgrades: Counter,
    rate_limited: Family<RouteLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    name: String,
    /// Auto listeners: connections by detection outcome (`detect::Outcome::index`).
    pub detections: [Counter; 8],
    /// Connections closed at accept because `max_connections` were open.
    pub overflow: Counter,
    /// Connections closed at accept by the memory guard.
    pub shed_connections: Counter,
    /// Requests answered 503 by the memory guard.
    pub shed_requests: Counter,
    /// Refused by the listener's authorization, by `authz::Deny::index`.
    pub authz_denied: [Counter; 2],
    /// Inbound mTLS handshakes: [completed, failed].
    pub tls_accepts: [Counter; 2],
    peer_requests: Family<PeerClassLabels, Counter>,
    peer_connections: Family<PeerLabels, Counter>,
}

/// One inbound connection's counters by its caller, looked up once when the connection
/// arrives (not per request).
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    requests: [Counter; 5],
}

impl PeerMetrics {
    pub fn count_status(&self, status: http::StatusCode) {
        self.requests[class_index(status)].inc();
    }
}

/// The `client_id` label of a caller without a SPIFFE ID; cannot collide with one.
pub const UNAUTHENTICATED: &str = "unauthenticated";

impl ListenerMetrics {
    pub fn count_status(&self, status: http::StatusCode) {
        self.requests[class_index(status)].inc();
    }

    /// Counts a connection from `peer` (`None`: plaintext) and returns its request counters.
    pub fn peer(&self, peer: Option<&crate::identity::SpiffeId>) -> PeerMetrics {
        let client_id = peer.map_or(UNAUTHENTICATED, |p| p.as_str()).to_string();
        self.peer_connections
            .get_or_create(&PeerLabels {
                listener: self.name.clone(),
                client_id: client_id.clone(),
            })
            .inc();
        PeerMetrics {
            requests: CLASSES.map(|status_class| {
                self.peer_requests.get_or_create_owned(&PeerClassLabels {
                    listener: self.name.clone(),
                    client_id: client_id.clone(),
                    status_class,
                })
            }),
        }
    }

    /// Off the fast path: only refused or faulted requests get here.
    pub fn count_rate_limited(&self, route: usize) {
        self.rate_limited
            .get_or_create(&RouteLabels {
                listener: self.name.clone(),
                route: route.to_string(),
            })
            .inc();
    }

    pub fn count_fault(&self, route: usize, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                listener: self.name.clone(),
                route: route.to_string(),
                kind,
            })
            .inc();
    }
}

/// Handles for one service.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub latency: Histogram,
    /// Carried across reloads with the service (see [`ServiceCounters`]).
    pub counters: Arc<ServiceCounters>,
    retries: Family<RetryLabels, Counter>,
    name: String,
}

impl ServiceMetrics {
    /// Counts a retry; off the fast path (a retry already cost a round trip).
    pub fn count_retry(&self, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                service: self.name.clone(),
                reason,
            })
            .inc();
    }

    pub fn count_overloaded(&self, limit: crate::resilience::breaker::Limit) {
        self.counters.overloaded[limit_index(limit)].inc();
    }
}

/// A service's counters: atomics kept with the service across reloads and written out by
/// `admin::EndpointCollector` at scrape time, like the endpoints' (ten labelled registry
/// series per service were half of what a service cost; a removed service's series now go
/// with it instead of staying in the registry forever).
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub no_endpoints: Count,
    pub budget_exhausted: Count,
    /// By `Limit`, in the order of [`OVERLOAD_LIMITS`].
    pub overloaded: [Count; 4],
    pub request_timeouts: Count,
    pub per_try_timeouts: Count,
    /// Outbound mTLS handshakes that failed.
    pub tls_failures: Count,
}

/// The `limit` label values, in the order of `ServiceCounters::overloaded`.
pub const OVERLOAD_LIMITS: [&str; 4] = [
    "max_connections",
    "max_pending_requests",
    "max_requests",
    "max_retries",
];

fn limit_index(limit: crate::resilience::breaker::Limit) -> usize {
    use crate::resilience::breaker::Limit;
    match limit {
        Limit::Connections => 0,
        Limit::PendingRequests => 1,
        Limit::Requests => 2,
        Limit::Retries => 3,
    }
}

/// The counters of one endpoint, kept across config changes with the endpoint.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    pub requests: [Count; 5],
    pub connect_failures: Count,
    pub resets: Count,
    pub ejections: Count,
}

impl EndpointMetrics {
    pub fn count_status(&self, status: http::StatusCode) {
        self.requests[class_index(status)].inc();
    }
}

/// An endpoint's counter: a plain atomic in the endpoint's state, written out at scrape
/// time by `admin::EndpointCollector`. No registry entry per endpoint: with thousands of
/// endpoints, eight labelled series each (label copies, map entries, one allocation per
/// counter) were most of a config's memory.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The `status_class` label values, in the order of `EndpointMetrics::requests`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: http::StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    /// Creates the families and registers them (with any extra collectors) in a registry.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        Self::with_identity(registry, Default::default())
    }

    /// With the counters of the workload identity (which exists before the metrics do).
    pub fn with_identity(
        registry: &mut Registry,
        identity: crate::identity::IdentityCounters,
    ) -> Arc<Self> {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            no_route: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            tcp_connections: Family::default(),
            tcp_active: Family::default(),
            tcp_bytes: Family::default(),
            upgrades: Family::default(),
            detections: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            authz_denied: Family::default(),
            tls_accepts: Family::default(),
            peer_requests: Family::default(),
            peer_connections: Family::default(),
            identity,
            gateway_reloads: Family::default(),
            listener_overflow: Family::default(),
            memory_shed: Family::default(),
            resident_memory: Gauge::default(),
            memory_overloaded: Gauge::default(),
            reloads: Family::default(),
            xds_nacks: Counter::default(),
            retries: Family::default(),
            access_log: Default::default(),
            traces: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("tern");
        // A gauge rather than an OpenMetrics `info`: the classic text format (and promtool)
        // has no info type.
        let build: Family<Vec<(String, String)>, Gauge> = Family::default();
        build
            .get_or_create(&vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )])
            .set(1);
        r.register(
            "build_info",
            "The running tern-proxy's version (always 1)",
            build,
        );
        r.register(
            "requests",
            "HTTP requests answered, by listener and status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request headers received to response body sent, by listener",
            m.request_duration.clone(),
        );
        r.register(
            "no_route",
            "HTTP requests that matched no route, by listener",
            m.no_route.clone(),
        );
        r.register(
            "upstream_response_seconds",
            "Time from request sent to response headers received, by service",
            m.upstream_latency.clone(),
        );
        r.register(
            "tcp_connections",
            "TCP connections accepted, by listener",
            m.tcp_connections.clone(),
        );
        r.register(
            "tcp_active_connections",
            "TCP connections open now, by listener",
            m.tcp_active.clone(),
        );
        r.register(
            "tcp_bytes",
            "Bytes forwarded on TCP listeners, by direction",
            m.tcp_bytes.clone(),
        );
        r.register(
            "http_upgrades",
            "HTTP/1.1 upgrades (WebSocket and others) and CONNECT tunnels opened, by listener; \
             their bytes and connections count in the tcp_* metrics",
            m.upgrades.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused with 429 by a route's rate limit, by listener and route index",
            m.rate_limited.clone(),
        );
        r.register(
            "faults",
            "Faults injected by a route's fault policy, by kind (delay, abort)",
            m.faults.clone(),
        );
        r.register(
            "protocol_detections",
            "Connections on auto listeners, by what their first bytes said (server_first: \
             nothing within the detection timeout)",
            m.detections.clone(),
        );
        r.register(
            "authz_denied",
            "Connections or requests refused by a listener's authorization, by reason \
             (no_identity: plaintext or no SPIFFE ID; not_allowed: an identity the policy does not allow)",
            m.authz_denied.clone(),
        );
        r.register(
            "tls_inbound_handshakes",
            "Inbound mTLS handshakes by listener and result (ok, failed)",
            m.tls_accepts.clone(),
        );
        r.register(
            "inbound_peer_connections",
            "Connections accepted on listeners with mTLS on, by listener and client_id (the \
             caller's SPIFFE ID, or unauthenticated for plaintext on a permissive port)",
            m.peer_connections.clone(),
        );
        r.register(
            "inbound_peer_requests",
            "HTTP requests answered on listeners with mTLS on, by listener, client_id and status class",
            m.peer_requests.clone(),
        );
        r.register(
            "tls_gateway_certificate_reloads",
            "Gateway certificate files re-read after a change, by listener and result (ok, failed: the old ones stay)",
            m.gateway_reloads.clone(),
        );
        r.register(
            "identity_certificate_renewals",
            "Workload certificates fetched from the CA (the first one included)",
            m.identity.renewals.clone(),
        );
        r.register(
            "identity_certificate_failures",
            "Failed attempts to fetch a workload certificate (each is retried with backoff)",
            m.identity.failures.clone(),
        );
        r.register(
            "identity_certificate_expiry_timestamp_seconds",
            "When the held workload certificate expires, Unix seconds (0 before the first)",
            m.identity.expiry.clone(),
        );
        r.register(
            "listener_overflow",
            "Connections closed as soon as accepted because the listener had max_connections open",
            m.listener_overflow.clone(),
        );
        r.register(
            "memory_shed",
            "Connections closed at accept and requests answered 503 while resident memory was over 90% of memory_limit",
            m.memory_shed.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident memory of the proxy process, as the memory guard last read it",
            m.resident_memory.clone(),
        );
        r.register(
            "memory_overloaded",
            "1 while the memory guard sheds new connections and requests",
            m.memory_overloaded.clone(),
        );
        r.register(
            "retries",
            "Requests retried, by service and the condition that caused it",
            m.retries.clone(),
        );
        r.register(
            "access_log_records_written",
            "Access log lines written",
            m.access_log.written.clone(),
        );
        r.register(
            "access_log_records_dropped",
            "Access log lines dropped because the writer's queue was full (the request was not slowed)",
            m.access_log.dropped.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Spans accepted by the OTLP receiver",
            m.traces.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Sampled spans not exported: the export queue was full or the export failed (requests were not slowed)",
            m.traces.dropped.clone(),
        );
        r.register(
            "trace_export_failures",
            "OTLP export calls that failed (collector down or refusing)",
            m.traces.export_failures.clone(),
        );
        r.register(
            "xds_nacks",
            "xDS updates this proxy rejected (the running config stayed)",
            m.xds_nacks.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads, by result",
            m.reloads.clone(),
        );
        // Zero series exist from the start, so `rate()` and alerts see the first failure.
        for result in [ReloadResult::Ok, ReloadResult::Failed] {
            let _ = m.reloads.get_or_create(&ReloadLabels { result });
        }
        Arc::new(m)
    }

    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = ListenerLabels {
            listener: name.to_string(),
        };
        let bytes = |direction| TcpBytesLabels {
            listener: name.to_string(),
            direction,
        };
        let shed = |kind| ShedLabels {
            listener: name.to_string(),
            kind,
        };
        ListenerMetrics {
            requests: CLASSES.map(|status_class| {
                self.requests.get_or_create_owned(&ListenerClassLabels {
                    listener: name.to_string(),
                    status_class,
                })
            }),
            duration: self.request_duration.get_or_create_owned(&l),
            no_route: self.no_route.get_or_create_owned(&l),
            tcp_connections: self.tcp_connections.get_or_create_owned(&l),
            tcp_active: self.tcp_active.get_or_create_owned(&l),
            tcp_bytes_upstream: self
                .tcp_bytes
                .get_or_create_owned(&bytes(Direction::Upstream)),
            tcp_bytes_downstream: self
                .tcp_bytes
                .get_or_create_owned(&bytes(Direction::Downstream)),
            upgrades: self.upgrades.get_or_create_owned(&l),
            rate_limited: self.rate_limited.clone(),
            faults: self.faults.clone(),
            name: name.to_string(),
            detections: crate::detect::Outcome::ALL.map(|outcome| {
                self.detections.get_or_create_owned(&DetectLabels {
                    listener: name.to_string(),
                    outcome: outcome.as_str(),
                })
            }),
            overflow: self.listener_overflow.get_or_create_owned(&l),
            shed_connections: self
                .memory_shed
                .get_or_create_owned(&shed(ShedKind::Connection)),
            shed_requests: self
                .memory_shed
                .get_or_create_owned(&shed(ShedKind::Request)),
            authz_denied: crate::authz::Deny::ALL.map(|d| {
                self.authz_denied.get_or_create_owned(&AuthzLabels {
                    listener: name.to_string(),
                    reason: d.as_str(),
                })
            }),
            tls_accepts: ["ok", "failed"].map(|result| {
                self.tls_accepts.get_or_create_owned(&TlsLabels {
                    listener: name.to_string(),
                    result,
                })
            }),
            peer_requests: self.peer_requests.clone(),
            peer_connections: self.peer_connections.clone(),
        }
    }

    /// The metrics of service `name`, around its counters (carried across reloads).
    pub fn service(&self, name: &str, counters: Arc<ServiceCounters>) -> ServiceMetrics {
        let l = ServiceLabels {
            service: name.to_string(),
        };
        ServiceMetrics {
            latency: self.upstream_latency.get_or_create_owned(&l),
            counters,
            retries: self.retries.clone(),
            name: name.to_string(),
        }
    }

    pub fn count_xds_nack(&self) {
        self.xds_nacks.inc();
    }

    pub fn count_reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}
