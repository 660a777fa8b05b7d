//! Clusters: EDS or STATIC, balancing, upstream protocol, timeouts, and what is refused.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, LoadBalancingPolicy, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, Http1ProtocolOptions, Http2ProtocolOptions, Http3ProtocolOptions,
    HttpProtocolOptions as CommonHttpProtocolOptions, TransportSocket, config_source,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf as pbuf;
use envoy_types::util::pack_any;

use super::*;

fn decode(c: &Cluster) -> Result<XdsCluster, InvalidResource> {
    XdsCluster::try_from(c)
}

fn with_type(mut c: Cluster, t: cluster::DiscoveryType) -> Cluster {
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(t as i32));
    c
}

fn explicit(
    config: http_protocol_options::explicit_http_config::ProtocolConfig,
) -> HttpProtocolOptions {
    HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(config),
                },
            ),
        ),
        ..Default::default()
    }
}

fn with_options(mut c: Cluster, options: HttpProtocolOptions) -> Cluster {
    c.typed_extension_protocol_options
        .insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(options));
    c
}

const OPTIONS_FIELD: &str =
    "typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]";

#[test]
fn eds_cluster_over_ads() {
    let c = decode(&eds_cluster("api")).unwrap();
    assert_eq!(c.name, "api");
    assert_eq!(c.protocol, None);
    assert_eq!(c.load_balancer, RawLoadBalancer::RoundRobin);
    assert_eq!(c.connect_timeout.as_deref(), Some("250ms"));
    assert_eq!(c.idle_timeout, None);
    assert_eq!(c.endpoints, EndpointSource::Eds("api".into()));
}

#[test]
fn eds_service_name_names_the_load_assignment() {
    let mut c = eds_cluster("outbound|80||api.default.svc");
    c.eds_cluster_config.as_mut().unwrap().service_name = "api.default".into();
    assert_eq!(
        decode(&c).unwrap().endpoints,
        EndpointSource::Eds("api.default".into())
    );
}

#[test]
fn eds_must_come_over_ads() {
    let mut c = eds_cluster("api");
    c.eds_cluster_config.as_mut().unwrap().eds_config = Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
            ApiConfigSource::default(),
        )),
        ..Default::default()
    });
    let e = refused(decode(&c));
    assert_eq!(e.kind, "Cluster");
    assert_eq!(e.field, "eds_cluster_config.eds_config");
    assert!(e.reason.contains("only ADS"), "{e}");

    let mut c = eds_cluster("api");
    c.eds_cluster_config = None;
    let e = refused(decode(&c));
    assert_eq!(e.field, "eds_cluster_config.eds_config");
    assert!(e.reason.contains("missing"), "{e}");
}

#[test]
fn static_cluster_with_inline_load_assignment() {
    let mut c = with_type(eds_cluster("db"), cluster::DiscoveryType::Static);
    c.eds_cluster_config = None;
    c.load_assignment = Some(cla(
        "db",
        vec![locality(
            0,
            vec![lb_endpoint("10.0.0.1", 5432), lb_endpoint("10.0.0.2", 5432)],
        )],
    ));
    let decoded = decode(&c).unwrap();
    let EndpointSource::Static(endpoints) = &decoded.endpoints else {
        panic!("static endpoints expected: {decoded:?}");
    };
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight))
        .collect();
    assert_eq!(
        endpoints,
        [("10.0.0.1:5432", None), ("10.0.0.2:5432", None)]
    );

    // No type at all means STATIC too.
    c.cluster_discovery_type = None;
    assert_eq!(decode(&c).unwrap(), decoded);
}

