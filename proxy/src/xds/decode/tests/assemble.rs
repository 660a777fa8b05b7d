//! `XdsState::assemble`: warming (what a config still waits for), protocol inference, the
//! RDS / EDS subscriptions and pruning. States are built from decoded Envoy resources.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::util::pack_any;

use super::*;
use crate::config::{LoadBalancerKind, RawListenerProtocol, UpstreamProtocol};
use crate::xds::{Assembly, XdsState};

fn listener(l: &Listener) -> (String, XdsListener) {
    let l = XdsListener::try_from(l).unwrap();
    (l.name().to_string(), l)
}

fn tcp(name: &str, cluster: &str) -> (String, XdsListener) {
    let tcp = TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    let mut l = listener_with(name, vec![network_filter(TCP_PROXY, pack_any(tcp))]);
    l.address = Some(socket("127.0.0.1", 9000));
    listener(&l)
}

fn routes(rc: &RouteConfiguration) -> (String, XdsRoutes) {
    let r = XdsRoutes::try_from(rc).unwrap();
    (r.name.clone(), r)
}

fn cluster(c: &Cluster) -> (String, XdsCluster) {
    let c = XdsCluster::try_from(c).unwrap();
    (c.name.clone(), c)
}

fn endpoints(name: &str, port: u32) -> (String, XdsEndpoints) {
    let e = XdsEndpoints::try_from(&cla(
        name,
        vec![locality(0, vec![lb_endpoint("10.0.0.1", port)])],
    ))
    .unwrap();
    (e.name.clone(), e)
}

/// What go-control-plane's example sends: listener → RDS → cluster → EDS, all present.
fn complete() -> XdsState {
    XdsState {
        listeners: [listener(&http_listener("web", hcm_rds("web-routes")))].into(),
        routes: [routes(&route_config(
            "web-routes",
            vec![vhost("all", &["*"], vec![route_to("/", "api")])],
        ))]
        .into(),
        clusters: [cluster(&eds_cluster("api"))].into(),
        endpoints: [endpoints("api", 8080)].into(),
    }
}

fn ready(state: &XdsState) -> RawConfig {
    match state.assemble() {
        Assembly::Ready(raw) => raw,
        Assembly::Waiting(what) => panic!("still waiting for {what}"),
    }
}

fn waiting(state: &XdsState) -> String {
    match state.assemble() {
        Assembly::Ready(raw) => panic!("expected to wait, got {raw:?}"),
        Assembly::Waiting(what) => what,
    }
}

#[test]
fn a_complete_state_makes_a_valid_config() {
    let raw = ready(&complete());
    assert_eq!(raw.listeners.len(), 1);
    let l = &raw.listeners[0];
    assert_eq!(
        (l.name.as_str(), l.address.as_str(), l.protocol),
        ("web", "127.0.0.1:8080", RawListenerProtocol::Http)
    );
    assert_eq!(l.routes[0].backends[0].service, "api");
    assert_eq!(raw.services.len(), 1);
    let s = &raw.services[0];
    assert_eq!(s.protocol, RawServiceProtocol::Http1);
    assert_eq!(s.connect_timeout.as_deref(), Some("250ms"));
    assert_eq!(s.endpoints[0].address, "10.0.0.1:8080");

    let config = Config::try_from(raw).unwrap();
    assert_eq!(
        config.services[0].connect_timeout,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        config.services[0].load_balancer,
        LoadBalancerKind::RoundRobin
    );
}

#[test]
fn an_empty_state_is_an_empty_config() {
    let raw = ready(&XdsState::default());
    assert!(raw.listeners.is_empty() && raw.services.is_empty());
}

#[test]
fn waits_for_the_route_configuration() {
    let mut state = complete();
    state.routes.clear();
    let what = waiting(&state);
    assert!(
        what.contains("RouteConfiguration \"web-routes\"") && what.contains("\"web\""),
        "{what}"
    );
}

#[test]
fn waits_for_a_cluster_a_route_names() {
    let mut state = complete();
    state.routes.extend([routes(&route_config(
        "web-routes",
        vec![vhost(
            "all",
            &["*"],
            vec![route_to("/new", "new"), route_to("/", "api")],
        )],
    ))]);
    assert_eq!(waiting(&state), "Cluster \"new\" of listener \"web\"");
    state.clusters.extend([cluster(&eds_cluster("new"))]);
    assert!(waiting(&state).contains("ClusterLoadAssignment \"new\""));
    state.endpoints.extend([endpoints("new", 9090)]);
    assert_eq!(ready(&state).services.len(), 2);
}

#[test]
fn waits_for_the_cluster_of_a_tcp_listener() {
    let mut state = complete();
    state.listeners.extend([tcp("raw", "db")]);
    assert_eq!(waiting(&state), "Cluster \"db\" of listener \"raw\"");
}

