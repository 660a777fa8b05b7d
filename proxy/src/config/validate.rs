//! Meaning checks on a parsed file: names resolve, addresses parse, weights are sane.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::load::ConfigError;
use super::model::*;
use super::*;

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let admin = raw
            .admin
            .as_ref()
            .map(|a| parse_addr("admin.address", &a.address))
            .transpose()?;
        let drain_timeout = opt_duration(
            "drain_timeout",
            raw.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        )?;
        let memory_limit = raw
            .memory_limit
            .as_ref()
            .map(|size| validate_memory_limit("memory_limit", size))
            .transpose()?;

        let mut service_names = HashSet::new();
        let mut services = Vec::with_capacity(raw.services.len());
        for (i, s) in raw.services.iter().enumerate() {
            let at = format!("services[{i}]");
            let service = validate_service(&at, s)?;
            if !service_names.insert(service.name.clone()) {
                return Err(ConfigError::field(
                    format!("{at}.name"),
                    format!("duplicate service name {:?}", service.name),
                ));
            }
            services.push(service);
        }
        let protocol_of = |name: &str| {
            services
                .iter()
                .find(|s| &*s.name == name)
                .map(|s| s.protocol)
        };

        let mut listener_names = HashSet::new();
        let mut addresses = HashSet::new();
        if let Some(admin) = admin {
            addresses.insert(admin);
        }
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        for (i, l) in raw.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            let name = validate_name(&format!("{at}.name"), &l.name)?;
            if !listener_names.insert(name.clone()) {
                return Err(ConfigError::field(
                    format!("{at}.name"),
                    format!("duplicate listener name {name:?}"),
                ));
            }
            let address = parse_addr(&format!("{at}.address"), &l.address)?;
            if address.port() != 0 && !addresses.insert(address) {
                return Err(ConfigError::field(
                    format!("{at}.address"),
                    format!(
                        "address {address} is already used by another listener or the admin server"
                    ),
                ));
            }
            let header_timeout = opt_duration(
                &format!("{at}.request_header_timeout"),
                l.request_header_timeout.as_deref(),
                DEFAULT_HEADER_TIMEOUT,
            )?;
            let max_connections =
                validate_max_connections(&format!("{at}.max_connections"), l.max_connections)?;
            let kind = match l.protocol {
                RawListenerProtocol::Http => {
                    if l.service.is_some() {
                        return Err(ConfigError::field(
                            format!("{at}.service"),
                            "an http listener routes with `routes`; `service` is for tcp and auto listeners",
                        ));
                    }
                    no_detect_timeout(&at, l)?;
                    ListenerKind::Http {
                        routes: listener_routes(&at, l, &protocol_of)?,
                    }
                }
                RawListenerProtocol::Tcp => {
                    if !l.routes.is_empty() {
                        return Err(ConfigError::field(
                            format!("{at}.routes"),
                            "a tcp listener has no routes; name its `service`",
                        ));
                    }
                    no_detect_timeout(&at, l)?;
                    ListenerKind::Tcp {
                        service: listener_tcp_service(&at, l, &protocol_of)?,
                    }
                }
                RawListenerProtocol::Auto => {
                    let detect_timeout = opt_duration(
                        &format!("{at}.detect_timeout"),
                        l.detect_timeout.as_deref(),
                        crate::detect::DEFAULT_DETECT_TIMEOUT,
                    )?;
                    if detect_timeout.is_zero() || detect_timeout > Duration::from_secs(10) {
                        return Err(ConfigError::field(
                            format!("{at}.detect_timeout"),
                            "must be more than 0 and at most 10s (server-first protocols wait for it)",
                        ));
                    }
                    ListenerKind::Auto {
                        routes: listener_routes(&at, l, &protocol_of)?,
                        service: listener_tcp_service(&at, l, &protocol_of)?,
                        detect_timeout,
                    }
                }
            };
            listeners.push(Listener {
                name,
                address,
                header_timeout,
                max_connections,
                outbound: l.direction == Some(RawDirection::Outbound),
                kind,
                mtls: security::listener_mtls(&at, l.mtls.as_ref())?,
                bind: l.bind.unwrap_or(true),
                original_destination: l.original_destination.unwrap_or(false),
                tls: gateway_tls(&at, l)?,
            });
        }
        interception(&listeners)?;

        let mut opaque_ports = match &raw.opaque_ports {
            Some(ports) => {
                if let Some(i) = ports.iter().position(|p| *p == 0) {
                    return Err(ConfigError::field(
                        format!("opaque_ports[{i}]"),
                        "port 0 is not a destination",
                    ));
                }
                ports.clone()
            }
            None => crate::detect::DEFAULT_OPAQUE_PORTS.to_vec(),
        };
        opaque_ports.sort_unstable();
        opaque_ports.dedup();

        let access_log = raw
            .telemetry
            .as_ref()
            .and_then(|t| t.access_log.as_ref())
            .map(validate_access_log)
            .transpose()?;
        let tracing = raw
            .telemetry
            .as_ref()
            .and_then(|t| t.tracing.as_ref())
            .map(validate_tracing)
            .transpose()?;

        Ok(Config {
            admin,
            drain_timeout,
            opaque_ports,
            access_log,
            tracing,
            memory_limit,
            listeners,
            services,
            raw: Arc::new(raw),
        })
    }
}

