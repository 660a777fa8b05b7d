use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use tern_proxy::config::{
    Config, RawConfig, RawEndpoint, RawLoadBalancer, RawService, RawServiceProtocol,
};

use super::{TrustDomain, Warning, services_from, translate};

mod identity;

fn td() -> TrustDomain {
    "cluster.local".parse().expect("valid trust domain")
}

/// A Service as the API server returns it; `ports` is the JSON of `spec.ports`.
fn service(namespace: &str, name: &str, ports: Value) -> Service {
    service_with(namespace, name, json!({}), json!({ "ports": ports }))
}

fn service_with(namespace: &str, name: &str, annotations: Value, spec: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": { "namespace": namespace, "name": name, "annotations": annotations },
        "spec": spec,
    }))
    .expect("valid Service")
}

/// An EndpointSlice of `service`; `ports` and `endpoints` are the JSON of those fields.
fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    slice_with(
        namespace,
        name,
        service,
        "IPv4",
        json!({}),
        ports,
        endpoints,
    )
}

fn slice_with(
    namespace: &str,
    name: &str,
    service: &str,
    address_type: &str,
    annotations: Value,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": { "kubernetes.io/service-name": service },
            "annotations": annotations,
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("valid EndpointSlice")
}

fn ready(ip: &str) -> Value {
    json!({ "addresses": [ip], "conditions": { "ready": true } })
}

fn mesh(name: &str, protocol: RawServiceProtocol, endpoints: &[(&str, Option<u32>)]) -> RawService {
    RawService {
        name: name.to_string(),
        protocol,
        load_balancer: RawLoadBalancer::RoundRobin,
        connect_timeout: None,
        idle_timeout: None,
        endpoints: endpoints
            .iter()
            .map(|(address, weight)| RawEndpoint {
                address: address.to_string(),
                weight: *weight,
            })
            .collect(),
        circuit_breaker: None,
        outlier_detection: None,
        health_check: None,
        identity: None,
        original_destination: None,
    }
}

struct Case {
    name: &'static str,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    want: Vec<RawService>,
}

