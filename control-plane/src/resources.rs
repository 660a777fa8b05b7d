//! Translation of a validated mesh (`tern_proxy::config::Config`) into Envoy xDS v3 resources.
//!
//! Every service becomes a Cluster (EDS over ADS) and a ClusterLoadAssignment; every listener
//! of the mesh file becomes a Listener with an HTTP connection manager (routes over RDS) or a
//! TCP proxy. Every HTTP service also gets an *API listener* named after the service, with an
//! inline route to its cluster, because that is what a proxyless gRPC client resolving
//! `xds:///SERVICE` asks for. Everything is plain Envoy so that Envoy and gRPC can consume it;
//! what Envoy has no field for (peak-EWMA, the upstream protocol of a plain-TCP cluster) travels
//! in the cluster's `filter_metadata["tern"]`, which other clients ignore. Resilience settings
//! are translated in `resilience`, per-route traffic policy and tracing in `traffic`, and
//! `packing` makes equal resources encode to equal bytes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Http1ProtocolOptions,
    Http2ProtocolOptions, HttpProtocolOptions as CommonHttpProtocolOptions, Locality, Metadata,
    SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter,
    listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{self as pbuf, Any, UInt32Value};
use envoy_types::util::pack_any;
use tern_proxy::config::{
    Backend, Config, ListenerKind, LoadBalancerKind, PathMatch, Service, UpstreamProtocol,
};

use tern_proxy::xds::TypeKind;

use crate::{packing, resilience, traffic};

/// Well-known filter and extension names, as Envoy and gRPC expect them.
pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
pub const HTTP_INSPECTOR_FILTER: &str = "envoy.filters.listener.http_inspector";
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The `filter_metadata` key under which Tern-only cluster settings travel.
pub const TERN_METADATA: &str = "tern";

/// One named resource, packed, with the version the xDS protocol reports for it.
#[derive(Debug, Clone)]
pub struct Packed {
    pub name: String,
    pub any: Any,
    /// Sent only to clients that ask for it by name (see [`encode`]).
    pub named_only: bool,
}