fn validate_tracing(
    raw: &crate::config::model::RawTracing,
) -> Result<crate::telemetry::traces::TracingConfig, ConfigError> {
    let at = "telemetry.tracing";
    let uri: http::Uri = raw.otlp_endpoint.parse().map_err(|e| {
        ConfigError::field(format!("{at}.otlp_endpoint"), format!("not a URI: {e}"))
    })?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.authority().is_none() {
        return Err(ConfigError::field(
            format!("{at}.otlp_endpoint"),
            "must be http://host:port or https://host:port (OTLP over gRPC)",
        ));
    }
    let sample_ratio = raw.sample_ratio.unwrap_or(0.01);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(ConfigError::field(
            format!("{at}.sample_ratio"),
            format!("{sample_ratio} is not between 0 and 1"),
        ));
    }
    let service_name = raw
        .service_name
        .clone()
        .unwrap_or_else(|| "tern-proxy".into());
    if service_name.is_empty() {
        return Err(ConfigError::field(format!("{at}.service_name"), "empty"));
    }
    Ok(crate::telemetry::traces::TracingConfig {
        otlp_endpoint: raw.otlp_endpoint.clone(),
        sample_ratio,
        service_name,
    })
}

fn validate_access_log(
    raw: &crate::config::model::RawAccessLog,
) -> Result<crate::telemetry::access_log::AccessLogConfig, ConfigError> {
    use crate::telemetry::access_log::{
        AccessLogConfig, DEFAULT_TEMPLATE, LogFormat, LogPath, Template,
    };
    let at = "telemetry.access_log";
    let path = match raw.path.as_str() {
        "" => {
            return Err(ConfigError::field(
                format!("{at}.path"),
                "empty; `stdout` or a file",
            ));
        }
        "stdout" => LogPath::Stdout,
        p => LogPath::File(p.into()),
    };
    let format = match (raw.format.as_deref().unwrap_or("json"), &raw.template) {
        ("json", None) => LogFormat::Json,
        ("json", Some(_)) => {
            return Err(ConfigError::field(
                format!("{at}.template"),
                "a template is for `format: text`",
            ));
        }
        ("text", t) => LogFormat::Text(
            Template::parse(t.as_deref().unwrap_or(DEFAULT_TEMPLATE))
                .map_err(|e| ConfigError::field(format!("{at}.template"), e))?,
        ),
        (other, _) => {
            return Err(ConfigError::field(
                format!("{at}.format"),
                format!("unknown format {other:?}; json or text"),
            ));
        }
    };
    Ok(AccessLogConfig { path, format })
}

