//! The ADS server as a raw xDS client sees it, over real sockets: what a State-of-the-World
//! and an incremental (delta) stream are sent, when, and what the admin server shows about
//! it. Each test runs its own control plane on a scratch mesh file (polled every 10 ms,
//! debounced 5 ms) and is bounded by `ads_support::TEST`.

mod ads_support;

use std::collections::HashMap;
use std::time::Duration;

use ads_support::{
    Delta, Mesh, Plane, QUIET, RECV, SETTLE, Service, Sotw, bounded, connect, delta_names,
    delta_versions, endpoints_of, eventually, find, http_get, sotw_names, unpack,
    write_atomically,
};
use anyhow::{Context, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, ConfigSource, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::StatusCode;
use prost::Message;
use tern_proxy::xds::TypeKind::{Cluster as Cds, Endpoint as Eds, Listener as Lds, Route as Rds};

const ALL_CLUSTERS: [&str; 3] = ["api", "cache", "db"];

// ---------------------------------------------------------------------------------------------
// State of the World.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_wildcard_cds_and_lds_send_every_cluster_and_listener() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("sotw-wildcard", &Mesh::base()).await?;
        let mut s = plane.sotw("wildcard").await?;

        let cds = s.fetch_and_ack(Cds, &[]).await?;
        ensure!(cds.type_url == Cds.type_url(), "{}", cds.type_url);
        ensure!(
            !cds.version_info.is_empty() && !cds.nonce.is_empty(),
            "version {:?}, nonce {:?}",
            cds.version_info,
            cds.nonce
        );
        ensure!(sotw_names(&cds)? == ALL_CLUSTERS, "{:?}", sotw_names(&cds)?);
        for name in ALL_CLUSTERS {
            let cluster: Cluster = find(&cds, name)?;
            ensure!(
                cluster.cluster_discovery_type
                    == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                "{name}: {:?}",
                cluster.cluster_discovery_type
            );
            let eds = cluster
                .eds_cluster_config
                .and_then(|c| c.eds_config)
                .with_context(|| format!("{name} has no eds_config"))?;
            ensure_ads(&eds, name)?;
        }

        let lds = s.fetch_and_ack(Lds, &[]).await?;
        ensure!(lds.type_url == Lds.type_url(), "{}", lds.type_url);
        ensure!(!lds.version_info.is_empty() && !lds.nonce.is_empty());
        // The API listeners named after the HTTP services (`api`, `cache`) are for proxyless
        // gRPC clients, which name them; a wildcard (Envoy, Tern) does not get them.
        ensure!(
            sotw_names(&lds)? == ["pg", "web"],
            "{:?}",
            sotw_names(&lds)?
        );
        let web: Listener = find(&lds, "web")?;
        ensure!(
            address_of(&web)? == "127.0.0.1:10080",
            "{}",
            address_of(&web)?
        );
        let hcm: HttpConnectionManager = network_filter(&web)?;
        match hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => {
                ensure!(rds.route_config_name == "web", "{}", rds.route_config_name);
                ensure_ads(&rds.config_source.context("rds without source")?, "web")?;
            }
            other => anyhow::bail!("web should take its routes over RDS: {other:?}"),
        }
        let pg: Listener = find(&lds, "pg")?;
        let tcp: TcpProxy = network_filter(&pg)?;
        ensure!(
            tcp.cluster_specifier == Some(tcp_proxy::ClusterSpecifier::Cluster("db".into())),
            "{:?}",
            tcp.cluster_specifier
        );
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_api_listeners_are_sent_to_clients_naming_them() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("sotw-api-listeners", &Mesh::base()).await?;
        let mut s = plane.sotw("grpc-client").await?;
        let lds = s.fetch_and_ack(Lds, &["api", "cache", "web"]).await?;
        ensure!(
            sotw_names(&lds)? == ["api", "cache", "web"],
            "{:?}",
            sotw_names(&lds)?
        );
        for service in ["api", "cache"] {
            let listener: Listener = find(&lds, service)?;
            let api = listener
                .api_listener
                .and_then(|a| a.api_listener)
                .with_context(|| format!("{service} is not an API listener"))?;
            let hcm: HttpConnectionManager = unpack(&api)?;
            let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else {
                anyhow::bail!("{service}: the API listener's routes should be inline");
            };
            ensure!(route_cluster(&rc)? == service, "{rc:?}");
        }
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_eds_and_rds_send_only_the_subscribed_names() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-by-name", &mesh).await?;
        let mut s = plane.sotw("by-name").await?;

        let eds = s.fetch_and_ack(Eds, &["api"]).await?;
        ensure!(sotw_names(&eds)? == ["api"], "{:?}", sotw_names(&eds)?);
        let api: ClusterLoadAssignment = find(&eds, "api")?;
        ensure!(
            endpoints_of(&api) == [("127.0.0.1:9001".into(), 1), ("127.0.0.1:9002".into(), 3)],
            "{:?}",
            endpoints_of(&api)
        );

        // A newly subscribed name is sent.
        s.subscribe(Eds, &["api", "db"]).await?;
        let eds = s.recv(Eds).await?;
        let names = sotw_names(&eds)?;
        ensure!(
            names.iter().any(|n| n == "db") && names.iter().all(|n| n == "api" || n == "db"),
            "{names:?}"
        );
        let db: ClusterLoadAssignment = find(&eds, "db")?;
        ensure!(endpoints_of(&db) == [("127.0.0.1:5432".into(), 1)]);
        s.ack(&eds).await?;

        // A name that does not exist yet is remembered and sent once it does.
        s.subscribe(Eds, &["api", "db", "ghost"]).await?;
        s.expect_quiet(Eds, QUIET).await?;
        mesh = mesh.with_service(Service::new("ghost", "http1", &[(7000, None)]));
        plane.edit(&mesh).await?;
        let eds = s.recv(Eds).await?;
        ensure!(sotw_names(&eds)? == ["ghost"], "{:?}", sotw_names(&eds)?);
        s.ack(&eds).await?;

        // After unsubscribing from db, its changes are not sent; api's still are.
        s.subscribe(Eds, &["api", "ghost"]).await?;
        mesh = mesh.with_endpoints("db", &[(5433, None)]);
        plane.edit(&mesh).await?;
        s.expect_quiet(Eds, QUIET).await?;
        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let eds = s.recv(Eds).await?;
        ensure!(sotw_names(&eds)? == ["api"], "{:?}", sotw_names(&eds)?);
        s.ack(&eds).await?;
        // Subscribing to db again sends it again, at its current state.
        s.subscribe(Eds, &["api", "db", "ghost"]).await?;
        let eds = s.recv(Eds).await?;
        let db: ClusterLoadAssignment = find(&eds, "db")?;
        ensure!(endpoints_of(&db) == [("127.0.0.1:5433".into(), 1)]);
        s.ack(&eds).await?;

        let rds = s.fetch_and_ack(Rds, &["web"]).await?;
        ensure!(rds.type_url == Rds.type_url());
        ensure!(sotw_names(&rds)? == ["web"], "{:?}", sotw_names(&rds)?);
        let rc: RouteConfiguration = find(&rds, "web")?;
        ensure!(rc.virtual_hosts.len() == 1 && rc.virtual_hosts[0].domains == ["*"]);
        ensure!(route_cluster(&rc)? == "api", "{rc:?}");
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_after_an_ack_eds_carries_only_changes_and_cds_lds_the_full_set() -> anyhow::Result<()>
{
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-edit", &mesh).await?;
        let mut s = plane.sotw("editor").await?;
        let cds = s.fetch_and_ack(Cds, &[]).await?;
        let lds = s.fetch_and_ack(Lds, &[]).await?;
        s.fetch_and_ack(Eds, &ALL_CLUSTERS).await?;
        s.fetch_and_ack(Rds, &["web"]).await?;
        s.expect_silence(QUIET).await?;

        // api's endpoints and db's cluster change: CDS resends every cluster, EDS only api.
        mesh = mesh.with_endpoints("api", &[(9001, None), (9003, Some(2))]);
        mesh.service("db").load_balancer = Some("least_request");
        let v = plane.edit(&mesh).await?.to_string();
        let cds2 = s.recv(Cds).await?;
        ensure!(
            cds2.version_info == v && cds2.version_info != cds.version_info,
            "cds version {:?} (model {v}, before {:?})",
            cds2.version_info,
            cds.version_info
        );
        ensure!(
            sotw_names(&cds2)? == ALL_CLUSTERS,
            "{:?}",
            sotw_names(&cds2)?
        );
        let db: Cluster = find(&cds2, "db")?;
        ensure!(db.lb_policy == LbPolicy::LeastRequest as i32, "{db:?}");
        let eds2 = s.recv(Eds).await?;
        ensure!(
            eds2.version_info == v,
            "eds version {:?}",
            eds2.version_info
        );
        ensure!(sotw_names(&eds2)? == ["api"], "{:?}", sotw_names(&eds2)?);
        let api: ClusterLoadAssignment = find(&eds2, "api")?;
        ensure!(
            endpoints_of(&api) == [("127.0.0.1:9001".into(), 1), ("127.0.0.1:9003".into(), 2)],
            "{:?}",
            endpoints_of(&api)
        );
        s.ack(&cds2).await?;
        s.ack(&eds2).await?;
        // Listeners and routes did not change: nothing for them.
        s.expect_silence(QUIET).await?;

        // Only the web listener changes: LDS resends both listeners.
        mesh.web_header_timeout = Some("3s".into());
        let v = plane.edit(&mesh).await?.to_string();
        let lds2 = s.recv(Lds).await?;
        ensure!(
            lds2.version_info == v && lds2.version_info != lds.version_info,
            "lds version {:?}",
            lds2.version_info
        );
        ensure!(
            sotw_names(&lds2)? == ["pg", "web"],
            "{:?}",
            sotw_names(&lds2)?
        );
        let web: HttpConnectionManager = network_filter(&find(&lds2, "web")?)?;
        ensure!(
            web.request_headers_timeout.map(|d| d.seconds) == Some(3),
            "{:?}",
            web.request_headers_timeout
        );
        s.ack(&lds2).await?;
        s.expect_silence(QUIET).await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_holds_pushes_until_the_ack_then_sends_only_the_latest() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-hold", &mesh).await?;
        let mut s = plane.sotw("slow-acker").await?;
        let cds = s.fetch(Cds, &[]).await?;
        let eds = s.fetch(Eds, &["api"]).await?;

        let mut latest = 0;
        for i in 0..5u16 {
            mesh = mesh.with_endpoints("api", &[(9100 + i, None)]);
            mesh.service("cache").connect_timeout = Some(format!("{}s", i + 1));
            latest = plane.edit(&mesh).await?;
        }
        // Five versions were published; neither type gets any before its ACK.
        s.expect_silence(QUIET).await?;

        s.ack(&eds).await?;
        let eds2 = s.recv(Eds).await?;
        ensure!(
            eds2.version_info == latest.to_string(),
            "eds version {:?}, latest model {latest}",
            eds2.version_info
        );
        ensure!(sotw_names(&eds2)? == ["api"], "{:?}", sotw_names(&eds2)?);
        let api: ClusterLoadAssignment = find(&eds2, "api")?;
        ensure!(
            endpoints_of(&api) == [("127.0.0.1:9104".into(), 1)],
            "{:?}",
            endpoints_of(&api)
        );
        s.ack(&eds2).await?;
        // No intermediate EDS version follows, and CDS still waits for its own ACK.
        s.expect_silence(QUIET).await?;

        s.ack(&cds).await?;
        let cds2 = s.recv(Cds).await?;
        ensure!(
            cds2.version_info == latest.to_string(),
            "{:?}",
            cds2.version_info
        );
        ensure!(sotw_names(&cds2)? == ALL_CLUSTERS);
        let cache: Cluster = find(&cds2, "cache")?;
        ensure!(
            cache.connect_timeout.as_ref().map(|d| d.seconds) == Some(5),
            "{:?}",
            cache.connect_timeout
        );
        s.ack(&cds2).await?;
        s.expect_silence(QUIET).await?;

        let metrics = plane.metrics().await?;
        for t in ["cds", "eds"] {
            let pushes = metrics.get(
                "tern_xds_pushes_total",
                &[("type", t), ("protocol", "sotw")],
            );
            ensure!(pushes == Some(2.0), "{t} pushes: {pushes:?}");
        }
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_nack_is_counted_shown_and_not_answered_with_a_resend() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-nack", &mesh).await?;
        let mut s = plane.sotw("nacker").await?;
        let reason = "cluster db: rejected by the test";

        let cds = s.fetch(Cds, &[]).await?;
        s.nack(&cds, reason).await?;
        // The same version is not sent again (a NACK loop would resend it at once).
        s.expect_quiet(Cds, QUIET).await?;

        eventually("the NACK counted and shown", SETTLE, || async {
            let metrics = plane.metrics().await?;
            let nacks = metrics.get(
                "tern_xds_nacks_total",
                &[("type", "cds"), ("reason", reason)],
            );
            ensure!(nacks == Some(1.0), "nacks {nacks:?}:\n{}", metrics.text);
            let node = plane.node("nacker").await?;
            ensure!(node["last_nack"]["cds"] == reason, "{node}");
            ensure!(node["acked"].get("cds").is_none(), "{node}");
            Ok(())
        })
        .await?;

        // A real change is still pushed, and its ACK is recorded next to the earlier NACK.
        mesh.service("db").load_balancer = Some("least_request");
        let v = plane.edit(&mesh).await?.to_string();
        let cds2 = s.recv(Cds).await?;
        ensure!(cds2.version_info == v, "{:?}", cds2.version_info);
        s.ack(&cds2).await?;
        eventually("the ACK after the NACK shown", SETTLE, || async {
            let node = plane.node("nacker").await?;
            ensure!(node["acked"]["cds"] == v.as_str(), "{node}");
            ensure!(node["last_nack"]["cds"] == reason, "{node}");
            Ok(())
        })
        .await?;
        s.expect_silence(QUIET).await?;
        let metrics = plane.metrics().await?;
        let pushes = metrics.get(
            "tern_xds_pushes_total",
            &[("type", "cds"), ("protocol", "sotw")],
        );
        ensure!(pushes == Some(2.0), "cds pushes {pushes:?}");
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_stale_nonce_while_a_push_is_pending_is_ignored() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-stale-pending", &mesh).await?;
        let mut s = plane.sotw("stale-pending").await?;
        let r1 = s.fetch_and_ack(Eds, &["api"]).await?;
        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let r2 = s.recv(Eds).await?;

        // An answer to r1, which r2 has superseded: a NACK and a new subscription.
        s.send(DiscoveryRequest {
            version_info: r1.version_info.clone(),
            resource_names: vec!["api".into(), "db".into()],
            type_url: Eds.type_url(),
            response_nonce: r1.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "stale".into(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await?;
        s.expect_quiet(Eds, QUIET).await?;
        let metrics = plane.metrics().await?;
        let nacks = metrics.get("tern_xds_nacks_total", &[]).unwrap_or(0.0);
        ensure!(nacks == 0.0, "a stale NACK was counted: {nacks}");

        // r2 still awaits its ACK: a newer version waits too.
        mesh = mesh.with_endpoints("api", &[(9004, None)]);
        let latest = plane.edit(&mesh).await?;
        s.expect_quiet(Eds, QUIET).await?;
        s.ack(&r2).await?;
        let r3 = s.recv(Eds).await?;
        ensure!(
            r3.version_info == latest.to_string(),
            "{:?}",
            r3.version_info
        );
        ensure!(sotw_names(&r3)? == ["api"], "{:?}", sotw_names(&r3)?);
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_stale_nonce_after_a_newer_ack_is_ignored() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("sotw-stale-acked", &mesh).await?;
        let mut s = plane.sotw("stale-acked").await?;
        let r1 = s.fetch_and_ack(Eds, &["api"]).await?;
        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let r2 = s.recv(Eds).await?;
        s.ack(&r2).await?;

        // r1's nonce went stale when r2 was sent (xDS spec, "Resource updates"), ACKed or
        // not: a request carrying it is ignored, so the db it asks for is not sent.
        s.send(DiscoveryRequest {
            version_info: r1.version_info.clone(),
            resource_names: vec!["api".into(), "db".into()],
            type_url: Eds.type_url(),
            response_nonce: r1.nonce.clone(),
            ..Default::default()
        })
        .await?;
        s.expect_quiet(Eds, QUIET).await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_debug_nodes_shows_the_node_and_acked_versions() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("sotw-nodes", &Mesh::base()).await?;
        // The node goes on the first request only, as Envoy sends it.
        let mut s = plane.sotw("node-a").await?;
        let cds = s.fetch_and_ack(Cds, &[]).await?;
        let lds = s.fetch_and_ack(Lds, &[]).await?;
        let eds = s.fetch_and_ack(Eds, &ALL_CLUSTERS).await?;
        let rds = s.fetch_and_ack(Rds, &["web"]).await?;
        let node = eventually("every type's ACK shown", SETTLE, || async {
            let node = plane.node("node-a").await?;
            for (t, r) in [("cds", &cds), ("lds", &lds), ("eds", &eds), ("rds", &rds)] {
                ensure!(node["acked"][t] == r.version_info.as_str(), "{t}: {node}");
            }
            Ok(node)
        })
        .await?;
        ensure!(node["protocol"] == "sotw", "{node}");
        ensure!(
            node["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{node}"
        );
        ensure!(
            node["last_nack"].as_object().is_some_and(|m| m.is_empty()),
            "{node}"
        );

        drop(s);
        eventually("the closed stream gone", SETTLE, || async {
            let nodes = plane.nodes().await?;
            ensure!(nodes.is_empty(), "{nodes:?}");
            Ok(())
        })
        .await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Incremental (delta).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_wildcard_and_named_subscriptions_carry_names_and_versions() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("delta-subscribe", &mesh).await?;
        let mut d = plane.delta("delta-a").await?;

        let cds = d.fetch_and_ack(Cds, &[]).await?;
        ensure!(cds.type_url == Cds.type_url());
        ensure!(
            !cds.system_version_info.is_empty() && !cds.nonce.is_empty(),
            "{cds:?}"
        );
        ensure!(
            cds.removed_resources.is_empty(),
            "{:?}",
            cds.removed_resources
        );
        let clusters = delta_versions(&cds)?;
        ensure!(clusters.keys().eq(ALL_CLUSTERS.iter()), "{clusters:?}");
        ensure!(clusters.values().all(|v| !v.is_empty()), "{clusters:?}");

        // An explicit wildcard plus a name: every listener, and the API listener named.
        d.subscribe(Lds, &["*", "cache"], &[]).await?;
        let lds = d.recv(Lds).await?;
        ensure!(
            delta_names(&lds)? == ["cache", "pg", "web"],
            "{:?}",
            delta_names(&lds)?
        );
        d.ack(&lds).await?;

        let eds = d.fetch_and_ack(Eds, &["api"]).await?;
        ensure!(delta_names(&eds)? == ["api"], "{:?}", delta_names(&eds)?);
        let api_version = delta_versions(&eds)?["api"].clone();
        let eds = d.fetch_and_ack(Eds, &["db"]).await?;
        ensure!(delta_names(&eds)? == ["db"], "{:?}", delta_names(&eds)?);

        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let eds = d.recv(Eds).await?;
        let changed = delta_versions(&eds)?;
        ensure!(changed.keys().eq(["api"].iter()), "{changed:?}");
        ensure!(
            changed["api"] != api_version,
            "api kept version {api_version}"
        );
        let cla: ClusterLoadAssignment = unpack(
            eds.resources
                .first()
                .and_then(|r| r.resource.as_ref())
                .context("no body")?,
        )?;
        ensure!(endpoints_of(&cla) == [("127.0.0.1:9003".into(), 1)]);
        d.ack(&eds).await?;
        // Clusters and listeners did not change.
        d.expect_quiet(Cds, QUIET).await?;
        d.expect_quiet(Lds, Duration::ZERO).await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_a_removed_service_is_sent_as_removed_resources() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("delta-remove", &Mesh::base()).await?;
        let mut d = plane.delta("remover").await?;
        d.fetch_and_ack(Cds, &[]).await?;
        d.fetch_and_ack(Eds, &["api", "cache"]).await?;
        d.fetch_and_ack(Lds, &["*", "cache"]).await?;

        plane.edit(&Mesh::base().without_service("cache")).await?;
        for kind in [Cds, Eds, Lds] {
            let r = d.recv(kind).await?;
            ensure!(
                r.resources.is_empty() && r.removed_resources == ["cache"],
                "{}: resources {:?}, removed {:?}",
                kind.short(),
                delta_names(&r)?,
                r.removed_resources
            );
            d.ack(&r).await?;
        }

        // Still subscribed: when cache comes back it is sent again.
        plane.edit(&Mesh::base()).await?;
        for kind in [Cds, Eds, Lds] {
            let r = d.recv(kind).await?;
            ensure!(
                delta_names(&r)? == ["cache"] && r.removed_resources.is_empty(),
                "{}: resources {:?}, removed {:?}",
                kind.short(),
                delta_names(&r)?,
                r.removed_resources
            );
            d.ack(&r).await?;
        }
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_unsubscribe_stops_updates() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("delta-unsubscribe", &mesh).await?;
        let mut d = plane.delta("unsubscriber").await?;
        let eds = d.fetch_and_ack(Eds, &["api", "db"]).await?;
        ensure!(
            delta_names(&eds)? == ["api", "db"],
            "{:?}",
            delta_names(&eds)?
        );

        d.subscribe(Eds, &[], &["db"]).await?;
        mesh = mesh.with_endpoints("db", &[(5433, None)]);
        plane.edit(&mesh).await?;
        d.expect_quiet(Eds, QUIET).await?;

        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let eds = d.recv(Eds).await?;
        ensure!(
            delta_names(&eds)? == ["api"] && eds.removed_resources.is_empty(),
            "resources {:?}, removed {:?}",
            delta_names(&eds)?,
            eds.removed_resources
        );
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_initial_resource_versions_are_not_resent() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("delta-reconnect", &mesh).await?;
        let mut first = plane.delta("reconnecting").await?;
        let clusters = delta_versions(&first.fetch_and_ack(Cds, &[]).await?)?;
        let endpoints = delta_versions(&first.fetch_and_ack(Eds, &["api", "db"]).await?)?;
        drop(first);

        let mut d = plane.delta("reconnecting").await?;
        // Holding every subscribed assignment at its current version: nothing to send.
        d.subscribe_holding(Eds, &["api", "db"], endpoints.into_iter().collect())
            .await?;
        d.expect_quiet(Eds, QUIET).await?;

        // Holding api as it is, db at an older version and a cluster that is gone: db is
        // resent, cache (not held) is sent, gone is removed, api is not resent.
        let holding: HashMap<String, String> = [
            ("api".to_string(), clusters["api"].clone()),
            ("db".to_string(), "an-older-version".to_string()),
            ("gone".to_string(), "1".to_string()),
        ]
        .into_iter()
        .collect();
        d.subscribe_holding(Cds, &[], holding).await?;
        let cds = d.recv(Cds).await?;
        ensure!(
            delta_names(&cds)? == ["cache", "db"] && cds.removed_resources == ["gone"],
            "resources {:?}, removed {:?}",
            delta_names(&cds)?,
            cds.removed_resources
        );
        d.ack(&cds).await?;

        // From there the stream carries changes as usual.
        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let eds = d.recv(Eds).await?;
        ensure!(delta_names(&eds)? == ["api"], "{:?}", delta_names(&eds)?);
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_counted_and_not_answered_with_a_resend() -> anyhow::Result<()> {
    bounded(async {
        let mut mesh = Mesh::base();
        let plane = Plane::start("delta-nack", &mesh).await?;
        let mut d = plane.delta("delta-nacker").await?;
        d.subscribe(Eds, &["api"], &[]).await?;
        let eds = d.recv(Eds).await?;
        let reason = "endpoint api: rejected by the test";
        d.nack(&eds, reason).await?;
        d.expect_quiet(Eds, QUIET).await?;
        eventually("the delta NACK counted and shown", SETTLE, || async {
            let metrics = plane.metrics().await?;
            let nacks = metrics.get(
                "tern_xds_nacks_total",
                &[("type", "eds"), ("reason", reason)],
            );
            ensure!(nacks == Some(1.0), "nacks {nacks:?}");
            let node = plane.node("delta-nacker").await?;
            ensure!(node["last_nack"]["eds"] == reason, "{node}");
            ensure!(node["protocol"] == "delta", "{node}");
            Ok(())
        })
        .await?;

        mesh = mesh.with_endpoints("api", &[(9003, None)]);
        plane.edit(&mesh).await?;
        let eds = d.recv(Eds).await?;
        ensure!(delta_names(&eds)? == ["api"], "{:?}", delta_names(&eds)?);
        d.ack(&eds).await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Isolation, model updates, health and metrics.

/// Each stuck stream has its own connection, as each proxy does: on a shared HTTP/2
/// connection, unread data holds the connection's flow-control window in the client, which
/// would stall its other streams whatever the server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_reads_or_acks_does_not_delay_others() -> anyhow::Result<()> {
    bounded(async {
        // Enough clusters that a CDS response overflows a 64 KiB flow-control window.
        let mut mesh = Mesh::base();
        for i in 0..600u16 {
            mesh = mesh.with_service(Service::new(
                &format!("filler-{i:03}"),
                "tcp",
                &[(20_000 + i, None)],
            ));
        }
        let plane = Plane::start("isolation", &mesh).await?;

        // Never reads its responses, with the smallest windows HTTP/2 allows.
        let mut never_reads =
            Sotw::open(connect(plane.xds, Some(65_535)).await?, "never-reads").await?;
        never_reads.subscribe(Cds, &[]).await?;
        never_reads.subscribe(Lds, &[]).await?;
        never_reads.subscribe(Eds, &["api"]).await?;
        never_reads.subscribe(Rds, &["web"]).await?;
        // Reads, never ACKs.
        let mut never_acks = plane.sotw("never-acks").await?;
        never_acks.fetch(Cds, &[]).await?;
        never_acks.fetch(Eds, &["api"]).await?;

        let mut healthy = plane.sotw("healthy").await?;
        let cds = healthy.fetch_and_ack(Cds, &[]).await?;
        ensure!(
            cds.encoded_len() > 65_535,
            "the CDS response is only {} bytes",
            cds.encoded_len()
        );
        healthy.fetch_and_ack(Eds, &["api"]).await?;

        for i in 0..3u16 {
            mesh = mesh.with_endpoints("api", &[(9200 + i, None)]);
            write_atomically(&plane.mesh, &mesh.yaml())?;
            let edited = tokio::time::Instant::now();
            let eds = healthy.recv(Eds).await?;
            let took = edited.elapsed();
            let api: ClusterLoadAssignment = find(&eds, "api")?;
            ensure!(
                endpoints_of(&api) == [(format!("127.0.0.1:{}", 9200 + i), 1)],
                "{:?}",
                endpoints_of(&api)
            );
            ensure!(
                took < Duration::from_secs(5),
                "edit {i} took {took:?} to reach the healthy stream"
            );
            healthy.ack(&eds).await?;
        }
        // The stuck streams are still open and still held back.
        never_acks.expect_silence(QUIET).await?;
        let nodes = plane.nodes().await?;
        ensure!(nodes.len() == 3, "{nodes:?}");
        drop(never_reads);
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_counted_and_not_pushed_then_a_valid_one_is() -> anyhow::Result<()> {
    bounded(async {
        let mesh = Mesh::base();
        let plane = Plane::start("invalid-edit", &mesh).await?;
        let mut s = plane.sotw("watcher").await?;
        s.fetch_and_ack(Cds, &[]).await?;
        s.fetch_and_ack(Lds, &[]).await?;
        let eds = s.fetch_and_ack(Eds, &["api"]).await?;
        let before = plane.model_version().await?;

        // A field that does not parse, then a route to a service that does not exist.
        plane
            .edit_invalid(&mesh.yaml().replace("protocol: http1", "protocol: http7"))
            .await?;
        plane
            .edit_invalid(&mesh.yaml().replace("service: api", "service: nowhere"))
            .await?;
        s.expect_silence(QUIET).await?;
        ensure!(plane.model_version().await? == before);
        let invalid = plane.invalid_updates().await?;
        ensure!(invalid == 2.0, "invalid updates: {invalid}");
        let (status, _) = http_get(plane.admin, "/ready").await?;
        ensure!(status == StatusCode::OK, "/ready: {status}");

        let fixed = mesh.with_endpoints("api", &[(9003, None)]);
        let v = plane.edit(&fixed).await?;
        ensure!(v == before + 1, "version {v} after {before}");
        let eds2 = s.recv(Eds).await?;
        ensure!(eds2.version_info == v.to_string() && eds2.version_info != eds.version_info);
        let api: ClusterLoadAssignment = find(&eds2, "api")?;
        ensure!(endpoints_of(&api) == [("127.0.0.1:9003".into(), 1)]);
        plane.stop().await;
        Ok(())
    })
    .await
}

/// One of the fifty streams (boxed: the two clients differ in size).
enum Either {
    Sotw(Box<Sotw>),
    Delta(Box<Delta>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_converge_after_an_edit() -> anyhow::Result<()> {
    bounded(async {
        let mesh = Mesh::base();
        let plane = Plane::start("fifty", &mesh).await?;
        let mut channels = Vec::new();
        for _ in 0..10 {
            channels.push(plane.channel().await?);
        }
        // Five streams on each of ten connections, alternating SotW and delta.
        let mut streams = Vec::new();
        for i in 0..50 {
            let channel = channels[i % channels.len()].clone();
            let node = format!("many-{i:02}");
            streams.push(if i % 2 == 0 {
                let mut s = Sotw::open(channel, &node).await?;
                s.fetch_and_ack(Eds, &["api"]).await?;
                Either::Sotw(Box::new(s))
            } else {
                let mut d = Delta::open(channel, &node).await?;
                d.fetch_and_ack(Eds, &["api"]).await?;
                Either::Delta(Box::new(d))
            });
        }

        // Every stream waits for the edit in its own task, and hands itself back so that
        // it stays open for the look at /debug/nodes.
        let mut tasks = tokio::task::JoinSet::new();
        for stream in streams {
            tasks.spawn(async move {
                let (cla, stream): (ClusterLoadAssignment, Either) = match stream {
                    Either::Sotw(mut s) => {
                        let r = s.recv(Eds).await?;
                        s.ack(&r).await?;
                        (find(&r, "api")?, Either::Sotw(s))
                    }
                    Either::Delta(mut d) => {
                        let r = d.recv(Eds).await?;
                        d.ack(&r).await?;
                        let body = r.resources.first().and_then(|r| r.resource.as_ref());
                        (unpack(body.context("no body")?)?, Either::Delta(d))
                    }
                };
                ensure!(
                    endpoints_of(&cla) == [("127.0.0.1:9003".into(), 1)],
                    "{:?}",
                    endpoints_of(&cla)
                );
                anyhow::Ok(stream)
            });
        }
        let v = plane
            .edit(&mesh.with_endpoints("api", &[(9003, None)]))
            .await?;
        let mut open = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            open.push(joined??);
        }
        eventually("all fifty streams ACKing the edit", SETTLE, || async {
            let nodes = plane.nodes().await?;
            let acked = nodes
                .iter()
                .filter(|n| n["acked"]["eds"] == v.to_string().as_str())
                .count();
            ensure!(acked == 50, "{acked} of {} streams at eds {v}", nodes.len());
            Ok(())
        })
        .await?;
        drop(open);
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_connected_streams_follow_the_streams() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("gauges", &Mesh::base()).await?;
        for path in ["/ready", "/live"] {
            let (status, body) = http_get(plane.admin, path).await?;
            ensure!(status == StatusCode::OK, "{path}: {status} {body:?}");
        }
        let connected = |sotw: f64, delta: f64| {
            let plane = &plane;
            eventually("tern_xds_connected_streams", SETTLE, move || async move {
                let m = plane.metrics().await?;
                let s = m
                    .get("tern_xds_connected_streams", &[("protocol", "sotw")])
                    .unwrap_or(0.0);
                let d = m
                    .get("tern_xds_connected_streams", &[("protocol", "delta")])
                    .unwrap_or(0.0);
                ensure!((s, d) == (sotw, delta), "sotw {s}, delta {d}");
                Ok(())
            })
        };
        connected(0.0, 0.0).await?;

        let mut sotw = Vec::new();
        for i in 0..3 {
            let mut s = plane.sotw(&format!("gauge-sotw-{i}")).await?;
            s.fetch_and_ack(Cds, &[]).await?;
            sotw.push(s);
        }
        let mut delta = Vec::new();
        for i in 0..2 {
            let mut d = plane.delta(&format!("gauge-delta-{i}")).await?;
            d.fetch_and_ack(Cds, &[]).await?;
            delta.push(d);
        }
        connected(3.0, 2.0).await?;
        sotw.pop();
        connected(2.0, 2.0).await?;
        drop(sotw);
        drop(delta);
        connected(0.0, 0.0).await?;
        plane.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_promptly() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("shutdown", &Mesh::base()).await?;
        let mut s = plane.sotw("sotw-at-shutdown").await?;
        s.fetch_and_ack(Cds, &[]).await?;
        let mut d = plane.delta("delta-at-shutdown").await?;
        d.fetch_and_ack(Cds, &[]).await?;
        // Both clients keep their request side open, as a proxy does.
        let started = tokio::time::Instant::now();
        plane.stop().await;
        let took = started.elapsed();
        s.expect_closed(RECV).await?;
        d.expect_closed(RECV).await?;
        ensure!(
            took < Duration::from_secs(3),
            "shutdown took {took:?} with two streams open"
        );
        Ok(())
    })
    .await
}

/// README's metric names, exactly: the parser elsewhere forgives a stray leading `_`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_the_documented_names() -> anyhow::Result<()> {
    bounded(async {
        let plane = Plane::start("metric-names", &Mesh::base()).await?;
        let mut s = plane.sotw("named").await?;
        s.fetch_and_ack(Cds, &[]).await?;
        let text = plane.metrics().await?.text;
        for name in [
            "tern_xds_connected_streams{",
            "tern_xds_pushes_total{",
            "tern_xds_model_updates_total{",
            "tern_xds_model_version ",
            "tern_xds_resources{",
        ] {
            ensure!(
                text.lines().any(|l| l.starts_with(name)),
                "no sample starting with {name:?} in:\n{text}"
            );
        }
        plane.stop().await;
        Ok(())
    })
    .await
}

/// The poller compares the file's modification time and length, so an edit of the same
/// length that lands in the same timestamp tick (a few ms on Linux) as the version it last
/// read looks unchanged, and is never served. A script or a config-management run can write
/// that fast. Pinning the edit's mtime to the tick the poller last read makes the race
/// deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_within_one_timestamp_tick_is_still_pushed() -> anyhow::Result<()> {
    bounded(async {
        let mesh = Mesh::base();
        let plane = Plane::start("same-tick", &mesh).await?;
        let mut s = plane.sotw("tick").await?;
        s.fetch_and_ack(Eds, &["api"]).await?;

        // The poller reads the file at tick `t` (same content: nothing to publish)...
        let tick = std::time::SystemTime::now();
        std::fs::File::options()
            .write(true)
            .open(&plane.mesh)?
            .set_modified(tick)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ...and a same-length edit lands within the same tick.
        let edited = mesh.with_endpoints("api", &[(9003, None), (9002, Some(3))]);
        ensure!(edited.yaml().len() == Mesh::base().yaml().len());
        let tmp = plane.mesh.with_extension("tick");
        std::fs::write(&tmp, edited.yaml())?;
        std::fs::File::options()
            .write(true)
            .open(&tmp)?
            .set_modified(tick)?;
        std::fs::rename(&tmp, &plane.mesh)?;

        let eds = s.recv(Eds).await?;
        let api: ClusterLoadAssignment = find(&eds, "api")?;
        ensure!(
            endpoints_of(&api) == [("127.0.0.1:9003".into(), 1), ("127.0.0.1:9002".into(), 3)],
            "{:?}",
            endpoints_of(&api)
        );
        plane.stop().await;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Helpers for reading resources.

fn ensure_ads(source: &ConfigSource, what: &str) -> anyhow::Result<()> {
    ensure!(
        matches!(
            source.config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ),
        "{what}: config source is not ADS: {source:?}"
    );
    ensure!(
        source.resource_api_version == ApiVersion::V3 as i32,
        "{what}: resource API version {}",
        source.resource_api_version
    );
    Ok(())
}

fn address_of(listener: &Listener) -> anyhow::Result<String> {
    let address = listener
        .address
        .as_ref()
        .and_then(|a| a.address.as_ref())
        .context("listener without address")?;
    let address::Address::SocketAddress(sa) = address else {
        anyhow::bail!("not a socket address: {address:?}");
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        anyhow::bail!("no port: {sa:?}");
    };
    Ok(format!("{}:{port}", sa.address))
}

/// The typed config of a listener's only network filter.
fn network_filter<M: prost::Message + prost::Name + Default>(
    listener: &Listener,
) -> anyhow::Result<M> {
    let [chain] = listener.filter_chains.as_slice() else {
        anyhow::bail!(
            "{}: {} filter chains",
            listener.name,
            listener.filter_chains.len()
        );
    };
    let [f] = chain.filters.as_slice() else {
        anyhow::bail!("{}: {} filters", listener.name, chain.filters.len());
    };
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => unpack(any),
        other => anyhow::bail!("{}: filter {} config {other:?}", listener.name, f.name),
    }
}

/// The cluster of a route configuration's only route.
fn route_cluster(rc: &RouteConfiguration) -> anyhow::Result<String> {
    let [vhost] = rc.virtual_hosts.as_slice() else {
        anyhow::bail!("{} virtual hosts", rc.virtual_hosts.len());
    };
    let [r] = vhost.routes.as_slice() else {
        anyhow::bail!("{} routes", vhost.routes.len());
    };
    match &r.action {
        Some(route::Action::Route(action)) => match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => Ok(c.clone()),
            other => anyhow::bail!("not a single cluster: {other:?}"),
        },
        other => anyhow::bail!("not a route action: {other:?}"),
    }
}
