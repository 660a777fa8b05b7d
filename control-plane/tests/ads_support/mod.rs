//! For the ADS protocol tests (`ads_protocol.rs`): the control plane on a scratch mesh file
//! with quick polling, a mesh-file builder, raw State-of-the-World and incremental ADS clients
//! that read with a deadline and keep responses of other types for later, and readers for
//! the admin server's `/metrics` and `/debug/nodes`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::StatusCode;
use tern_control_plane::{Options, Running};
use tern_proxy::xds::TypeKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

#[path = "../grpc_xds/support.rs"]
mod peer;

pub use peer::{TempDir, eventually, http_get, write_atomically};

/// How long a response that is due may take to arrive. Generous: a loaded 2-core machine.
pub const RECV: Duration = Duration::from_secs(10);
/// How long a test watches for a response that must not come. A slow server can only make a
/// test pass wrongly here, never fail wrongly.
pub const QUIET: Duration = Duration::from_millis(400);
/// How long an admin-visible state (a metric, a version) may take to converge.
pub const SETTLE: Duration = Duration::from_secs(10);
/// The bound on a whole test.
pub const TEST: Duration = Duration::from_secs(90);

/// Runs a test body with an overall deadline, so a hang fails instead of stalling the suite.
pub async fn bounded<F>(body: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    match tokio::time::timeout(TEST, body).await {
        Ok(result) => result,
        Err(_) => bail!("the test did not finish within {TEST:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The mesh file.

/// One service of a mesh file.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    /// `http1`, `http2` or `tcp`.
    pub protocol: &'static str,
    pub load_balancer: Option<&'static str>,
    pub connect_timeout: Option<String>,
    /// (port on 127.0.0.1, weight; `None` leaves the weight out).
    pub endpoints: Vec<(u16, Option<u32>)>,
}

/// A mesh file, written out as YAML.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub services: Vec<Service>,
    /// The `web` listener's `request_header_timeout`, if set.
    pub web_header_timeout: Option<String>,
}

impl Mesh {
    /// Listeners `web` (HTTP, routes to `api` over RDS) and `pg` (TCP to `db`); services `api`
    /// (http1, 9001 and 9002 with weight 3), `cache` (http2, not routed to) and `db` (tcp).
    pub fn base() -> Mesh {
        Mesh {
            services: vec![
                Service::new("api", "http1", &[(9001, None), (9002, Some(3))]),
                Service::new("cache", "http2", &[(6379, None)]),
                Service::new("db", "tcp", &[(5432, None)]),
            ],
            web_header_timeout: None,
        }
    }

    pub fn service(&mut self, name: &str) -> &mut Service {
        let found = self.services.iter().position(|s| s.name == name);
        let index = found.unwrap_or_else(|| panic!("no service {name} in the mesh"));
        &mut self.services[index]
    }

    pub fn with_endpoints(mut self, service: &str, endpoints: &[(u16, Option<u32>)]) -> Mesh {
        self.service(service).endpoints = endpoints.to_vec();
        self
    }

    pub fn with_service(mut self, service: Service) -> Mesh {
        self.services.push(service);
        self
    }

    pub fn without_service(mut self, name: &str) -> Mesh {
        self.services.retain(|s| s.name != name);
        self
    }

    pub fn yaml(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "listeners:\n  - name: web\n    address: \"127.0.0.1:10080\"\n    protocol: http\n",
        );
        if let Some(t) = &self.web_header_timeout {
            let _ = writeln!(out, "    request_header_timeout: {t}");
        }
        out.push_str("    routes:\n      - backends: [ { service: api } ]\n");
        out.push_str(
            "  - name: pg\n    address: \"127.0.0.1:15432\"\n    protocol: tcp\n    service: db\n",
        );
        out.push_str("services:\n");
        for s in &self.services {
            let _ = writeln!(out, "  - name: {}\n    protocol: {}", s.name, s.protocol);
            if let Some(lb) = s.load_balancer {
                let _ = writeln!(out, "    load_balancer: {lb}");
            }
            if let Some(t) = &s.connect_timeout {
                let _ = writeln!(out, "    connect_timeout: {t}");
            }
            let endpoints: Vec<String> = s
                .endpoints
                .iter()
                .map(|(port, weight)| match weight {
                    Some(w) => format!("{{ address: \"127.0.0.1:{port}\", weight: {w} }}"),
                    None => format!("{{ address: \"127.0.0.1:{port}\" }}"),
                })
                .collect();
            let _ = writeln!(out, "    endpoints: [ {} ]", endpoints.join(", "));
        }
        out
    }
}

