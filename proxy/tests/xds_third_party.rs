//! The proxy following an ADS server that is not Tern's control plane: a scripted server
//! (`xds_third_party/scripted_ads.rs`) sends hand-built Envoy resources of the shape
//! go-control-plane sends (`xds_third_party/resources.rs`) and records every request. Real
//! traffic goes through the proxy to real upstreams meanwhile. Both protocol variants.
#![allow(clippy::unwrap_used)]

#[path = "xds_third_party/resources.rs"]
mod resources;
#[path = "xds_third_party/scripted_ads.rs"]
mod scripted_ads;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use envoy_types::util::pack_any;
use resources::{dns_cluster, eds_cluster, http_listener, load_assignment, route_config, socket};
use scripted_ads::{Script, Server, eventually};
use support::{Upstream, get, http1_client};
use tern_proxy::app::App;
use tern_proxy::config::LoadBalancerKind;
use tern_proxy::xds::{TypeKind, XdsOptions, XdsProtocol};
use tokio_util::sync::CancellationToken;

struct Proxy {
    app: App,
    stop: CancellationToken,
}

impl Proxy {
    fn follow(server: SocketAddr, protocol: XdsProtocol) -> Proxy {
        let app = App::new();
        let stop = CancellationToken::new();
        tokio::spawn(tern_proxy::xds::run(
            app.clone(),
            XdsOptions {
                server: server.to_string(),
                node: "n1".into(),
                protocol,
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
            },
            stop.clone(),
        ));
        Proxy { app, stop }
    }

    fn status(&self) -> serde_json::Value {
        self.app.xds_status().unwrap_or_default()
    }

    async fn web(&self) -> SocketAddr {
        eventually("the listener web to be bound", || {
            self.app.bound_addresses().get("web").copied()
        })
        .await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends `n` requests; all must be answered 200 by `upstream`.
async fn traffic_to(addr: SocketAddr, n: usize, upstream: &str) {
    let client = http1_client();
    for i in 0..n {
        let r = get(&client, addr, "svc.example", "/hello", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(r.header("x-upstream"), upstream, "request {i}");
    }
}

/// The opening exchange: CDS and LDS wildcards; then cluster `api` → `a`, listener `web` →
/// routes `web-routes` → `api`, each version "1", each ACKed.
async fn bring_up(script: &Script, a: &Upstream) {
    eventually("the opening requests", || {
        (script.request_count() >= 2).then_some(())
    })
    .await;
    let (node, types) = script.opening();
    assert_eq!(node, "n1");
    assert_eq!(
        types[..2].iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            &TypeKind::Cluster.type_url(),
            &TypeKind::Listener.type_url()
        ])
    );
    assert_eq!(
        script.subscription(TypeKind::Cluster),
        Some(BTreeSet::new())
    );
    assert_eq!(
        script.subscription(TypeKind::Listener),
        Some(BTreeSet::new())
    );

    let nonce = script
        .push(
            TypeKind::Cluster,
            "1",
            vec![eds_cluster("api", cluster::LbPolicy::RoundRobin)],
        )
        .await;
    let ack = script.answer(TypeKind::Cluster, &nonce).await;
    assert_eq!(ack.error, None);
    if let Script::Sotw(_) = script {
        assert_eq!(ack.version_info.as_deref(), Some("1"));
        assert!(ack.resource_names.is_empty(), "CDS stays a wildcard");
    }
    script.wait_subscribed(TypeKind::Endpoint, &["api"]).await;
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "1",
            vec![load_assignment("api", &[a.addr])],
        )
        .await;
    let ack = script.answer(TypeKind::Endpoint, &nonce).await;
    assert_eq!(ack.error, None);
    if let Script::Sotw(_) = script {
        assert_eq!(ack.version_info.as_deref(), Some("1"));
        assert_eq!(
            ack.resource_names,
            ["api"],
            "the ACK repeats the subscription"
        );
    }

    let nonce = script
        .push(
            TypeKind::Listener,
            "1",
            vec![http_listener("web", "web-routes")],
        )
        .await;
    let ack = script.answer(TypeKind::Listener, &nonce).await;
    assert_eq!(ack.error, None);
    script
        .wait_subscribed(TypeKind::Route, &["web-routes"])
        .await;
    let nonce = script
        .push(
            TypeKind::Route,
            "1",
            vec![route_config("web-routes", "api")],
        )
        .await;
    let ack = script.answer(TypeKind::Route, &nonce).await;
    assert_eq!(ack.error, None);
    if let Script::Sotw(_) = script {
        assert_eq!(ack.version_info.as_deref(), Some("1"));
        assert_eq!(ack.resource_names, ["web-routes"]);
    }
}

