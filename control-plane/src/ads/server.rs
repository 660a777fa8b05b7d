//! The tonic service: accepts ADS streams and runs each one as its own named, tracked task.

use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::stream::{self, Protocol, Shared};
use crate::metrics::ProtocolLabels;

/// Responses queued per stream. A stream has at most one unanswered push per type, so four
/// are enough; the bound only matters if a proxy stops reading its socket.
const STREAM_QUEUE: usize = 4;

pub struct AdsServer {
    shared: Shared,
    next_id: AtomicU64,
    tracker: TaskTracker,
}

impl AdsServer {
    pub fn new(shared: Shared, tracker: TaskTracker) -> Self {
        AdsServer {
            shared,
            next_id: AtomicU64::new(1),
            tracker,
        }
    }

    fn open(&self, protocol: Protocol, peer: String) -> (u64, StreamGuard) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.nodes.connect(id, protocol.as_str(), peer);
        self.shared
            .metrics
            .connected
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .inc();
        (
            id,
            StreamGuard {
                id,
                protocol,
                shared: self.shared.clone(),
            },
        )
    }
}

/// Unregisters a stream however its task ends.
struct StreamGuard {
    id: u64,
    protocol: Protocol,
    shared: Shared,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared.nodes.disconnect(self.id);
        self.shared
            .metrics
            .connected
            .get_or_create(&ProtocolLabels {
                protocol: self.protocol.as_str(),
            })
            .dec();
        tracing::info!(stream = self.id, "ADS stream closed");
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = peer_of(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let (id, guard) = self.open(Protocol::Sotw, peer);
        let shared = self.shared.clone();
        self.tracker.spawn(
            async move {
                stream::run_sotw(id, shared, inbound, tx).await;
                drop(guard);
            }
            .instrument(tracing::info_span!("ads_sotw", stream = id)),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = peer_of(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let (id, guard) = self.open(Protocol::Delta, peer);
        let shared = self.shared.clone();
        self.tracker.spawn(
            async move {
                stream::run_delta(id, shared, inbound, tx).await;
                drop(guard);
            }
            .instrument(tracing::info_span!("ads_delta", stream = id)),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}
