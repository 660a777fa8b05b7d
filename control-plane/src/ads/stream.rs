//! One ADS stream, State of the World or incremental: reads requests, answers ACKs and NACKs,
//! and pushes what changed whenever a new snapshot is published.
//!
//! Each stream is its own task with its own bounded outbound queue; it reads the newest
//! snapshot from a `watch`, so a slow proxy skips intermediate versions instead of queueing
//! them, and never holds up other streams. A type with a push awaiting its ACK gets nothing
//! newer until the proxy answers.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as PbResource,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::{Stream, StreamExt};
use tern_proxy::xds::TypeKind;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::subscription::{Pending, TypeState};
use crate::cache::Resources;
use crate::metrics::{Metrics, NackLabels, TypeLabels};
use crate::nodes::Nodes;

/// What every stream needs from the server.
#[derive(Clone)]
pub struct Shared {
    pub resources: watch::Receiver<Arc<Resources>>,
    pub metrics: Arc<Metrics>,
    pub nodes: Arc<Nodes>,
    pub shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Why a push happened: only pushes caused by a mesh change count toward push latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Request,
    Change,
}

struct Core {
    id: u64,
    protocol: Protocol,
    node: Option<String>,
    types: [TypeState; 4],
    nonces: u64,
    current: Arc<Resources>,
    shared: Shared,
    pending_cause: [Cause; 4],
}

impl Core {
    fn new(id: u64, protocol: Protocol, shared: Shared) -> Self {
        let current = Arc::clone(&shared.resources.borrow());
        Core {
            id,
            protocol,
            node: None,
            types: Default::default(),
            nonces: 0,
            current,
            shared,
            pending_cause: [Cause::Request; 4],
        }
    }

    fn labels(&self, kind: TypeKind) -> TypeLabels {
        TypeLabels {
            r#type: kind.short(),
            protocol: self.protocol.as_str(),
        }
    }

    fn learn_node(&mut self, node: Option<&Node>) {
        if self.node.is_some() {
            return;
        }
        // The node is only required on the first request of a stream.
        let id = node
            .map(|n| n.id.clone())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        tracing::info!(stream = self.id, node = %id, protocol = self.protocol.as_str(), "proxy connected");
        self.shared.nodes.update(self.id, |s| s.node = id.clone());
        self.node = Some(id);
    }

    /// Handles the ACK/NACK part of a request. Returns false for a stale nonce (an answer to
    /// a push that has since been superseded), which the spec says to ignore.
    fn answer(
        &mut self,
        kind: TypeKind,
        nonce: &str,
        error: Option<&RpcStatus>,
        version: &str,
    ) -> bool {
        let state = &mut self.types[kind.index()];
        if nonce.is_empty() {
            return true;
        }
        match &state.last_nonce {
            // Nothing of this type sent yet: a nonce from an earlier stream (the proxy
            // reconnected), nothing to match.
            None => return true,
            // A nonce is stale once a newer push is sent, answered or not (xDS spec,
            // "Resource updates").
            Some(last) if last != nonce => return false,
            Some(_) => {}
        }
        let Some(pending) = state.pending.clone() else {
            // The newest push, already answered: a subscription change at that version.
            return true;
        };
        state.pending = None;
        let labels = TypeLabels {
            r#type: kind.short(),
            protocol: self.protocol.as_str(),
        };
        match error {
            Some(status) => {
                let reason: String = status.message.chars().take(120).collect();
                tracing::warn!(
                    stream = self.id,
                    node = self.node.as_deref().unwrap_or(""),
                    r#type = kind.short(),
                    version = pending.version,
                    reason = %status.message,
                    "proxy rejected a push (NACK)"
                );
                self.shared
                    .metrics
                    .nacks
                    .get_or_create(&NackLabels {
                        r#type: kind.short(),
                        reason: reason.clone(),
                    })
                    .inc();
                state.last_nack = Some(status.message.clone());
                self.shared.nodes.update(self.id, |s| {
                    s.last_nack.insert(kind.short(), status.message.clone());
                });
            }
            None => {
                self.shared.metrics.acks.get_or_create(&labels).inc();
                if self.pending_cause[kind.index()] == Cause::Change {
                    self.shared
                        .metrics
                        .push_latency
                        .get_or_create(&labels)
                        .observe(pending.changed_at.elapsed().as_secs_f64());
                }
                let acked = if version.is_empty() {
                    pending.version.to_string()
                } else {
                    version.to_string()
                };
                state.acked_version = Some(acked.clone());
                self.shared.nodes.update(self.id, |s| {
                    s.acked.insert(kind.short(), acked);
                });
            }
        }
        true
    }