fn cases() -> Vec<Case> {
    use RawServiceProtocol::{Http1, Http2, Tcp};
    vec![
        Case {
            name: "only ready endpoints; a missing ready condition means ready",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![slice(
                "shop",
                "web-abc",
                "web",
                json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
                json!([
                    ready("10.0.0.1"),
                    { "addresses": ["10.0.0.2"], "conditions": { "ready": false } },
                    { "addresses": ["10.0.0.3"] },
                    { "addresses": ["10.0.0.4"], "conditions": {} },
                    { "addresses": ["10.0.0.5"],
                      "conditions": { "ready": false, "serving": true, "terminating": true } },
                    { "addresses": ["10.0.0.6"],
                      "conditions": { "ready": false, "serving": false, "terminating": false } },
                ]),
            )],
            want: vec![mesh(
                "web.shop.svc.cluster.local:80",
                Http1,
                &[
                    ("10.0.0.1:8080", None),
                    ("10.0.0.3:8080", None),
                    ("10.0.0.4:8080", None),
                ],
            )],
        },
        Case {
            name: "a named targetPort resolving to different numbers in different slices",
            services: vec![service(
                "shop",
                "api",
                json!([{ "name": "grpc", "port": 9000, "targetPort": "grpc" }]),
            )],
            slices: vec![
                slice(
                    "shop",
                    "api-old",
                    "api",
                    json!([{ "name": "grpc", "port": 7000 }]),
                    json!([ready("10.0.1.1"), ready("10.0.1.2")]),
                ),
                slice(
                    "shop",
                    "api-new",
                    "api",
                    json!([{ "name": "grpc", "port": 7100 }]),
                    json!([ready("10.0.1.3")]),
                ),
            ],
            want: vec![mesh(
                "api.shop.svc.cluster.local:9000",
                Http2,
                &[
                    ("10.0.1.1:7000", None),
                    ("10.0.1.2:7000", None),
                    ("10.0.1.3:7100", None),
                ],
            )],
        },
        Case {
            name: "each ServicePort takes the slice port of the same name",
            services: vec![service(
                "shop",
                "cart",
                json!([
                    { "name": "http-web", "port": 80, "targetPort": 8080 },
                    { "name": "admin", "port": 9901, "targetPort": 9901 },
                ]),
            )],
            slices: vec![slice(
                "shop",
                "cart-1",
                "cart",
                json!([{ "name": "admin", "port": 9901 }, { "name": "http-web", "port": 8080 }]),
                json!([ready("10.0.2.1")]),
            )],
            want: vec![
                mesh(
                    "cart.shop.svc.cluster.local:80",
                    Http1,
                    &[("10.0.2.1:8080", None)],
                ),
                mesh(
                    "cart.shop.svc.cluster.local:9901",
                    Tcp,
                    &[("10.0.2.1:9901", None)],
                ),
            ],
        },
        Case {
            name: "an unnamed single port matches the slice port without a name",
            services: vec![service("db", "pg", json!([{ "port": 5432 }]))],
            slices: vec![
                slice(
                    "db",
                    "pg-1",
                    "pg",
                    json!([{ "port": 5432 }]),
                    json!([ready("10.0.3.1")]),
                ),
                slice(
                    "db",
                    "pg-2",
                    "pg",
                    json!([{ "name": "", "port": 5433 }]),
                    json!([ready("10.0.3.2")]),
                ),
            ],
            want: vec![mesh(
                "pg.db.svc.cluster.local:5432",
                Tcp,
                &[("10.0.3.1:5432", None), ("10.0.3.2:5433", None)],
            )],
        },
        Case {
            name: "dual stack: IPv4 and IPv6 slices, IPv6 bracketed",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice(
                    "shop",
                    "web-v4",
                    "web",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.1")]),
                ),
                slice_with(
                    "shop",
                    "web-v6",
                    "web",
                    "IPv6",
                    json!({}),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("fd00::1"), ready("fd00::2")]),
                ),
            ],
            want: vec![mesh(
                "web.shop.svc.cluster.local:80",
                Http1,
                &[
                    ("10.0.0.1:8080", None),
                    ("[fd00::1]:8080", None),
                    ("[fd00::2]:8080", None),
                ],
            )],
        },
        Case {
            name: "a weight annotation weighs its slice's endpoints; an invalid one is ignored",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice(
                    "shop",
                    "web-stable",
                    "web",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.1")]),
                ),
                slice_with(
                    "shop",
                    "web-canary",
                    "web",
                    "IPv4",
                    json!({ "tern.dev/weight": "10" }),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.2")]),
                ),
                slice_with(
                    "shop",
                    "web-broken",
                    "web",
                    "IPv4",
                    json!({ "tern.dev/weight": "0" }),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.3")]),
                ),
            ],
            want: vec![mesh(
                "web.shop.svc.cluster.local:80",
                Http1,
                &[
                    ("10.0.0.1:8080", None),
                    ("10.0.0.2:8080", Some(10)),
                    ("10.0.0.3:8080", None),
                ],
            )],
        },
        Case {
            name: "an address in two slices is served once; the first slice by name decides",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice_with(
                    "shop",
                    "web-b",
                    "web",
                    "IPv4",
                    json!({ "tern.dev/weight": "5" }),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.1"), ready("10.0.0.2")]),
                ),
                slice_with(
                    "shop",
                    "web-a",
                    "web",
                    "IPv4",
                    json!({ "tern.dev/weight": "7" }),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.0.0.2"), ready("10.0.0.3")]),
                ),
            ],
            want: vec![mesh(
                "web.shop.svc.cluster.local:80",
                Http1,
                &[
                    ("10.0.0.1:8080", Some(5)),
                    ("10.0.0.2:8080", Some(7)),
                    ("10.0.0.3:8080", Some(7)),
                ],
            )],
        },
        Case {
            name: "ExternalName services are skipped; headless ones are served",
            services: vec![
                service_with(
                    "shop",
                    "legacy",
                    json!({}),
                    json!({ "type": "ExternalName", "externalName": "legacy.example.com",
                            "ports": [{ "name": "http", "port": 80 }] }),
                ),
                service_with(
                    "shop",
                    "peers",
                    json!({}),
                    json!({ "clusterIP": "None", "ports": [{ "name": "tcp-gossip", "port": 7946 }] }),
                ),
            ],
            slices: vec![
                slice(
                    "shop",
                    "legacy-1",
                    "legacy",
                    json!([{ "name": "http", "port": 80 }]),
                    json!([ready("10.0.9.9")]),
                ),
                slice(
                    "shop",
                    "peers-1",
                    "peers",
                    json!([{ "name": "tcp-gossip", "port": 7946 }]),
                    json!([ready("10.0.4.1"), ready("10.0.4.2")]),
                ),
            ],
            want: vec![mesh(
                "peers.shop.svc.cluster.local:7946",
                Tcp,
                &[("10.0.4.1:7946", None), ("10.0.4.2:7946", None)],
            )],
        },
        Case {
            name: "UDP and SCTP ports are skipped; the TCP port of the same number is kept",
            services: vec![service(
                "kube-system",
                "dns",
                json!([
                    { "name": "dns", "port": 53, "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
                    { "name": "sig", "port": 3868, "protocol": "SCTP" },
                ]),
            )],
            slices: vec![slice(
                "kube-system",
                "dns-1",
                "dns",
                json!([
                    { "name": "dns", "port": 53, "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
                    { "name": "sig", "port": 3868, "protocol": "SCTP" },
                ]),
                json!([ready("10.0.5.1")]),
            )],
            want: vec![mesh(
                "dns.kube-system.svc.cluster.local:53",
                Tcp,
                &[("10.0.5.1:53", None)],
            )],
        },
        Case {
            name: "slices of another namespace, another service or without the label stay out",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice(
                    "other",
                    "web-1",
                    "web",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.1.0.1")]),
                ),
                slice(
                    "shop",
                    "api-1",
                    "api",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("10.1.0.2")]),
                ),
                serde_json::from_value(json!({
                    "metadata": { "namespace": "shop", "name": "unlabelled" },
                    "addressType": "IPv4",
                    "ports": [{ "name": "http", "port": 8080 }],
                    "endpoints": [ready("10.1.0.3")],
                }))
                .expect("valid EndpointSlice"),
            ],
            want: vec![mesh("web.shop.svc.cluster.local:80", Http1, &[])],
        },
        Case {
            name: "FQDN slices and non-IP addresses are skipped",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice_with(
                    "shop",
                    "web-fqdn",
                    "web",
                    "FQDN",
                    json!({}),
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("web.example.com")]),
                ),
                slice(
                    "shop",
                    "web-1",
                    "web",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([ready("not-an-ip"), ready("10.0.0.1")]),
                ),
            ],
            want: vec![mesh(
                "web.shop.svc.cluster.local:80",
                Http1,
                &[("10.0.0.1:8080", None)],
            )],
        },
        Case {
            name: "a slice without the port, or without endpoints, contributes nothing",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }]),
            )],
            slices: vec![
                slice(
                    "shop",
                    "web-1",
                    "web",
                    json!([{ "name": "metrics", "port": 9090 }]),
                    json!([ready("10.0.0.1")]),
                ),
                slice(
                    "shop",
                    "web-2",
                    "web",
                    json!([{ "name": "http" }]),
                    json!([ready("10.0.0.2")]),
                ),
                slice(
                    "shop",
                    "web-3",
                    "web",
                    json!([]),
                    json!([ready("10.0.0.3")]),
                ),
                slice(
                    "shop",
                    "web-4",
                    "web",
                    json!([{ "name": "http", "port": 8080 }]),
                    json!([]),
                ),
            ],
            want: vec![mesh("web.shop.svc.cluster.local:80", Http1, &[])],
        },
        Case {
            name: "services are sorted by name across namespaces",
            services: vec![
                service("b", "web", json!([{ "name": "http", "port": 80 }])),
                service(
                    "a",
                    "web",
                    json!([{ "name": "grpc", "port": 9000 }, { "name": "http", "port": 80 }]),
                ),
            ],
            slices: vec![],
            want: vec![
                mesh("web.a.svc.cluster.local:80", Http1, &[]),
                mesh("web.a.svc.cluster.local:9000", Http2, &[]),
                mesh("web.b.svc.cluster.local:80", Http1, &[]),
            ],
        },
    ]
}

