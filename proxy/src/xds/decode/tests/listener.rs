//! Listeners: HTTP (RDS or inline routes), TCP proxy, API listeners, and what is refused.

use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, TransportSocket, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::route_match;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, ScopedRoutes, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::{self as pbuf, Any};
use envoy_types::util::pack_any;

use super::*;

fn tcp_listener(name: &str, cluster: &str) -> Listener {
    let tcp = TcpProxy {
        stat_prefix: name.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    listener_with(name, vec![network_filter(TCP_PROXY, pack_any(tcp))])
}

fn decode(l: &Listener) -> Result<XdsListener, InvalidResource> {
    XdsListener::try_from(l)
}

#[test]
fn http_listener_with_rds() {
    let mut hcm = hcm_rds("web-routes");
    hcm.request_headers_timeout = Some(pbuf::Duration {
        seconds: 5,
        nanos: 0,
    });
    let l = decode(&http_listener("web", hcm)).unwrap();
    assert_eq!(
        l,
        XdsListener::Http {
            name: "web".into(),
            address: "127.0.0.1:8080".into(),
            routes: RouteSource::Rds("web-routes".into()),
            request_header_timeout: Some("5000ms".into()),
            opaque: None,
            mtls: None,
            filters: PolicyFilters::default(),
            tracing: None,
        }
    );
    assert_eq!(l.name(), "web");
}

#[test]
fn an_unset_or_zero_header_timeout_leaves_tern_s_default() {
    let l = decode(&http_listener("web", hcm_rds("r"))).unwrap();
    assert!(matches!(
        l,
        XdsListener::Http {
            request_header_timeout: None,
            ..
        }
    ));
    let mut hcm = hcm_rds("r");
    hcm.request_headers_timeout = Some(pbuf::Duration::default());
    let l = decode(&http_listener("web", hcm)).unwrap();
    assert!(matches!(
        l,
        XdsListener::Http {
            request_header_timeout: None,
            ..
        }
    ));
}

#[test]
fn inline_route_config() {
    let rc = route_config(
        "inline",
        vec![vhost("all", &["*"], vec![route_to("/api", "api")])],
    );
    let l = decode(&http_listener("web", hcm_inline(rc))).unwrap();
    let XdsListener::Http {
        routes: RouteSource::Inline(routes),
        ..
    } = l
    else {
        panic!("inline routes expected: {l:?}");
    };
    assert_eq!(routes.len(), 1);
    assert_eq!(
        routes[0].matcher.as_ref().unwrap().path_prefix.as_deref(),
        Some("/api")
    );
    assert_eq!(routes[0].backends[0].service, "api");
}

#[test]
fn errors_in_inline_routes_name_the_full_path() {
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().path_specifier =
        Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/v[0-9]+".into(),
            ..Default::default()
        }));
    let rc = route_config("inline", vec![vhost("all", &["*"], vec![r])]);
    let e = refused(decode(&http_listener("web", hcm_inline(rc))));
    assert_eq!(e.kind, "Listener");
    assert_eq!(e.name, "web");
    assert_eq!(
        e.field,
        "filter_chains[0].filters[0].route_config.virtual_hosts[0].routes[0].match"
    );
}

#[test]
fn tcp_proxy_listener() {
    assert_eq!(
        decode(&tcp_listener("raw", "echo")).unwrap(),
        XdsListener::Tcp {
            name: "raw".into(),
            address: "127.0.0.1:8080".into(),
            cluster: "echo".into(),
            mtls: None,
        }
    );
}

#[test]
fn tcp_proxy_without_a_cluster_or_with_weighted_clusters_is_refused() {
    let e = refused(decode(&tcp_listener("raw", "")));
    assert_eq!(e.field, "filter_chains[0].filters[0].cluster");
    let tcp = TcpProxy {
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::WeightedClusters(
            tcp_proxy::WeightedCluster::default(),
        )),
        ..Default::default()
    };
    let l = listener_with("raw", vec![network_filter(TCP_PROXY, pack_any(tcp))]);
    let e = refused(decode(&l));
    assert_eq!(e.field, "filter_chains[0].filters[0].weighted_clusters");
}

#[test]
fn api_listener_is_skipped() {
    let l = Listener {
        name: "api.default.svc:80".into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm_rds("api"))),
        }),
        ..Default::default()
    };
    assert_eq!(
        decode(&l).unwrap(),
        XdsListener::Api {
            name: "api.default.svc:80".into()
        }
    );
}

#[test]
fn a_listener_needs_a_name() {
    let e = refused(decode(&http_listener("", hcm_rds("r"))));
    assert_eq!((e.kind, e.field.as_str()), ("Listener", "name"));
}

#[test]
fn two_filter_chains_are_refused() {
    let mut l = http_listener("web", hcm_rds("r"));
    l.filter_chains.push(l.filter_chains[0].clone());
    let e = refused(decode(&l));
    assert_eq!(e.field, "filter_chains");
    assert!(e.reason.contains("2 filter chains"), "{e}");
    assert_eq!(
        e.to_string(),
        "Listener \"web\": filter_chains: 2 filter chains; Tern supports one per listener (plus a default chain with protocol detection)"
    );
}