fn load_balancer(app: &App) -> Option<LoadBalancerKind> {
    app.store()
        .load()
        .config
        .services
        .iter()
        .find(|s| &*s.name == "api")
        .map(|s| s.load_balancer)
}

// ---------------------------------------------------------------------------------------------
// The tests.

async fn follows_acks_nacks_and_warms(protocol: XdsProtocol) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, protocol);
    let script = server.accept(protocol).await;
    bring_up(&script, &a).await;

    let web = proxy.web().await;
    assert!(proxy.app.is_ready());
    traffic_to(web, 10, "a").await;
    assert_eq!(proxy.status()["connected"], true);
    assert_eq!(proxy.status()["versions_accepted"]["cds"], "1");

    // An invalid cluster: NACKed with the cluster and the field named; nothing changes.
    let nonce = script
        .push(
            TypeKind::Cluster,
            "2",
            vec![eds_cluster("api", cluster::LbPolicy::Maglev)],
        )
        .await;
    let nack = script.answer(TypeKind::Cluster, &nonce).await;
    let error = nack.error.expect("a NACK");
    assert!(
        error.contains("Cluster \"api\"")
            && error.contains("lb_policy")
            && error.contains("MAGLEV"),
        "{error}"
    );
    if let Script::Sotw(_) = &script {
        assert_eq!(
            nack.version_info.as_deref(),
            Some("1"),
            "a NACK reports the version still in force"
        );
    }
    traffic_to(web, 20, "a").await;
    let status = proxy.status();
    assert_eq!(status["versions_accepted"]["cds"], "1", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("lb_policy")),
        "{status}"
    );
    assert_eq!(
        load_balancer(&proxy.app),
        Some(LoadBalancerKind::RoundRobin)
    );

    // A DNS cluster is refused the same way.
    let nonce = script
        .push(TypeKind::Cluster, "3", vec![dns_cluster("api")])
        .await;
    let error = script
        .answer(TypeKind::Cluster, &nonce)
        .await
        .error
        .expect("a NACK");
    assert!(
        error.contains("Cluster \"api\": type: LOGICAL_DNS"),
        "{error}"
    );
    traffic_to(web, 5, "a").await;

    // A valid update is ACKed and applied.
    let nonce = script
        .push(
            TypeKind::Cluster,
            "4",
            vec![eds_cluster("api", cluster::LbPolicy::LeastRequest)],
        )
        .await;
    let ack = script.answer(TypeKind::Cluster, &nonce).await;
    assert_eq!(ack.error, None);
    if let Script::Sotw(_) = &script {
        assert_eq!(ack.version_info.as_deref(), Some("4"));
    }
    assert_eq!(
        load_balancer(&proxy.app),
        Some(LoadBalancerKind::LeastRequest)
    );
    assert_eq!(proxy.status()["versions_accepted"]["cds"], "4");
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "2",
            vec![load_assignment("api", &[b.addr])],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Endpoint, &nonce).await.error, None);
    traffic_to(web, 10, "b").await;

    // Warming: routes to a cluster the proxy does not have yet are accepted but not applied;
    // traffic keeps the previous config until the cluster and its endpoints arrive.
    let nonce = script
        .push(
            TypeKind::Route,
            "2",
            vec![route_config("web-routes", "next")],
        )
        .await;
    let ack = script.answer(TypeKind::Route, &nonce).await;
    assert_eq!(
        ack.error, None,
        "a reference to a cluster not yet sent is no error"
    );
    let status = proxy.status();
    assert!(
        status["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("\"next\"")),
        "{status}"
    );
    traffic_to(web, 10, "b").await;

    let nonce = script
        .push(
            TypeKind::Cluster,
            "5",
            vec![
                eds_cluster("api", cluster::LbPolicy::LeastRequest),
                eds_cluster("next", cluster::LbPolicy::RoundRobin),
            ],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Cluster, &nonce).await.error, None);
    script
        .wait_subscribed(TypeKind::Endpoint, &["api", "next"])
        .await;
    // Still warming: the cluster is there, its endpoints are not.
    let status = proxy.status();
    assert!(
        status["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("ClusterLoadAssignment \"next\"")),
        "{status}"
    );
    traffic_to(web, 10, "b").await;

    let nonce = script
        .push(
            TypeKind::Endpoint,
            "3",
            vec![
                load_assignment("api", &[b.addr]),
                load_assignment("next", &[a.addr]),
            ],
        )
        .await;
    let ack = script.answer(TypeKind::Endpoint, &nonce).await;
    assert_eq!(ack.error, None);
    if let Script::Sotw(_) = &script {
        assert_eq!(ack.resource_names, ["api", "next"]);
    }
    assert_eq!(proxy.status()["waiting_for"], serde_json::Value::Null);
    traffic_to(web, 10, "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_acks_nacks_and_warms_against_a_third_party_server() {
    follows_acks_nacks_and_warms(XdsProtocol::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_acks_nacks_and_warms_against_a_third_party_server() {
    follows_acks_nacks_and_warms(XdsProtocol::Delta).await;
}

/// A resource the proxy cannot decode at all (wrong type in the response) is NACKed too.
#[tokio::test]
async fn a_resource_of_the_wrong_type_is_nacked() {
    let a = Upstream::start("a").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Sotw);
    let script = server.accept(XdsProtocol::Sotw).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;

    let nonce = script
        .push(
            TypeKind::Listener,
            "2",
            vec![eds_cluster("web", cluster::LbPolicy::RoundRobin)],
        )
        .await;
    let nack = script.answer(TypeKind::Listener, &nonce).await;
    let error = nack.error.expect("a NACK");
    assert!(
        error.contains("envoy.config.listener.v3.Listener"),
        "{error}"
    );
    assert_eq!(nack.version_info.as_deref(), Some("1"));
    traffic_to(web, 5, "a").await;
}

/// Envoy is not ready until its first listeners are (it waits for the initial LDS response);
/// a proxy with clusters but no listener bound cannot serve anyone.
#[tokio::test]

async fn not_ready_before_the_first_listener_response() {
    let a = Upstream::start("a").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Sotw);
    let script = server.accept(XdsProtocol::Sotw).await;
    eventually("the opening requests", || {
        (script.request_count() >= 2).then_some(())
    })
    .await;
    let nonce = script
        .push(
            TypeKind::Cluster,
            "1",
            vec![eds_cluster("api", cluster::LbPolicy::RoundRobin)],
        )
        .await;
    script.answer(TypeKind::Cluster, &nonce).await;
    script.wait_subscribed(TypeKind::Endpoint, &["api"]).await;
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "1",
            vec![load_assignment("api", &[a.addr])],
        )
        .await;
    script.answer(TypeKind::Endpoint, &nonce).await;
    assert!(
        !proxy.app.is_ready(),
        "ready with no listener: {}",
        proxy.status()
    );
}

