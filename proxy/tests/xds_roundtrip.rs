//! The control plane's encoder and the proxy's decoder agree: a mesh encoded into Envoy
//! resources (`tern_control_plane::resources::encode`), decoded one resource at a time with the
//! proxy's `TryFrom`s and assembled, validates into the same config — listeners, routes with
//! their matches and backends, services with protocol, balancer, timeouts, endpoints and
//! weights, the identity of meshed services — and routes sample requests the same way.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use http::{HeaderMap, HeaderName, HeaderValue};
use tern_control_plane::resources::{Packed, encode};
use tern_proxy::config::{
    Backend, Config, DEFAULT_UPSTREAM_IDLE_TIMEOUT, ListenerKind, PathMatch, Route, Service,
    UpstreamProtocol, parse_yaml,
};
use tern_proxy::xds::decode::{XdsCluster, XdsEndpoints, XdsListener, XdsRoutes, decode_any};
use tern_proxy::xds::{Assembly, TypeKind, XdsState};

const STATIC: &str = include_str!("../../deploy/examples/static.yaml");

/// Hosts (exact, mixed case, wildcard), exact and prefix paths, several headers, weights over
/// two and three services, first match wins across all of them; an IPv6 listener.
const HOSTS: &str = r#"
listeners:
  - name: edge
    address: 127.0.0.1:0
    protocol: http
    request_header_timeout: 3s
    routes:
      - match: { host: api.local, path: /healthz }
        backends: [ { service: health } ]
      - match: { host: API.Local, path_prefix: /v2, headers: { x-canary: "1", x-team: blue } }
        backends: [ { service: api-v2, weight: 10 }, { service: api, weight: 90 } ]
      - match: { host: "*.example.com", path_prefix: /static/ }
        backends: [ { service: static, weight: 7 } ]
      - match: { host: "*.example.com" }
        backends: [ { service: api } ]
      - match: { host: api.local }
        backends: [ { service: api, weight: 1 }, { service: api-v2, weight: 1 }, { service: api-v3, weight: 3 } ]
      - match: { headers: { x-debug: "on" } }
        backends: [ { service: debug } ]
      - match: { path_prefix: / }
        backends: [ { service: fallback } ]
  - name: internal
    address: "[::1]:0"
    protocol: http
    routes:
      - match: { path: /exact }
        backends: [ { service: api-v3 } ]
      - backends: [ { service: api } ]
services:
  - { name: api, protocol: http1, endpoints: [ { address: "10.0.0.1:8080" }, { address: "10.0.0.2:8080", weight: 3 } ] }
  - { name: api-v2, protocol: http1, endpoints: [ { address: "10.0.1.1:8080" } ] }
  - { name: api-v3, protocol: http1, endpoints: [ { address: "10.0.2.1:8080", weight: 10000 } ] }
  - { name: health, protocol: http1, endpoints: [ { address: "10.0.3.1:8081" } ] }
  - { name: static, protocol: http1, endpoints: [ { address: "10.0.4.1:80" } ] }
  - { name: debug, protocol: http1, endpoints: [] }
  - { name: fallback, protocol: http1, endpoints: [ { address: "[fd00::1]:80" } ] }
"#;

/// Upstream protocols and balancers, timeouts, a TCP listener, a listener named like a
/// service (so that service gets no API listener) and a service nothing uses.
const PROTOCOLS: &str = r#"
listeners:
  - name: grpc
    address: 127.0.0.1:15001
    protocol: http
    mtls: { mode: permissive, peer_identity_header: x-peer-identity }
    routes:
      - match: { path_prefix: /helloworld.Greeter/ }
        backends: [ { service: greeter } ]
      - match: { path: /grpc.health.v1.Health/Check }
        backends: [ { service: api } ]
  - name: db
    address: 0.0.0.0:15432
    protocol: tcp
    service: postgres
    mtls: { mode: strict, authorization: { default: deny, namespaces: [shop], identities: ["spiffe://cluster.local/ns/ops/sa/backup"] } }
  - name: mixed
    address: 127.0.0.1:15006
    protocol: auto
    service: postgres
    detect_timeout: 150ms
    routes:
      - backends: [ { service: api } ]
  - name: api
    address: 127.0.0.1:0
    protocol: http
    request_header_timeout: 1m30s
    routes:
      - backends: [ { service: api } ]