#[test]
fn no_filter_chain_or_a_default_one_is_refused() {
    let mut l = http_listener("web", hcm_rds("r"));
    l.filter_chains.clear();
    assert_eq!(refused(decode(&l)).field, "filter_chains");

    let mut l = http_listener("web", hcm_rds("r"));
    l.default_filter_chain = Some(FilterChain::default());
    assert_eq!(refused(decode(&l)).field, "default_filter_chain");
}

#[test]
fn transport_socket_is_refused() {
    let mut l = http_listener("web", hcm_rds("r"));
    l.filter_chains[0].transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: None,
    });
    let e = refused(decode(&l));
    assert_eq!(e.field, "filter_chains[0].transport_socket");
}

#[test]
fn an_empty_chain_two_network_filters_or_an_unknown_one_are_refused() {
    let l = listener_with("web", Vec::new());
    assert_eq!(refused(decode(&l)).field, "filter_chains[0].filters");

    let hcm = network_filter(HCM, pack_any(hcm_rds("r")));
    let l = listener_with("web", vec![hcm.clone(), hcm]);
    let e = refused(decode(&l));
    assert_eq!(e.field, "filter_chains[0].filters");
    assert!(e.reason.contains("got 2"), "{e}");

    // A network filter Tern does not know (any message will do as its config).
    let l = listener_with(
        "web",
        vec![network_filter(
            "envoy.filters.network.redis_proxy",
            pack_any(Router::default()),
        )],
    );
    let e = refused(decode(&l));
    assert_eq!(e.field, "filter_chains[0].filters[0].typed_config");
    assert!(e.reason.contains("unsupported filter"), "{e}");

    let mut l = listener_with("web", vec![network_filter(HCM, Any::default())]);
    l.filter_chains[0].filters[0].config_type = None;
    assert_eq!(
        refused(decode(&l)).field,
        "filter_chains[0].filters[0].typed_config"
    );
}

#[test]
fn an_unknown_http_filter_is_refused_unless_optional() {
    let ext_authz = HttpFilter {
        name: "envoy.filters.http.ext_authz".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
                .into(),
            value: Vec::new(),
        })),
        ..Default::default()
    };
    let mut hcm = hcm_rds("r");
    hcm.http_filters.insert(0, ext_authz.clone());
    let e = refused(decode(&http_listener("web", hcm)));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    assert!(e.reason.contains("envoy.filters.http.ext_authz"), "{e}");
    assert!(e.reason.contains("is_optional"), "{e}");

    let mut hcm = hcm_rds("r");
    hcm.http_filters.insert(
        0,
        HttpFilter {
            is_optional: true,
            ..ext_authz
        },
    );
    assert!(matches!(
        decode(&http_listener("web", hcm)).unwrap(),
        XdsListener::Http { .. }
    ));
}

#[test]
fn the_router_is_known_by_name_or_by_type() {
    let mut hcm = hcm_rds("r");
    hcm.http_filters = vec![HttpFilter {
        name: "my-router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }];
    assert!(decode(&http_listener("web", hcm)).is_ok());
    let mut hcm = hcm_rds("r");
    hcm.http_filters = vec![HttpFilter {
        name: ROUTER.into(),
        ..Default::default()
    }];
    assert!(decode(&http_listener("web", hcm)).is_ok());
}

#[test]
fn rds_must_come_over_ads() {
    let mut hcm = hcm_rds("r");
    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &mut hcm.route_specifier else {
        unreachable!()
    };
    rds.config_source = Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
            ApiConfigSource::default(),
        )),
        ..Default::default()
    });
    let e = refused(decode(&http_listener("web", hcm.clone())));
    assert_eq!(e.field, "filter_chains[0].filters[0].rds.config_source");
    assert!(e.reason.contains("only ADS"), "{e}");

    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &mut hcm.route_specifier else {
        unreachable!()
    };
    rds.config_source = None;
    let e = refused(decode(&http_listener("web", hcm.clone())));
    assert_eq!(e.field, "filter_chains[0].filters[0].rds.config_source");
    assert!(e.reason.contains("missing"), "{e}");

    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &mut hcm.route_specifier else {
        unreachable!()
    };
    rds.config_source = Some(ads());
    rds.route_config_name.clear();
    let e = refused(decode(&http_listener("web", hcm)));
    assert_eq!(e.field, "filter_chains[0].filters[0].rds.route_config_name");
}

#[test]
fn scoped_or_missing_routes_are_refused() {
    let mut hcm = hcm_rds("r");
    hcm.route_specifier = Some(http_connection_manager::RouteSpecifier::ScopedRoutes(
        ScopedRoutes::default(),
    ));
    assert_eq!(
        refused(decode(&http_listener("web", hcm.clone()))).field,
        "filter_chains[0].filters[0].scoped_routes"
    );
    hcm.route_specifier = None;
    assert_eq!(
        refused(decode(&http_listener("web", hcm))).field,
        "filter_chains[0].filters[0].route_specifier"
    );
}