/// The server goes away after a NACK; the proxy keeps serving, reconnects, and opens the new
/// stream with what it holds: the versions in force (not the NACKed one) and its
/// subscriptions, so that the server can resume without resending everything.
async fn reconnects_with_what_it_holds(protocol: XdsProtocol) {
    let a = Upstream::start("a").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, protocol);
    let script = server.accept(protocol).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;
    let nonce = script
        .push(
            TypeKind::Cluster,
            "2",
            vec![eds_cluster("api", cluster::LbPolicy::RingHash)],
        )
        .await;
    assert!(
        script
            .answer(TypeKind::Cluster, &nonce)
            .await
            .error
            .is_some()
    );

    drop(script);
    eventually("the proxy to notice", || {
        (proxy.status()["connected"] == false).then_some(())
    })
    .await;
    traffic_to(web, 10, "a").await;

    let script = server.accept(protocol).await;
    eventually("the resumed subscriptions", || {
        (script.request_count() >= 4).then_some(())
    })
    .await;
    match &script {
        Script::Sotw(c) => {
            let log = c.log.lock().unwrap();
            let of = |kind: TypeKind| {
                log.iter()
                    .find(|r| r.type_url == kind.type_url())
                    .map(|r| (r.version_info.as_str(), r.resource_names.clone()))
            };
            assert_eq!(of(TypeKind::Cluster), Some(("1", Vec::new())));
            assert_eq!(of(TypeKind::Listener), Some(("1", Vec::new())));
            assert_eq!(of(TypeKind::Endpoint), Some(("1", vec!["api".to_string()])));
            assert_eq!(
                of(TypeKind::Route),
                Some(("1", vec!["web-routes".to_string()]))
            );
            assert!(log[0].node.is_some());
        }
        Script::Delta(c) => {
            let log = c.log.lock().unwrap();
            let of = |kind: TypeKind| {
                log.iter()
                    .find(|r| r.type_url == kind.type_url())
                    .map(|r| {
                        (
                            r.resource_names_subscribe.clone(),
                            r.initial_resource_versions
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect::<Vec<_>>(),
                        )
                    })
                    .unwrap()
            };
            let held = |name: &str| vec![(name.to_string(), "1".to_string())];
            assert_eq!(of(TypeKind::Cluster), (Vec::new(), held("api")));
            assert_eq!(of(TypeKind::Listener), (Vec::new(), held("web")));
            assert_eq!(
                of(TypeKind::Endpoint),
                (vec!["api".to_string()], held("api"))
            );
            assert_eq!(
                of(TypeKind::Route),
                (vec!["web-routes".to_string()], held("web-routes"))
            );
        }
    }
    eventually("connected again", || {
        (proxy.status()["connected"] == true).then_some(())
    })
    .await;
    traffic_to(web, 5, "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_reconnects_with_the_versions_in_force() {
    reconnects_with_what_it_holds(XdsProtocol::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconnects_with_the_versions_it_holds() {
    reconnects_with_what_it_holds(XdsProtocol::Delta).await;
}

/// No server yet: the proxy keeps trying (with backoff), says why in its status, and
/// follows the server as soon as it is up.
#[tokio::test]
async fn keeps_trying_until_the_server_is_up() {
    let a = Upstream::start("a").await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::follow(addr, XdsProtocol::Sotw);
    eventually("a failed attempt in the status", || {
        let status = proxy.status();
        (status["connected"] == false
            && status["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot connect")))
        .then_some(())
    })
    .await;
    assert!(!proxy.app.is_ready());

    let mut server = Server::start_on(addr).await;
    let script = server.accept(XdsProtocol::Sotw).await;
    bring_up(&script, &a).await;
    traffic_to(proxy.web().await, 5, "a").await;
    assert_eq!(proxy.status()["connected"], true);
}

/// Delta removals take effect at once, as in Envoy: the removed cluster's EDS is unsubscribed
/// and routes that still name it answer 503 (the listener is not torn down), until the routes
/// move to another cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_removal_of_a_cluster_still_routed_to_answers_503_until_the_routes_move() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Delta);
    let script = server.accept(XdsProtocol::Delta).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;

    let Script::Delta(conn) = &script else {
        unreachable!()
    };
    let nonce = script
        .push(
            TypeKind::Cluster,
            "2",
            vec![eds_cluster("other", cluster::LbPolicy::RoundRobin)],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Cluster, &nonce).await.error, None);
    script
        .wait_subscribed(TypeKind::Endpoint, &["api", "other"])
        .await;
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "2",
            vec![load_assignment("other", &[b.addr])],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Endpoint, &nonce).await.error, None);
    traffic_to(web, 5, "a").await;

    // Remove "api" while the routes still use it.
    let nonce = "delta-remove-1".to_string();
    conn.tx
        .send(Ok(DeltaDiscoveryResponse {
            system_version_info: "3".into(),
            type_url: TypeKind::Cluster.type_url(),
            removed_resources: vec!["api".into()],
            nonce: nonce.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(script.answer(TypeKind::Cluster, &nonce).await.error, None);
    script.wait_subscribed(TypeKind::Endpoint, &["other"]).await;
    let status = proxy.status();
    assert!(
        status["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("Cluster \"api\"")),
        "{status}"
    );
    let client = http1_client();
    for _ in 0..5 {
        let r = get(&client, web, "svc.example", "/hello", &[]).await;
        assert_eq!(r.status, 503, "{}", r.body);
    }
    let hits = a.hits();

    let nonce = script
        .push(
            TypeKind::Route,
            "2",
            vec![route_config("web-routes", "other")],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Route, &nonce).await.error, None);
    traffic_to(web, 5, "b").await;
    assert_eq!(
        a.hits(),
        hits,
        "nothing goes to the removed cluster's endpoints"
    );
    let services: Vec<String> = proxy
        .app
        .store()
        .load()
        .config
        .services
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(services, ["other"]);
}

