//! One simulated proxy: an ADS stream (State of the World or incremental) that subscribes the
//! way a proxy does, ACKs every response, and reports when it holds the whole mesh and when it
//! has ACKed an edit's ClusterLoadAssignment.
//!
//! Subscriptions: Cluster and Listener wildcard; then ClusterLoadAssignment for every cluster
//! received and RouteConfiguration for every route name a listener references over RDS.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tern_proxy::xds::TypeKind;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::mesh::MARKER_BASE;
use crate::wire;

/// Which variant of ADS the simulated proxies speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Sotw,
    Delta,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        }
    }
}

/// What a stream tells the benchmark. `at` is taken right after the ACK was handed to the
/// stream's request queue (the gRPC client writes it out from there).
#[derive(Debug)]
pub enum Event {
    /// The stream has received and ACKed every cluster, listener, route configuration and the
    /// load assignment of every cluster. `largest` is, per type, the largest response it got
    /// (encoded bytes).
    Synced {
        stream: usize,
        at: Instant,
        largest: [usize; 4],
    },
    /// The stream has ACKed a load assignment carrying edit `edit`'s marker port.
    Saw {
        stream: usize,
        edit: u32,
        at: Instant,
    },
    /// The stream failed or the server closed it.
    Ended { stream: usize, reason: String },
}

pub struct StreamSpec {
    pub id: usize,
    /// `host:port` of the control plane's xDS port.
    pub server: String,
    pub protocol: Protocol,
    /// Clusters in the mesh: a stream is synced once it has all of them and their endpoints.
    pub expected_clusters: usize,
    pub events: mpsc::Sender<Event>,
}

/// Requests queued per stream: one ACK plus at most two subscription changes per response.
const REQUEST_QUEUE: usize = 16;
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// What the simulated proxy holds.
#[derive(Default)]
struct View {
    clusters: BTreeSet<String>,
    /// Listener name → the route configuration it asks for over RDS.
    listeners: BTreeMap<String, Option<String>>,
    load_assignments: HashSet<String>,
    routes: HashSet<String>,
    received: [bool; 4],
    /// Per type, the largest response so far (encoded bytes).
    largest: [usize; 4],
    synced: bool,
}

impl View {
    fn wanted(&self, kind: TypeKind) -> BTreeSet<String> {
        match kind {
            TypeKind::Endpoint => self.clusters.clone(),
            TypeKind::Route => self.listeners.values().flatten().cloned().collect(),
            TypeKind::Cluster | TypeKind::Listener => BTreeSet::new(),
        }
    }

    fn complete(&self, expected_clusters: usize) -> bool {
        self.received[TypeKind::Cluster.index()]
            && self.received[TypeKind::Listener.index()]
            && self.clusters.len() >= expected_clusters
            && self
                .clusters
                .iter()
                .all(|c| self.load_assignments.contains(c))
            && self
                .listeners
                .values()
                .flatten()
                .all(|r| self.routes.contains(r))
    }

    /// Takes one response's resources (`name` is known in delta responses, decoded in SotW
    /// ones) and returns the edits whose marker the load assignments carry.
    fn absorb<'a>(
        &mut self,
        kind: TypeKind,
        resources: impl Iterator<Item = (Option<&'a str>, &'a Any)>,
        removed: &[String],
        replace: bool,
    ) -> anyhow::Result<Vec<u32>> {
        self.received[kind.index()] = true;
        let mut edits = Vec::new();
        match kind {
            TypeKind::Cluster => {
                if replace {
                    self.clusters.clear();
                }
                for (name, any) in resources {
                    let name = match name {
                        Some(n) => n.to_string(),
                        None => wire::name_of(any).context("Cluster")?,
                    };
                    self.clusters.insert(name);
                }
                for name in removed {
                    self.clusters.remove(name);
                }
            }
            TypeKind::Listener => {
                if replace {
                    self.listeners.clear();
                }
                for (_, any) in resources {
                    let (name, rds) = wire::listener_of(any).context("Listener")?;
                    self.listeners.insert(name, rds);
                }
                for name in removed {
                    self.listeners.remove(name);
                }
            }
            TypeKind::Endpoint => {
                for (_, any) in resources {
                    let (name, port) =
                        wire::load_assignment_of(any).context("ClusterLoadAssignment")?;
                    if port > MARKER_BASE {
                        edits.push(port - MARKER_BASE);
                    }
                    self.load_assignments.insert(name);
                }
                for name in removed {
                    self.load_assignments.remove(name);
                }
            }
            TypeKind::Route => {
                for (name, any) in resources {
                    let name = match name {
                        Some(n) => n.to_string(),
                        None => wire::name_of(any).context("RouteConfiguration")?,
                    };
                    self.routes.insert(name);
                }
                for name in removed {
                    self.routes.remove(name);
                }
            }
        }
        Ok(edits)
    }
}

