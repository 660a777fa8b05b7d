//! Opaque TCP forwarding: balanced per connection, bytes copied both ways with half-close.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http::client::connect_tcp;
use crate::identity::SpiffeId;
use crate::resilience::breaker::Limit;
use crate::resilience::outlier::Observation;
use crate::snapshot::{ListenerRt, ListenerRtKind, ServiceRt};
use crate::store::Store;
use crate::telemetry::access_log::{Flag, Record};
use crate::tls::{Alpn, Io};

/// Endpoints tried for one connection before giving up: a refused connect is safe to retry
/// elsewhere because no byte has been forwarded yet.
const CONNECT_ATTEMPTS: usize = 3;

/// Forwards one accepted connection to an endpoint of the listener's service.
///
/// When `retired` fires (the listener was removed or rebound, or the process drains), the
/// connection keeps flowing for the config's `drain_timeout` and is then closed: long-lived
/// TCP connections get the same notice as HTTP requests, not an abrupt cut.
pub async fn serve(
    store: &Store,
    listener: &Arc<str>,
    downstream: Io,
    client: SocketAddr,
    original: Option<SocketAddr>,
    peer: Option<SpiffeId>,
    retired: CancellationToken,
) {
    let (drain_timeout, listener_rt, log) = {
        let snapshot = store.load();
        let Some(l) = snapshot.listeners.get(listener).cloned() else {
            return;
        };
        (
            snapshot.config.drain_timeout,
            l,
            snapshot.access_log.clone(),
        )
    };
    let (ListenerRtKind::Tcp { service } | ListenerRtKind::Auto { service, .. }) =
        &listener_rt.kind
    else {
        return;
    };
    let service = Arc::clone(service);
    let start = Instant::now();
    let record = log.as_ref().map(|_| {
        let mut r = Record::new("tcp", Arc::clone(listener), client.ip());
        r.peer_identity = peer.clone();
        r
    });
    let outcome = forward(
        &listener_rt,
        &service,
        downstream,
        client,
        original,
        &retired,
        drain_timeout,
    )
    .await;
    if let (Some(log), Some(mut record)) = (log, record) {
        record.set_duration(start.elapsed());
        record.response_flags = outcome.flag.as_str();
        record.upstream_service = Some(Arc::clone(&service.config.name));
        record.upstream_endpoint = outcome.endpoint;
        record.bytes_received = Some(outcome.to_upstream);
        record.bytes_sent = outcome.to_client;
        log.emit(record);
    }
}

/// How a TCP connection went, for the access log.
#[derive(Default)]
struct Outcome {
    flag: Flag,
    endpoint: Option<SocketAddr>,
    to_upstream: u64,
    to_client: u64,
}

async fn forward(
    listener_rt: &ListenerRt,
    service: &Arc<ServiceRt>,
    mut downstream: Io,
    client: SocketAddr,
    original: Option<SocketAddr>,
    retired: &CancellationToken,
    drain_timeout: std::time::Duration,
) -> Outcome {
    let metrics = &listener_rt.metrics;
    metrics.tcp_connections.inc();
    metrics.tcp_active.inc();
    let _active = scopeguard(|| {
        metrics.tcp_active.dec();
    });

    // A TCP connection counts against the service's `max_connections` while it lasts.
    let limits = service.config.circuit_breaker;
    let _permit = match service
        .shared
        .breaker
        .try_acquire(Limit::Connections, limits.max_connections)
    {
        Ok(p) => p,
        Err(limit) => {
            service.metrics.count_overloaded(limit);
            tracing::info!(%client, service = %service.config.name, "circuit breaker: max_connections reached; closing");
            let _ = downstream.shutdown().await;
            return Outcome {
                flag: Flag::Overloaded,
                ..Outcome::default()
            };
        }
    };
    if let Some(passthrough) = service.config.original_destination {
        let local = downstream.tcp().local_addr().ok();
        let target = original.map(|o| passthrough.target(o));
        let target = match (target, local) {
            (Some(t), Some(l)) if crate::intercept::loops_back(t, l) => {
                Err("the original destination is this proxy (not an intercepted connection)")
            }
            (Some(t), _) => Ok(t),
            (None, _) => Err("the original destination is unknown"),
        };
        let target = match target {
            Ok(t) => t,
            Err(why) => {
                service.metrics.counters.no_endpoints.inc();
                tracing::info!(%client, why, "pass-through refused; closing");
                let _ = downstream.shutdown().await;
                return Outcome {
                    flag: Flag::NoRoute,
                    ..Outcome::default()
                };
            }
        };
        return match connect_tcp(target, service.config.connect_timeout).await {
            Ok(stream) => {
                copy(
                    listener_rt,
                    downstream,
                    Io::Plain(stream),
                    None,
                    target,
                    client,
                    retired,
                    drain_timeout,
                )
                .await
            }
            Err(e) => {
                tracing::debug!(%client, %target, error = %e, "pass-through connect failed");
                let _ = downstream.shutdown().await;
                Outcome {
                    flag: Flag::UpstreamConnectFailure,
                    endpoint: Some(target),
                    ..Outcome::default()
                }
            }
        };
    }
    let mut rng = fastrand::Rng::new();
    let mut upstream = None;
    let mut tried = Vec::with_capacity(CONNECT_ATTEMPTS);
    for _ in 0..CONNECT_ATTEMPTS {
        let Some((index, endpoint)) = service.pick_avoiding(&mut rng, Instant::now(), &tried)
        else {
            service.metrics.counters.no_endpoints.inc();
            break;
        };
        tried.push(index);
        let state = &endpoint.state;
        match dial(service, state.addr, service.config.connect_timeout).await {
            Ok(stream) => {
                state.load.record_success();
                service.observe(endpoint, Observation::Success, Instant::now());
                upstream = Some((stream, Arc::clone(state)));
                break;
            }
            Err(e) => {
                tracing::debug!(service = %service.config.name, error = %e, "tcp upstream connect failed");
                let now = Instant::now();
                state.load.record_failure(now);
                state.metrics.connect_failures.inc();
                service.observe(endpoint, Observation::ConnectFailure, now);
            }
        }
    }
    let Some((upstream, state)) = upstream else {
        tracing::info!(%client, service = %service.config.name, "no tcp upstream reachable; closing");
        let _ = downstream.shutdown().await;
        return Outcome {
            flag: Flag::UpstreamConnectFailure,
            ..Outcome::default()
        };
    };
    let addr = state.addr;
    copy(
        listener_rt,
        downstream,
        upstream,
        Some(state),
        addr,
        client,
        retired,
        drain_timeout,
    )
    .await
}