/// Warming holds back the resource that waits, not everything: while routes wait for a cluster
/// that has not arrived, an endpoint change of a cluster in use still applies (Envoy warms
/// each listener and cluster on its own; endpoint updates of active clusters are never held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn an_endpoint_change_applies_while_other_routes_wait_for_their_cluster() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Sotw);
    let script = server.accept(XdsProtocol::Sotw).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;

    let nonce = script
        .push(
            TypeKind::Route,
            "2",
            vec![route_config("web-routes", "never-sent")],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Route, &nonce).await.error, None);
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "2",
            vec![load_assignment("api", &[b.addr])],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Endpoint, &nonce).await.error, None);
    // The endpoint of "a" is gone from the control plane's view: nothing should go there.
    traffic_to(web, 10, "b").await;
}

/// What can be checked when a resource arrives is checked then: a listener whose address
/// another listener already has is NACKed at once, even while it waits for its routes. If it
/// were ACKed, the config would stay invalid and every later update would be NACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn an_invalid_listener_is_nacked_even_while_it_waits() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Sotw);
    let script = server.accept(XdsProtocol::Sotw).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let on_port = |name: &'static str| {
        let (name, any) = http_listener(name, "more-routes");
        let mut l: Listener = prost::Message::decode(any.value.as_slice()).unwrap();
        l.address = Some(socket(SocketAddr::from(([127, 0, 0, 1], port))));
        (name, pack_any(l))
    };
    let nonce = script
        .push(
            TypeKind::Listener,
            "2",
            vec![
                http_listener("web", "web-routes"),
                on_port("one"),
                on_port("two"),
            ],
        )
        .await;
    let lds = script.answer(TypeKind::Listener, &nonce).await;
    let nonce = script
        .push(
            TypeKind::Route,
            "2",
            vec![
                route_config("web-routes", "api"),
                route_config("more-routes", "api"),
            ],
        )
        .await;
    let rds = script.answer(TypeKind::Route, &nonce).await;
    // Whatever happened to those, a plain endpoint change must still be taken.
    let nonce = script
        .push(
            TypeKind::Endpoint,
            "2",
            vec![load_assignment("api", &[b.addr])],
        )
        .await;
    let eds = script.answer(TypeKind::Endpoint, &nonce).await;
    assert!(
        lds.error
            .as_deref()
            .is_some_and(|e| e.contains("already used")),
        "LDS v2 is ACKed: {lds:?}; then RDS: {rds:?}; then EDS: {eds:?}"
    );
    assert_eq!(eds.error, None);
    traffic_to(web, 5, "b").await;
}