/// Every resource of a mesh, by type, in name order. API listeners are `named_only`: a
/// proxyless gRPC client asks for its listener by name, while a proxy (Envoy, Tern) asks for
/// all listeners and must not get them (Envoy logs a warning for every API listener it is
/// sent, and has nothing to bind for them).
pub fn encode(config: &Config) -> BTreeMap<TypeKind, Vec<Packed>> {
    let mut out: BTreeMap<TypeKind, Vec<Packed>> = BTreeMap::new();
    let listener_names: std::collections::HashSet<&str> =
        config.listeners.iter().map(|l| &*l.name).collect();
    for service in &config.services {
        out.entry(TypeKind::Cluster).or_default().push(Packed {
            name: service.name.to_string(),
            any: packing::pack_cluster(cluster_of(service)),
            named_only: false,
        });
        out.entry(TypeKind::Endpoint).or_default().push(Packed {
            name: service.name.to_string(),
            any: pack_any(load_assignment_of(service)),
            named_only: false,
        });
        // A mesh-file listener of the same name wins; gRPC clients then resolve that one.
        if service.protocol != UpstreamProtocol::Tcp && !listener_names.contains(&*service.name) {
            out.entry(TypeKind::Listener).or_default().push(Packed {
                name: service.name.to_string(),
                any: pack_any(api_listener_of(service)),
                named_only: true,
            });
        }
    }
    for listener in &config.listeners {
        let http = |routes: &[tern_proxy::config::Route]| {
            let hcm = HttpConnectionManager {
                stat_prefix: listener.name.to_string(),
                route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads_source()),
                    route_config_name: listener.name.to_string(),
                })),
                http_filters: traffic::policy_filters()
                    .into_iter()
                    .chain([router_filter()])
                    .collect(),
                request_headers_timeout: Some(duration(listener.header_timeout)),
                tracing: config.tracing.as_ref().map(traffic::tracing),
                ..Default::default()
            };
            let rc = RouteConfiguration {
                name: listener.name.to_string(),
                virtual_hosts: vec![VirtualHost {
                    name: listener.name.to_string(),
                    domains: vec!["*".to_string()],
                    routes: routes.iter().map(route_of).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            (network_filter(HCM_FILTER, pack_any(hcm)), rc)
        };
        let tcp = |service: &str| {
            let tcp = TcpProxy {
                stat_prefix: listener.name.to_string(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(service.to_string())),
                ..Default::default()
            };
            network_filter(TCP_PROXY_FILTER, pack_any(tcp))
        };
        let one_chain = |filter: Filter| FilterChain {
            filters: vec![filter],
            ..Default::default()
        };
        let mut encoded = Listener {
            name: listener.name.to_string(),
            address: Some(socket_address(listener.address)),
            metadata: tern_proxy::xds::identity::raw_mtls(&listener.mtls)
                .map(|m| tern_proxy::xds::identity::listener_metadata(&m)),
            ..Default::default()
        };
        let route_config = match &listener.kind {
            ListenerKind::Http { routes } => {
                let (filter, rc) = http(routes);
                encoded.filter_chains = vec![one_chain(filter)];
                Some(rc)
            }
            ListenerKind::Tcp { service } => {
                encoded.filter_chains = vec![one_chain(tcp(service))];
                None
            }
            // Protocol detection as Envoy spells it: the HTTP inspector picks the HTTP
            // chain by ALPN-like application protocol; everything else, and connections
            // silent past the listener filter timeout, take the default TCP chain.
            ListenerKind::Auto {
                routes,
                service,
                detect_timeout,
            } => {
                let (filter, rc) = http(routes);
                encoded.listener_filters = vec![ListenerFilter {
                    name: HTTP_INSPECTOR_FILTER.to_string(),
                    config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                        HttpInspector::default(),
                    ))),
                    ..Default::default()
                }];
                encoded.listener_filters_timeout = Some(duration(*detect_timeout));
                encoded.continue_on_listener_filters_timeout = true;
                encoded.filter_chains = vec![FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        application_protocols: vec!["http/1.1".into(), "h2c".into()],
                        ..Default::default()
                    }),
                    filters: vec![filter],
                    ..Default::default()
                }];
                encoded.default_filter_chain = Some(one_chain(tcp(service)));
                Some(rc)
            }
        };
        out.entry(TypeKind::Listener).or_default().push(Packed {
            name: listener.name.to_string(),
            any: pack_any(encoded),
            named_only: false,
        });
        if let Some(rc) = route_config {
            out.entry(TypeKind::Route).or_default().push(Packed {
                name: listener.name.to_string(),
                any: packing::pack_route_configuration(rc),
                named_only: false,
            });
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

fn cluster_of(service: &Service) -> Cluster {
    let lb_policy = match service.load_balancer {
        LoadBalancerKind::RoundRobin => cluster::LbPolicy::RoundRobin,
        // Envoy has no peak-EWMA; least request is its closest relative.
        LoadBalancerKind::LeastRequest | LoadBalancerKind::PeakEwma => {
            cluster::LbPolicy::LeastRequest
        }
    };
    let mut options = HashMap::new();
    let protocol_config = match service.protocol {
        UpstreamProtocol::Http1 => Some(
            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            ),
        ),
        UpstreamProtocol::Http2 => Some(
            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions::default(),
            ),
        ),
        UpstreamProtocol::Tcp => None,
    };
    if let Some(protocol_config) = protocol_config {
        let http = HttpProtocolOptions {
            common_http_protocol_options: Some(CommonHttpProtocolOptions {
                idle_timeout: Some(duration(service.idle_timeout)),
                ..Default::default()
            }),
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(protocol_config),
                    },
                ),
            ),
            ..Default::default()
        };
        options.insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(http));
    }
    let mut tern = BTreeMap::new();
    tern.insert(
        "protocol".to_string(),
        string_value(match service.protocol {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
            UpstreamProtocol::Tcp => "tcp",
        }),
    );
    tern.insert(
        "load_balancer".to_string(),
        string_value(service.load_balancer.as_str()),
    );
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert(
        TERN_METADATA.to_string(),
        pbuf::Struct {
            fields: tern.into_iter().collect(),
        },
    );
    Cluster {
        name: service.name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(service.connect_timeout)),
        lb_policy: lb_policy as i32,
        typed_extension_protocol_options: options,
        metadata: Some(Metadata {
            filter_metadata,
            ..Default::default()
        }),
        circuit_breakers: Some(resilience::circuit_breakers(&service.circuit_breaker)),
        outlier_detection: service
            .outlier_detection
            .as_ref()
            .map(resilience::outlier_detection),
        health_checks: service
            .health_check
            .as_ref()
            .map(resilience::health_checks)
            .unwrap_or_default(),
        transport_socket: service
            .identity
            .as_ref()
            .map(tern_proxy::xds::identity::upstream_tls),
        ..Default::default()
    }
}

