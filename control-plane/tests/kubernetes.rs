//! The Kubernetes source against a fake API server speaking the real list and watch protocol:
//! initial lists, watch events, resumed watches and 410 Gone re-lists, and identities that
//! follow the pods.

mod k8s_support;

use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use k8s_support::{FakeApiServer, Kind, WAIT};
use serde_json::{Value, json};
use tern_control_plane::kubernetes::{Source as KubernetesSource, run};
use tern_proxy::config::{RawEndpoint, RawLoadBalancer, RawService, RawServiceProtocol};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type Published = Option<Arc<Vec<RawService>>>;

/// The source under test, running against `server`.
struct Source {
    out: watch::Receiver<Published>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Source {
    fn start(server: &FakeApiServer) -> anyhow::Result<Source> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("tern_control_plane=debug,kube_runtime=debug")
            .with_test_writer()
            .with_ansi(false)
            .try_init();
        let config = kube::Config::new(server.url().parse()?);
        let client = kube::Client::try_from(config)?;
        let (tx, out) = watch::channel(None);
        let source = KubernetesSource {
            client,
            trust_domain: "cluster.local".parse()?,
        };
        let task = tokio::spawn(run(source, tx));
        Ok(Source { out, task })
    }

    /// Waits until the published services equal `want`.
    async fn wait_for(&mut self, want: &[RawService]) -> anyhow::Result<()> {
        let reached = tokio::time::timeout(WAIT, async {
            self.out
                .wait_for(|published| published.as_deref().map(Vec::as_slice) == Some(want))
                .await
                .is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => {
                let ended = self.task.is_finished();
                bail!(
                    "services did not become {want:#?} within {WAIT:?} (source ended: {ended}); \
                     last published: {:#?}",
                    *self.out.borrow()
                )
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn service(namespace: &str, name: &str, ports: Value) -> Value {
    json!({
        "metadata": { "namespace": namespace, "name": name, "uid": format!("uid-{name}") },
        "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": ports },
    })
}

fn slice(namespace: &str, name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

fn endpoint(ip: &str, ready: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": { "ready": ready, "serving": ready, "terminating": false },
        "targetRef": { "kind": "Pod", "namespace": "shop", "name": format!("pod-{ip}") },
    })
}

/// The pod behind `endpoint(ip, ..)`; `sidecar` gives it a native `tern-proxy` sidecar as in
/// deploy/kubernetes/sidecar-example.yaml.
fn pod(ip: &str, account: &str, sidecar: bool) -> Value {
    let init = if sidecar {
        json!([{ "name": "tern-proxy", "image": "tern", "restartPolicy": "Always" }])
    } else {
        json!([])
    };
    json!({
        "metadata": { "namespace": "shop", "name": format!("pod-{ip}"), "uid": format!("uid-{ip}") },
        "spec": {
            "serviceAccountName": account,
            "initContainers": init,
            "containers": [{ "name": "app", "image": "app" }],
        },
        "status": { "phase": "Running", "podIP": ip },
    })
}

/// Pods without the sidecar behind every address the tests below use, so that they are
/// served in plaintext as before the mesh derived identities.
fn apply_plain_pods(server: &FakeApiServer, ips: &[&str]) {
    for ip in ips {
        server.apply(Kind::Pods, pod(ip, "default", false));
    }
}

fn web_service() -> Value {
    service(
        "shop",
        "web",
        json!([{ "name": "http", "port": 80, "targetPort": "web" }]),
    )
}

fn web_slice(endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| endpoint(ip, *ready))
        .collect();
    slice(
        "shop",
        "web-abcde",
        "web",
        json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
        json!(endpoints),
    )
}

fn mesh(name: &str, protocol: RawServiceProtocol, endpoints: &[&str]) -> RawService {
    RawService {
        name: name.to_string(),
        protocol,
        load_balancer: RawLoadBalancer::RoundRobin,
        connect_timeout: None,
        idle_timeout: None,
        endpoints: endpoints
            .iter()
            .map(|address| RawEndpoint {
                address: address.to_string(),
                weight: None,
            })
            .collect(),
        circuit_breaker: None,
        outlier_detection: None,
        health_check: None,
        identity: None,
        original_destination: None,
    }
}

fn web(endpoints: &[&str]) -> RawService {
    mesh(
        "web.shop.svc.cluster.local:80",
        RawServiceProtocol::Http1,
        endpoints,
    )
}

/// A server holding `web` with two ready endpoints.
async fn server_with_web() -> anyhow::Result<FakeApiServer> {
    let server = FakeApiServer::start().await?;
    server.apply(Kind::Services, web_service());
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", true)]),
    );
    apply_plain_pods(
        &server,
        &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
    );
    Ok(server)
}

fn count(server: &FakeApiServer, matches: impl Fn(&k8s_support::Recorded) -> bool) -> usize {
    server.requests().iter().filter(|r| matches(r)).count()
}

#[tokio::test]
async fn initial_lists_are_served_once_all_are_complete() -> anyhow::Result<()> {
    let server = server_with_web().await?;
    // A gRPC service whose named target port differs between two slices.
    server.apply(
        Kind::Services,
        service(
            "shop",
            "api",
            json!([{ "name": "grpc", "port": 9000, "targetPort": "grpc" }]),
        ),
    );
    server.apply(
        Kind::EndpointSlices,
        slice(
            "shop",
            "api-old",
            "api",
            json!([{ "name": "grpc", "port": 7000 }]),
            json!([endpoint("10.0.1.1", true), endpoint("10.0.1.2", false)]),
        ),
    );
    server.apply(
        Kind::EndpointSlices,
        slice(
            "shop",
            "api-new",
            "api",
            json!([{ "name": "grpc", "port": 7100 }]),
            json!([endpoint("10.0.1.3", true)]),
        ),
    );
    apply_plain_pods(&server, &["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    server.hold_lists(Kind::EndpointSlices);
    server.hold_lists(Kind::Pods);

    let mut source = Source::start(&server)?;
    // The Service watch starts only after the Service list was taken in whole.
    server
        .wait_for_request(0, "a Service watch", |r| r.is_watch_of(Kind::Services))
        .await?;
    server
        .wait_for_request(0, "an EndpointSlice list", |r| {
            r.is_list(Kind::EndpointSlices)
        })
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ensure!(
        source.out.borrow().is_none(),
        "published before the EndpointSlice list was complete: {:?}",
        *source.out.borrow()
    );

    server.release_lists(Kind::EndpointSlices);
    server
        .wait_for_request(0, "a Pod list", |r| r.is_list(Kind::Pods))
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ensure!(
        source.out.borrow().is_none(),
        "published before the Pod list was complete: {:?}",
        *source.out.borrow()
    );

    server.release_lists(Kind::Pods);
    source
        .wait_for(&[
            mesh(
                "api.shop.svc.cluster.local:9000",
                RawServiceProtocol::Http2,
                &["10.0.1.1:7000", "10.0.1.3:7100"],
            ),
            web(&["10.0.0.1:8080", "10.0.0.2:8080"]),
        ])
        .await
}

#[tokio::test]
async fn watch_events_update_the_services() -> anyhow::Result<()> {
    let server = server_with_web().await?;
    let mut source = Source::start(&server)?;
    source
        .wait_for(&[web(&["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;
    server
        .wait_for_request(0, "an EndpointSlice watch", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;

    // MODIFIED: an endpoint stops being ready.
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", false)]),
    );
    source.wait_for(&[web(&["10.0.0.1:8080"])]).await?;

    // ADDED, then DELETED.
    server.apply(
        Kind::Services,
        service("shop", "db", json!([{ "name": "tcp-pg", "port": 5432 }])),
    );
    let db = mesh(
        "db.shop.svc.cluster.local:5432",
        RawServiceProtocol::Tcp,
        &[],
    );
    source.wait_for(&[db, web(&["10.0.0.1:8080"])]).await?;
    server.delete(Kind::Services, "shop", "db")?;
    source.wait_for(&[web(&["10.0.0.1:8080"])]).await?;

    ensure!(
        count(&server, |r| r.is_list(Kind::Services)) == 1,
        "{:#?}",
        server.requests()
    );
    ensure!(
        count(&server, |r| r.is_list(Kind::EndpointSlices)) == 1,
        "{:#?}",
        server.requests()
    );
    Ok(())
}

#[tokio::test]
async fn a_closed_watch_resumes_from_the_last_version_seen() -> anyhow::Result<()> {
    let server = server_with_web().await?;
    let mut source = Source::start(&server)?;
    source
        .wait_for(&[web(&["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;
    let first = server
        .wait_for_request(0, "an EndpointSlice watch", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;
    ensure!(
        first.query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        "{first:?}"
    );

    let seen = server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", false)]),
    );
    source.wait_for(&[web(&["10.0.0.1:8080"])]).await?;

    // The server ends the watch; the client must resume from `seen`, not re-list.
    let since = server.requests().len();
    ensure!(
        server.close_watches(Kind::EndpointSlices) == 1,
        "one open watch expected"
    );
    let resumed = server
        .wait_for_request(since, "a resumed EndpointSlice watch", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;
    ensure!(
        resumed.resource_version() == Some(seen.to_string().as_str()),
        "resumed from {:?}, expected {seen}",
        resumed.resource_version()
    );

    // An event on the resumed watch arrives.
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", false), ("10.0.0.3", true)]),
    );
    source
        .wait_for(&[web(&["10.0.0.1:8080", "10.0.0.3:8080"])])
        .await?;

    // A bookmark moves the version the client resumes from past other kinds' changes.
    let mut annotated = web_service();
    annotated["metadata"]["annotations"] = json!({ "tern.dev/connect-timeout": "2s" });
    server.apply(Kind::Services, annotated);
    let mut slow_connect = web(&["10.0.0.1:8080", "10.0.0.3:8080"]);
    slow_connect.connect_timeout = Some("2s".to_string());
    source.wait_for(std::slice::from_ref(&slow_connect)).await?;
    let (bookmark, sent) = server.bookmark(Kind::EndpointSlices);
    ensure!(sent == 1, "the resumed watch should take bookmarks");
    let since = server.requests().len();
    server.close_watches(Kind::EndpointSlices);
    let resumed = server
        .wait_for_request(since, "an EndpointSlice watch after the bookmark", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;
    ensure!(
        resumed.resource_version() == Some(bookmark.to_string().as_str()),
        "resumed from {:?}, expected the bookmark's {bookmark}",
        resumed.resource_version()
    );

    ensure!(
        count(&server, |r| r.is_list(Kind::EndpointSlices)) == 1,
        "a closed watch must not cause a re-list: {:#?}",
        server.requests()
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_version_relists_and_converges() -> anyhow::Result<()> {
    let server = server_with_web().await?;
    let mut source = Source::start(&server)?;
    source
        .wait_for(&[web(&["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;
    let first = server
        .wait_for_request(0, "an EndpointSlice watch", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;
    let listed_at = first
        .resource_version()
        .context("watch without resourceVersion")?;

    // A change the client misses, then its watch ends: resuming gets 410 Gone.
    let since = server.requests().len();
    server.apply_compacted(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", false), ("10.0.0.2", true), ("10.0.0.4", true)]),
    );
    server.close_watches(Kind::EndpointSlices);
    let expired = server
        .wait_for_request(since, "a resumed EndpointSlice watch", |r| {
            r.is_watch_of(Kind::EndpointSlices)
        })
        .await?;
    ensure!(expired.resource_version() == Some(listed_at), "{expired:?}");
    server
        .wait_for_request(since, "an EndpointSlice re-list", |r| {
            r.is_list(Kind::EndpointSlices)
        })
        .await?;

    source
        .wait_for(&[web(&["10.0.0.2:8080", "10.0.0.4:8080"])])
        .await?;

    // After the re-list, watching goes on from the listed version.
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.2", true), ("10.0.0.4", true), ("10.0.0.5", true)]),
    );
    source
        .wait_for(&[web(&["10.0.0.2:8080", "10.0.0.4:8080", "10.0.0.5:8080"])])
        .await?;
    ensure!(
        count(&server, |r| r.is_list(Kind::Services)) == 1,
        "only the expired kind is re-listed: {:#?}",
        server.requests()
    );
    Ok(())
}

#[tokio::test]
async fn meshed_pods_give_their_service_an_identity_that_follows_the_pods() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(Kind::Services, web_service());
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", true)]),
    );
    server.apply(Kind::Pods, pod("10.0.0.1", "web", true));
    server.apply(Kind::Pods, pod("10.0.0.2", "web", true));
    let as_account = |account: &str, endpoints: &[&str]| {
        let mut service = web(endpoints);
        service.identity = Some(format!("spiffe://cluster.local/ns/shop/sa/{account}"));
        service
    };

    let mut source = Source::start(&server)?;
    source
        .wait_for(&[as_account("web", &["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;
    let pod_watch = server
        .wait_for_request(0, "a Pod watch", |r| r.is_watch_of(Kind::Pods))
        .await?;
    ensure!(
        pod_watch
            .query
            .get("fieldSelector")
            .is_some_and(|s| s.contains("status.phase")),
        "finished pods should be left out: {pod_watch:?}"
    );

    // A rollout to another service account: one of two moved is a tie, which the ID that
    // sorts first wins, and the moved pod is withheld rather than spoken to as the other.
    server.apply(Kind::Pods, pod("10.0.0.2", "web-v2", true));
    source
        .wait_for(&[as_account("web", &["10.0.0.1:8080"])])
        .await?;
    server.apply(Kind::Pods, pod("10.0.0.1", "web-v2", true));
    source
        .wait_for(&[as_account("web-v2", &["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;

    // An endpoint whose pod has not been seen waits for it. (The weight shows that the
    // slice was taken in.)
    let mut grown = web_slice(&[("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.3", true)]);
    grown["metadata"]["annotations"] = json!({ "tern.dev/weight": "5" });
    server.apply(Kind::EndpointSlices, grown);
    let weighted = |mut service: RawService| {
        for endpoint in &mut service.endpoints {
            endpoint.weight = Some(5);
        }
        service
    };
    source
        .wait_for(&[weighted(as_account(
            "web-v2",
            &["10.0.0.1:8080", "10.0.0.2:8080"],
        ))])
        .await?;
    server.apply(Kind::Pods, pod("10.0.0.3", "web-v2", true));
    source
        .wait_for(&[weighted(as_account(
            "web-v2",
            &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
        ))])
        .await?;

    // The sidecar removed everywhere (and a pod deleted): plaintext, as without a mesh.
    server.delete(Kind::Pods, "shop", "pod-10.0.0.3")?;
    server.apply(
        Kind::EndpointSlices,
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", true)]),
    );
    server.apply(Kind::Pods, pod("10.0.0.1", "web-v2", false));
    server.apply(Kind::Pods, pod("10.0.0.2", "web-v2", false));
    source
        .wait_for(&[web(&["10.0.0.1:8080", "10.0.0.2:8080"])])
        .await?;
    ensure!(
        count(&server, |r| r.is_list(Kind::Pods)) == 1,
        "{:#?}",
        server.requests()
    );
    Ok(())
}