    fn next_nonce(&mut self) -> String {
        self.nonces += 1;
        self.nonces.to_string()
    }

    fn record_push(&mut self, kind: TypeKind, nonce: String, resources: usize, cause: Cause) {
        self.types[kind.index()].last_nonce = Some(nonce);
        self.types[kind.index()].pending = Some(Pending {
            version: self.current.version,
            changed_at: self.current.changed_at,
        });
        self.pending_cause[kind.index()] = cause;
        let labels = self.labels(kind);
        self.shared.metrics.pushes.get_or_create(&labels).inc();
        self.shared
            .metrics
            .resources_sent
            .get_or_create(&labels)
            .inc_by(resources as u64);
        self.shared.nodes.update(self.id, |s| s.pushes += 1);
    }

    /// The next State-of-the-World response for `kind`, if one is due.
    fn sotw_push(&mut self, kind: TypeKind, cause: Cause) -> Option<DiscoveryResponse> {
        let current = Arc::clone(&self.current);
        let state = &mut self.types[kind.index()];
        // Version 0 is the empty placeholder before the first model is published: a proxy
        // that reconnects to a control plane still starting must not be told "no resources".
        if current.version == 0 || !state.requested || state.pending.is_some() {
            return None;
        }
        // The first request of a wildcard type always gets an answer, even an empty one, so
        // the proxy knows it has the whole (empty) state.
        let first = state.acked_version.is_none() && state.sent.is_empty() && state.wildcard;
        // Nothing of this type changed since the stream was last brought up to date with it.
        let type_version = current.type_version(kind);
        if state.up_to_date_at == Some(type_version) && !first {
            return None;
        }
        state.up_to_date_at = Some(type_version);
        let diff = state.diff(current.of(kind));
        let resources = if kind.is_full_state() {
            if diff.is_empty() && !first {
                return None;
            }
            let all = state.all_subscribed(current.of(kind));
            state.sent.clear();
            state.mark_sent(&all, &[]);
            all
        } else {
            if diff.changed.is_empty() && !first {
                return None;
            }
            state.mark_sent(&diff.changed, &diff.removed);
            diff.changed
        };
        let nonce = self.next_nonce();
        let response = DiscoveryResponse {
            version_info: current.version.to_string(),
            resources: resources.iter().map(|r| r.any.clone()).collect(),
            type_url: kind.type_url(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.record_push(kind, nonce, resources.len(), cause);
        Some(response)
    }

    /// The next incremental response for `kind`, if one is due.
    fn delta_push(&mut self, kind: TypeKind, cause: Cause) -> Option<DeltaDiscoveryResponse> {
        let current = Arc::clone(&self.current);
        let state = &mut self.types[kind.index()];
        // Version 0 is the empty placeholder before the first model is published: a proxy
        // that reconnects to a control plane still starting must not be told "no resources".
        if current.version == 0 || !state.requested || state.pending.is_some() {
            return None;
        }
        let first = state.acked_version.is_none() && state.sent.is_empty() && state.wildcard;
        let type_version = current.type_version(kind);
        if state.up_to_date_at == Some(type_version) && !first {
            return None;
        }
        state.up_to_date_at = Some(type_version);
        let diff = state.diff(current.of(kind));
        if diff.is_empty() && !first {
            return None;
        }
        state.mark_sent(&diff.changed, &diff.removed);
        let nonce = self.next_nonce();
        let count = diff.changed.len();
        let response = DeltaDiscoveryResponse {
            system_version_info: current.version.to_string(),
            resources: diff
                .changed
                .iter()
                .map(|r| PbResource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.any.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: kind.type_url(),
            removed_resources: diff.removed.iter().map(|n| n.to_string()).collect(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.record_push(kind, nonce, count, cause);
        // A first wildcard answer with nothing in it must not count as "the client has it".
        Some(response)
    }
}

/// Serves one State-of-the-World ADS stream until the proxy goes away or the server stops.
pub async fn run_sotw<S>(
    id: u64,
    shared: Shared,
    mut inbound: S,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) where
    S: Stream<Item = Result<DiscoveryRequest, Status>> + Unpin,
{
    let mut rx = shared.resources.clone();
    let shutdown = shared.shutdown.clone();
    let mut core = Core::new(id, Protocol::Sotw, shared);
    loop {
        let cause = tokio::select! {
            req = inbound.next() => match req {
                Some(Ok(req)) => {
                    core.learn_node(req.node.as_ref());
                    let Some(kind) = TypeKind::from_type_url(&req.type_url) else {
                        tracing::debug!(stream = id, type_url = %req.type_url, "ignoring unsupported type");
                        continue;
                    };
                    if !core.answer(kind, &req.response_nonce, req.error_detail.as_ref(), &req.version_info) {
                        continue;
                    }
                    core.types[kind.index()].set_sotw_names(&req.resource_names);
                    Cause::Request
                }
                Some(Err(status)) => {
                    tracing::debug!(stream = id, %status, "stream error");
                    break;
                }
                None => break,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                core.current = Arc::clone(&rx.borrow_and_update());
                Cause::Change
            }
            () = shutdown.cancelled() => break,
        };
        for kind in TypeKind::ALL {
            if let Some(response) = core.sotw_push(kind, cause)
                && out.send(Ok(response)).await.is_err()
            {
                return;
            }
        }
    }
}

/// Serves one incremental ADS stream until the proxy goes away or the server stops.
pub async fn run_delta<S>(
    id: u64,
    shared: Shared,
    mut inbound: S,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) where
    S: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Unpin,
{
    let mut rx = shared.resources.clone();
    let shutdown = shared.shutdown.clone();
    let mut core = Core::new(id, Protocol::Delta, shared);
    loop {
        let cause = tokio::select! {
            req = inbound.next() => match req {
                Some(Ok(req)) => {
                    core.learn_node(req.node.as_ref());
                    let Some(kind) = TypeKind::from_type_url(&req.type_url) else {
                        tracing::debug!(stream = id, type_url = %req.type_url, "ignoring unsupported type");
                        continue;
                    };
                    let version = core.types[kind.index()]
                        .pending
                        .as_ref()
                        .map(|p| p.version.to_string())
                        .unwrap_or_default();
                    core.answer(kind, &req.response_nonce, req.error_detail.as_ref(), &version);
                    let state = &mut core.types[kind.index()];
                    if !state.requested {
                        // What the proxy already holds from an earlier stream is not resent.
                        for (name, version) in &req.initial_resource_versions {
                            state.sent.insert(Arc::from(name.as_str()), Arc::from(version.as_str()));
                        }
                    }
                    state.update_delta_names(&req.resource_names_subscribe, &req.resource_names_unsubscribe);
                    Cause::Request
                }
                Some(Err(status)) => {
                    tracing::debug!(stream = id, %status, "stream error");
                    break;
                }
                None => break,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                core.current = Arc::clone(&rx.borrow_and_update());
                Cause::Change
            }
            () = shutdown.cancelled() => break,
        };
        for kind in TypeKind::ALL {
            if let Some(response) = core.delta_push(kind, cause)
                && out.send(Ok(response)).await.is_err()
            {
                return;
            }
        }
    }
}
