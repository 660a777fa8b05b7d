//! Identities derived from the pods behind a Service's endpoints, and their overrides.

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::{service, service_with, slice, td};
use crate::kubernetes::translate::{Warning, translate};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A pod in `shop`; `sidecar` adds a native `tern-proxy` sidecar, as the example manifest.
fn pod(name: &str, account: &str, sidecar: bool) -> Pod {
    let init = if sidecar {
        json!([{ "name": "tern-proxy", "restartPolicy": "Always" }])
    } else {
        json!([])
    };
    serde_json::from_value(json!({
        "metadata": { "namespace": "shop", "name": name, "uid": format!("uid-{name}") },
        "spec": {
            "serviceAccountName": account,
            "initContainers": init,
            "containers": [{ "name": "app" }],
        },
    }))
    .expect("valid Pod")
}

/// A ready endpoint of the pod named `pod`, as the EndpointSlice controller writes it.
fn at(ip: &str, pod: &str) -> Value {
    json!({
        "addresses": [ip],
        "conditions": { "ready": true },
        "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod, "uid": format!("uid-{pod}") },
    })
}

fn web() -> Service {
    service("shop", "web", json!([{ "name": "http", "port": 80 }]))
}

fn web_slice(endpoints: Value) -> EndpointSlice {
    slice(
        "shop",
        "web-1",
        "web",
        json!([{ "name": "http", "port": 8080 }]),
        endpoints,
    )
}

