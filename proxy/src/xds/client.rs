//! The ADS client: follows a control plane over one stream (State of the World or incremental),
//! turns what arrives into a config, applies it, and ACKs or NACKs. It reconnects with
//! jittered exponential backoff and, while the control plane is away, the last good config
//! simply stays in force: nothing here ever clears it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::TypeKind;
use super::assemble::XdsState;
use super::backoff::Backoff;
use super::decode::{
    InvalidResource, XdsCluster, XdsEndpoints, XdsListener, XdsRoutes, decode_any,
};
use crate::app::App;
use crate::config::{Config, RawConfig};

/// Which variant of the protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    /// State of the World: every response carries the whole set (listeners, clusters).
    Sotw,
    /// Incremental: only changes and removals travel.
    Delta,
}

#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// `host:port` of the ADS server (plaintext gRPC).
    pub server: String,
    pub node: String,
    pub protocol: XdsProtocol,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// What arrived in one response for one type.
enum Update {
    /// SotW Listener and Cluster responses: this is the whole set.
    Replace(Vec<Decoded>),
    /// Everything else: add or replace these, remove those.
    Change(Vec<Decoded>, Vec<String>),
}

// Short-lived (one response's worth), so the size spread between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Decoded {
    Listener(XdsListener),
    Routes(XdsRoutes),
    Cluster(XdsCluster),
    Endpoints(XdsEndpoints),
}

fn decode(kind: TypeKind, any: &Any) -> Result<Decoded, InvalidResource> {
    Ok(match kind {
        TypeKind::Listener => Decoded::Listener(XdsListener::try_from(&decode_any::<Listener>(
            any, "Listener",
        )?)?),
        TypeKind::Route => Decoded::Routes(XdsRoutes::try_from(
            &decode_any::<RouteConfiguration>(any, "RouteConfiguration")?,
        )?),
        TypeKind::Cluster => Decoded::Cluster(XdsCluster::try_from(&decode_any::<Cluster>(
            any, "Cluster",
        )?)?),
        TypeKind::Endpoint => {
            Decoded::Endpoints(XdsEndpoints::try_from(
                &decode_any::<ClusterLoadAssignment>(any, "ClusterLoadAssignment")?,
            )?)
        }
    })
}

/// The proxy's side of the conversation, independent of the protocol variant.
struct Follower {
    app: App,
    options: XdsOptions,
    state: XdsState,
    /// The last version accepted per type (what a NACK reports as still in force).
    versions: [String; 4],
    /// The config last applied, to skip re-applying identical ones (a resync after a
    /// reconnect changes nothing and must disturb nothing).
    applied: Option<RawConfig>,
    waiting: Option<String>,
    last_error: Option<String>,
    connected: bool,
    /// Incremental protocol only: per type, the versions held when the last stream ended.
    delta_versions: Option<[HashMap<String, String>; 4]>,
    /// Types that have had at least one response since the proxy started.
    seen: [bool; 4],
    /// When the first complete-enough config was assembled (for the initial fetch timeout).
    first_seen: Option<Instant>,
}