impl Service {
    pub fn new(name: &str, protocol: &'static str, endpoints: &[(u16, Option<u32>)]) -> Service {
        Service {
            name: name.to_string(),
            protocol,
            load_balancer: None,
            connect_timeout: None,
            endpoints: endpoints.to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control plane.

/// A control plane serving a mesh file in its own scratch directory.
pub struct Plane {
    running: Option<Running>,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub mesh: PathBuf,
    _dir: TempDir,
}

impl Plane {
    /// Starts on `mesh` (polled every 10 ms, debounced 5 ms) and waits until the first model
    /// is published (`/ready`), so that streams never meet the empty placeholder snapshot.
    pub async fn start(name: &str, mesh: &Mesh) -> anyhow::Result<Plane> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "tern_control_plane=warn".into()),
            )
            .with_test_writer()
            .with_ansi(false)
            .try_init();
        let dir = TempDir::new(&format!("tern-ads-{name}"))?;
        let path = dir.join("mesh.yaml");
        write_atomically(&path, &mesh.yaml())?;
        let running = tern_control_plane::start(Options {
            config: Some(path.clone()),
            xds_address: "127.0.0.1:0".parse()?,
            admin_address: Some("127.0.0.1:0".parse()?),
            kubernetes: None,
            debounce: Duration::from_millis(5),
            watch_interval: Duration::from_millis(10),
            ca: None,
        })
        .await?;
        let admin = running.admin_address.context("the admin server is off")?;
        let plane = Plane {
            xds: running.xds_address,
            admin,
            running: Some(running),
            mesh: path,
            _dir: dir,
        };
        eventually("the control plane ready", SETTLE, || async {
            let (status, body) = http_get(admin, "/ready").await?;
            ensure!(status == StatusCode::OK, "/ready: {status} {body:?}");
            Ok(())
        })
        .await?;
        Ok(plane)
    }

    /// Closes every stream and waits for the server's tasks.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Rewrites the mesh file and waits until the control plane has published it as a new
    /// model version, which it returns. Waiting also keeps two edits apart by more than the
    /// file system's timestamp granularity, which the file poller relies on.
    pub async fn edit(&self, mesh: &Mesh) -> anyhow::Result<u64> {
        let before = self.model_version().await?;
        write_atomically(&self.mesh, &mesh.yaml())?;
        eventually("the edit published", SETTLE, || async {
            let now = self.model_version().await?;
            ensure!(now > before, "model version still {now}");
            Ok(now)
        })
        .await
    }

    /// Writes `text` as the mesh file and waits until the control plane has counted it as an
    /// invalid model update.
    pub async fn edit_invalid(&self, text: &str) -> anyhow::Result<()> {
        let before = self.invalid_updates().await?;
        write_atomically(&self.mesh, text)?;
        eventually("the invalid edit counted", SETTLE, || async {
            let now = self.invalid_updates().await?;
            ensure!(now > before, "invalid updates still {now}");
            Ok(())
        })
        .await
    }

    pub async fn invalid_updates(&self) -> anyhow::Result<f64> {
        let metrics = self.metrics().await?;
        Ok(metrics
            .get("tern_xds_model_updates_total", &[("outcome", "invalid")])
            .unwrap_or(0.0))
    }

    /// The model version being served (`tern_xds_model_version`).
    pub async fn model_version(&self) -> anyhow::Result<u64> {
        let metrics = self.metrics().await?;
        let v = metrics
            .get("tern_xds_model_version", &[])
            .context("no tern_xds_model_version in /metrics")?;
        Ok(v as u64)
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = http_get(self.admin, "/metrics").await?;
        ensure!(status == StatusCode::OK, "/metrics answered {status}");
        Ok(Metrics::parse(&String::from_utf8_lossy(&body)))
    }

