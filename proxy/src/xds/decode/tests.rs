//! Envoy resources built by hand, the way other control planes send them, and what Tern makes
//! of them. Shared builders here; one file per resource type, and one for `assemble`.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{self as pbuf, UInt32Value};
use envoy_types::util::pack_any;

use super::*;
use crate::config::{Config, RawConfig};
use crate::xds::traffic::ROUTER;

mod assemble;
mod clusters;
mod endpoints;
mod listener;
mod routes;
mod tracing;
mod traffic;

pub(super) fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(super) fn router() -> HttpFilter {
    HttpFilter {
        name: ROUTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

/// An HTTP connection manager taking its routes from RDS over ADS.
pub(super) fn hcm_rds(route_config_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: "test".to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters: vec![router()],
        ..Default::default()
    }
}

pub(super) fn hcm_inline(rc: RouteConfiguration) -> HttpConnectionManager {
    HttpConnectionManager {
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)),
        ..hcm_rds("unused")
    }
}

pub(super) fn network_filter(name: &str, config: pbuf::Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

/// A listener on 127.0.0.1:8080 with one filter chain holding `filters`.
pub(super) fn listener_with(name: &str, filters: Vec<Filter>) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket("127.0.0.1", 8080)),
        filter_chains: vec![FilterChain {
            filters,
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(super) fn http_listener(name: &str, hcm: HttpConnectionManager) -> Listener {
    listener_with(name, vec![network_filter(HCM, pack_any(hcm))])
}

pub(super) fn route_to(prefix: &str, cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub(super) fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.to_string(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

pub(super) fn route_config(name: &str, virtual_hosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

/// What go-control-plane's examples send: EDS over ADS, round robin, a connect timeout.
pub(super) fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pbuf::Duration {
            seconds: 0,
            nanos: 250_000_000,
        }),
        ..Default::default()
    }
}

pub(super) fn lb_endpoint(ip: &str, port: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket(ip, port)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub(super) fn weighted(mut e: LbEndpoint, weight: u32) -> LbEndpoint {
    e.load_balancing_weight = Some(UInt32Value { value: weight });
    e
}

pub(super) fn locality(priority: u32, lb_endpoints: Vec<LbEndpoint>) -> LocalityLbEndpoints {
    LocalityLbEndpoints {
        priority,
        lb_endpoints,
        ..Default::default()
    }
}

pub(super) fn cla(name: &str, endpoints: Vec<LocalityLbEndpoints>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints,
        ..Default::default()
    }
}

pub(super) fn tern_metadata(fields: &[(&str, &str)]) -> Metadata {
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert(
        "tern".to_string(),
        pbuf::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        pbuf::Value {
                            kind: Some(pbuf::value::Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        },
    );
    Metadata {
        filter_metadata,
        ..Default::default()
    }
}

/// The error of a refused resource, with a readable failure if it was accepted.
pub(super) fn refused<T: std::fmt::Debug>(result: Result<T, InvalidResource>) -> InvalidResource {
    match result {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e,
    }
}

pub(super) fn host_of(r: &RawRoute) -> Option<&str> {
    r.matcher.as_ref().and_then(|m| m.host.as_deref())
}

/// Which backend Tern's router picks for a request, using the real matcher over the routes
/// as validated into a config (first match wins); `None` is a 404.
pub(super) fn pick(routes: &[RawRoute], host: &str, path: &str) -> Option<String> {
    let mut services: Vec<String> = routes
        .iter()
        .flat_map(|r| r.backends.iter().map(|b| b.service.clone()))
        .collect();
    services.sort();
    services.dedup();
    // Through serde, so that fields added to the model later take their defaults.
    let raw: RawConfig = serde_json::from_value(serde_json::json!({
        "listeners": [{
            "name": "l",
            "address": "127.0.0.1:0",
            "protocol": "http",
            "routes": routes,
        }],
        "services": services
            .iter()
            .map(|name| serde_json::json!({ "name": name, "protocol": "http1" }))
            .collect::<Vec<_>>(),
    }))
    .expect("a config model");
    let config = Config::try_from(raw).expect("decoded routes make a valid config");
    let crate::config::ListenerKind::Http { routes } = &config.listeners[0].kind else {
        unreachable!("an http listener")
    };
    routes
        .iter()
        .find(|r| {
            crate::http::route::matches(&r.matcher, Some(host), path, &http::HeaderMap::new())
        })
        .map(|r| r.backends[0].service.to_string())
}

#[test]
fn display_is_the_nack_text() {
    let e = InvalidResource {
        kind: "Cluster",
        name: "api".into(),
        field: "lb_policy".into(),
        reason: "MAGLEV is not supported (ROUND_ROBIN or LEAST_REQUEST)".into(),
    };
    assert_eq!(
        e.to_string(),
        "Cluster \"api\": lb_policy: MAGLEV is not supported (ROUND_ROBIN or LEAST_REQUEST)"
    );
}

#[test]
fn decode_any_checks_the_type_url() {
    let any = pack_any(eds_cluster("api"));
    let c: Cluster = decode_any(&any, "Cluster").unwrap();
    assert_eq!(c.name, "api");
    let e = refused(decode_any::<Listener>(&any, "Listener"));
    assert_eq!((e.kind, e.field.as_str()), ("Listener", "resource"));
    assert!(
        e.reason.contains("envoy.config.listener.v3.Listener")
            && e.reason.contains("envoy.config.cluster.v3.Cluster"),
        "{e}"
    );
    let garbage = pbuf::Any {
        type_url: Cluster::type_url(),
        value: vec![0xff, 0xff, 0xff],
    };
    let e = refused(decode_any::<Cluster>(&garbage, "Cluster"));
    assert!(e.reason.starts_with("cannot decode"), "{e}");
}

#[test]
fn durations_round_up_to_whole_milliseconds() {
    let d = |seconds, nanos| duration_text(&pbuf::Duration { seconds, nanos });
    assert_eq!(d(0, 1), "1ms");
    assert_eq!(d(0, 999_999), "1ms");
    assert_eq!(d(0, 1_000_000), "1ms");
    assert_eq!(d(0, 1_000_001), "2ms");
    assert_eq!(d(1, 500_000_001), "1501ms");
    assert_eq!(d(10, 0), "10000ms");
    assert_eq!(d(-1, 0), "0ms");
    // Every text made here is one Tern's own duration parser reads back.
    for text in [d(0, 1), d(1, 500_000_001), d(3600, 0)] {
        assert!(crate::config::parse_duration(&text).is_ok(), "{text}");
    }
}

#[test]
fn strip_port_keeps_names_and_wildcards() {
    assert_eq!(strip_port("api.local:8080"), "api.local");
    assert_eq!(strip_port("*.example.com:443"), "*.example.com");
    assert_eq!(strip_port("api.local"), "api.local");
    assert_eq!(strip_port("api.local:http"), "api.local:http");
}