#[test]
fn waits_for_a_cluster_s_load_assignment_even_when_unused() {
    let mut state = complete();
    let mut c = eds_cluster("spare");
    c.eds_cluster_config.as_mut().unwrap().service_name = "spare-eds".into();
    state.clusters.extend([cluster(&c)]);
    let what = waiting(&state);
    assert!(
        what.contains("ClusterLoadAssignment \"spare-eds\"") && what.contains("\"spare\""),
        "{what}"
    );
    state.endpoints.extend([endpoints("spare-eds", 1)]);
    let raw = ready(&state);
    let spare = raw.services.iter().find(|s| s.name == "spare").unwrap();
    assert_eq!(spare.endpoints[0].address, "10.0.0.1:1");
}

#[test]
fn static_clusters_and_inline_routes_wait_for_nothing() {
    let mut c = eds_cluster("db");
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::Static as i32,
    ));
    c.load_assignment = Some(cla(
        "db",
        vec![locality(0, vec![lb_endpoint("10.0.0.9", 5432)])],
    ));
    let inline = hcm_inline(route_config(
        "inline",
        vec![vhost("all", &["*"], vec![route_to("/", "db")])],
    ));
    let state = XdsState {
        listeners: [listener(&http_listener("web", inline))].into(),
        clusters: [cluster(&c)].into(),
        ..Default::default()
    };
    let raw = ready(&state);
    assert_eq!(raw.services[0].endpoints[0].address, "10.0.0.9:5432");
    assert!(state.wanted_routes().is_empty());
    assert!(state.wanted_endpoints().is_empty());
}

#[test]
fn api_listeners_are_left_out() {
    let mut state = complete();
    let api = Listener {
        name: "api".into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm_rds("never-sent"))),
        }),
        ..Default::default()
    };
    state.listeners.extend([listener(&api)]);
    let raw = ready(&state);
    assert_eq!(
        raw.listeners.iter().map(|l| &l.name).collect::<Vec<_>>(),
        ["web"]
    );
    assert_eq!(state.wanted_routes(), BTreeSet::from(["web-routes".into()]));
}

#[test]
fn a_cluster_behind_a_tcp_listener_speaks_tcp() {
    let mut state = complete();
    state.listeners.extend([tcp("raw", "db")]);
    state.clusters.extend([cluster(&eds_cluster("db"))]);
    state.endpoints.extend([endpoints("db", 5432)]);
    let raw = ready(&state);
    let protocol = |name: &str| {
        raw.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.protocol)
    };
    assert_eq!(protocol("db"), Some(RawServiceProtocol::Tcp));
    assert_eq!(protocol("api"), Some(RawServiceProtocol::Http1));
    let raw_listener = raw.listeners.iter().find(|l| l.name == "raw").unwrap();
    assert_eq!(raw_listener.protocol, RawListenerProtocol::Tcp);
    assert_eq!(raw_listener.service.as_deref(), Some("db"));

    let config = Config::try_from(raw).unwrap();
    let db = config.services.iter().find(|s| &*s.name == "db").unwrap();
    assert_eq!(db.protocol, UpstreamProtocol::Tcp);
}

#[test]
fn a_stated_protocol_is_not_inferred_over() {
    let mut state = complete();
    let mut grpc = eds_cluster("api");
    grpc.metadata = Some(tern_metadata(&[("protocol", "http2")]));
    state.clusters.extend([cluster(&grpc)]);
    assert_eq!(
        ready(&state).services[0].protocol,
        RawServiceProtocol::Http2
    );
}

#[test]
fn subscriptions_follow_the_listeners_and_clusters() {
    let mut state = complete();
    let mut c = eds_cluster("other");
    c.eds_cluster_config.as_mut().unwrap().service_name = "other-eds".into();
    state.clusters.extend([cluster(&c)]);
    state
        .listeners
        .extend([listener(&http_listener("admin", hcm_rds("admin-routes")))]);
    assert_eq!(
        state.wanted_routes(),
        BTreeSet::from(["admin-routes".into(), "web-routes".into()])
    );
    assert_eq!(
        state.wanted_endpoints(),
        BTreeSet::from(["api".into(), "other-eds".into()])
    );
}

#[test]
fn prune_drops_what_nothing_refers_to() {
    let mut state = complete();
    state
        .routes
        .extend([routes(&route_config("old-routes", Vec::new()))]);
    state.endpoints.extend([endpoints("old", 1)]);
    state.prune();
    assert_eq!(state, complete());

    // The listener goes: its routes go; the cluster goes: its endpoints go.
    state.listeners.clear();
    state.clusters.clear();
    state.prune();
    assert!(state.routes.is_empty() && state.endpoints.is_empty());
}