impl Follower {
    /// Takes one response's resources; `Ok` means ACK, `Err` carries the NACK's reason.
    async fn accept(
        &mut self,
        kind: TypeKind,
        update: Update,
        version: &str,
    ) -> Result<(), String> {
        let mut next = self.state.clone();
        let (items, removed, replace) = match update {
            Update::Replace(items) => (items, Vec::new(), true),
            Update::Change(items, removed) => (items, removed, false),
        };
        macro_rules! merge {
            ($map:expr, $variant:ident, $name:expr) => {{
                if replace {
                    $map.clear();
                }
                for name in &removed {
                    $map.remove(name);
                }
                for item in items {
                    if let Decoded::$variant(v) = item {
                        $map.insert($name(&v), v);
                    }
                }
            }};
        }
        match kind {
            TypeKind::Listener => merge!(next.listeners, Listener, |v: &XdsListener| v
                .name()
                .to_string()),
            TypeKind::Route => merge!(next.routes, Routes, |v: &XdsRoutes| v.name.clone()),
            TypeKind::Cluster => merge!(next.clusters, Cluster, |v: &XdsCluster| v.name.clone()),
            TypeKind::Endpoint => {
                merge!(next.endpoints, Endpoints, |v: &XdsEndpoints| v.name.clone())
            }
        }
        next.prune();
        self.seen[kind.index()] = true;
        // The first config waits for the first answers about listeners and clusters: before
        // them, "nothing" only means "not known yet", and a proxy must not turn ready on it.
        if !(self.seen[TypeKind::Listener.index()] && self.seen[TypeKind::Cluster.index()]) {
            self.waiting = Some("the first Listener and Cluster responses".into());
            self.state = next;
            return Ok(());
        }
        let warm = next.assemble_warm(self.applied.as_ref());
        if !warm.warming.is_empty() {
            tracing::debug!(warming = ?warm.warming, "applying what is complete; the rest is warming");
        }
        // Validated even when nothing changes for the data path, and with the listeners that
        // still wait, so that an invalid resource is NACKed when it arrives rather than
        // poisoning a later update.
        let raw = warm.config;
        if !warm.pending.is_empty() {
            let mut shadow = raw.clone();
            shadow.listeners.extend(warm.pending);
            Config::try_from(shadow)
                .map_err(|e| format!("the resources do not make a valid config: {e}"))?;
        }
        let config = Config::try_from(raw.clone())
            .map_err(|e| format!("the resources do not make a valid config: {e}"))?;
        self.waiting = (!warm.warming.is_empty()).then(|| warm.warming.join(", "));
        if self.applied.as_ref() == Some(&raw) {
            self.update_readiness(warm.warming.is_empty());
            self.state = next;
            return Ok(());
        }
        // Readiness is decided only after the apply below: deciding it here turned the proxy
        // ready while the listener that had just finished warming was not bound yet.
        let mut versions = self.versions.clone();
        versions[kind.index()] = version.to_string();
        let source = format!(
            "xds:{} node={} {}",
            self.options.server,
            self.options.node,
            TypeKind::ALL
                .iter()
                .map(|t| format!("{}={}", t.short(), versions[t.index()]))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let version = self
            .app
            .apply(config, source)
            .await
            .map_err(|e| format!("cannot apply: {e}"))?;
        tracing::info!(version, "xDS config applied");
        // Said once per change rather than on every update that leaves it so.
        for warning in &warm.warnings {
            tracing::warn!(%warning, "xDS resources disagree");
        }
        self.applied = Some(raw);
        self.state = next;
        self.update_readiness(self.waiting.is_none());
        Ok(())
    }

    /// Ready once the first config has applied with nothing left warming, or, like Envoy's
    /// `initial_fetch_timeout`, once that has taken too long (a resource that never comes
    /// must not keep a proxy out of service forever).
    fn update_readiness(&mut self, complete: bool) {
        if self.app.is_ready() || self.applied.is_none() {
            return;
        }
        let since = *self.first_seen.get_or_insert_with(Instant::now);
        if complete || since.elapsed() >= INITIAL_FETCH_TIMEOUT {
            if !complete {
                tracing::warn!(waiting_for = ?self.waiting, "turning ready after {INITIAL_FETCH_TIMEOUT:?} with resources still missing");
            }
            self.app.set_ready(true);
        }
    }

    fn publish_status(&self) {
        let versions: BTreeMap<&str, &str> = TypeKind::ALL
            .iter()
            .map(|t| (t.short(), self.versions[t.index()].as_str()))
            .collect();
        self.app.set_xds_status(json!({
            "server": self.options.server,
            "node": self.options.node,
            "protocol": match self.options.protocol {
                XdsProtocol::Sotw => "sotw",
                XdsProtocol::Delta => "delta",
            },
            "connected": self.connected,
            "versions_accepted": versions,
            "resources": {
                "listeners": self.state.listeners.keys().collect::<Vec<_>>(),
                "routes": self.state.routes.len(),
                "clusters": self.state.clusters.len(),
                "endpoints": self.state.endpoints.len(),
            },
            "waiting_for": self.waiting,
            "last_error": self.last_error,
        }));
    }

    fn node(&self) -> Node {
        Node {
            id: self.options.node.clone(),
            cluster: "tern".into(),
            user_agent_name: "tern-proxy".into(),
            user_agent_version_type: Some(
                envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").into(),
                ),
            ),
            ..Default::default()
        }
    }

    async fn handle(&mut self, kind: TypeKind, update: Update, version: &str) -> Option<RpcStatus> {
        match self.accept(kind, update, version).await {
            Ok(()) => {
                self.versions[kind.index()] = version.to_string();
                self.publish_status();
                None
            }
            Err(reason) => Some(self.reject(kind, reason)),
        }
    }

