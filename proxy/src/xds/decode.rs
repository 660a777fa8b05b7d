//! Envoy resources turned into Tern's own model, once, at the edge. Past this module nothing
//! sees a protobuf type. Each `TryFrom` names the resource, the field and the reason when it
//! refuses something; that text becomes the NACK's `error_detail`.
//!
//! The subset: Listeners with one filter chain ending in an HTTP connection manager (routes by
//! RDS or inline; local rate limit and fault filters before the router; an OpenTelemetry
//! tracer) or a TCP proxy; RouteConfigurations with prefix / exact path, exact header and
//! domain matches, single or weighted clusters and per-route rate limit and fault configs
//! (`traffic.rs`, `tracer.rs`), retries and timeouts (`policy.rs`); EDS or STATIC clusters
//! with round-robin or least-request balancing, HTTP/1 or HTTP/2 upstreams; endpoint
//! addresses with weights. Fields that change what traffic does and that Tern cannot honour
//! are refused; fields that only tune (stats prefixes, limits Tern sets itself) are ignored.
//! API listeners (for proxyless gRPC clients) are not for a proxy and are skipped.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, ConfigSource, HealthStatus, Metadata, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RouteConfiguration, VirtualHost, header_matcher, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::{self as pbuf, Any};
use prost::{Message, Name};

use super::policy::{self, duration_text};
use super::traffic::{self, PolicyFilters};
use crate::config::{
    RawBackend, RawCircuitBreaker, RawEndpoint, RawHealthCheck, RawLoadBalancer, RawMatch,
    RawOutlierDetection, RawRoute, RawServiceProtocol,
};
use crate::config::{RawMtls, RawTracing};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Weights above this are refused rather than silently scaled.
const MAX_WEIGHT: u32 = 10_000;

/// Why a resource was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {reason}")]
pub struct InvalidResource {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub reason: String,
}

/// The opaque side of a listener with protocol detection.
#[derive(Debug, Clone, PartialEq)]
pub struct OpaqueFallback {
    pub cluster: String,
    pub detect_timeout: String,
}

/// A Listener, as Tern will run it.
#[derive(Debug, Clone, PartialEq)]
pub enum XdsListener {
    /// For proxyless gRPC clients; a proxy has nothing to bind.
    Api { name: String },
    Http {
        name: String,
        address: String,
        routes: RouteSource,
        request_header_timeout: Option<String>,
        /// Protocol detection: what is not HTTP goes to this cluster (`protocol: auto`).
        opaque: Option<OpaqueFallback>,
        /// Mesh mTLS and authorization (Tern metadata).
        mtls: Option<RawMtls>,
        /// The policy filters its connection manager runs.
        filters: PolicyFilters,
        /// Its connection manager's tracing provider.
        tracing: Option<RawTracing>,
    },
    Tcp {
        name: String,
        address: String,
        cluster: String,
        mtls: Option<RawMtls>,
    },
}