    /// `/debug/nodes`: one entry per open stream.
    pub async fn nodes(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let (status, body) = http_get(self.admin, "/debug/nodes").await?;
        ensure!(status == StatusCode::OK, "/debug/nodes answered {status}");
        let value: serde_json::Value = serde_json::from_slice(&body)?;
        value
            .as_array()
            .cloned()
            .context("/debug/nodes is not a JSON array")
    }

    /// The single `/debug/nodes` entry of node `id`.
    pub async fn node(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let nodes = self.nodes().await?;
        let mine: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["node"] == id).collect();
        match mine.as_slice() {
            [one] => Ok((*one).clone()),
            _ => bail!("expected one /debug/nodes entry for {id}, got {nodes:#?}"),
        }
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        connect(self.xds, None).await
    }

    pub async fn sotw(&self, node: &str) -> anyhow::Result<Sotw> {
        Sotw::open(self.channel().await?, node).await
    }

    pub async fn delta(&self, node: &str) -> anyhow::Result<Delta> {
        Delta::open(self.channel().await?, node).await
    }
}

/// A new HTTP/2 connection to the xDS port; `window` sets both flow-control windows.
pub async fn connect(xds: SocketAddr, window: Option<u32>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(format!("http://{xds}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(w) = window {
        endpoint = endpoint
            .initial_stream_window_size(w)
            .initial_connection_window_size(w);
    }
    tokio::time::timeout(RECV, endpoint.connect())
        .await
        .context("connecting to the xDS port timed out")?
        .context("connecting to the xDS port")
}

// ---------------------------------------------------------------------------------------------
// The clients.

fn node(id: &str) -> Option<Node> {
    (!id.is_empty()).then(|| Node {
        id: id.to_string(),
        cluster: "tern-ads-tests".to_string(),
        ..Default::default()
    })
}

fn nack_status(message: &str) -> RpcStatus {
    RpcStatus {
        // INVALID_ARGUMENT, as Envoy sends.
        code: 3,
        message: message.to_string(),
        details: Vec::new(),
    }
}

/// A State-of-the-World ADS stream driven by hand. Like Envoy, it sends the node on the first
/// request only, and every request carries the type's full subscription, the last version it
/// accepted and the last nonce it answered.
pub struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node: Option<Node>,
    names: [Vec<String>; 4],
    version: [String; 4],
    nonce: [String; 4],
    held: VecDeque<DiscoveryResponse>,
}

impl Sotw {
    /// Opens a stream on `channel`; `node` is the node id (empty: send no node).
    pub async fn open(channel: Channel, node_id: &str) -> anyhow::Result<Sotw> {
        let (tx, requests) = mpsc::channel(64);
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let rx = tokio::time::timeout(
            RECV,
            client.stream_aggregated_resources(ReceiverStream::new(requests)),
        )
        .await
        .context("opening the SotW stream timed out")??
        .into_inner();
        Ok(Sotw {
            tx,
            rx,
            node: node(node_id),
            names: Default::default(),
            version: Default::default(),
            nonce: Default::default(),
            held: VecDeque::new(),
        })
    }

    /// Sends `request` as it is, adding the node if this is the stream's first request.
    pub async fn send(&mut self, mut request: DiscoveryRequest) -> anyhow::Result<()> {
        if let Some(node) = self.node.take() {
            request.node = Some(node);
        }
        tokio::time::timeout(RECV, self.tx.send(request))
            .await
            .context("sending a request timed out")?
            .context("the request stream is closed")
    }