fn no_detect_timeout(at: &str, l: &RawListener) -> Result<(), ConfigError> {
    if l.detect_timeout.is_some() {
        return Err(ConfigError::field(
            format!("{at}.detect_timeout"),
            "only auto listeners detect protocols",
        ));
    }
    Ok(())
}

fn listener_routes(
    at: &str,
    l: &RawListener,
    protocol_of: &impl Fn(&str) -> Option<UpstreamProtocol>,
) -> Result<Vec<Route>, ConfigError> {
    l.routes
        .iter()
        .enumerate()
        .map(|(j, r)| validate_route(&format!("{at}.routes[{j}]"), r, protocol_of))
        .collect()
}

/// The opaque-TCP service of a tcp or auto listener: present, known, and speaking tcp.
fn listener_tcp_service(
    at: &str,
    l: &RawListener,
    protocol_of: &impl Fn(&str) -> Option<UpstreamProtocol>,
) -> Result<Arc<str>, ConfigError> {
    let service = l.service.as_deref().ok_or_else(|| {
        ConfigError::field(
            format!("{at}.service"),
            "missing: tcp and auto listeners need a service for opaque TCP",
        )
    })?;
    match protocol_of(service) {
        None => Err(ConfigError::field(
            format!("{at}.service"),
            format!("unknown service {service:?}"),
        )),
        Some(UpstreamProtocol::Tcp) => Ok(Arc::from(service)),
        Some(_) => Err(ConfigError::field(
            format!("{at}.service"),
            format!(
                "service {service:?} speaks HTTP; opaque TCP needs a service with protocol tcp"
            ),
        )),
    }
}

fn validate_service(at: &str, s: &RawService) -> Result<Service, ConfigError> {
    let name = validate_name(&format!("{at}.name"), &s.name)?;
    let protocol = match s.protocol {
        RawServiceProtocol::Http1 => UpstreamProtocol::Http1,
        RawServiceProtocol::Http2 => UpstreamProtocol::Http2,
        RawServiceProtocol::Tcp => UpstreamProtocol::Tcp,
    };
    let load_balancer = match s.load_balancer {
        RawLoadBalancer::RoundRobin => LoadBalancerKind::RoundRobin,
        RawLoadBalancer::LeastRequest => LoadBalancerKind::LeastRequest,
        RawLoadBalancer::PeakEwma => LoadBalancerKind::PeakEwma,
    };
    let connect_timeout = opt_duration(
        &format!("{at}.connect_timeout"),
        s.connect_timeout.as_deref(),
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let idle_timeout = opt_duration(
        &format!("{at}.idle_timeout"),
        s.idle_timeout.as_deref(),
        DEFAULT_UPSTREAM_IDLE_TIMEOUT,
    )?;
    let mut seen = HashSet::new();
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for (i, e) in s.endpoints.iter().enumerate() {
        let address = parse_addr(&format!("{at}.endpoints[{i}].address"), &e.address)?;
        if !seen.insert(address) {
            return Err(ConfigError::field(
                format!("{at}.endpoints[{i}].address"),
                format!("duplicate endpoint {address}"),
            ));
        }
        let weight = validate_weight(&format!("{at}.endpoints[{i}].weight"), e.weight)?;
        endpoints.push(EndpointConfig { address, weight });
    }
    Ok(Service {
        name,
        protocol,
        load_balancer,
        connect_timeout,
        idle_timeout,
        endpoints,
        circuit_breaker: policy::breaker(at, s.circuit_breaker.as_ref())?,
        outlier_detection: policy::outlier(at, s.outlier_detection.as_ref())?,
        health_check: policy::health_check(at, s.health_check.as_ref())?,
        identity: security::service_identity(at, s.identity.as_deref())?,
        original_destination: original_destination(at, s)?,
    })
}

fn gateway_tls(at: &str, l: &RawListener) -> Result<Option<GatewayTlsConfig>, ConfigError> {
    let Some(tls) = &l.tls else {
        return Ok(None);
    };
    let at = format!("{at}.tls");
    if l.protocol == RawListenerProtocol::Auto {
        return Err(ConfigError::field(
            at,
            "a TLS-terminating listener is http or tcp (what TLS carries is not sniffed)",
        ));
    }
    if l.mtls
        .as_ref()
        .and_then(|m| m.mode)
        .is_some_and(|m| m != RawMtlsMode::Disabled)
    {
        return Err(ConfigError::field(
            at,
            "a listener terminates either gateway TLS or mesh mTLS, not both",
        ));
    }
    if tls.certificates.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.certificates"),
            "at least one certificate is needed",
        ));
    }
    let mut certificates = Vec::with_capacity(tls.certificates.len());
    for (i, c) in tls.certificates.iter().enumerate() {
        for (field, value) in [("cert", &c.cert), ("key", &c.key)] {
            if value.trim().is_empty() {
                return Err(ConfigError::field(
                    format!("{at}.certificates[{i}].{field}"),
                    "a file path is needed",
                ));
            }
        }
        let mut server_names = Vec::with_capacity(c.server_names.len());
        for (j, name) in c.server_names.iter().enumerate() {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            let valid = !bare.is_empty()
                && bare.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                });
            if !valid {
                return Err(ConfigError::field(
                    format!("{at}.certificates[{i}].server_names[{j}]"),
                    format!("{name:?} is not a DNS name (or `*.` and one)"),
                ));
            }
            server_names.push(name.to_ascii_lowercase());
        }
        certificates.push(GatewayCert {
            cert: c.cert.clone().into(),
            key: c.key.clone().into(),
            server_names,
        });
    }
    Ok(Some(GatewayTlsConfig { certificates }))
}