pub(super) struct Case {
    pub name: &'static str,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    /// (service, identity, endpoint addresses)
    want: Vec<(&'static str, Option<&'static str>, Vec<&'static str>)>,
    warnings: Vec<Warning>,
}

fn not_seen(count: usize) -> Vec<Warning> {
    vec![Warning::PodsNotSeen {
        service: "shop/web".into(),
        port: 80,
        count,
    }]
}

pub(super) fn cases() -> Vec<Case> {
    let endpoints = json!([at("10.0.0.1", "web-a"), at("10.0.0.2", "web-b")]);
    vec![
        Case {
            name: "meshed pods of one service account: mTLS to its identity",
            services: vec![web()],
            slices: vec![web_slice(endpoints.clone())],
            pods: vec![pod("web-a", "web", true), pod("web-b", "web", true)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "no pod runs the sidecar: plaintext, as without a mesh",
            services: vec![web()],
            slices: vec![web_slice(endpoints.clone())],
            pods: vec![pod("web-a", "web", false), pod("web-b", "web", false)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                None,
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "meshed and unmeshed: mTLS to the meshed ones, the others withheld",
            services: vec![web()],
            slices: vec![web_slice(json!([
                at("10.0.0.1", "web-a"),
                at("10.0.0.2", "web-b"),
                at("10.0.0.3", "old-c"),
            ]))],
            pods: vec![
                pod("web-a", "web", true),
                pod("web-b", "web", true),
                pod("old-c", "web", false),
            ],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![Warning::Unmeshed {
                service: "shop/web".into(),
                port: 80,
                count: 1,
                identity: WEB.into(),
            }],
        },
        Case {
            name: "even one meshed pod among unmeshed ones is not spoken to in plaintext",
            services: vec![web()],
            slices: vec![web_slice(json!([
                at("10.0.0.1", "web-a"),
                at("10.0.0.2", "old-b"),
                at("10.0.0.3", "old-c"),
            ]))],
            pods: vec![
                pod("web-a", "web", true),
                pod("old-b", "web", false),
                pod("old-c", "web", false),
            ],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080"],
            )],
            warnings: vec![Warning::Unmeshed {
                service: "shop/web".into(),
                port: 80,
                count: 2,
                identity: WEB.into(),
            }],
        },
        Case {
            name: "several service accounts: the most common one, the others withheld",
            services: vec![web()],
            slices: vec![web_slice(json!([
                at("10.0.0.1", "web-a"),
                at("10.0.0.2", "web-b"),
                at("10.0.0.3", "new-c"),
            ]))],
            pods: vec![
                pod("web-a", "web", true),
                pod("web-b", "web", true),
                pod("new-c", "web-v2", true),
            ],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![Warning::OtherIdentity {
                service: "shop/web".into(),
                port: 80,
                count: 1,
                identity: WEB.into(),
            }],
        },
        Case {
            name: "a pod not seen yet is withheld, whatever the others are",
            services: vec![web()],
            slices: vec![web_slice(json!([
                at("10.0.0.1", "web-a"),
                at("10.0.0.2", "web-new"),
            ]))],
            pods: vec![pod("web-a", "web", true)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080"],
            )],
            warnings: not_seen(1),
        },
        Case {
            name: "no pod seen: no endpoint rather than plaintext to pods that may be meshed",
            services: vec![web()],
            slices: vec![web_slice(endpoints.clone())],
            pods: vec![],
            want: vec![("web.shop.svc.cluster.local:80", None, vec![])],
            warnings: not_seen(2),
        },
        Case {
            name: "a pod recreated under its name is not the pod the slice means",
            services: vec![web()],
            slices: vec![web_slice(json!([at("10.0.0.1", "web-a")]))],
            pods: vec![{
                let mut recreated = pod("web-a", "web", true);
                recreated.metadata.uid = Some("uid-web-a-2".into());
                recreated
            }],
            want: vec![("web.shop.svc.cluster.local:80", None, vec![])],
            warnings: not_seen(1),
        },
        Case {
            name: "endpoints without a pod (a hand-made slice) are plaintext",
            services: vec![web()],
            slices: vec![web_slice(json!([{ "addresses": ["192.0.2.10"] }]))],
            pods: vec![],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                None,
                vec!["192.0.2.10:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "each port is decided on its own endpoints",
            services: vec![service(
                "shop",
                "web",
                json!([{ "name": "http", "port": 80 }, { "name": "metrics", "port": 9090 }]),
            )],
            slices: vec![
                web_slice(json!([at("10.0.0.1", "web-a")])),
                slice(
                    "shop",
                    "web-metrics",
                    "web",
                    json!([{ "name": "metrics", "port": 9090 }]),
                    json!([at("10.0.0.9", "exporter")]),
                ),
            ],
            pods: vec![pod("web-a", "web", true), pod("exporter", "web", false)],
            want: vec![
                (
                    "web.shop.svc.cluster.local:80",
                    Some(WEB),
                    vec!["10.0.0.1:8080"],
                ),
                (
                    "web.shop.svc.cluster.local:9090",
                    None,
                    vec!["10.0.0.9:9090"],
                ),
            ],
            warnings: vec![],
        },
        Case {
            name: "an identity annotation (service account) wins and serves every endpoint",
            services: vec![service_with(
                "shop",
                "web",
                json!({ "tern.dev/identity": "web" }),
                json!({ "ports": [{ "name": "http", "port": 80 }] }),
            )],
            slices: vec![web_slice(json!([
                at("10.0.0.1", "web-a"),
                at("10.0.0.2", "custom-b"),
                at("10.0.0.3", "unseen-c"),
            ]))],
            // A sidecar under another container name: derivation would say plaintext.
            pods: vec![pod("web-a", "web", true), pod("custom-b", "web", false)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "an identity annotation may give a full SPIFFE ID",
            services: vec![service_with(
                "shop",
                "web",
                json!({ "tern.dev/identity": "spiffe://cluster.local/ns/edge/sa/gateway" }),
                json!({ "ports": [{ "name": "http", "port": 80 }] }),
            )],
            slices: vec![web_slice(endpoints.clone())],
            pods: vec![pod("web-a", "web", false), pod("web-b", "web", false)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some("spiffe://cluster.local/ns/edge/sa/gateway"),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "identity none: plaintext to every endpoint, meshed or not",
            services: vec![service_with(
                "shop",
                "web",
                json!({ "tern.dev/identity": "none" }),
                json!({ "ports": [{ "name": "http", "port": 80 }] }),
            )],
            slices: vec![web_slice(endpoints.clone())],
            pods: vec![pod("web-a", "web", true), pod("web-b", "other", false)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                None,
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![],
        },
        Case {
            name: "an invalid identity annotation is reported and derivation applies",
            services: vec![service_with(
                "shop",
                "web",
                json!({ "tern.dev/identity": "Web Server" }),
                json!({ "ports": [{ "name": "http", "port": 80 }] }),
            )],
            slices: vec![web_slice(endpoints)],
            pods: vec![pod("web-a", "web", true), pod("web-b", "web", true)],
            want: vec![(
                "web.shop.svc.cluster.local:80",
                Some(WEB),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            )],
            warnings: vec![Warning::Annotation {
                kind: "Service",
                object: "shop/web".into(),
                problem: "annotation tern.dev/identity=\"Web Server\" ignored: expected a \
                          service account name, a spiffe:// ID or none"
                    .into(),
            }],
        },
    ]
}

#[test]
fn identities_table() {
    for case in cases() {
        let check = |services: &[Service], slices: &[EndpointSlice], pods: &[Pod]| {
            let got = translate(services, slices, pods, &td());
            let summary: Vec<(&str, Option<&str>, Vec<&str>)> = got
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.as_str(),
                        s.identity.as_deref(),
                        s.endpoints.iter().map(|e| e.address.as_str()).collect(),
                    )
                })
                .collect();
            assert_eq!(summary, case.want, "case: {}", case.name);
            assert_eq!(got.warnings, case.warnings, "case: {}", case.name);
        };
        check(&case.services, &case.slices, &case.pods);
        // The caches hand objects over in no particular order.
        let mut pods = case.pods.clone();
        pods.reverse();
        let mut slices = case.slices.clone();
        slices.reverse();
        check(&case.services, &slices, &pods);
    }
}

#[test]
fn withheld_endpoints_are_explained() {
    let warnings = [
        Warning::Unmeshed {
            service: "shop/web".into(),
            port: 80,
            count: 1,
            identity: WEB.into(),
        },
        Warning::OtherIdentity {
            service: "shop/web".into(),
            port: 80,
            count: 2,
            identity: WEB.into(),
        },
        Warning::PodsNotSeen {
            service: "shop/web".into(),
            port: 80,
            count: 3,
        },
    ];
    let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "Service shop/web port 80: 1 ready endpoint(s) run no Tern sidecar beside meshed \
             ones; withheld, the others are spoken to over mTLS as \
             spiffe://cluster.local/ns/shop/sa/web",
            "Service shop/web port 80: 2 ready endpoint(s) run as another service account than \
             most; withheld, the others are spoken to over mTLS as \
             spiffe://cluster.local/ns/shop/sa/web (annotation tern.dev/identity pins one)",
            "Service shop/web port 80: 3 ready endpoint(s) belong to pods not seen; withheld \
             until they are",
        ]
    );
}