impl XdsListener {
    pub fn name(&self) -> &str {
        match self {
            XdsListener::Api { name }
            | XdsListener::Http { name, .. }
            | XdsListener::Tcp { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteSource {
    /// Routes come from the RouteConfiguration of this name.
    Rds(String),
    Inline(Vec<RawRoute>),
}

/// A RouteConfiguration: routes in the order they are tried.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsRoutes {
    pub name: String,
    pub routes: Vec<RawRoute>,
}

/// A Cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsCluster {
    pub name: String,
    /// The protocol the cluster states (Tern metadata, or HTTP/2 protocol options); `None`
    /// means HTTP/1.1, or plain TCP when a TCP proxy uses the cluster.
    pub protocol: Option<RawServiceProtocol>,
    pub load_balancer: RawLoadBalancer,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub endpoints: EndpointSource,
    pub circuit_breaker: Option<RawCircuitBreaker>,
    pub outlier_detection: Option<RawOutlierDetection>,
    pub health_check: Option<RawHealthCheck>,
    /// The SPIFFE ID its endpoints present (from the cluster's TLS transport socket).
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EndpointSource {
    /// Endpoints come from the ClusterLoadAssignment of this name.
    Eds(String),
    Static(Vec<RawEndpoint>),
}

/// A ClusterLoadAssignment.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsEndpoints {
    pub name: String,
    pub endpoints: Vec<RawEndpoint>,
}

/// Collects the resource's identity so errors can say where they are.
struct At {
    kind: &'static str,
    name: String,
}

impl At {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> InvalidResource {
        InvalidResource {
            kind: self.kind,
            name: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn unpack<T: Message + Name + Default>(
    any: &Any,
    at: &At,
    field: &str,
) -> Result<T, InvalidResource> {
    if any.type_url != T::type_url() {
        return Err(at.err(
            field,
            format!("expected {} but got {}", T::type_url(), any.type_url),
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| at.err(field, format!("cannot decode: {e}")))
}

/// Decodes a resource of any of the four types from its `Any`, checking the type URL.
pub fn decode_any<T: Message + Name + Default>(
    any: &Any,
    kind: &'static str,
) -> Result<T, InvalidResource> {
    let at = At {
        kind,
        name: String::new(),
    };
    unpack(any, &at, "resource")
}

impl TryFrom<&Listener> for XdsListener {
    type Error = InvalidResource;

    fn try_from(l: &Listener) -> Result<Self, Self::Error> {
        let at = At {
            kind: "Listener",
            name: l.name.clone(),
        };
        if l.name.is_empty() {
            return Err(at.err("name", "missing"));
        }
        if l.api_listener.is_some() {
            return Ok(XdsListener::Api {
                name: l.name.clone(),
            });
        }
        let address = socket_addr(l.address.as_ref(), &at, "address")?;
        let mtls = super::identity::mtls_of(l.metadata.as_ref())
            .map_err(|reason| at.err("metadata.filter_metadata.tern.mtls", reason))?;
        let chain = match l.filter_chains.as_slice() {
            [one] => one,
            [] => return Err(at.err("filter_chains", "a listener needs one filter chain")),
            _ => {
                return Err(at.err(
                    "filter_chains",
                    format!(
                        "{} filter chains; Tern supports one per listener (plus a default chain \
                         with protocol detection)",
                        l.filter_chains.len()
                    ),
                ));
            }
        };
        if let Some(default) = &l.default_filter_chain {
            return auto_listener(l, chain, default, address, &at).map(|mut listener| {
                if let XdsListener::Http { mtls: m, .. } = &mut listener {
                    *m = mtls;
                }
                listener
            });
        }
        if chain
            .filter_chain_match
            .as_ref()
            .is_some_and(|m| *m != Default::default())
        {
            return Err(at.err(
                "filter_chains[0].filter_chain_match",
                "filter chain matching is not supported; the one chain must take every connection",
            ));
        }
        match terminal(chain, &at, "filter_chains[0]")? {
            Terminal::Http(hcm) => Ok(XdsListener::Http {
                name: l.name.clone(),
                address,
                routes: hcm.routes,
                request_header_timeout: hcm.request_header_timeout,
                opaque: None,
                mtls,
                filters: hcm.filters,
                tracing: hcm.tracing,
            }),
            Terminal::Tcp { cluster } => Ok(XdsListener::Tcp {
                name: l.name.clone(),
                address,
                cluster,
                mtls,
            }),
        }
    }
}

/// What a filter chain ends in.
enum Terminal {
    Http(Hcm),
    Tcp { cluster: String },
}

/// An HTTP connection manager, decoded.
struct Hcm {
    routes: RouteSource,
    request_header_timeout: Option<String>,
    filters: PolicyFilters,
    tracing: Option<RawTracing>,
}

fn terminal(chain: &FilterChain, at: &At, field: &str) -> Result<Terminal, InvalidResource> {
    if chain.transport_socket.is_some() {
        return Err(at.err(
            format!("{field}.transport_socket"),
            "TLS termination from xDS is not supported",
        ));
    }
    let Some(terminal) = chain.filters.last() else {
        return Err(at.err(format!("{field}.filters"), "empty"));
    };
    if chain.filters.len() > 1 {
        return Err(at.err(
            format!("{field}.filters"),
            format!(
                "only a single terminal filter ({HCM} or {TCP_PROXY}) is supported, got {}",
                chain.filters.len()
            ),
        ));
    }
    let field = format!("{field}.filters[0]");
    let Some(filter::ConfigType::TypedConfig(config)) = &terminal.config_type else {
        return Err(at.err(format!("{field}.typed_config"), "missing"));
    };
    if config.type_url == HttpConnectionManager::type_url() {
        let hcm: HttpConnectionManager = unpack(config, at, &field)?;
        Ok(Terminal::Http(decode_hcm(&hcm, at, &field)?))
    } else if config.type_url == TcpProxy::type_url() {
        let tcp: TcpProxy = unpack(config, at, &field)?;
        let cluster = match tcp.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => c,
            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(_)) => {
                return Err(at.err(
                    format!("{field}.weighted_clusters"),
                    "weighted TCP clusters are not supported",
                ));
            }
            _ => return Err(at.err(format!("{field}.cluster"), "missing")),
        };
        Ok(Terminal::Tcp { cluster })
    } else {
        Err(at.err(
            format!("{field}.typed_config"),
            format!("unsupported filter {}", config.type_url),
        ))
    }
}

/// Protocol detection as Envoy spells it: the `http_inspector` listener filter, one filter
/// chain matching the HTTP application protocols and ending in an HTTP connection manager,
/// and a default chain ending in a TCP proxy. `listener_filters_timeout` with
/// `continue_on_listener_filters_timeout` is the server-speaks-first wait.
fn auto_listener(
    l: &Listener,
    chain: &FilterChain,
    default: &FilterChain,
    address: String,
    at: &At,
) -> Result<XdsListener, InvalidResource> {
    let inspects_http = l.listener_filters.iter().any(|f| {
        f.name == HTTP_INSPECTOR
            || matches!(&f.config_type, Some(listener_filter::ConfigType::TypedConfig(c))
                if c.type_url == HttpInspector::type_url())
    });
    if !inspects_http {
        return Err(at.err(
            "default_filter_chain",
            format!(
                "supported only for protocol detection, with the {HTTP_INSPECTOR} listener filter"
            ),
        ));
    }
    if !l.continue_on_listener_filters_timeout {
        return Err(at.err(
            "continue_on_listener_filters_timeout",
            "must be true: Tern forwards a connection whose client sends nothing (a \
             server-speaks-first protocol) as opaque TCP; it never closes it",
        ));
    }
    let protocols = chain
        .filter_chain_match
        .as_ref()
        .map(|m| {
            let only_protocols = FilterChainMatch {
                application_protocols: m.application_protocols.clone(),
                ..Default::default()
            };
            (*m == only_protocols).then_some(&m.application_protocols)
        })
        .unwrap_or(None);
    let http_only = protocols.is_some_and(|p| {
        !p.is_empty()
            && p.iter()
                .all(|p| matches!(p.as_str(), "http/1.1" | "http/1.0" | "h2c"))
    });
    if !http_only {
        return Err(at.err(
            "filter_chains[0].filter_chain_match",
            "with a default chain, the filter chain must match only application_protocols \
             among http/1.1, http/1.0 and h2c",
        ));
    }
    if default
        .filter_chain_match
        .as_ref()
        .is_some_and(|m| *m != Default::default())
    {
        return Err(at.err("default_filter_chain.filter_chain_match", "must be empty"));
    }
    let Terminal::Http(hcm) = terminal(chain, at, "filter_chains[0]")? else {
        return Err(at.err(
            "filter_chains[0].filters[0]",
            format!("the HTTP chain must end in {HCM}"),
        ));
    };
    let Terminal::Tcp { cluster } = terminal(default, at, "default_filter_chain")? else {
        return Err(at.err(
            "default_filter_chain.filters[0]",
            format!("the default chain must end in {TCP_PROXY}"),
        ));
    };
    // Envoy's default when unset.
    let detect_timeout = l
        .listener_filters_timeout
        .as_ref()
        .map(duration_text)
        .unwrap_or_else(|| "15s".to_string());
    Ok(XdsListener::Http {
        name: l.name.clone(),
        address,
        routes: hcm.routes,
        request_header_timeout: hcm.request_header_timeout,
        opaque: Some(OpaqueFallback {
            cluster,
            detect_timeout,
        }),
        // Set by the caller, which read the listener's metadata.
        mtls: None,
        filters: hcm.filters,
        tracing: hcm.tracing,
    })
}

fn decode_hcm(hcm: &HttpConnectionManager, at: &At, field: &str) -> Result<Hcm, InvalidResource> {
    let err = |f, r| at.err(f, r);
    let filters = traffic::http_filters(&hcm.http_filters, field, &err)?;
    let tracing = super::tracer::provider(hcm.tracing.as_ref(), field, &err)?;
    let routes = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return Err(at.err(format!("{field}.rds.route_config_name"), "missing"));
            }
            check_ads(
                rds.config_source.as_ref(),
                at,
                &format!("{field}.rds.config_source"),
            )?;
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline(routes_of(rc, at, &format!("{field}.route_config"))?)
        }
        Some(http_connection_manager::RouteSpecifier::ScopedRoutes(_)) => {
            return Err(at.err(format!("{field}.scoped_routes"), "not supported"));
        }
        None => return Err(at.err(format!("{field}.route_specifier"), "missing")),
    };
    let request_header_timeout = hcm
        .request_headers_timeout
        .as_ref()
        .filter(|d| d.seconds > 0 || d.nanos > 0)
        .map(duration_text);
    Ok(Hcm {
        routes,
        request_header_timeout,
        filters,
        tracing,
    })
}

impl TryFrom<&RouteConfiguration> for XdsRoutes {
    type Error = InvalidResource;

    fn try_from(rc: &RouteConfiguration) -> Result<Self, Self::Error> {
        let at = At {
            kind: "RouteConfiguration",
            name: rc.name.clone(),
        };
        if rc.name.is_empty() {
            return Err(at.err("name", "missing"));
        }
        Ok(XdsRoutes {
            name: rc.name.clone(),
            routes: routes_of(rc, &at, "")?,
        })
    }
}

/// Envoy picks a virtual host by its most specific domain, then the first matching route in
/// it. Tern tries routes in order, so virtual hosts are laid out most specific first: exact
/// domains, then `*.suffix` wildcards, then `*`.
fn routes_of(
    rc: &RouteConfiguration,
    at: &At,
    field: &str,
) -> Result<Vec<RawRoute>, InvalidResource> {
    let prefix = if field.is_empty() {
        String::new()
    } else {
        format!("{field}.")
    };
    let mut entries: Vec<(u8, usize, String)> = Vec::new();
    for (v, vhost) in rc.virtual_hosts.iter().enumerate() {
        for (d, domain) in vhost.domains.iter().enumerate() {
            let domain = domain.to_ascii_lowercase();
            let rank = if domain == "*" {
                2
            } else if domain.starts_with("*.") {
                1
            } else if domain.contains('*') {
                return Err(at.err(
                    format!("{prefix}virtual_hosts[{v}].domains[{d}]"),
                    format!("domain {domain:?}: only exact, \"*.suffix\" and \"*\" are supported"),
                ));
            } else {
                0
            };
            entries.push((rank, v, domain));
        }
    }
    // Envoy: exact domains first, then suffix wildcards longest first, then `*`; ties keep
    // the order of the virtual hosts.
    entries.sort_by_key(|(rank, v, domain)| {
        let specificity = if *rank == 1 {
            usize::MAX - domain.len()
        } else {
            0
        };
        (*rank, specificity, *v)
    });
    // Envoy picks one virtual host, then a route in it, and answers 404 when none of its
    // routes matches. Flattened in order, a request that matches no route of its virtual
    // host would go on to a less specific one; refuse that rather than route differently.
    for (i, (_, v, domain)) in entries.iter().enumerate() {
        let vhost = &rc.virtual_hosts[*v];
        if vhost_has_catch_all(vhost) {
            continue;
        }
        let covers = |other: &str| {
            other == "*"
                || other
                    .strip_prefix('*')
                    .is_some_and(|suffix| domain.ends_with(suffix) && domain != other)
        };
        if let Some((_, w, other)) = entries[i + 1..]
            .iter()
            .find(|(_, w, other)| w != v && covers(other))
        {
            return Err(at.err(
                format!("{prefix}virtual_hosts[{v}]"),
                format!(
                    "virtual host {:?} ({domain}) has no route for every path, so Envoy answers 404 where Tern would use virtual host {:?} ({other}); add a final catch-all route to it",
                    vhost.name, rc.virtual_hosts[*w].name
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for (_, v, domain) in entries {
        let vhost = &rc.virtual_hosts[v];
        let host = if domain == "*" {
            None
        } else {
            // A domain may carry a port; Tern matches hosts without it.
            Some(strip_port(&domain).to_string())
        };
        for route in vhost_routes(vhost, at, &format!("{prefix}virtual_hosts[{v}]"))? {
            let mut route = route;
            let matcher = route.matcher.get_or_insert_with(RawMatch::default);
            if matcher.host.is_none() {
                matcher.host.clone_from(&host);
            }
            out.push(route);
        }
    }
    Ok(out)
}

/// A route that takes every request of its virtual host: a `/` (or empty) prefix and no
/// other condition.
fn vhost_has_catch_all(vhost: &VirtualHost) -> bool {
    vhost.routes.iter().any(|r| {
        r.r#match.as_ref().is_some_and(|m| {
            matches!(&m.path_specifier, Some(route_match::PathSpecifier::Prefix(p)) if p.is_empty() || p == "/")
                && m.headers.is_empty()
                && m.query_parameters.is_empty()
        })
    })
}

fn strip_port(domain: &str) -> &str {
    match domain.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => domain,
    }
}

fn vhost_routes(
    vhost: &VirtualHost,
    at: &At,
    vhost_field: &str,
) -> Result<Vec<RawRoute>, InvalidResource> {
    let mut out = Vec::with_capacity(vhost.routes.len());
    let vhost_policy = traffic::vhost_policy(vhost, vhost_field, &|f, r| at.err(f, r))?;
    for (r, route) in vhost.routes.iter().enumerate() {
        let field = format!("{vhost_field}.routes[{r}]");
        let m = route
            .r#match
            .as_ref()
            .ok_or_else(|| at.err(format!("{field}.match"), "missing"))?;
        let mut matcher = RawMatch::default();
        match &m.path_specifier {
            Some(route_match::PathSpecifier::Prefix(p)) if p.is_empty() || p == "/" => {}
            Some(route_match::PathSpecifier::Prefix(p)) => matcher.path_prefix = Some(p.clone()),
            Some(route_match::PathSpecifier::Path(p)) => matcher.path = Some(p.clone()),
            Some(_) => {
                return Err(at.err(
                    format!("{field}.match"),
                    "only prefix and path matches are supported (no regex or templates)",
                ));
            }
            None => return Err(at.err(format!("{field}.match.path_specifier"), "missing")),
        }
        if m.case_sensitive.as_ref().is_some_and(|b| !b.value) {
            return Err(at.err(
                format!("{field}.match.case_sensitive"),
                "case-insensitive paths are not supported",
            ));
        }
        if !m.query_parameters.is_empty() {
            return Err(at.err(format!("{field}.match.query_parameters"), "not supported"));
        }
        if m.runtime_fraction.is_some() {
            return Err(at.err(format!("{field}.match.runtime_fraction"), "not supported"));
        }
        let unsupported = [
            ("grpc", m.grpc.is_some()),
            ("tls_context", m.tls_context.is_some()),
            ("cookies", !m.cookies.is_empty()),
            ("dynamic_metadata", !m.dynamic_metadata.is_empty()),
            ("filter_state", !m.filter_state.is_empty()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(at.err(
                format!("{field}.match.{name}"),
                "this match condition is not supported",
            ));
        }
        for (h, header) in m.headers.iter().enumerate() {
            let (name, value) = header_of(header, at, &format!("{field}.match.headers[{h}]"))?;
            if name == ":authority" || name == "host" {
                matcher.host = Some(value);
            } else {
                matcher.headers.insert(name, value);
            }
        }
        let action = match &route.action {
            Some(route::Action::Route(a)) => a,
            Some(_) => {
                return Err(at.err(
                    format!("{field}.action"),
                    "only route actions are supported (no redirect or direct response)",
                ));
            }
            None => return Err(at.err(format!("{field}.action"), "missing")),
        };
        if !action.prefix_rewrite.is_empty() || action.regex_rewrite.is_some() {
            return Err(at.err(format!("{field}.route"), "path rewrites are not supported"));
        }
        if action.host_rewrite_specifier.is_some() {
            return Err(at.err(format!("{field}.route"), "host rewrites are not supported"));
        }
        let timeout = policy::route_timeout(action.timeout.as_ref());
        let retry = policy::retry(
            action.retry_policy.as_ref(),
            route.metadata.as_ref(),
            &format!("{field}.route"),
            &|f, r| at.err(f, r),
        )?;
        let backends = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) if !c.is_empty() => vec![RawBackend {
                service: c.clone(),
                weight: None,
            }],
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                let mut backends = Vec::new();
                for (i, c) in w.clusters.iter().enumerate() {
                    let weight = c.weight.as_ref().map(|w| w.value).unwrap_or(0);
                    if weight == 0 {
                        continue; // Envoy sends nothing to a zero-weight cluster.
                    }
                    if weight > MAX_WEIGHT {
                        return Err(at.err(
                            format!("{field}.route.weighted_clusters.clusters[{i}].weight"),
                            format!("{weight} is above Tern's maximum of {MAX_WEIGHT}"),
                        ));
                    }
                    backends.push(RawBackend {
                        service: c.name.clone(),
                        weight: Some(weight),
                    });
                }
                if backends.is_empty() {
                    return Err(at.err(
                        format!("{field}.route.weighted_clusters"),
                        "no cluster with a weight",
                    ));
                }
                backends
            }
            _ => {
                return Err(at.err(
                    format!("{field}.route.cluster"),
                    "missing (cluster_header and cluster specifier plugins are not supported)",
                ));
            }
        };
        let (rate_limit, fault) = traffic::route_policy(
            &route.typed_per_filter_config,
            &vhost_policy,
            route.metadata.as_ref(),
            &field,
            &|f, r| at.err(f, r),
        )?;
        out.push(RawRoute {
            matcher: (matcher != RawMatch::default()).then_some(matcher),
            backends,
            timeout,
            retry,
            rate_limit,
            fault,
        });
    }
    Ok(out)
}

// `exact_match` is deprecated in favour of `string_match` but older servers still send it.
#[allow(deprecated)]
fn header_of(h: &HeaderMatcher, at: &At, field: &str) -> Result<(String, String), InvalidResource> {
    if h.invert_match {
        return Err(at.err(field, "inverted header matches are not supported"));
    }
    let name = h.name.to_ascii_lowercase();
    let value = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::ExactMatch(v)) => v.clone(),
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s))
            if s.ignore_case && name != ":authority" && name != "host" =>
        {
            return Err(at.err(
                field,
                "case-insensitive header value matches are not supported",
            ));
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => match &s.match_pattern {
            Some(string_matcher::MatchPattern::Exact(v)) => v.clone(),
            // `*.example.com` is the one suffix form Tern's host matching has.
            Some(string_matcher::MatchPattern::Suffix(v))
                if name == ":authority" && v.starts_with('.') =>
            {
                format!("*{v}")
            }
            _ => {
                return Err(at.err(
                    field,
                    "only exact header matches are supported (and \".suffix\" on :authority)",
                ));
            }
        },
        _ => return Err(at.err(field, "only exact header matches are supported")),
    };
    Ok((name, value))
}