#[test]
fn services_from_table() {
    for case in cases() {
        assert_eq!(
            services_from(&case.services, &case.slices, &[], &td()),
            case.want,
            "case: {}",
            case.name
        );
        // The cache hands objects over in no particular order.
        let mut services = case.services.clone();
        let mut slices = case.slices.clone();
        services.reverse();
        slices.reverse();
        assert_eq!(
            services_from(&services, &slices, &[], &td()),
            case.want,
            "case reversed: {}",
            case.name
        );
    }
}

#[test]
fn service_annotations_set_balancer_and_timeouts_for_every_port() {
    let annotations = json!({
        "tern.dev/load-balancer": "peak_ewma",
        "tern.dev/connect-timeout": "500ms",
        "tern.dev/idle-timeout": "30s",
    });
    let spec =
        json!({ "ports": [{ "name": "http", "port": 80 }, { "name": "grpc", "port": 9000 }] });
    let services = [service_with("shop", "web", annotations, spec)];
    let got = services_from(&services, &[], &[], &td());
    assert_eq!(got.len(), 2);
    for s in got {
        assert_eq!(s.load_balancer, RawLoadBalancer::PeakEwma, "{}", s.name);
        assert_eq!(s.connect_timeout.as_deref(), Some("500ms"), "{}", s.name);
        assert_eq!(s.idle_timeout.as_deref(), Some("30s"), "{}", s.name);
    }
}

