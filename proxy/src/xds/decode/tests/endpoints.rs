//! ClusterLoadAssignments: health, priorities, duplicates, addresses and weights.

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, lb_endpoint,
};

use super::*;

fn decode(c: &ClusterLoadAssignment) -> Result<Vec<RawEndpoint>, InvalidResource> {
    XdsEndpoints::try_from(c).map(|e| {
        assert_eq!(e.name, c.cluster_name);
        e.endpoints
    })
}

fn addresses(endpoints: &[RawEndpoint]) -> Vec<&str> {
    endpoints.iter().map(|e| e.address.as_str()).collect()
}

fn with_health(mut e: LbEndpoint, h: HealthStatus) -> LbEndpoint {
    e.health_status = h as i32;
    e
}

#[test]
fn endpoints_and_weights() {
    let c = cla(
        "api",
        vec![locality(
            0,
            vec![
                lb_endpoint("10.0.0.1", 80),
                weighted(lb_endpoint("10.0.0.2", 80), 1),
                weighted(lb_endpoint("10.0.0.3", 80), 3),
                weighted(lb_endpoint("10.0.0.4", 80), 10_000),
            ],
        )],
    );
    let endpoints: Vec<_> = decode(&c)
        .unwrap()
        .into_iter()
        .map(|e| (e.address, e.weight))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("10.0.0.1:80".to_string(), None),
            ("10.0.0.2:80".to_string(), None),
            ("10.0.0.3:80".to_string(), Some(3)),
            ("10.0.0.4:80".to_string(), Some(10_000)),
        ]
    );
}

#[test]
fn unhealthy_draining_and_timed_out_endpoints_are_dropped() {
    let c = cla(
        "api",
        vec![locality(
            0,
            vec![
                with_health(lb_endpoint("10.0.0.1", 80), HealthStatus::Healthy),
                with_health(lb_endpoint("10.0.0.2", 80), HealthStatus::Unhealthy),
                with_health(lb_endpoint("10.0.0.3", 80), HealthStatus::Draining),
                with_health(lb_endpoint("10.0.0.4", 80), HealthStatus::Timeout),
                with_health(lb_endpoint("10.0.0.5", 80), HealthStatus::Unknown),
                with_health(lb_endpoint("10.0.0.6", 80), HealthStatus::Degraded),
            ],
        )],
    );
    assert_eq!(
        addresses(&decode(&c).unwrap()),
        ["10.0.0.1:80", "10.0.0.5:80", "10.0.0.6:80"]
    );
}

#[test]
fn only_the_lowest_priority_number_is_used() {
    let c = cla(
        "api",
        vec![
            locality(1, vec![lb_endpoint("10.0.1.1", 80)]),
            locality(0, vec![lb_endpoint("10.0.0.1", 80)]),
            locality(2, vec![lb_endpoint("10.0.2.1", 80)]),
            locality(0, vec![lb_endpoint("10.0.0.2", 80)]),
        ],
    );
    assert_eq!(
        addresses(&decode(&c).unwrap()),
        ["10.0.0.1:80", "10.0.0.2:80"]
    );
}

/// The doc of `endpoints_of` says "the most preferred priority that has any"; Envoy fails
/// over to priority 1 when priority 0 has no healthy endpoint.
#[test]

fn a_priority_without_usable_endpoints_fails_over_to_the_next() {
    let c = cla(
        "api",
        vec![
            locality(
                0,
                vec![with_health(
                    lb_endpoint("10.0.0.1", 80),
                    HealthStatus::Unhealthy,
                )],
            ),
            locality(0, Vec::new()),
            locality(1, vec![lb_endpoint("10.0.1.1", 80)]),
        ],
    );
    assert_eq!(addresses(&decode(&c).unwrap()), ["10.0.1.1:80"]);
}