/// Copies bytes both ways until both sides are done, or the drain deadline.
#[allow(clippy::too_many_arguments)]
async fn copy(
    listener_rt: &ListenerRt,
    mut downstream: Io,
    mut upstream: Io,
    state: Option<Arc<crate::snapshot::EndpointState>>,
    target: SocketAddr,
    client: SocketAddr,
    retired: &CancellationToken,
    drain_timeout: std::time::Duration,
) -> Outcome {
    let metrics = &listener_rt.metrics;
    let endpoint = Some(target);
    let _ = downstream.tcp().set_nodelay(true);
    let _in_flight = state.as_ref().map(|s| s.start());
    // `copy_bidirectional` shuts down each write side when the other side's reads end, which
    // carries a half-close through, and returns when both directions are done.
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => copied,
        () = drain_deadline(retired, drain_timeout) => {
            tracing::info!(%client, ?drain_timeout, "listener drained: closing tcp connection");
            return Outcome {
                flag: Flag::ListenerDrained,
                endpoint,
                ..Outcome::default()
            };
        }
    };
    match copied {
        Ok((up, down)) => {
            metrics.tcp_bytes_upstream.inc_by(up);
            metrics.tcp_bytes_downstream.inc_by(down);
            Outcome {
                flag: Flag::None,
                endpoint,
                to_upstream: up,
                to_client: down,
            }
        }
        Err(e) => {
            if let Some(state) = &state {
                state.metrics.resets.inc();
            }
            tracing::debug!(%client, error = %e, "tcp connection ended with an error");
            Outcome {
                flag: Flag::UpstreamReset,
                endpoint,
                ..Outcome::default()
            }
        }
    }
}

/// Connects to an endpoint: plain, or mTLS (ALPN `tern.opaque`) when the service is meshed.
async fn dial(
    service: &ServiceRt,
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> Result<Io, String> {
    let tcp = connect_tcp(addr, timeout)
        .await
        .map_err(|e| e.to_string())?;
    match service.pools.mesh() {
        None => Ok(Io::Plain(tcp)),
        Some(mesh) => mesh
            .tls
            .connect(tcp, addr.ip(), &mesh.identity, Alpn::Opaque)
            .await
            .map_err(|e| {
                mesh.counters.tls_failures.inc();
                format!("mTLS with {addr}: {e}")
            }),
    }
}

/// Resolves `timeout` after `retired` fires; never before.
pub async fn drain_deadline(retired: &CancellationToken, timeout: std::time::Duration) {
    retired.cancelled().await;
    tokio::time::sleep(timeout).await;
}

/// Runs `f` when dropped (even if the future is cancelled mid-copy).
fn scopeguard<F: FnMut()>(f: F) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    Guard(f)
}