fn original_destination(
    at: &str,
    s: &RawService,
) -> Result<Option<OriginalDestination>, ConfigError> {
    let Some(od) = &s.original_destination else {
        return Ok(None);
    };
    let at = format!("{at}.original_destination");
    if s.protocol != RawServiceProtocol::Tcp {
        return Err(ConfigError::field(
            at,
            "only tcp services pass connections through to their original destination",
        ));
    }
    if !s.endpoints.is_empty() || s.health_check.is_some() || s.identity.is_some() {
        return Err(ConfigError::field(
            at,
            "a pass-through service has no endpoints, health_check or identity",
        ));
    }
    let host = od
        .host
        .as_deref()
        .map(|h| {
            h.parse::<std::net::IpAddr>().map_err(|_| {
                ConfigError::field(format!("{at}.host"), format!("{h:?} is not an IP address"))
            })
        })
        .transpose()?;
    Ok(Some(OriginalDestination { host }))
}

/// Unbound listeners are reached only through an `original_destination` listener, each
/// address by one listener. (Pass-through services are tcp services, which routes refuse.)
fn interception(listeners: &[Listener]) -> Result<(), ConfigError> {
    let mut claimed = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        if !l.bind {
            if l.original_destination {
                return Err(ConfigError::field(
                    format!("{at}.original_destination"),
                    "an unbound listener cannot itself read original destinations",
                ));
            }
            if l.address.port() == 0 {
                return Err(ConfigError::field(
                    format!("{at}.address"),
                    "an unbound listener matches an original destination: give its port",
                ));
            }
            if !claimed.insert(l.address) {
                return Err(ConfigError::field(
                    format!("{at}.address"),
                    format!("another unbound listener already takes {}", l.address),
                ));
            }
        }
    }
    if claimed.is_empty() || listeners.iter().any(|l| l.original_destination) {
        return Ok(());
    }
    Err(ConfigError::field(
        "listeners",
        "unbound listeners need a listener with `original_destination: true` to reach them",
    ))
}