services:
  - name: greeter
    protocol: http2
    load_balancer: peak_ewma
    connect_timeout: 250ms
    idle_timeout: 30s
    # Meshed: over xDS, the cluster's TLS transport socket names the endpoints' SPIFFE ID.
    identity: spiffe://cluster.local/ns/grpc/sa/greeter
    endpoints: [ { address: "127.0.0.1:50051", weight: 2 }, { address: "[::1]:50051" } ]
  - name: postgres
    protocol: tcp
    load_balancer: least_request
    connect_timeout: 2s
    idle_timeout: 1m
    identity: spiffe://cluster.local/ns/db/sa/postgres
    endpoints: [ { address: "10.0.0.5:5432" } ]
  - name: api
    protocol: http1
    load_balancer: least_request
    connect_timeout: 1500ms
    idle_timeout: 100ms
    endpoints: [ { address: "10.0.0.1:8080", weight: 10000 }, { address: "10.0.0.2:8080" } ]
  - name: unused
    protocol: http1
    load_balancer: round_robin
    endpoints: []
"#;

/// What `tests/xds.rs` serves.
const MINIMAL: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - backends: [ { service: api } ]
services:
  - name: api
    protocol: http1
    endpoints: [ { address: "127.0.0.1:9001", weight: 1 } ]
"#;

/// Route timeouts and retries, circuit breakers, outlier detection and health checks.
const RESILIENCE: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:10080
    protocol: http
    routes:
      - match: { path_prefix: /slow }
        backends: [ { service: api } ]
        timeout: 30s
      - backends: [ { service: api, weight: 3 }, { service: api-v2, weight: 1 } ]
        timeout: 2s
        retry: { attempts: 3, on: [unavailable, 5xx, connect-failure, reset], status_codes: [409],
                 per_try_timeout: 500ms, backoff: { base: 25ms, max: 250ms },
                 budget: { ratio: 0.25, min_per_second: 7 } }
  - name: db
    address: 127.0.0.1:15432
    protocol: tcp
    service: db
services:
  - name: api
    protocol: http1
    circuit_breaker: { max_connections: 100, max_pending_requests: 10, max_requests: 50, max_retries: 2 }
    outlier_detection: { consecutive_5xx: 4, consecutive_gateway_failure: 3, consecutive_connect_failure: 2,
                         interval: 2s, base_ejection_time: 10s, max_ejection_time: 60s, max_ejection_percent: 40 }
    health_check: { http: { path: /healthz, expected_statuses: [200, 204] }, interval: 3s, timeout: 700ms,
                    healthy_threshold: 1, unhealthy_threshold: 4 }
    endpoints: [ { address: 127.0.0.1:9001 } ]
  - name: api-v2
    protocol: http2
    endpoints: [ { address: 127.0.0.1:9002 } ]
  - name: db
    protocol: tcp
    circuit_breaker: { max_connections: 5 }
    health_check: { tcp: {}, interval: 1s }
    endpoints: [ { address: 127.0.0.1:5432 } ]
"#;

/// Per-route rate limits (every key kind, fractional and large rates, the default burst) and
/// faults (fractional percents, a header condition), beside a retry budget on one route; an
/// auto listener; tracing.
const TRAFFIC: &str = r#"
telemetry:
  tracing: { otlp_endpoint: "http://127.0.0.1:4317", sample_ratio: 0.125, service_name: edge }