#[test]
fn static_cluster_errors_point_into_its_load_assignment() {
    let mut c = with_type(eds_cluster("db"), cluster::DiscoveryType::Static);
    c.load_assignment = Some(cla(
        "db",
        vec![locality(0, vec![lb_endpoint("db.internal", 5432)])],
    ));
    let e = refused(decode(&c));
    assert_eq!(
        e.field,
        "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    );

    c.load_assignment = None;
    assert_eq!(refused(decode(&c)).field, "load_assignment");
    c.cluster_discovery_type = None;
    assert_eq!(refused(decode(&c)).field, "type");
}

#[test]
fn dns_and_original_destination_clusters_are_refused() {
    for (t, name) in [
        (cluster::DiscoveryType::StrictDns, "STRICT_DNS"),
        (cluster::DiscoveryType::LogicalDns, "LOGICAL_DNS"),
        (cluster::DiscoveryType::OriginalDst, "ORIGINAL_DST"),
    ] {
        let e = refused(decode(&with_type(eds_cluster("ext"), t)));
        assert_eq!(e.field, "type");
        assert_eq!(
            e.to_string(),
            format!("Cluster \"ext\": type: {name} clusters are not supported (use EDS or STATIC)")
        );
    }
    let mut c = eds_cluster("ext");
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(42));
    assert!(refused(decode(&c)).reason.starts_with("42 clusters"));

    let mut c = eds_cluster("agg");
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::ClusterType(
        cluster::CustomClusterType {
            name: "envoy.clusters.aggregate".into(),
            typed_config: None,
        },
    ));
    let e = refused(decode(&c));
    assert_eq!(e.field, "cluster_type");
    assert!(e.reason.contains("envoy.clusters.aggregate"), "{e}");
}

#[test]
fn round_robin_and_least_request_are_read_other_policies_refused() {
    let mut c = eds_cluster("api");
    c.lb_policy = cluster::LbPolicy::LeastRequest as i32;
    assert_eq!(
        decode(&c).unwrap().load_balancer,
        RawLoadBalancer::LeastRequest
    );
    for (policy, name) in [
        (cluster::LbPolicy::RingHash, "RING_HASH"),
        (cluster::LbPolicy::Random, "RANDOM"),
        (cluster::LbPolicy::Maglev, "MAGLEV"),
        (cluster::LbPolicy::ClusterProvided, "CLUSTER_PROVIDED"),
    ] {
        c.lb_policy = policy as i32;
        let e = refused(decode(&c));
        assert_eq!(e.field, "lb_policy");
        assert!(e.reason.starts_with(name), "{e}");
    }
    c.lb_policy = 99;
    assert_eq!(refused(decode(&c)).reason, "unknown value 99");

    let mut c = eds_cluster("api");
    c.load_balancing_policy = Some(LoadBalancingPolicy::default());
    assert_eq!(refused(decode(&c)).field, "load_balancing_policy");
}

#[test]
fn upstream_tls_names_the_identity_or_is_refused() {
    let id: crate::identity::SpiffeId = "spiffe://cluster.local/ns/a/sa/api".parse().unwrap();
    let mut c = eds_cluster("api");
    c.transport_socket = Some(crate::xds::identity::upstream_tls(&id));
    assert_eq!(decode(&c).unwrap().identity.as_deref(), Some(id.as_str()));

    // TLS Tern cannot honour (no identity to check) is refused, not spoken in plaintext.
    let mut c = eds_cluster("api");
    c.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: None,
    });
    assert_eq!(refused(decode(&c)).field, "transport_socket");

    let mut c = eds_cluster("api");
    c.transport_socket_matches = vec![cluster::TransportSocketMatch::default()];
    assert_eq!(refused(decode(&c)).field, "transport_socket_matches");
}

#[test]
fn http2_from_explicit_protocol_options_with_idle_timeout() {
    let mut options = explicit(
        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
            Http2ProtocolOptions::default(),
        ),
    );
    options.common_http_protocol_options = Some(CommonHttpProtocolOptions {
        idle_timeout: Some(pbuf::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    });
    let c = decode(&with_options(eds_cluster("grpc"), options)).unwrap();
    assert_eq!(c.protocol, Some(RawServiceProtocol::Http2));
    assert_eq!(c.idle_timeout.as_deref(), Some("30000ms"));

    let c = decode(&with_options(
        eds_cluster("web"),
        explicit(
            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            ),
        ),
    ))
    .unwrap();
    assert_eq!(c.protocol, Some(RawServiceProtocol::Http1));
    assert_eq!(c.idle_timeout, None);
}

#[test]
fn http2_from_the_deprecated_cluster_field() {
    let mut c = eds_cluster("grpc");
    #[allow(deprecated)]
    {
        c.http2_protocol_options = Some(Http2ProtocolOptions::default());
    }
    assert_eq!(
        decode(&c).unwrap().protocol,
        Some(RawServiceProtocol::Http2)
    );
}