fn load_assignment_of(service: &Service) -> ClusterLoadAssignment {
    let lb_endpoints = service
        .endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(e.address)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: service.name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            // gRPC NACKs an EDS resource whose localities have no `locality` field
            // ("endpoints[0].locality: field not present"); an empty one is enough.
            locality: Some(Locality::default()),
            lb_endpoints,
            // gRPC's xDS balancer drops localities without a weight.
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The listener a proxyless gRPC client asks for when it dials `xds:///SERVICE`.
fn api_listener_of(service: &Service) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: service.name.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: service.name.to_string(),
                virtual_hosts: vec![VirtualHost {
                    name: service.name.to_string(),
                    domains: vec!["*".to_string()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                service.name.to_string(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: service.name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm)),
        }),
        ..Default::default()
    }
}

fn route_of(route: &tern_proxy::config::Route) -> Route {
    let m = &route.matcher;
    let path_specifier = Some(match &m.path {
        None => route_match::PathSpecifier::Prefix("/".to_string()),
        Some(PathMatch::Prefix(p)) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(PathMatch::Exact(p)) => route_match::PathSpecifier::Path(p.clone()),
    });
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, value)| {
            header_matcher_of(
                name.as_str(),
                string_matcher::MatchPattern::Exact(value.to_str().unwrap_or_default().to_string()),
            )
        })
        .collect();
    // First-match-wins across hosts cannot be said with virtual hosts (Envoy picks the most
    // specific domain first), so a host travels as an `:authority` matcher on the route.
    if let Some(host) = &m.host {
        let pattern = match host.strip_prefix('*') {
            Some(suffix) => string_matcher::MatchPattern::Suffix(suffix.to_string()),
            None => string_matcher::MatchPattern::Exact(host.clone()),
        };
        headers.insert(0, header_matcher_of(":authority", pattern));
    }
    let cluster_specifier = match route.backends.as_slice() {
        [one] => route_action::ClusterSpecifier::Cluster(one.service.to_string()),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many.iter().map(weighted_of).collect(),
            ..Default::default()
        }),
    };
    Route {
        r#match: Some(RouteMatch {
            path_specifier,
            headers,
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            timeout: Some(resilience::route_timeout(route.timeout)),
            retry_policy: route.retry.as_ref().map(resilience::retry_policy),
            ..Default::default()
        })),
        metadata: route_metadata(route),
        typed_per_filter_config: traffic::per_filter_config(route),
        ..Default::default()
    }
}

/// What only Tern reads about a route: its retry budget and its rate limit key.
fn route_metadata(route: &tern_proxy::config::Route) -> Option<Metadata> {
    let mut fields = HashMap::new();
    if let Some(retry) = &route.retry {
        fields.insert(
            resilience::RETRY_BUDGET.to_string(),
            resilience::budget(retry),
        );
    }
    if let Some(limit) = &route.rate_limit {
        fields.insert(
            traffic::RATE_LIMIT_KEY.to_string(),
            traffic::rate_limit_key(limit),
        );
    }
    if fields.is_empty() {
        return None;
    }
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert(TERN_METADATA.to_string(), pbuf::Struct { fields });
    Some(Metadata {
        filter_metadata,
        ..Default::default()
    })
}

fn weighted_of(backend: &Backend) -> weighted_cluster::ClusterWeight {
    weighted_cluster::ClusterWeight {
        name: backend.service.to_string(),
        weight: Some(UInt32Value {
            value: backend.weight,
        }),
        ..Default::default()
    }
}

fn header_matcher_of(name: &str, pattern: string_matcher::MatchPattern) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: name == ":authority",
            },
        )),
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: ROUTER_FILTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

fn network_filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

fn ads_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn socket_address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

pub(crate) fn duration(d: Duration) -> pbuf::Duration {
    pbuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn string_value(s: &str) -> pbuf::Value {
    pbuf::Value {
        kind: Some(pbuf::value::Kind::StringValue(s.to_string())),
    }
}