listeners:
  - name: web
    address: 127.0.0.1:10080
    protocol: http
    routes:
      - match: { path_prefix: /limited }
        backends: [ { service: api } ]
        rate_limit: { requests_per_second: 2.5, burst: 2, key: "header:x-user" }
      - match: { path_prefix: /per-ip }
        backends: [ { service: api } ]
        rate_limit: { requests_per_second: 1000 }
      - match: { path_prefix: /odd }
        backends: [ { service: api } ]
        rate_limit: { requests_per_second: 12.345, burst: 3, key: none }
      - match: { path_prefix: /slow }
        backends: [ { service: api } ]
        rate_limit: { requests_per_second: 0.1, burst: 1, key: peer_identity }
      - match: { path_prefix: /chaos }
        backends: [ { service: api } ]
        fault: { delay: { percent: 0.5, duration: 150ms }, abort: { percent: 12.25, status: 503 }, header: X-Chaos }
      - backends: [ { service: api } ]
        retry: { attempts: 2, budget: { ratio: 0.5, min_per_second: 3 } }
        rate_limit: { requests_per_second: 10, burst: 20, key: client_ip }
        fault: { abort: { percent: 100, status: 418 } }
  - name: mixed
    address: 127.0.0.1:10081
    protocol: auto
    service: db
    routes:
      - backends: [ { service: api } ]
        fault: { delay: { percent: 33.3333, duration: 1s } }
services:
  - { name: api, protocol: http1, endpoints: [ { address: "127.0.0.1:9001" } ] }
  - { name: db, protocol: tcp, endpoints: [ { address: "127.0.0.1:5432" } ] }
"#;

fn fixtures() -> [(&'static str, &'static str); 6] {
    [
        ("deploy/examples/static.yaml", STATIC),
        ("hosts", HOSTS),
        ("protocols", PROTOCOLS),
        ("minimal", MINIMAL),
        ("resilience", RESILIENCE),
        ("traffic", TRAFFIC),
    ]
}

/// Decodes every resource the way the ADS client does and assembles them.
fn decode_all(resources: &BTreeMap<TypeKind, Vec<Packed>>) -> XdsState {
    let mut state = XdsState::default();
    for (kind, list) in resources {
        for p in list {
            let fail = |e: &dyn std::fmt::Display| -> ! {
                panic!("the proxy refuses {kind:?} {:?}: {e}", p.name)
            };
            match kind {
                TypeKind::Listener => {
                    let pb: Listener = decode_any(&p.any, "Listener").unwrap_or_else(|e| fail(&e));
                    let l = XdsListener::try_from(&pb).unwrap_or_else(|e| fail(&e));
                    assert_eq!(l.name(), p.name);
                    state.listeners.insert(p.name.clone(), l);
                }
                TypeKind::Route => {
                    let pb: RouteConfiguration =
                        decode_any(&p.any, "RouteConfiguration").unwrap_or_else(|e| fail(&e));
                    let r = XdsRoutes::try_from(&pb).unwrap_or_else(|e| fail(&e));
                    assert_eq!(r.name, p.name);
                    state.routes.insert(p.name.clone(), r);
                }
                TypeKind::Cluster => {
                    let pb: Cluster = decode_any(&p.any, "Cluster").unwrap_or_else(|e| fail(&e));
                    let c = XdsCluster::try_from(&pb).unwrap_or_else(|e| fail(&e));
                    assert_eq!(c.name, p.name);
                    state.clusters.insert(p.name.clone(), c);
                }
                TypeKind::Endpoint => {
                    let pb: ClusterLoadAssignment =
                        decode_any(&p.any, "ClusterLoadAssignment").unwrap_or_else(|e| fail(&e));
                    let e = XdsEndpoints::try_from(&pb).unwrap_or_else(|e| fail(&e));
                    assert_eq!(e.name, p.name);
                    state.endpoints.insert(p.name.clone(), e);
                }
            }
        }
    }
    state
}