fn validate_route(
    at: &str,
    r: &RawRoute,
    protocol_of: &dyn Fn(&str) -> Option<UpstreamProtocol>,
) -> Result<Route, ConfigError> {
    let matcher = match &r.matcher {
        None => RouteMatch::default(),
        Some(m) => validate_match(&format!("{at}.match"), m)?,
    };
    if r.backends.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.backends"),
            "a route needs at least one backend",
        ));
    }
    let mut backends = Vec::with_capacity(r.backends.len());
    for (k, b) in r.backends.iter().enumerate() {
        let field = format!("{at}.backends[{k}].service");
        match protocol_of(&b.service) {
            None => {
                return Err(ConfigError::field(
                    field,
                    format!("unknown service {:?}", b.service),
                ));
            }
            Some(UpstreamProtocol::Tcp) => {
                return Err(ConfigError::field(
                    field,
                    format!(
                        "service {:?} has protocol tcp; an http route needs an http1 or http2 service",
                        b.service
                    ),
                ));
            }
            Some(_) => {}
        }
        let weight = validate_weight(&format!("{at}.backends[{k}].weight"), b.weight)?;
        backends.push(Backend {
            service: Arc::from(b.service.as_str()),
            weight,
        });
    }
    Ok(Route {
        matcher,
        backends,
        timeout: policy::route_timeout(at, r)?,
        retry: policy::retry(&format!("{at}.retry"), r.retry.as_ref())?,
        rate_limit: r
            .rate_limit
            .as_ref()
            .map(|l| validate_rate_limit(&format!("{at}.rate_limit"), l))
            .transpose()?,
        fault: r
            .fault
            .as_ref()
            .map(|f| validate_fault(&format!("{at}.fault"), f))
            .transpose()?,
    })
}

fn validate_rate_limit(
    at: &str,
    l: &RawRateLimit,
) -> Result<crate::traffic::rate_limit::RateLimitConfig, ConfigError> {
    use crate::traffic::rate_limit::{RateKey, RateLimitConfig};
    if !(l.requests_per_second > 0.0 && l.requests_per_second.is_finite()) {
        return Err(ConfigError::field(
            format!("{at}.requests_per_second"),
            "must be a positive number",
        ));
    }
    let burst = match l.burst {
        Some(0) => {
            return Err(ConfigError::field(
                format!("{at}.burst"),
                "must be at least 1",
            ));
        }
        Some(b) => b,
        None => l.requests_per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    let key = match l.key.as_deref().unwrap_or("client_ip") {
        "client_ip" => RateKey::ClientIp,
        "peer_identity" => RateKey::PeerIdentity,
        "none" => RateKey::None,
        other => match other.strip_prefix("header:") {
            Some(name) => {
                RateKey::Header(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    ConfigError::field(format!("{at}.key"), format!("invalid header name {name:?}"))
                })?)
            }
            None => {
                return Err(ConfigError::field(
                    format!("{at}.key"),
                    format!("unknown key {other:?}; client_ip, header:NAME, peer_identity or none"),
                ));
            }
        },
    };
    Ok(RateLimitConfig {
        requests_per_second: l.requests_per_second,
        burst,
        key,
    })
}

fn validate_fault(
    at: &str,
    f: &RawFault,
) -> Result<crate::traffic::fault::FaultConfig, ConfigError> {
    let percent = |field: String, p: f64| {
        if (0.0..=100.0).contains(&p) {
            Ok(p)
        } else {
            Err(ConfigError::field(
                field,
                format!("{p} is not between 0 and 100"),
            ))
        }
    };
    let delay = match &f.delay {
        Some(d) => Some((
            percent(format!("{at}.delay.percent"), d.percent)?,
            crate::config::parse_duration(&d.duration)
                .map_err(|e| ConfigError::field(format!("{at}.delay.duration"), e))?,
        )),
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            if !(200..=599).contains(&a.status) {
                return Err(ConfigError::field(
                    format!("{at}.abort.status"),
                    format!("{} is not an HTTP status between 200 and 599", a.status),
                ));
            }
            Some((percent(format!("{at}.abort.percent"), a.percent)?, a.status))
        }
        None => None,
    };
    if delay.is_none() && abort.is_none() {
        return Err(ConfigError::field(
            at.to_string(),
            "needs a delay, an abort or both",
        ));
    }
    let header = f
        .header
        .as_deref()
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                ConfigError::field(format!("{at}.header"), format!("invalid header name {h:?}"))
            })
        })
        .transpose()?;
    Ok(crate::traffic::fault::FaultConfig {
        delay,
        abort,
        header,
    })
}