#[test]
fn other_upstream_protocol_choices_are_refused() {
    let e = refused(decode(&with_options(
        eds_cluster("api"),
        explicit(
            http_protocol_options::explicit_http_config::ProtocolConfig::Http3ProtocolOptions(
                Http3ProtocolOptions::default(),
            ),
        ),
    )));
    assert_eq!(e.field, format!("{OPTIONS_FIELD}.explicit_http_config"));

    let auto = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::AutoConfig(
                http_protocol_options::AutoHttpConfig::default(),
            ),
        ),
        ..Default::default()
    };
    let e = refused(decode(&with_options(eds_cluster("api"), auto)));
    assert_eq!(
        e.field,
        format!("{OPTIONS_FIELD}.upstream_protocol_options")
    );

    let mut c = eds_cluster("api");
    c.typed_extension_protocol_options.insert(
        HTTP_PROTOCOL_OPTIONS.to_string(),
        pack_any(Http2ProtocolOptions::default()),
    );
    let e = refused(decode(&c));
    assert_eq!(e.field, OPTIONS_FIELD);
    assert!(e.reason.starts_with("expected"), "{e}");
}

#[test]
fn tern_metadata_sets_protocol_and_peak_ewma() {
    let mut c = eds_cluster("api");
    c.lb_policy = cluster::LbPolicy::LeastRequest as i32;
    c.metadata = Some(tern_metadata(&[
        ("protocol", "http2"),
        ("load_balancer", "peak_ewma"),
    ]));
    let d = decode(&c).unwrap();
    assert_eq!(d.protocol, Some(RawServiceProtocol::Http2));
    assert_eq!(d.load_balancer, RawLoadBalancer::PeakEwma);

    // Tern's metadata wins over Envoy's protocol options.
    let mut c = with_options(
        eds_cluster("db"),
        explicit(
            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            ),
        ),
    );
    c.metadata = Some(tern_metadata(&[("protocol", "tcp")]));
    assert_eq!(decode(&c).unwrap().protocol, Some(RawServiceProtocol::Tcp));

    for (lb, want) in [
        ("round_robin", RawLoadBalancer::RoundRobin),
        ("least_request", RawLoadBalancer::LeastRequest),
    ] {
        let mut c = eds_cluster("api");
        c.metadata = Some(tern_metadata(&[("load_balancer", lb)]));
        assert_eq!(decode(&c).unwrap().load_balancer, want);
    }
}

#[test]
fn unknown_tern_metadata_values_are_refused() {
    let mut c = eds_cluster("api");
    c.metadata = Some(tern_metadata(&[("protocol", "http3")]));
    let e = refused(decode(&c));
    assert_eq!(e.field, "metadata.filter_metadata.tern.protocol");
    assert!(e.reason.contains("http3"), "{e}");

    c.metadata = Some(tern_metadata(&[("load_balancer", "maglev")]));
    assert_eq!(
        refused(decode(&c)).field,
        "metadata.filter_metadata.tern.load_balancer"
    );

    // Other filters' metadata is none of Tern's business.
    let mut other = tern_metadata(&[("protocol", "quic")]);
    let v = other.filter_metadata.remove("tern").unwrap();
    other.filter_metadata.insert("istio".into(), v);
    c.metadata = Some(other);
    assert!(decode(&c).is_ok());
}

#[test]
fn connect_timeouts_round_up_to_milliseconds_and_unset_means_envoys_default() {
    let with_timeout = |seconds, nanos| {
        let mut c = eds_cluster("api");
        c.connect_timeout = Some(pbuf::Duration { seconds, nanos });
        decode(&c).unwrap().connect_timeout
    };
    assert_eq!(with_timeout(0, 1).as_deref(), Some("1ms"));
    assert_eq!(with_timeout(0, 1_500_000).as_deref(), Some("2ms"));
    assert_eq!(with_timeout(2, 0).as_deref(), Some("2000ms"));
    assert_eq!(with_timeout(0, 0).as_deref(), Some("5000ms"));
    assert_eq!(with_timeout(-1, 0).as_deref(), Some("5000ms"));
    let mut c = eds_cluster("api");
    c.connect_timeout = None;
    assert_eq!(
        decode(&c).unwrap().connect_timeout.as_deref(),
        Some("5000ms")
    );
}

#[test]
fn a_cluster_needs_a_name() {
    let e = refused(decode(&eds_cluster("")));
    assert_eq!((e.kind, e.field.as_str()), ("Cluster", "name"));
}