    /// A NACK: logged, counted, shown in `/config_dump`; the running config stays.
    fn reject(&mut self, kind: TypeKind, reason: String) -> RpcStatus {
        tracing::warn!(r#type = kind.short(), %reason, "rejecting xDS update (NACK); the running config stays");
        self.app.metrics().count_xds_nack();
        self.last_error = Some(reason.clone());
        self.publish_status();
        RpcStatus {
            code: tonic::Code::InvalidArgument as i32,
            message: reason,
            details: Vec::new(),
        }
    }
}

/// Follows the control plane until `shutdown`.
pub async fn run(app: App, options: XdsOptions, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_max);
    let mut follower = Follower {
        app,
        options,
        state: XdsState::default(),
        versions: Default::default(),
        applied: None,
        waiting: None,
        last_error: None,
        connected: false,
        delta_versions: None,
        seen: [false; 4],
        first_seen: None,
    };
    follower.publish_status();
    loop {
        let session = async {
            let endpoint = Endpoint::from_shared(format!("http://{}", follower.options.server))
                .map_err(|e| format!("bad xDS server address: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            match follower.options.protocol {
                XdsProtocol::Sotw => sotw_session(&mut follower, channel).await,
                XdsProtocol::Delta => delta_session(&mut follower, channel).await,
            }
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = session => outcome,
        };
        follower.connected = false;
        match outcome {
            Ok(true) | Err(SessionEnd { received: true, .. }) => backoff.reset(),
            _ => {}
        }
        let reason = match &outcome {
            Ok(_) => "stream closed by the server".to_string(),
            Err(e) => e.reason.clone(),
        };
        follower.last_error = Some(reason.clone());
        follower.publish_status();
        let delay = backoff.next_delay();
        tracing::warn!(server = %follower.options.server, %reason, retry_in = ?delay, "xDS stream ended; keeping the last good config");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why a session ended, and whether it got far enough to reset the backoff.
struct SessionEnd {
    reason: String,
    received: bool,
}

impl From<String> for SessionEnd {
    fn from(reason: String) -> Self {
        SessionEnd {
            reason,
            received: false,
        }
    }
}

const REQUEST_QUEUE: usize = 16;
/// How long a proxy waits for its first config to be complete before turning ready anyway.
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Queues a request on the stream. Awaiting (rather than dropping when full) matters: a lost
/// ACK would leave that type waiting forever on a server that sends nothing new until ACKed.
async fn send<T>(tx: &mpsc::Sender<T>, req: T) -> Result<(), SessionEnd> {
    tx.send(req).await.map_err(|_| SessionEnd {
        reason: "the request stream closed".into(),
        received: true,
    })
}

fn to_set(names: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    names.into_iter().collect()
}

async fn sotw_session(f: &mut Follower, channel: Channel) -> Result<bool, SessionEnd> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(REQUEST_QUEUE);
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut subscribed: [BTreeSet<String>; 4] = Default::default();
    let mut nonces: [String; 4] = Default::default();
    // Wildcard subscriptions for the full-state types; on a reconnect also the named ones
    // already known, with the versions in force, so the server can resync in one round.
    let mut first = true;
    for kind in [
        TypeKind::Cluster,
        TypeKind::Listener,
        TypeKind::Endpoint,
        TypeKind::Route,
    ] {
        let names = match kind {
            TypeKind::Endpoint => to_set(f.state.wanted_endpoints()),
            TypeKind::Route => to_set(f.state.wanted_routes()),
            _ => BTreeSet::new(),
        };
        if !kind.is_full_state() && names.is_empty() {
            continue;
        }
        send(
            &tx,
            DiscoveryRequest {
                version_info: f.versions[kind.index()].clone(),
                node: first.then(|| f.node()),
                resource_names: names.iter().cloned().collect(),
                type_url: kind.type_url(),
                ..Default::default()
            },
        )
        .await?;
        subscribed[kind.index()] = names;
        first = false;
    }
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("ADS call failed: {}", s.message()))?
        .into_inner();
    f.connected = true;
    f.publish_status();
    tracing::info!(server = %f.options.server, "xDS stream open (state of the world)");
    let mut received = false;
    loop {
        let response = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(received),
            Err(s) => {
                return Err(SessionEnd {
                    reason: format!("stream error: {}", s.message()),
                    received,
                });
            }
        };
        received = true;
        let Some(kind) = TypeKind::from_type_url(&response.type_url) else {
            tracing::debug!(type_url = %response.type_url, "ignoring a response of an unsupported type");
            continue;
        };
        let decoded: Result<Vec<Decoded>, InvalidResource> =
            response.resources.iter().map(|a| decode(kind, a)).collect();
        let nack = match decoded {
            Ok(items) => {
                let update = if kind.is_full_state() {
                    Update::Replace(items)
                } else {
                    Update::Change(items, Vec::new())
                };
                f.handle(kind, update, &response.version_info).await
            }
            Err(e) => Some(f.reject(kind, e.to_string())),
        };
        nonces[kind.index()].clone_from(&response.nonce);
        send(
            &tx,
            DiscoveryRequest {
                version_info: f.versions[kind.index()].clone(),
                resource_names: subscribed[kind.index()].iter().cloned().collect(),
                type_url: kind.type_url(),
                response_nonce: response.nonce.clone(),
                error_detail: nack,
                ..Default::default()
            },
        )
        .await?;
        for (kind, wanted) in [
            (TypeKind::Endpoint, f.state.wanted_endpoints()),
            (TypeKind::Route, f.state.wanted_routes()),
        ] {
            if wanted != subscribed[kind.index()] {
                send(
                    &tx,
                    DiscoveryRequest {
                        version_info: f.versions[kind.index()].clone(),
                        resource_names: wanted.iter().cloned().collect(),
                        type_url: kind.type_url(),
                        response_nonce: nonces[kind.index()].clone(),
                        ..Default::default()
                    },
                )
                .await?;
                subscribed[kind.index()] = wanted;
            }
        }
    }
}