#[test]
fn duplicate_addresses_are_kept_once() {
    let c = cla(
        "api",
        vec![
            locality(
                0,
                vec![
                    weighted(lb_endpoint("10.0.0.1", 80), 5),
                    lb_endpoint("10.0.0.2", 80),
                ],
            ),
            locality(0, vec![lb_endpoint("10.0.0.1", 80)]),
        ],
    );
    let endpoints = decode(&c).unwrap();
    assert_eq!(addresses(&endpoints), ["10.0.0.1:80", "10.0.0.2:80"]);
    assert_eq!(endpoints[0].weight, Some(5), "the first one is kept");
}

#[test]
fn ipv6_addresses_are_bracketed() {
    let c = cla(
        "api",
        vec![locality(
            0,
            vec![lb_endpoint("::1", 80), lb_endpoint("fd00::a", 8080)],
        )],
    );
    let endpoints = decode(&c).unwrap();
    assert_eq!(addresses(&endpoints), ["[::1]:80", "[fd00::a]:8080"]);
    for e in &endpoints {
        assert!(e.address.parse::<std::net::SocketAddr>().is_ok());
    }
}

#[test]
fn hostnames_named_ports_and_pipes_are_refused() {
    let c = cla(
        "api",
        vec![locality(
            0,
            vec![lb_endpoint("10.0.0.1", 80), lb_endpoint("api.internal", 80)],
        )],
    );
    let e = refused(decode(&c));
    assert_eq!(e.kind, "ClusterLoadAssignment");
    assert_eq!(e.name, "api");
    assert_eq!(
        e.field,
        "endpoints[0].lb_endpoints[1].endpoint.address.socket_address.address"
    );
    assert!(e.reason.contains("\"api.internal\""), "{e}");

    let mut named = lb_endpoint("10.0.0.1", 0);
    if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &mut named.host_identifier
        && let Some(address::Address::SocketAddress(sa)) =
            ep.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.port_specifier = Some(socket_address::PortSpecifier::NamedPort("http".into()));
    }
    let e = refused(decode(&cla("api", vec![locality(0, vec![named])])));
    assert_eq!(
        e.field,
        "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"
    );
    assert!(e.reason.contains("named ports"), "{e}");

    let mut pipe = lb_endpoint("10.0.0.1", 80);
    if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &mut pipe.host_identifier {
        ep.address = None;
    }
    let e = refused(decode(&cla("api", vec![locality(0, vec![pipe])])));
    assert_eq!(e.field, "endpoints[0].lb_endpoints[0].endpoint.address");

    let by_name = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::EndpointName("ep-1".into())),
        ..Default::default()
    };
    let e = refused(decode(&cla("api", vec![locality(0, vec![by_name])])));
    assert_eq!(e.field, "endpoints[0].lb_endpoints[0].endpoint");
}

#[test]
fn endpoint_weight_zero_or_above_10000_is_refused() {
    let c = cla(
        "api",
        vec![locality(0, vec![weighted(lb_endpoint("10.0.0.1", 80), 0)])],
    );
    let e = refused(decode(&c));
    assert_eq!(
        e.field,
        "endpoints[0].lb_endpoints[0].load_balancing_weight"
    );
    assert_eq!(
        e.to_string(),
        "ClusterLoadAssignment \"api\": endpoints[0].lb_endpoints[0].load_balancing_weight: \
         must be at least 1"
    );
    let c = cla(
        "api",
        vec![locality(
            0,
            vec![weighted(lb_endpoint("10.0.0.1", 80), 10_001)],
        )],
    );
    assert!(refused(decode(&c)).reason.contains("10001"));
}

#[test]
fn an_empty_assignment_is_no_endpoints() {
    assert!(decode(&cla("api", Vec::new())).unwrap().is_empty());
    assert!(
        decode(&cla("api", vec![locality(0, Vec::new())]))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn an_assignment_needs_a_cluster_name() {
    let e = refused(XdsEndpoints::try_from(&cla("", Vec::new())));
    assert_eq!(e.field, "cluster_name");
}
