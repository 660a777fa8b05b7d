//! Resilience settings survive the trip through Envoy's fields: what the control plane encodes
//! (RouteAction.timeout / retry_policy, Cluster.circuit_breakers / outlier_detection /
//! health_checks) the proxy decodes back to the same validated config.
#![allow(clippy::unwrap_used)]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use tern_proxy::config::{Config, RawConfig, parse_yaml};
use tern_proxy::xds::TypeKind;
use tern_proxy::xds::decode::{XdsCluster, XdsRoutes};

const MESH: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:10080
    protocol: http
    routes:
      - match: { path_prefix: /slow }
        backends: [ { service: api } ]
      - backends: [ { service: api } ]
        timeout: 2s
        retry: { attempts: 3, on: [5xx, connect-failure, reset, unavailable], status_codes: [409],
                 per_try_timeout: 500ms, backoff: { base: 25ms, max: 250ms },
                 budget: { ratio: 0.25, min_per_second: 7 } }
services:
  - name: api
    protocol: http1
    circuit_breaker: { max_connections: 100, max_pending_requests: 10, max_requests: 50, max_retries: 2 }
    outlier_detection: { consecutive_5xx: 4, consecutive_gateway_failure: 3, consecutive_connect_failure: 2,
                         interval: 2s, base_ejection_time: 10s, max_ejection_time: 60s, max_ejection_percent: 40 }
    health_check: { http: { path: /healthz, expected_statuses: [200, 204] }, interval: 3s, timeout: 700ms,
                    healthy_threshold: 1, unhealthy_threshold: 4 }
    endpoints: [ { address: 127.0.0.1:9001 } ]
  - name: db
    protocol: tcp
    health_check: { tcp: {}, interval: 1s }
    endpoints: [ { address: 127.0.0.1:5432 } ]
"#;

#[test]
fn policies_survive_encode_and_decode() {
    let original = parse_yaml(MESH).unwrap();
    let encoded = tern_control_plane::resources::encode(&original);

    let mut raw = RawConfig::default();
    for p in &encoded[&TypeKind::Cluster] {
        let cluster = Cluster::decode(p.any.value.as_slice()).unwrap();
        let c = XdsCluster::try_from(&cluster).unwrap();
        raw.services.push(tern_proxy::config::RawService {
            name: c.name,
            protocol: c.protocol.unwrap(),
            load_balancer: c.load_balancer,
            connect_timeout: c.connect_timeout,
            idle_timeout: c.idle_timeout,
            endpoints: vec![tern_proxy::config::RawEndpoint {
                address: "127.0.0.1:1".into(),
                weight: None,
            }],
            circuit_breaker: c.circuit_breaker,
            outlier_detection: c.outlier_detection,
            health_check: c.health_check,
            identity: None,
            original_destination: None,
        });
    }
    let rc = RouteConfiguration::decode(encoded[&TypeKind::Route][0].any.value.as_slice()).unwrap();
    let routes = XdsRoutes::try_from(&rc).unwrap();
    raw.listeners.push(tern_proxy::config::RawListener {
        name: "web".into(),
        address: "127.0.0.1:10080".into(),
        protocol: tern_proxy::config::RawListenerProtocol::Http,
        routes: routes.routes,
        service: None,
        request_header_timeout: None,
        detect_timeout: None,
        direction: None,
        max_connections: None,
        mtls: None,
        bind: None,
        original_destination: None,
        tls: None,
    });
    let decoded = Config::try_from(raw).unwrap();

    let by_name = |c: &Config, n: &str| c.services.iter().find(|s| &*s.name == n).cloned().unwrap();
    for name in ["api", "db"] {
        let (a, b) = (by_name(&original, name), by_name(&decoded, name));
        assert_eq!(a.circuit_breaker, b.circuit_breaker, "{name}");
        assert_eq!(a.outlier_detection, b.outlier_detection, "{name}");
        assert_eq!(a.health_check, b.health_check, "{name}");
    }
    let routes = |c: &Config| match &c.listeners[0].kind {
        tern_proxy::config::ListenerKind::Http { routes } => routes.clone(),
        _ => panic!("http listener"),
    };
    let (a, b) = (routes(&original), routes(&decoded));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.timeout, y.timeout);
        let (mut px, mut py) = (x.retry.clone(), y.retry.clone());
        if let (Some(px), Some(py)) = (&mut px, &mut py) {
            px.on.sort();
            py.on.sort();
        }
        assert_eq!(px, py);
    }
    assert!(a[1].retry.is_some() && a[0].retry.is_none());
}
