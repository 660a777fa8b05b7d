//! Tern's control plane: turns a mesh description (a YAML file, Kubernetes, or both) into
//! Envoy xDS v3 resources and streams them to proxies over ADS.
//!
//! Layout: `model` merges and validates the sources and publishes snapshots (`cache`) built by
//! `resources` (with `resilience`, `traffic` and `packing`); `ads` serves them, one task per
//! stream; `admin` and `metrics` show what happens; `kubernetes` watches Services,
//! EndpointSlices and Pods; `ca` is the mesh's certificate authority; `inject` adds the
//! sidecar to manifests.

pub mod admin;
pub mod ads;
pub mod ca;
pub mod cache;
pub mod inject;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod nodes;
pub mod packing;
pub mod resilience;
pub mod resources;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::ads::{AdsServer, Shared};
use crate::cache::Resources;

/// How to run a control plane.
pub struct Options {
    /// The mesh file; watched for edits.
    pub config: Option<PathBuf>,
    pub xds_address: SocketAddr,
    pub admin_address: Option<SocketAddr>,
    /// Watch this cluster's Services, EndpointSlices and Pods.
    pub kubernetes: Option<kubernetes::Source>,
    /// Time a change waits for more changes before a new version is published.
    pub debounce: Duration,
    /// How often the mesh file's metadata is checked.
    pub watch_interval: Duration,
    /// Serve the mesh certificate authority too.
    pub ca: Option<ca::CaOptions>,
}

/// A started control plane.
pub struct Running {
    pub xds_address: SocketAddr,
    pub admin_address: Option<SocketAddr>,
    pub ca: Option<ca::RunningCa>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Stops accepting, closes every stream and waits for the tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

/// Validates the sources, binds the xDS and admin ports and starts serving.
pub async fn start(options: Options) -> anyhow::Result<Running> {
    let file_model = match &options.config {
        Some(path) => {
            let (config, _) = tern_proxy::config::load_file(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(Arc::clone(&config.raw))
        }
        None => None,
    };
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let nodes = Arc::new(nodes::Nodes::default());
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    let (file_tx, file_rx) = watch::channel(file_model);
    let (kube_tx, kube_rx) = watch::channel(None);
    let (resources_tx, resources_rx) = watch::channel(Arc::new(Resources::empty()));

    if let Some(path) = options.config.clone() {
        tracker.spawn(
            model::watch_file(
                path,
                options.watch_interval,
                file_tx,
                Arc::clone(&metrics),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("watch_file")),
        );
    }
    let wait_for_kubernetes = options.kubernetes.is_some();
    if let Some(source) = options.kubernetes {
        let stop = shutdown.clone();
        tracker.spawn(
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    result = kubernetes::run(source, kube_tx) => {
                        if let Err(e) = result {
                            tracing::error!(error = %e, "Kubernetes watch failed; serving the last model");
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("kubernetes")),
        );
    }
    tracker.spawn(
        model::publish(
            file_rx,
            kube_rx,
            wait_for_kubernetes,
            options.debounce,
            resources_tx,
            Arc::clone(&metrics),
            Arc::clone(&ready),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("publish")),
    );

    let ca = match options.ca {
        Some(ca_options) => {
            Some(ca::start(ca_options, Arc::clone(&metrics), &tracker, shutdown.clone()).await?)
        }
        None => None,
    };
    let shared = Shared {
        resources: resources_rx,
        metrics,
        nodes: Arc::clone(&nodes),
        shutdown: shutdown.clone(),
    };
    let ads = Arc::new(AdsServer::new(shared, tracker.clone()));
    let listener = TcpListener::bind(options.xds_address)
        .await
        .with_context(|| format!("binding the xDS port {}", options.xds_address))?;
    let xds_address = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    tracker.spawn(
        async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .tcp_nodelay(true)
                .add_service(
                    AggregatedDiscoveryServiceServer::from_arc(ads)
                        .max_decoding_message_size(16 * 1024 * 1024)
                        .max_encoding_message_size(64 * 1024 * 1024),
                )
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "xDS server failed");
            }
        }
        .instrument(tracing::info_span!("xds_server")),
    );

    let admin_address = match options.admin_address {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin port {addr}"))?;
            let bound = listener.local_addr()?;
            let state = admin::AdminState {
                registry: Arc::new(registry),
                nodes,
                ready,
            };
            tracker.spawn(
                admin::serve(listener, state, tracker.clone(), shutdown.clone())
                    .instrument(tracing::info_span!("admin")),
            );
            Some(bound)
        }
        None => None,
    };
    Ok(Running {
        xds_address,
        admin_address,
        ca,
        shutdown,
        tracker,
    })
}