impl TryFrom<&Cluster> for XdsCluster {
    type Error = InvalidResource;

    fn try_from(c: &Cluster) -> Result<Self, Self::Error> {
        let at = At {
            kind: "Cluster",
            name: c.name.clone(),
        };
        if c.name.is_empty() {
            return Err(at.err("name", "missing"));
        }
        if !c.transport_socket_matches.is_empty() {
            return Err(at.err(
                "transport_socket_matches",
                "not supported; one transport_socket names the endpoints' identity",
            ));
        }
        // Mesh mTLS: the endpoints' SPIFFE ID, in Envoy's own terms.
        let identity = c
            .transport_socket
            .as_ref()
            .map(|ts| {
                super::identity::identity_of(ts)
                    .map(|id| id.to_string())
                    .map_err(|reason| at.err("transport_socket", reason))
            })
            .transpose()?;
        let endpoints = match &c.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t))
                if *t == cluster::DiscoveryType::Eds as i32 =>
            {
                let eds = c.eds_cluster_config.as_ref();
                check_ads(
                    eds.and_then(|e| e.eds_config.as_ref()),
                    &at,
                    "eds_cluster_config.eds_config",
                )?;
                let name = eds
                    .map(|e| e.service_name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| c.name.clone());
                EndpointSource::Eds(name)
            }
            Some(cluster::ClusterDiscoveryType::Type(t))
                if *t == cluster::DiscoveryType::Static as i32 =>
            {
                let cla = c
                    .load_assignment
                    .as_ref()
                    .ok_or_else(|| at.err("load_assignment", "a STATIC cluster needs one"))?;
                EndpointSource::Static(endpoints_of(cla, &at, "load_assignment.")?)
            }
            None => {
                // The type defaults to STATIC.
                match &c.load_assignment {
                    Some(cla) => {
                        EndpointSource::Static(endpoints_of(cla, &at, "load_assignment.")?)
                    }
                    None => return Err(at.err("type", "missing (EDS or STATIC)")),
                }
            }
            Some(cluster::ClusterDiscoveryType::Type(t)) => {
                let name = cluster::DiscoveryType::try_from(*t)
                    .map(|d| d.as_str_name().to_string())
                    .unwrap_or_else(|_| t.to_string());
                return Err(at.err(
                    "type",
                    format!("{name} clusters are not supported (use EDS or STATIC)"),
                ));
            }
            Some(cluster::ClusterDiscoveryType::ClusterType(ext)) => {
                return Err(at.err(
                    "cluster_type",
                    format!("custom cluster type {:?} is not supported", ext.name),
                ));
            }
        };
        let mut load_balancer = match cluster::LbPolicy::try_from(c.lb_policy) {
            Ok(cluster::LbPolicy::RoundRobin) => RawLoadBalancer::RoundRobin,
            Ok(cluster::LbPolicy::LeastRequest) => RawLoadBalancer::LeastRequest,
            Ok(other) => {
                return Err(at.err(
                    "lb_policy",
                    format!(
                        "{} is not supported (ROUND_ROBIN or LEAST_REQUEST)",
                        other.as_str_name()
                    ),
                ));
            }
            Err(_) => return Err(at.err("lb_policy", format!("unknown value {}", c.lb_policy))),
        };
        if c.load_balancing_policy.is_some() {
            return Err(at.err("load_balancing_policy", "not supported; use lb_policy"));
        }
        let mut protocol = None;
        #[allow(deprecated)]
        if c.http2_protocol_options.is_some() {
            protocol = Some(RawServiceProtocol::Http2);
        }
        let mut idle_timeout = None;
        if let Some(any) = c
            .typed_extension_protocol_options
            .get(HTTP_PROTOCOL_OPTIONS)
        {
            let field = format!("typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS}]");
            let options: HttpProtocolOptions = unpack(any, &at, &field)?;
            match &options.upstream_protocol_options {
                Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                    match &e.protocol_config {
                        Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) => {
                            protocol = Some(RawServiceProtocol::Http2);
                        }
                        Some(http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(_)) => {
                            protocol = Some(RawServiceProtocol::Http1);
                        }
                        _ => return Err(at.err(format!("{field}.explicit_http_config"), "only HTTP/1.1 and HTTP/2 are supported")),
                    }
                }
                None => {}
                Some(_) => {
                    return Err(at.err(
                        format!("{field}.upstream_protocol_options"),
                        "only explicit_http_config is supported",
                    ));
                }
            }
            idle_timeout = options
                .common_http_protocol_options
                .as_ref()
                .and_then(|o| o.idle_timeout.as_ref())
                .filter(|d| d.seconds > 0 || d.nanos > 0)
                .map(duration_text);
        }
        // Tern's own settings, for what Envoy has no field for.
        if let Some(tern) = tern_metadata(c.metadata.as_ref()) {
            match string_field(tern, "protocol") {
                Some("http1") => protocol = Some(RawServiceProtocol::Http1),
                Some("http2") => protocol = Some(RawServiceProtocol::Http2),
                Some("tcp") => protocol = Some(RawServiceProtocol::Tcp),
                Some(other) => {
                    return Err(at.err(
                        "metadata.filter_metadata.tern.protocol",
                        format!("unknown protocol {other:?}"),
                    ));
                }
                None => {}
            }
            match string_field(tern, "load_balancer") {
                Some("round_robin") => load_balancer = RawLoadBalancer::RoundRobin,
                Some("least_request") => load_balancer = RawLoadBalancer::LeastRequest,
                Some("peak_ewma") => load_balancer = RawLoadBalancer::PeakEwma,
                Some(other) => {
                    return Err(at.err(
                        "metadata.filter_metadata.tern.load_balancer",
                        format!("unknown load balancer {other:?}"),
                    ));
                }
                None => {}
            }
        }
        Ok(XdsCluster {
            name: c.name.clone(),
            identity,
            protocol,
            load_balancer,
            // Unset means Envoy's default of 5 s, which is what the server expects.
            connect_timeout: Some(
                c.connect_timeout
                    .as_ref()
                    .filter(|d| d.seconds > 0 || d.nanos > 0)
                    .map_or_else(|| "5000ms".to_string(), duration_text),
            ),
            idle_timeout,
            endpoints,
            circuit_breaker: policy::breaker(c.circuit_breakers.as_ref()),
            outlier_detection: policy::outlier(c.outlier_detection.as_ref()),
            health_check: policy::health_check(&c.health_checks, &|f, r| at.err(f, r))?,
        })
    }
}