fn round_trip(config: &Config) -> Config {
    let resources = encode(config);
    let state = decode_all(&resources);
    // Everything the listeners and clusters refer to was sent, and nothing else.
    let sent = |kind| -> BTreeSet<String> {
        resources
            .get(&kind)
            .map(|l| l.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(state.wanted_routes(), sent(TypeKind::Route));
    assert_eq!(state.wanted_endpoints(), sent(TypeKind::Endpoint));
    let mut pruned = state.clone();
    pruned.prune();
    assert_eq!(pruned, state, "the encoder sends nothing unreferenced");
    match state.assemble() {
        Assembly::Ready(raw) => Config::try_from(raw).expect("the decoded mesh validates"),
        Assembly::Waiting(what) => panic!("a full encoding still waits for {what}"),
    }
}

/// The config with what the encoding legitimately does not keep made canonical.
fn normalized(config: &Config) -> (BTreeMap<String, tern_proxy::config::Listener>, Vec<Service>) {
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if let ListenerKind::Http { routes } = &mut l.kind {
                routes.iter_mut().for_each(normalize_route);
            }
            (l.name.to_string(), l)
        })
        .collect();
    let mut services: Vec<Service> = config
        .services
        .iter()
        .map(|s| {
            let mut s = s.clone();
            // A TCP service has no connection pool, so its idle timeout means nothing and
            // the encoder does not send it.
            if s.protocol == UpstreamProtocol::Tcp {
                s.idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT;
            }
            s
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    (listeners, services)
}

fn normalize_route(r: &mut Route) {
    // Retry conditions are a set; Envoy's `retry_on` string lists them in its own order.
    if let Some(retry) = &mut r.retry {
        retry.on.sort();
    }
    // The weight of a lone backend picks nothing; a cluster route has none.
    if let [only] = r.backends.as_mut_slice() {
        only.weight = 1;
    }
    // A "/" prefix matches every path, as no path condition does.
    if r.matcher.path == Some(PathMatch::Prefix("/".into())) {
        r.matcher.path = None;
    }
}

/// The backends the first matching route of each HTTP listener sends a request to.
fn decisions(config: &Config, requests: &[Sample]) -> Vec<(String, Option<Vec<Backend>>)> {
    let mut out = Vec::new();
    let mut listeners: Vec<_> = config.listeners.iter().collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    for l in listeners {
        let ListenerKind::Http { routes } = &l.kind else {
            continue;
        };
        for s in requests {
            let mut headers = HeaderMap::new();
            for (k, v) in s.headers {
                headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            let picked = routes
                .iter()
                .find(|r| tern_proxy::http::route::matches(&r.matcher, s.host, s.path, &headers))
                .map(|r| {
                    let mut r = r.clone();
                    normalize_route(&mut r);
                    r.backends
                });
            out.push((format!("{} {s:?}", l.name), picked));
        }
    }
    out
}

#[derive(Debug)]
struct Sample {
    host: Option<&'static str>,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const SAMPLES: &[Sample] = &[
    Sample {
        host: Some("api.local"),
        path: "/healthz",
        headers: &[],
    },
    Sample {
        host: Some("api.local"),
        path: "/healthz/deep",
        headers: &[],
    },
    Sample {
        host: Some("api.local"),
        path: "/v2/users",
        headers: &[("x-canary", "1"), ("x-team", "blue")],
    },
    Sample {
        host: Some("api.local"),
        path: "/v2/users",
        headers: &[("x-canary", "1")],
    },
    Sample {
        host: Some("cdn.example.com"),
        path: "/static/app.js",
        headers: &[],
    },
    Sample {
        host: Some("a.b.example.com"),
        path: "/other",
        headers: &[],
    },
    Sample {
        host: Some("example.com"),
        path: "/static/app.js",
        headers: &[],
    },
    Sample {
        host: Some("other"),
        path: "/",
        headers: &[("x-debug", "on")],
    },
    Sample {
        host: None,
        path: "/exact",
        headers: &[],
    },
    Sample {
        host: None,
        path: "/exact/not",
        headers: &[],
    },
    Sample {
        host: Some("x"),
        path: "/helloworld.Greeter/SayHello",
        headers: &[],
    },
    Sample {
        host: Some("x"),
        path: "/grpc.health.v1.Health/Check",
        headers: &[],
    },
];

#[test]
fn meshes_survive_encode_then_decode() {
    for (name, yaml) in fixtures() {
        let original = parse_yaml(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let decoded = round_trip(&original);
        let (want_listeners, want_services) = normalized(&original);
        let (got_listeners, got_services) = normalized(&decoded);
        assert_eq!(
            got_listeners.keys().collect::<Vec<_>>(),
            want_listeners.keys().collect::<Vec<_>>(),
            "{name}: listeners"
        );
        for (l, want) in &want_listeners {
            assert_eq!(&got_listeners[l], want, "{name}: listener {l}");
        }
        assert_eq!(
            got_services.iter().map(|s| &*s.name).collect::<Vec<_>>(),
            want_services.iter().map(|s| &*s.name).collect::<Vec<_>>(),
            "{name}: services"
        );
        for (got, want) in got_services.iter().zip(&want_services) {
            assert_eq!(got, want, "{name}: service {}", want.name);
        }
        assert_eq!(
            decisions(&decoded, SAMPLES),
            decisions(&original, SAMPLES),
            "{name}: routing decisions"
        );
    }
}

/// The checks above compare after normalizing; these say the interesting parts outright.
#[test]
fn the_details_that_travel_in_tern_metadata_and_protocol_options_arrive() {
    let decoded = round_trip(&parse_yaml(PROTOCOLS).unwrap());
    let service = |name: &str| {
        decoded
            .services
            .iter()
            .find(|s| &*s.name == name)
            .unwrap()
            .clone()
    };
    let greeter = service("greeter");
    assert_eq!(greeter.protocol, UpstreamProtocol::Http2);
    assert_eq!(
        greeter.load_balancer,
        tern_proxy::config::LoadBalancerKind::PeakEwma
    );
    assert_eq!(greeter.connect_timeout.as_millis(), 250);
    assert_eq!(greeter.idle_timeout.as_secs(), 30);
    let weights: Vec<_> = greeter
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("127.0.0.1:50051".to_string(), 2),
            ("[::1]:50051".to_string(), 1)
        ]
    );
    let postgres = service("postgres");
    assert_eq!(postgres.protocol, UpstreamProtocol::Tcp);
    assert_eq!(
        postgres.load_balancer,
        tern_proxy::config::LoadBalancerKind::LeastRequest
    );
    assert_eq!(postgres.connect_timeout.as_secs(), 2);
    let api = service("api");
    assert_eq!(api.idle_timeout.as_millis(), 100);
    assert_eq!(api.endpoints[0].weight, 10_000);
    let listener = |name: &str| {
        decoded
            .listeners
            .iter()
            .find(|l| &*l.name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(listener("api").header_timeout.as_secs(), 90);
    assert_eq!(
        listener("db").kind,
        ListenerKind::Tcp {
            service: "postgres".into()
        }
    );
    assert_eq!(listener("db").address.to_string(), "0.0.0.0:15432");
}

/// Rate limits, faults and tracing arrive as written: compared outright, not normalized.
#[test]
fn rate_limits_faults_and_tracing_arrive_as_written() {
    use tern_proxy::traffic::fault::FaultConfig;
    use tern_proxy::traffic::rate_limit::{RateKey, RateLimitConfig};

    let original = parse_yaml(TRAFFIC).unwrap();
    let decoded = round_trip(&original);
    let routes = |config: &Config, listener: &str| -> Vec<Route> {
        let l = config
            .listeners
            .iter()
            .find(|l| &*l.name == listener)
            .unwrap();
        match &l.kind {
            ListenerKind::Http { routes } | ListenerKind::Auto { routes, .. } => routes.clone(),
            ListenerKind::Tcp { .. } => panic!("{listener} is HTTP"),
        }
    };
    for listener in ["web", "mixed"] {
        let policy = |c: &Config| -> Vec<(Option<RateLimitConfig>, Option<FaultConfig>)> {
            routes(c, listener)
                .into_iter()
                .map(|r| (r.rate_limit, r.fault))
                .collect()
        };
        assert_eq!(policy(&decoded), policy(&original), "{listener}");
    }
    let web = routes(&decoded, "web");
    let limit = |i: usize| web[i].rate_limit.clone().unwrap();
    assert_eq!(
        limit(0),
        RateLimitConfig {
            requests_per_second: 2.5,
            burst: 2,
            key: RateKey::Header(HeaderName::from_static("x-user")),
        }
    );
    assert_eq!(limit(1).burst, 1000, "the default burst travels explicitly");
    assert_eq!(limit(1).key, RateKey::ClientIp, "the default key too");
    assert_eq!(limit(2).requests_per_second, 12.345);
    assert_eq!(limit(3).requests_per_second, 0.1);
    assert_eq!(limit(3).key, RateKey::PeerIdentity);
    let chaos = web[4].fault.clone().unwrap();
    assert_eq!(
        chaos.delay,
        Some((0.5, std::time::Duration::from_millis(150)))
    );
    assert_eq!(chaos.abort, Some((12.25, 503)));
    assert_eq!(chaos.header, Some(HeaderName::from_static("x-chaos")));
    assert_eq!(web[5].retry.as_ref().unwrap().budget.ratio, 0.5);
    let tracing = decoded.tracing.clone().expect("tracing travels");
    assert_eq!(Some(&tracing), original.tracing.as_ref());
    assert_eq!(tracing.otlp_endpoint, "http://127.0.0.1:4317");
    assert_eq!(tracing.sample_ratio, 0.125);
    assert_eq!(tracing.service_name, "edge");

    // A mesh without tracing sends none, and the proxy keeps none.
    let plain = round_trip(&parse_yaml(MINIMAL).unwrap());
    assert!(plain.tracing.is_none());
}

#[test]
fn each_http_service_gets_an_api_listener_unless_a_listener_has_its_name() {
    let config = parse_yaml(PROTOCOLS).unwrap();
    let state = decode_all(&encode(&config));
    let api: BTreeSet<&str> = state
        .listeners
        .values()
        .filter(|l| matches!(l, XdsListener::Api { .. }))
        .map(|l| l.name())
        .collect();
    assert_eq!(api, BTreeSet::from(["greeter", "unused"]));
    assert!(matches!(state.listeners["api"], XdsListener::Http { .. }));
    // API listeners are for gRPC clients: the proxy binds only the mesh's own listeners.
    let Assembly::Ready(raw) = state.assemble() else {
        panic!("ready")
    };
    let bound: BTreeSet<&str> = raw.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(bound, BTreeSet::from(["api", "db", "grpc", "mixed"]));
}

/// The control plane versions each resource by a hash of its bytes and pushes those whose
/// version changed: publishing the same mesh again must keep every version, or unchanged
/// resources are pushed to every proxy again. (A Cluster's metadata is a protobuf `Struct`,
/// a `HashMap` that prost writes in iteration order, which differs between instances; so are
/// a route's metadata and its `typed_per_filter_config`.)
#[test]
fn republishing_the_same_mesh_keeps_every_resource_version() {
    for (name, yaml) in [("protocols", PROTOCOLS), ("traffic", TRAFFIC)] {
        republish(name, yaml);
    }
}

fn republish(fixture: &str, yaml: &str) {
    use tern_control_plane::cache::Resources;

    let config = parse_yaml(yaml).unwrap();
    let now = tokio::time::Instant::now();
    let mut previous = Resources::build(&config, 1, now, &Resources::empty());
    for version in 2..22 {
        let next = Resources::build(&config, version, now, &previous);
        for kind in TypeKind::ALL {
            for (name, r) in previous.of(kind) {
                assert_eq!(
                    next.of(kind)[name].version,
                    r.version,
                    "{fixture}: {kind:?} {name:?} looks changed in version {version}"
                );
            }
        }
        previous = next;
    }
}