#[test]
fn listener_addresses_must_be_ip_and_port_over_tcp() {
    let with_address = |a: Option<Address>| {
        let mut l = http_listener("web", hcm_rds("r"));
        l.address = a;
        decode(&l)
    };
    let e = refused(with_address(Some(socket("localhost", 80))));
    assert_eq!(e.field, "address.socket_address.address");
    assert!(e.reason.contains("not an IP address"), "{e}");

    let mut named = socket("0.0.0.0", 0);
    if let Some(address::Address::SocketAddress(sa)) = &mut named.address {
        sa.port_specifier = Some(socket_address::PortSpecifier::NamedPort("http".into()));
    }
    let e = refused(with_address(Some(named)));
    assert_eq!(e.field, "address.socket_address.port_value");
    assert!(e.reason.contains("named ports"), "{e}");

    let e = refused(with_address(Some(socket("0.0.0.0", 70_000))));
    assert_eq!(e.field, "address.socket_address.port_value");

    let mut udp = socket("0.0.0.0", 53);
    if let Some(address::Address::SocketAddress(sa)) = &mut udp.address {
        sa.protocol = socket_address::Protocol::Udp as i32;
    }
    assert_eq!(
        refused(with_address(Some(udp))).field,
        "address.socket_address.protocol"
    );

    assert_eq!(refused(with_address(None)).field, "address");

    let l = with_address(Some(socket("::", 15001))).unwrap();
    assert!(matches!(l, XdsListener::Http { address, .. } if address == "[::]:15001"));
}

/// With one chain and a `filter_chain_match`, Envoy closes every connection the match does
/// not select (say, another destination port or SNI name); Tern would serve them all.
#[test]
fn a_filter_chain_match_is_refused() {
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    use envoy_types::pb::google::protobuf::UInt32Value;

    let mut l = http_listener("web", hcm_rds("r"));
    l.filter_chains[0].filter_chain_match = Some(FilterChainMatch {
        destination_port: Some(UInt32Value { value: 9080 }),
        ..Default::default()
    });
    assert_eq!(
        refused(decode(&l)).field,
        "filter_chains[0].filter_chain_match"
    );
    // An empty match selects everything: nothing to refuse.
    l.filter_chains[0].filter_chain_match = Some(FilterChainMatch::default());
    assert!(decode(&l).is_ok());
}

/// Protocol detection, Envoy's way: `http_inspector`, an HTTP chain matched by application
/// protocol, a default TCP chain, and the listener filter timeout as the server-first wait.
fn auto_listener(continue_on_timeout: bool, inspector: bool) -> Listener {
    use envoy_types::pb::envoy::config::listener::v3::{
        FilterChainMatch, ListenerFilter, listener_filter,
    };
    use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
    let mut l = http_listener("mixed", hcm_rds("mixed"));
    l.filter_chains[0].filter_chain_match = Some(FilterChainMatch {
        application_protocols: vec!["http/1.1".into(), "h2c".into()],
        ..Default::default()
    });
    if inspector {
        l.listener_filters = vec![ListenerFilter {
            name: "envoy.filters.listener.http_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(
                envoy_types::util::pack_any(HttpInspector::default()),
            )),
            ..Default::default()
        }];
    }
    l.listener_filters_timeout = Some(pbuf::Duration {
        seconds: 0,
        nanos: 150_000_000,
    });
    l.continue_on_listener_filters_timeout = continue_on_timeout;
    l.default_filter_chain = Some(FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(
                envoy_types::util::pack_any(TcpProxy {
                    stat_prefix: "mixed".into(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("db".into())),
                    ..Default::default()
                }),
            )),
        }],
        ..Default::default()
    });
    l
}

#[test]
fn protocol_detection_decodes_to_an_auto_listener() {
    let l = decode(&auto_listener(true, true)).unwrap();
    let XdsListener::Http { opaque, routes, .. } = l else {
        panic!("{l:?}")
    };
    assert_eq!(routes, RouteSource::Rds("mixed".into()));
    let opaque = opaque.unwrap();
    assert_eq!(opaque.cluster, "db");
    assert_eq!(opaque.detect_timeout, "150ms");
}

#[test]
fn protocol_detection_that_tern_cannot_honour_is_refused_by_field() {
    let e = decode(&auto_listener(false, true)).unwrap_err();
    assert_eq!(e.field, "continue_on_listener_filters_timeout");
    let e = decode(&auto_listener(true, false)).unwrap_err();
    assert_eq!(e.field, "default_filter_chain");
    let mut tls_match = auto_listener(true, true);
    tls_match.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .server_names = vec!["api.local".into()];
    let e = decode(&tls_match).unwrap_err();
    assert_eq!(e.field, "filter_chains[0].filter_chain_match");
}