    fn request(&self, kind: TypeKind) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: self.version[kind.index()].clone(),
            resource_names: self.names[kind.index()].clone(),
            type_url: kind.type_url(),
            response_nonce: self.nonce[kind.index()].clone(),
            ..Default::default()
        }
    }

    /// Subscribes to `names` of `kind` (none: a wildcard on the first request).
    pub async fn subscribe(&mut self, kind: TypeKind, names: &[&str]) -> anyhow::Result<()> {
        self.names[kind.index()] = names.iter().map(|n| n.to_string()).collect();
        self.send(self.request(kind)).await
    }

    /// ACKs `response`.
    pub async fn ack(&mut self, response: &DiscoveryResponse) -> anyhow::Result<()> {
        let kind = kind_of(&response.type_url)?;
        self.version[kind.index()].clone_from(&response.version_info);
        self.nonce[kind.index()].clone_from(&response.nonce);
        self.send(self.request(kind)).await
    }

    /// NACKs `response` with `reason`, keeping the last accepted version.
    pub async fn nack(&mut self, response: &DiscoveryResponse, reason: &str) -> anyhow::Result<()> {
        let kind = kind_of(&response.type_url)?;
        self.nonce[kind.index()].clone_from(&response.nonce);
        let mut request = self.request(kind);
        request.error_detail = Some(nack_status(reason));
        self.send(request).await
    }

    /// Subscribes and returns the first response.
    pub async fn fetch(
        &mut self,
        kind: TypeKind,
        names: &[&str],
    ) -> anyhow::Result<DiscoveryResponse> {
        self.subscribe(kind, names).await?;
        self.recv(kind).await
    }

    /// Subscribes, ACKs the first response and returns it.
    pub async fn fetch_and_ack(
        &mut self,
        kind: TypeKind,
        names: &[&str],
    ) -> anyhow::Result<DiscoveryResponse> {
        let response = self.fetch(kind, names).await?;
        self.ack(&response).await?;
        Ok(response)
    }

    /// The next response of `kind`, within [`RECV`]; responses of other types are kept.
    pub async fn recv(&mut self, kind: TypeKind) -> anyhow::Result<DiscoveryResponse> {
        match self.next_within(kind, RECV).await? {
            Some(r) => Ok(r),
            None => bail!("no {} response within {RECV:?}", kind.short()),
        }
    }

    /// Fails if a response of `kind` arrives within `within`.
    pub async fn expect_quiet(&mut self, kind: TypeKind, within: Duration) -> anyhow::Result<()> {
        match self.next_within(kind, within).await? {
            None => Ok(()),
            Some(r) => bail!(
                "unexpected {} response: version {:?}, nonce {:?}, resources {:?}",
                kind.short(),
                r.version_info,
                r.nonce,
                sotw_names(&r).unwrap_or_default()
            ),
        }
    }

    /// Fails if any response arrives within `within` (or one is already kept).
    pub async fn expect_silence(&mut self, within: Duration) -> anyhow::Result<()> {
        if let Some(r) = self.held.front() {
            bail!("unexpected response kept from earlier: {}", r.type_url);
        }
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => Ok(()),
            Ok(Ok(Some(r))) => bail!(
                "unexpected response: {} version {:?} resources {:?}",
                r.type_url,
                r.version_info,
                sotw_names(&r).unwrap_or_default()
            ),
            Ok(Ok(None)) => bail!("the server closed the stream"),
            Ok(Err(status)) => bail!("the stream failed: {status}"),
        }
    }

    /// Waits for the server to end the stream (cleanly or with a status).
    pub async fn expect_closed(&mut self, within: Duration) -> anyhow::Result<()> {
        loop {
            match tokio::time::timeout(within, self.rx.message()).await {
                Err(_) => bail!("the stream is still open after {within:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None) | Err(_)) => return Ok(()),
            }
        }
    }

    async fn next_within(
        &mut self,
        kind: TypeKind,
        within: Duration,
    ) -> anyhow::Result<Option<DiscoveryResponse>> {
        let url = kind.type_url();
        if let Some(i) = self.held.iter().position(|r| r.type_url == url) {
            return Ok(self.held.remove(i));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return Ok(None),
                Ok(m) => m,
            };
            match message {
                Ok(Some(r)) if r.type_url == url => return Ok(Some(r)),
                Ok(Some(r)) => self.held.push_back(r),
                Ok(None) => bail!("the server closed the stream"),
                Err(status) => bail!("the stream failed: {status}"),
            }
        }
    }
}

/// An incremental (delta) ADS stream driven by hand.
pub struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node: Option<Node>,
    held: VecDeque<DeltaDiscoveryResponse>,
}