#[test]
fn invalid_annotations_fall_back_to_defaults_and_are_reported_once() {
    let annotations = json!({
        "tern.dev/load-balancer": "fastest",
        "tern.dev/connect-timeout": "1 second",
    });
    let spec =
        json!({ "ports": [{ "name": "http", "port": 80 }, { "name": "http-alt", "port": 8080 }] });
    let services = [service_with("shop", "web", annotations, spec)];
    let slices = [slice_with(
        "shop",
        "web-1",
        "web",
        "IPv4",
        json!({ "tern.dev/weight": "heavy" }),
        json!([{ "name": "http", "port": 8080 }, { "name": "http-alt", "port": 8081 }]),
        json!([ready("10.0.0.1")]),
    )];
    let got = translate(&services, &slices, &[] as &[Pod], &td());
    for s in &got.services {
        assert_eq!(s.load_balancer, RawLoadBalancer::RoundRobin, "{}", s.name);
        assert_eq!(s.connect_timeout, None, "{}", s.name);
        assert!(s.endpoints.iter().all(|e| e.weight.is_none()), "{s:?}");
    }
    let text: Vec<String> = got.warnings.iter().map(Warning::to_string).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(
        text.contains(
            &"EndpointSlice shop/web-1: annotation tern.dev/weight=\"heavy\" ignored: \
                        expected an integer from 1 to 10000"
                .to_string()
        ),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.starts_with(
            "Service shop/web: annotation tern.dev/load-balancer=\"fastest\" ignored"
        )),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.starts_with(
            "Service shop/web: annotation tern.dev/connect-timeout=\"1 second\" ignored"
        )),
        "{text:#?}"
    );
}

#[test]
fn unsupported_slices_and_addresses_are_reported() {
    let services = [service(
        "shop",
        "web",
        json!([{ "name": "http", "port": 80 }]),
    )];
    let slices = [
        slice_with(
            "shop",
            "web-fqdn",
            "web",
            "FQDN",
            json!({}),
            json!([{ "name": "http", "port": 80 }]),
            json!([ready("web.example.com")]),
        ),
        slice(
            "shop",
            "web-1",
            "web",
            json!([{ "name": "http", "port": 80 }]),
            json!([ready("10.0.0.300")]),
        ),
    ];
    let got = translate(&services, &slices, &[] as &[Pod], &td());
    assert_eq!(
        got.warnings,
        vec![
            Warning::InvalidAddress {
                slice: "shop/web-1".into(),
                address: "10.0.0.300".into()
            },
            Warning::UnsupportedAddressType {
                slice: "shop/web-fqdn".into(),
                address_type: "FQDN".into()
            },
        ]
    );
}

#[test]
fn the_proxy_accepts_every_translation() {
    let mut cases = cases();
    // Kubernetes caps Service names and namespaces at 63 characters each.
    let long = "a".repeat(63);
    cases.push(Case {
        name: "longest names",
        services: vec![service(&long, &long, json!([{ "port": 65535 }]))],
        slices: vec![],
        want: vec![],
    });
    for case in cases {
        let raw = RawConfig {
            services: services_from(&case.services, &case.slices, &[], &td()),
            ..RawConfig::default()
        };
        if let Err(e) = Config::try_from(raw) {
            panic!("case {}: the proxy rejects the translation: {e}", case.name);
        }
    }
    for case in identity::cases() {
        let raw = RawConfig {
            services: services_from(&case.services, &case.slices, &case.pods, &td()),
            ..RawConfig::default()
        };
        if let Err(e) = Config::try_from(raw) {
            panic!("case {}: the proxy rejects the translation: {e}", case.name);
        }
    }
}