async fn delta_session(f: &mut Follower, channel: Channel) -> Result<bool, SessionEnd> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(REQUEST_QUEUE);
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut subscribed: [BTreeSet<String>; 4] = Default::default();
    // Per type, name → version held: sent back as `initial_resource_versions` on a reconnect
    // so that only what changed while away is sent again.
    let mut held: [HashMap<String, String>; 4] = Default::default();
    if let Some(previous) = f.delta_versions.take() {
        held = previous;
    }
    let mut first = true;
    for kind in [
        TypeKind::Cluster,
        TypeKind::Listener,
        TypeKind::Endpoint,
        TypeKind::Route,
    ] {
        let names = match kind {
            TypeKind::Endpoint => f.state.wanted_endpoints(),
            TypeKind::Route => f.state.wanted_routes(),
            _ => BTreeSet::new(),
        };
        if !kind.is_full_state() && names.is_empty() {
            continue;
        }
        send(
            &tx,
            DeltaDiscoveryRequest {
                node: first.then(|| f.node()),
                type_url: kind.type_url(),
                resource_names_subscribe: names.iter().cloned().collect(),
                initial_resource_versions: held[kind.index()].clone(),
                ..Default::default()
            },
        )
        .await?;
        subscribed[kind.index()] = names;
        first = false;
    }
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("delta ADS call failed: {}", s.message()))?
        .into_inner();
    f.connected = true;
    f.publish_status();
    tracing::info!(server = %f.options.server, "xDS stream open (incremental)");
    let mut received = false;
    let result = loop {
        let response = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(received),
            Err(s) => {
                break Err(SessionEnd {
                    reason: format!("stream error: {}", s.message()),
                    received,
                });
            }
        };
        received = true;
        let Some(kind) = TypeKind::from_type_url(&response.type_url) else {
            continue;
        };
        let decoded: Result<Vec<Decoded>, InvalidResource> = response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|a| decode(kind, a))
            .collect();
        let nack = match decoded {
            Ok(items) => {
                let update = Update::Change(items, response.removed_resources.clone());
                f.handle(kind, update, &response.system_version_info).await
            }
            Err(e) => Some(f.reject(kind, e.to_string())),
        };
        if nack.is_none() {
            let map = &mut held[kind.index()];
            for name in &response.removed_resources {
                map.remove(name);
            }
            for r in &response.resources {
                map.insert(r.name.clone(), r.version.clone());
            }
        }
        send(
            &tx,
            DeltaDiscoveryRequest {
                type_url: kind.type_url(),
                response_nonce: response.nonce.clone(),
                error_detail: nack,
                ..Default::default()
            },
        )
        .await?;
        for (kind, wanted) in [
            (TypeKind::Endpoint, f.state.wanted_endpoints()),
            (TypeKind::Route, f.state.wanted_routes()),
        ] {
            let current = &subscribed[kind.index()];
            if wanted != *current {
                let subscribe: Vec<String> = wanted.difference(current).cloned().collect();
                let unsubscribe: Vec<String> = current.difference(&wanted).cloned().collect();
                for name in &unsubscribe {
                    held[kind.index()].remove(name);
                }
                send(
                    &tx,
                    DeltaDiscoveryRequest {
                        type_url: kind.type_url(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    },
                )
                .await?;
                subscribed[kind.index()] = wanted;
            }
        }
    };
    f.delta_versions = Some(held);
    result
}