impl Delta {
    pub async fn open(channel: Channel, node_id: &str) -> anyhow::Result<Delta> {
        let (tx, requests) = mpsc::channel(64);
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let rx = tokio::time::timeout(
            RECV,
            client.delta_aggregated_resources(ReceiverStream::new(requests)),
        )
        .await
        .context("opening the delta stream timed out")??
        .into_inner();
        Ok(Delta {
            tx,
            rx,
            node: node(node_id),
            held: VecDeque::new(),
        })
    }

    pub async fn send(&mut self, mut request: DeltaDiscoveryRequest) -> anyhow::Result<()> {
        if let Some(node) = self.node.take() {
            request.node = Some(node);
        }
        tokio::time::timeout(RECV, self.tx.send(request))
            .await
            .context("sending a request timed out")?
            .context("the request stream is closed")
    }

    /// Changes the subscription of `kind`.
    pub async fn subscribe(
        &mut self,
        kind: TypeKind,
        subscribe: &[&str],
        unsubscribe: &[&str],
    ) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: kind.type_url(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    /// A first request for `kind` that says which resources the client already holds.
    pub async fn subscribe_holding(
        &mut self,
        kind: TypeKind,
        subscribe: &[&str],
        holding: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: kind.type_url(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            initial_resource_versions: holding,
            ..Default::default()
        })
        .await
    }