impl TryFrom<&ClusterLoadAssignment> for XdsEndpoints {
    type Error = InvalidResource;

    fn try_from(cla: &ClusterLoadAssignment) -> Result<Self, Self::Error> {
        let at = At {
            kind: "ClusterLoadAssignment",
            name: cla.cluster_name.clone(),
        };
        if cla.cluster_name.is_empty() {
            return Err(at.err("cluster_name", "missing"));
        }
        Ok(XdsEndpoints {
            name: cla.cluster_name.clone(),
            endpoints: endpoints_of(cla, &at, "")?,
        })
    }
}

/// Endpoints of the most preferred priority that has any; unhealthy and draining ones are
/// left out, as Envoy would send them nothing.
fn endpoints_of(
    cla: &ClusterLoadAssignment,
    at: &At,
    prefix: &str,
) -> Result<Vec<RawEndpoint>, InvalidResource> {
    let mut priorities: Vec<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    // The most preferred priority with a usable endpoint; a priority whose endpoints are all
    // unhealthy or draining fails over to the next, as in Envoy.
    for priority in priorities {
        let usable = endpoints_at(cla, at, prefix, priority)?;
        if !usable.is_empty() {
            return Ok(usable);
        }
    }
    Ok(Vec::new())
}

fn endpoints_at(
    cla: &ClusterLoadAssignment,
    at: &At,
    prefix: &str,
    priority: u32,
) -> Result<Vec<RawEndpoint>, InvalidResource> {
    let mut out: Vec<RawEndpoint> = Vec::new();
    for (l, locality) in cla.endpoints.iter().enumerate() {
        if locality.priority != priority {
            continue;
        }
        for (e, lb) in locality.lb_endpoints.iter().enumerate() {
            let field = format!("{prefix}endpoints[{l}].lb_endpoints[{e}]");
            let health = HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown);
            if matches!(
                health,
                HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout
            ) {
                continue;
            }
            let endpoint = match &lb.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
                _ => {
                    return Err(at.err(
                        format!("{field}.endpoint"),
                        "missing (named endpoints are not supported)",
                    ));
                }
            };
            let address = socket_addr(
                endpoint.address.as_ref(),
                at,
                &format!("{field}.endpoint.address"),
            )?;
            let weight = match lb.load_balancing_weight.as_ref().map(|w| w.value) {
                None | Some(1) => None,
                Some(0) => {
                    return Err(at.err(
                        format!("{field}.load_balancing_weight"),
                        "must be at least 1",
                    ));
                }
                Some(w) if w > MAX_WEIGHT => {
                    return Err(at.err(
                        format!("{field}.load_balancing_weight"),
                        format!("{w} is above Tern's maximum of {MAX_WEIGHT}"),
                    ));
                }
                Some(w) => Some(w),
            };
            if out.iter().any(|x| x.address == address) {
                continue;
            }
            out.push(RawEndpoint { address, weight });
        }
    }
    Ok(out)
}