/// Policy as an Envoy-minded control plane writes it: the fault filter before the local rate
/// limit, `HUNDRED` denominators, a bucket on the virtual host that one route opts out of with
/// a disabled `FilterConfig`, a fault on that route. The proxy enforces both; a fault Tern
/// cannot inject (chosen by a request header), a connection manager whose router is not last
/// and a bucket two routes would share are NACKed with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_style_rate_limit_and_fault_filters_are_enforced() {
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::config::route::v3::{FilterConfig, RouteConfiguration};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        FaultAbort, HttpFault, fault_abort,
    };
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, http_filter,
    };
    use envoy_types::pb::envoy::r#type::v3::{
        FractionalPercent, TokenBucket, fractional_percent::DenominatorType,
    };
    use envoy_types::pb::google::protobuf::{self as pbuf, Any, UInt32Value};

    let hundred = |numerator| FractionalPercent {
        numerator,
        denominator: DenominatorType::Hundred as i32,
    };
    let filter = |name: &str, config: Any| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    let with_filters = |order: &[&str]| {
        let (name, any) = http_listener("web", "web-routes");
        let mut l: Listener = prost::Message::decode(any.value.as_slice()).unwrap();
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            hcm_any,
        )) = &mut l.filter_chains[0].filters[0].config_type
        else {
            unreachable!("the HCM")
        };
        let mut hcm: HttpConnectionManager =
            prost::Message::decode(hcm_any.value.as_slice()).unwrap();
        let router = hcm.http_filters.remove(0);
        hcm.http_filters = order
            .iter()
            .map(|f| match *f {
                "fault" => filter("envoy.filters.http.fault", pack_any(HttpFault::default())),
                "ratelimit" => filter(
                    "envoy.filters.http.local_ratelimit",
                    pack_any(LocalRateLimit {
                        stat_prefix: "http_local_rate_limiter".into(),
                        ..Default::default()
                    }),
                ),
                _ => router.clone(),
            })
            .collect();
        *hcm_any = pack_any(hcm);
        (name, pack_any(l))
    };
    let routes = |abort: fault_abort::ErrorType, broken_counts: bool| {
        let (name, any) = route_config("web-routes", "api");
        let mut rc: RouteConfiguration = prost::Message::decode(any.value.as_slice()).unwrap();
        let vhost = &mut rc.virtual_hosts[0];
        let mut broken = vhost.routes[0].clone();
        broken.r#match.as_mut().unwrap().path_specifier = Some(
            envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                "/broken".into(),
            ),
        );
        broken.typed_per_filter_config.insert(
            "envoy.filters.http.fault".into(),
            pack_any(HttpFault {
                abort: Some(FaultAbort {
                    percentage: Some(hundred(100)),
                    error_type: Some(abort),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        if !broken_counts {
            // Envoy's way to take one route out of the virtual host's filter.
            broken.typed_per_filter_config.insert(
                "envoy.filters.http.local_ratelimit".into(),
                pack_any(FilterConfig {
                    disabled: true,
                    ..Default::default()
                }),
            );
        }
        vhost.routes.insert(0, broken);
        let enabled = Some(RuntimeFractionalPercent {
            default_value: Some(hundred(100)),
            runtime_key: "local_rate_limit_enabled".into(),
        });
        vhost.typed_per_filter_config.insert(
            "envoy.filters.http.local_ratelimit".into(),
            pack_any(LocalRateLimit {
                stat_prefix: "vhost".into(),
                token_bucket: Some(TokenBucket {
                    max_tokens: 3,
                    tokens_per_fill: Some(UInt32Value { value: 3 }),
                    fill_interval: Some(pbuf::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                }),
                filter_enabled: enabled.clone(),
                filter_enforced: enabled,
                ..Default::default()
            }),
        );
        (name, pack_any(rc))
    };

    let a = Upstream::start("a").await;
    let mut server = Server::start().await;
    let proxy = Proxy::follow(server.addr, XdsProtocol::Sotw);
    let script = server.accept(XdsProtocol::Sotw).await;
    bring_up(&script, &a).await;
    let web = proxy.web().await;

    let nonce = script
        .push(
            TypeKind::Listener,
            "2",
            vec![with_filters(&["fault", "ratelimit", "router"])],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Listener, &nonce).await.error, None);
    let nonce = script
        .push(
            TypeKind::Route,
            "2",
            vec![routes(fault_abort::ErrorType::HttpStatus(503), false)],
        )
        .await;
    assert_eq!(script.answer(TypeKind::Route, &nonce).await.error, None);

    let client = http1_client();
    let broken = get(&client, web, "svc.example", "/broken", &[]).await;
    assert_eq!(broken.status, 503, "{}", broken.body);
    // The virtual host's bucket, which /broken is out of.
    traffic_to(web, 3, "a").await;
    let limited = get(&client, web, "svc.example", "/hello", &[]).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(!limited.header("retry-after").is_empty());

    let nonce = script
        .push(
            TypeKind::Route,
            "3",
            vec![routes(
                fault_abort::ErrorType::HeaderAbort(Default::default()),
                false,
            )],
        )
        .await;
    let error = script
        .answer(TypeKind::Route, &nonce)
        .await
        .error
        .expect("a NACK");
    assert!(
        error.contains(
            "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.fault].abort.header_abort"
        ),
        "{error}"
    );
    let nonce = script
        .push(
            TypeKind::Listener,
            "3",
            vec![with_filters(&["router", "fault"])],
        )
        .await;
    let error = script
        .answer(TypeKind::Listener, &nonce)
        .await
        .error
        .expect("a NACK");
    assert!(
        error.contains("http_filters[0]") && error.contains("router must be the last"),
        "{error}"
    );
    // A bucket both routes would share: Tern's buckets are per route.
    let nonce = script
        .push(
            TypeKind::Route,
            "4",
            vec![routes(fault_abort::ErrorType::HttpStatus(503), true)],
        )
        .await;
    let error = script
        .answer(TypeKind::Route, &nonce)
        .await
        .error
        .expect("a NACK");
    assert!(error.contains("shared by 2 routes"), "{error}");
    // All refused: the config in force still aborts /broken.
    let broken = get(&client, web, "svc.example", "/broken", &[]).await;
    assert_eq!(broken.status, 503);
}