fn validate_match(at: &str, m: &RawMatch) -> Result<RouteMatch, ConfigError> {
    let host = match &m.host {
        None => None,
        Some(h) => {
            let host = h.trim().to_ascii_lowercase();
            let bare = host.strip_prefix("*.").unwrap_or(&host);
            if bare.is_empty() || bare.contains(['/', ' ', ':', '*']) {
                return Err(ConfigError::field(
                    format!("{at}.host"),
                    format!(
                        "invalid host {h:?} (expected a name like api.local or *.example.com, without port)"
                    ),
                ));
            }
            Some(host)
        }
    };
    let path = match (&m.path_prefix, &m.path) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(
                format!("{at}.path"),
                "give either path or path_prefix, not both",
            ));
        }
        (Some(p), None) => Some(PathMatch::Prefix(validate_path(
            &format!("{at}.path_prefix"),
            p,
        )?)),
        (None, Some(p)) => Some(PathMatch::Exact(validate_path(&format!("{at}.path"), p)?)),
        (None, None) => None,
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (name, value) in &m.headers {
        let field = format!("{at}.headers.{name}");
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::field(&field, "invalid header name"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| ConfigError::field(&field, "invalid header value"))?;
        headers.push((name, value));
    }
    Ok(RouteMatch {
        host,
        path,
        headers,
    })
}

fn validate_path(at: &str, p: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::field(
            at,
            format!("path {p:?} must start with '/'"),
        ));
    }
    Ok(p.to_string())
}

fn validate_name(at: &str, name: &str) -> Result<Arc<str>, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !ok {
        return Err(ConfigError::field(
            at,
            format!("invalid name {name:?} (use 1-253 letters, digits, '-', '_', '.', ':')"),
        ));
    }
    Ok(Arc::from(name))
}

fn validate_weight(at: &str, weight: Option<u32>) -> Result<u32, ConfigError> {
    match weight {
        None => Ok(1),
        Some(0) => Err(ConfigError::field(
            at,
            "weight must be at least 1 (remove the entry to send it nothing)",
        )),
        Some(w) if w > 10_000 => Err(ConfigError::field(
            at,
            format!("weight {w} is above the maximum of 10000"),
        )),
        Some(w) => Ok(w),
    }
}

fn validate_max_connections(at: &str, max: Option<u32>) -> Result<u32, ConfigError> {
    match max {
        None => Ok(DEFAULT_MAX_CONNECTIONS),
        Some(0) => Err(ConfigError::field(
            at,
            "max_connections must be at least 1 (remove the listener to accept nothing)",
        )),
        Some(n) if n > MAX_MAX_CONNECTIONS => Err(ConfigError::field(
            at,
            format!("max_connections {n} is above the maximum of {MAX_MAX_CONNECTIONS}"),
        )),
        Some(n) => Ok(n),
    }
}

fn validate_memory_limit(at: &str, size: &RawSize) -> Result<u64, ConfigError> {
    let parsed = match size {
        RawSize::Bytes(n) => parse_memory_limit(&n.to_string()),
        RawSize::Text(text) => parse_memory_limit(text),
    };
    parsed.map_err(|reason| ConfigError::field(at, reason))
}

fn parse_addr(at: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse::<SocketAddr>().map_err(|_| {
        ConfigError::field(
            at,
            format!("invalid address {text:?} (expected IP:PORT, e.g. 127.0.0.1:8080)"),
        )
    })
}

pub(super) fn opt_duration(
    at: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(t) => parse_duration(t).map_err(|reason| ConfigError::field(at, reason)),
    }
}

mod policy;
mod security;

#[cfg(test)]
mod tests;