fn socket_addr(a: Option<&Address>, at: &At, field: &str) -> Result<String, InvalidResource> {
    let Some(Address {
        address: Some(address::Address::SocketAddress(sa)),
    }) = a
    else {
        return Err(at.err(
            field,
            "missing socket_address (pipes and internal addresses are not supported)",
        ));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        at.err(
            format!("{field}.socket_address.address"),
            format!(
                "{:?} is not an IP address (DNS names are not resolved)",
                sa.address
            ),
        )
    })?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            at.err(
                format!("{field}.socket_address.port_value"),
                format!("{p} is not a port"),
            )
        })?,
        _ => {
            return Err(at.err(
                format!("{field}.socket_address.port_value"),
                "missing (named ports are not supported)",
            ));
        }
    };
    if sa.protocol != socket_address::Protocol::Tcp as i32 {
        return Err(at.err(
            format!("{field}.socket_address.protocol"),
            "only TCP is supported",
        ));
    }
    Ok(std::net::SocketAddr::new(ip, port).to_string())
}

fn check_ads(source: Option<&ConfigSource>, at: &At, field: &str) -> Result<(), InvalidResource> {
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
        None => Err(at.err(field, "missing; Tern follows one ADS stream")),
        Some(_) => Err(at.err(field, "only ADS config sources are supported")),
    }
}

fn tern_metadata(m: Option<&Metadata>) -> Option<&pbuf::Struct> {
    m.and_then(|m| m.filter_metadata.get("tern"))
}

fn string_field<'a>(s: &'a pbuf::Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(pbuf::value::Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