    pub async fn ack(&mut self, response: &DeltaDiscoveryResponse) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    pub async fn nack(
        &mut self,
        response: &DeltaDiscoveryResponse,
        reason: &str,
    ) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(nack_status(reason)),
            ..Default::default()
        })
        .await
    }

    /// Subscribes, ACKs the first response and returns it.
    pub async fn fetch_and_ack(
        &mut self,
        kind: TypeKind,
        subscribe: &[&str],
    ) -> anyhow::Result<DeltaDiscoveryResponse> {
        self.subscribe(kind, subscribe, &[]).await?;
        let response = self.recv(kind).await?;
        self.ack(&response).await?;
        Ok(response)
    }

    pub async fn recv(&mut self, kind: TypeKind) -> anyhow::Result<DeltaDiscoveryResponse> {
        match self.next_within(kind, RECV).await? {
            Some(r) => Ok(r),
            None => bail!("no {} delta response within {RECV:?}", kind.short()),
        }
    }

    pub async fn expect_quiet(&mut self, kind: TypeKind, within: Duration) -> anyhow::Result<()> {
        match self.next_within(kind, within).await? {
            None => Ok(()),
            Some(r) => bail!(
                "unexpected {} delta response: resources {:?}, removed {:?}",
                kind.short(),
                delta_versions(&r).unwrap_or_default(),
                r.removed_resources
            ),
        }
    }

    /// Waits for the server to end the stream (cleanly or with a status).
    pub async fn expect_closed(&mut self, within: Duration) -> anyhow::Result<()> {
        loop {
            match tokio::time::timeout(within, self.rx.message()).await {
                Err(_) => bail!("the stream is still open after {within:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None) | Err(_)) => return Ok(()),
            }
        }
    }

    async fn next_within(
        &mut self,
        kind: TypeKind,
        within: Duration,
    ) -> anyhow::Result<Option<DeltaDiscoveryResponse>> {
        let url = kind.type_url();
        if let Some(i) = self.held.iter().position(|r| r.type_url == url) {
            return Ok(self.held.remove(i));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return Ok(None),
                Ok(m) => m,
            };
            match message {
                Ok(Some(r)) if r.type_url == url => return Ok(Some(r)),
                Ok(Some(r)) => self.held.push_back(r),
                Ok(None) => bail!("the server closed the stream"),
                Err(status) => bail!("the stream failed: {status}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding.

pub fn kind_of(type_url: &str) -> anyhow::Result<TypeKind> {
    TypeKind::from_type_url(type_url).with_context(|| format!("unknown type URL {type_url:?}"))
}

/// Decodes `any` as `M`, checking its type URL first.
pub fn unpack<M: prost::Message + prost::Name + Default>(any: &Any) -> anyhow::Result<M> {
    ensure!(
        any.type_url == M::type_url(),
        "expected a {} but got a {}",
        M::type_url(),
        any.type_url
    );
    M::decode(any.value.as_slice()).with_context(|| format!("decoding a {}", M::full_name()))
}

/// The name inside a resource of `kind`.
pub fn name_in(kind: TypeKind, any: &Any) -> anyhow::Result<String> {
    Ok(match kind {
        TypeKind::Cluster => unpack::<Cluster>(any)?.name,
        TypeKind::Endpoint => unpack::<ClusterLoadAssignment>(any)?.cluster_name,
        TypeKind::Listener => unpack::<Listener>(any)?.name,
        TypeKind::Route => unpack::<RouteConfiguration>(any)?.name,
    })
}

/// The names of a SotW response's resources, sorted; every resource must be of the
/// response's type.
pub fn sotw_names(response: &DiscoveryResponse) -> anyhow::Result<Vec<String>> {
    let kind = kind_of(&response.type_url)?;
    let mut names = response
        .resources
        .iter()
        .map(|any| name_in(kind, any))
        .collect::<anyhow::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// A delta response's resources, name → version, after checking that each wrapper's name
/// matches the resource inside it.
pub fn delta_versions(
    response: &DeltaDiscoveryResponse,
) -> anyhow::Result<BTreeMap<String, String>> {
    let kind = kind_of(&response.type_url)?;
    let mut out = BTreeMap::new();
    for r in &response.resources {
        let any = r
            .resource
            .as_ref()
            .with_context(|| format!("resource {} has no body", r.name))?;
        let inner = name_in(kind, any)?;
        ensure!(
            inner == r.name,
            "wrapper name {:?} but resource {inner:?}",
            r.name
        );
        out.insert(r.name.clone(), r.version.clone());
    }
    Ok(out)
}

/// The sorted names of a delta response's resources.
pub fn delta_names(response: &DeltaDiscoveryResponse) -> anyhow::Result<Vec<String>> {
    Ok(delta_versions(response)?.into_keys().collect())
}

/// The resource named `name` in a SotW response, decoded.
pub fn find<M: prost::Message + prost::Name + Default>(
    response: &DiscoveryResponse,
    name: &str,
) -> anyhow::Result<M> {
    let kind = kind_of(&response.type_url)?;
    for any in &response.resources {
        if name_in(kind, any)? == name {
            return unpack(any);
        }
    }
    bail!("no {name} in the {} response", kind.short())
}

/// A load assignment's endpoints as ("ip:port", weight), in order.
pub fn endpoints_of(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
    cla.endpoints
        .iter()
        .flat_map(|locality| &locality.lb_endpoints)
        .map(|lb| {
            let addr = match &lb.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e.address.as_ref(),
                _ => None,
            };
            let text = match addr.and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => {
                        format!("{}:{p}", sa.address)
                    }
                    _ => sa.address.clone(),
                },
                _ => String::from("?"),
            };
            let weight = lb.load_balancing_weight.as_ref().map_or(0, |w| w.value);
            (text, weight)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// /metrics.

/// One sample line of the OpenMetrics text.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `/metrics`, parsed.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the sample lines. A stray `_` in front of a name (a registry built with an
    /// empty prefix) is ignored here; `metrics_use_the_documented_names` checks for it.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`; `None` if there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.strip_prefix('_').unwrap_or(line);
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' => {}
                '=' => {
                    // A quoted value with \\, \" and \n escapes.
                    let (_, quote) = chars.next()?;
                    if quote != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
        rest = &after[end?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes() {
        let m = Metrics::parse(
            "# TYPE x counter\n_tern_xds_nacks_total{type=\"cds\",reason=\"a, \\\"b\\\" c\"} 2\n\
             tern_xds_model_version 7\n",
        );
        assert_eq!(
            m.get("tern_xds_nacks_total", &[("reason", "a, \"b\" c")]),
            Some(2.0)
        );
        assert_eq!(m.get("tern_xds_model_version", &[]), Some(7.0));
        assert_eq!(m.get("tern_xds_nacks_total", &[("type", "eds")]), None);
    }
}