/// Runs one stream until it fails, the server closes it, or the benchmark drops its task.
pub async fn run(spec: StreamSpec) {
    let outcome = match spec.protocol {
        Protocol::Sotw => sotw(&spec).await,
        Protocol::Delta => delta(&spec).await,
    };
    let reason = match outcome {
        Ok(()) => "the server closed the stream".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = spec
        .events
        .send(Event::Ended {
            stream: spec.id,
            reason,
        })
        .await;
}

async fn connect(spec: &StreamSpec) -> anyhow::Result<AggregatedDiscoveryServiceClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{}", spec.server))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", spec.server))?;
    Ok(AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

fn node(id: usize) -> Node {
    Node {
        id: format!("xds-load-{id}"),
        cluster: "xds-load".into(),
        user_agent_name: "tern-xds-load".into(),
        ..Default::default()
    }
}

/// Reports what this response completed. Returns false once nobody listens any more.
async fn report(spec: &StreamSpec, view: &mut View, edits: Vec<u32>, acked_at: Instant) -> bool {
    for edit in edits {
        let event = Event::Saw {
            stream: spec.id,
            edit,
            at: acked_at,
        };
        if spec.events.send(event).await.is_err() {
            return false;
        }
    }
    if !view.synced && view.complete(spec.expected_clusters) {
        view.synced = true;
        let event = Event::Synced {
            stream: spec.id,
            at: Instant::now(),
            largest: view.largest,
        };
        if spec.events.send(event).await.is_err() {
            return false;
        }
    }
    true
}

async fn sotw(spec: &StreamSpec) -> anyhow::Result<()> {
    let mut client = connect(spec).await?;
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(REQUEST_QUEUE);
    for (i, kind) in [TypeKind::Cluster, TypeKind::Listener]
        .into_iter()
        .enumerate()
    {
        tx.send(DiscoveryRequest {
            node: (i == 0).then(|| node(spec.id)),
            type_url: kind.type_url(),
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening the ADS stream")?
        .into_inner();
    let mut view = View::default();
    // Per type: the names subscribed, and the version and nonce of the last response.
    let mut names: [Vec<String>; 4] = Default::default();
    let mut last: [(String, String); 4] = Default::default();
    while let Some(response) = inbound.message().await.context("receiving")? {
        let size = response.encoded_len();
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = response;
        let Some(kind) = TypeKind::from_type_url(&type_url) else {
            bail!("unexpected type {type_url}");
        };
        let largest = &mut view.largest[kind.index()];
        *largest = (*largest).max(size);
        let edits = view.absorb(
            kind,
            resources.iter().map(|a| (None, a)),
            &[],
            kind.is_full_state(),
        )?;
        tx.send(DiscoveryRequest {
            version_info: version_info.clone(),
            resource_names: names[kind.index()].clone(),
            type_url,
            response_nonce: nonce.clone(),
            ..Default::default()
        })
        .await?;
        let acked_at = Instant::now();
        last[kind.index()] = (version_info, nonce);
        for follow in [TypeKind::Endpoint, TypeKind::Route] {
            let wanted: Vec<String> = view.wanted(follow).into_iter().collect();
            if wanted != names[follow.index()] {
                let (version, nonce) = &last[follow.index()];
                tx.send(DiscoveryRequest {
                    version_info: version.clone(),
                    resource_names: wanted.clone(),
                    type_url: follow.type_url(),
                    response_nonce: nonce.clone(),
                    ..Default::default()
                })
                .await?;
                names[follow.index()] = wanted;
            }
        }
        if !report(spec, &mut view, edits, acked_at).await {
            return Ok(());
        }
    }
    Ok(())
}

async fn delta(spec: &StreamSpec) -> anyhow::Result<()> {
    let mut client = connect(spec).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(REQUEST_QUEUE);
    for (i, kind) in [TypeKind::Cluster, TypeKind::Listener]
        .into_iter()
        .enumerate()
    {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(spec.id)),
            type_url: kind.type_url(),
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening the delta ADS stream")?
        .into_inner();
    let mut view = View::default();
    let mut subscribed: [BTreeSet<String>; 4] = Default::default();
    while let Some(response) = inbound.message().await.context("receiving")? {
        let size = response.encoded_len();
        let DeltaDiscoveryResponse {
            resources,
            type_url,
            removed_resources,
            nonce,
            ..
        } = response;
        let Some(kind) = TypeKind::from_type_url(&type_url) else {
            bail!("unexpected type {type_url}");
        };
        let largest = &mut view.largest[kind.index()];
        *largest = (*largest).max(size);
        let edits = view.absorb(
            kind,
            resources
                .iter()
                .filter_map(|r| Some((Some(r.name.as_str()), r.resource.as_ref()?))),
            &removed_resources,
            false,
        )?;
        tx.send(DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            ..Default::default()
        })
        .await?;
        let acked_at = Instant::now();
        for follow in [TypeKind::Endpoint, TypeKind::Route] {
            let wanted = view.wanted(follow);
            let current = &subscribed[follow.index()];
            if wanted != *current {
                tx.send(DeltaDiscoveryRequest {
                    type_url: follow.type_url(),
                    resource_names_subscribe: wanted.difference(current).cloned().collect(),
                    resource_names_unsubscribe: current.difference(&wanted).cloned().collect(),
                    ..Default::default()
                })
                .await?;
                subscribed[follow.index()] = wanted;
            }
        }
        if !report(spec, &mut view, edits, acked_at).await {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::util::pack_any;

    fn cluster(name: &str) -> Any {
        pack_any(Cluster {
            name: name.into(),
            ..Default::default()
        })
    }

    #[test]
    fn sotw_cluster_responses_replace_and_drive_eds_names() {
        let mut view = View::default();
        let first = [cluster("a"), cluster("b")];
        view.absorb(
            TypeKind::Cluster,
            first.iter().map(|a| (None, a)),
            &[],
            true,
        )
        .expect("absorbs");
        assert_eq!(
            view.wanted(TypeKind::Endpoint)
                .into_iter()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let second = [cluster("b")];
        view.absorb(
            TypeKind::Cluster,
            second.iter().map(|a| (None, a)),
            &[],
            true,
        )
        .expect("absorbs");
        assert_eq!(
            view.wanted(TypeKind::Endpoint)
                .into_iter()
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(!view.complete(1), "no listeners and no endpoints yet");
    }
}
