//! Per-endpoint upstream connections: a LIFO stack of idle HTTP/1.1 connections (keep-alive
//! reuse) or one shared HTTP/2 connection (multiplexed), dialled to the endpoint's address.
//! To a meshed endpoint (the service has an identity), every connection is mTLS and every
//! request travels on the one HTTP/2 connection whatever the app spoke (ALPN `h2`); only
//! upgrades and CONNECT get an HTTP/1.1 connection of their own (ALPN `http/1.1`).
//!
//! Owning the pool (rather than a generic client) keeps the request path short and lets the
//! proxy know exactly when a request was never sent, which is what makes a retry safe.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::Instrument;

use super::client::{ConnectError, connect_tcp};
use crate::config::{BreakerConfig, Service, UpstreamProtocol};
use crate::identity::SpiffeId;
use crate::resilience::breaker::{Breaker, Limit, Permit};
use crate::tls::{Alpn, Io, MeshTls, TlsError};

/// How to reach a meshed service: the proxy's mTLS and the identity its endpoints must prove.
#[derive(Debug, Clone)]
pub struct MeshUpstream {
    pub tls: Arc<MeshTls>,
    pub identity: SpiffeId,
    /// The service's counters (failed handshakes).
    pub counters: Arc<crate::metrics::ServiceCounters>,
}

/// A request body going upstream: streamed from the client (sent once), or buffered so
/// that a retry can send it again.
pub type UpstreamBody = http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when they come back. High
/// enough that a burst of responses returning together does not churn connections (the idle
/// timeout is what trims the stack).
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// HTTP/2 keep-alive pings detect a dead upstream connection without a request timing out.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: the request was certainly not sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The mTLS handshake failed (wrong or untrusted identity, timeout): nothing was sent.
    #[error("mTLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The connection failed after the request may have been (partly) sent.
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// A circuit breaker refused a new connection or a request waiting for one: the request
    /// was not sent.
    #[error("circuit breaker {}: limit reached", .0.as_str())]
    Overloaded(Limit),
}

impl UpstreamError {
    /// True when the upstream never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::Tls { .. } | UpstreamError::Handshake { .. }
        )
    }

    /// True when the upstream provably did not process the request although a connection
    /// existed: HTTP/2 `REFUSED_STREAM`, a stream above the last-stream-id of the upstream's
    /// GOAWAY, or a request cancelled before it was written. Safe to retry for any method.
    pub fn never_processed(&self) -> bool {
        match self {
            UpstreamError::Request { source, .. } => source.is_canceled() || h2_refused(source),
            _ => false,
        }
    }

    pub fn overloaded(&self) -> Option<Limit> {
        match self {
            UpstreamError::Overloaded(limit) => Some(*limit),
            _ => None,
        }
    }
}

/// Whether an HTTP/2 stream error says the server refused the stream unprocessed (RFC 9113
/// §8.7: `REFUSED_STREAM`, or a GOAWAY whose last-stream-id is below the stream).
fn h2_refused(error: &hyper::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        next = e.source();
    }
    false
}

/// How the endpoints of one service are dialled, shared by their pools. A service whose
/// connection settings change gets new settings and new pools (old connections are not
/// reused under new settings); otherwise both survive a reload.
#[derive(Debug)]
pub struct PoolSettings {
    key: PoolKey,
    /// The service's circuit breaker (shared by its endpoints, kept across reloads).
    breaker: Arc<Breaker>,
    mesh: Option<MeshUpstream>,
}

/// The settings that decide whether existing connections may be reused after a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    /// The wire protocol: HTTP/2 whenever the service is meshed.
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub limits: BreakerConfig,
    pub identity: Option<SpiffeId>,
}

impl PoolSettings {
    pub fn new(service: &Service, breaker: Arc<Breaker>, mesh: Option<MeshUpstream>) -> Self {
        let key = PoolKey {
            // Between proxies, HTTP/1.1 rides the multiplexed HTTP/2 connection.
            protocol: if mesh.is_some() {
                UpstreamProtocol::Http2
            } else {
                service.protocol
            },
            connect_timeout: service.connect_timeout,
            idle_timeout: service.idle_timeout,
            limits: service.circuit_breaker,
            identity: mesh.as_ref().map(|m| m.identity.clone()),
        };
        PoolSettings { key, breaker, mesh }
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Set when the service is meshed: its connections are mTLS, checked against it.
    pub fn mesh(&self) -> Option<&MeshUpstream> {
        self.mesh.as_ref()
    }
}

/// The connections of one endpoint. Most endpoints of a large mesh are never called by a
/// given sidecar, so the connection state is allocated on first use: an idle endpoint costs
/// its address and two pointers.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    settings: Arc<PoolSettings>,
    conns: OnceLock<Box<Conns>>,
}

#[derive(Debug, Default)]
struct Conns {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// Held while dialling the HTTP/2 connection, so concurrent requests share one dial.
    h2_dial: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// An HTTP/1.1 connection lent to one request; given back by [`Lease::release`] once the
/// response body has been read to its end, closed otherwise.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    sender: http1::SendRequest<UpstreamBody>,
}

impl Lease {
    pub fn release(self) {
        self.pool.put_back(self.sender);
    }
}

impl Pool {
    pub fn new(addr: SocketAddr, settings: Arc<PoolSettings>) -> Self {
        Pool {
            addr,
            settings,
            conns: OnceLock::new(),
        }
    }

    fn conns(&self) -> &Conns {
        self.conns.get_or_init(Box::default)
    }

    /// What requests to this endpoint travel as on the wire (HTTP/2 when meshed).
    pub fn wire_protocol(&self) -> UpstreamProtocol {
        self.settings.key.protocol
    }

    /// Dials the endpoint: plain TCP, or mTLS to a meshed endpoint checked against its
    /// identity.
    async fn dial(&self, alpn: Alpn) -> Result<Io, UpstreamError> {
        let tcp = connect_tcp(self.addr, self.settings.key.connect_timeout).await?;
        match &self.settings.mesh {
            None => Ok(Io::Plain(tcp)),
            Some(mesh) => mesh
                .tls
                .connect(tcp, self.addr.ip(), &mesh.identity, alpn)
                .await
                .map_err(|source| {
                    mesh.counters.tls_failures.inc();
                    tracing::debug!(addr = %self.addr, error = %source, "upstream mTLS failed");
                    UpstreamError::Tls {
                        addr: self.addr,
                        source,
                    }
                }),
        }
    }

    /// A new connection needs room under `max_connections`, and the request waiting for it
    /// room under `max_pending_requests`; past either, fail fast rather than queue.
    fn admit_dial(&self) -> Result<(Permit, Permit), UpstreamError> {
        let settings = &self.settings;
        let pending = settings
            .breaker
            .try_acquire(
                Limit::PendingRequests,
                settings.key.limits.max_pending_requests,
            )
            .map_err(UpstreamError::Overloaded)?;
        let connection = settings
            .breaker
            .try_acquire(Limit::Connections, settings.key.limits.max_connections)
            .map_err(UpstreamError::Overloaded)?;
        Ok((pending, connection))
    }

    /// Sends a request; for HTTP/1.1 the response comes with the connection's lease.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        match self.settings.key.protocol {
            UpstreamProtocol::Http2 => {
                let mut sender = self.h2_sender().await?;
                let response =
                    sender
                        .send_request(req)
                        .await
                        .map_err(|source| UpstreamError::Request {
                            addr: self.addr,
                            source,
                        })?;
                Ok((response, None))
            }
            _ => self.send_h1(req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        // A pooled connection may have been closed by the upstream while idle. If hyper hands
        // the request back unsent, it goes out on the next idle connection or a fresh one.
        // Each retry consumes an idle connection and a fresh one never retries: this ends.
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(sender) => (sender, true),
                None => (self.connect_h1().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: Arc::clone(self),
                        sender,
                    };
                    return Ok((response, Some(lease)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        let source = e.into_error();
                        return Err(UpstreamError::Request {
                            addr: self.addr,
                            source,
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and fresh.
    async fn checkout(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        loop {
            let idle = self.conns.get()?.idle.lock().ok()?.pop()?;
            // Tern closes connections idle past its timeout, before the upstream's own
            // keep-alive timeout can close them under a request.
            if idle.since.elapsed() >= self.settings.key.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Closes idle connections past the idle timeout. Called periodically, so that Tern, not
    /// the upstream, closes connections of an endpoint that has gone quiet.
    pub fn sweep(&self) -> usize {
        let Some(Ok(mut idle)) = self.conns.get().map(|c| c.idle.lock()) else {
            return 0;
        };
        let now = Instant::now();
        let before = idle.len();
        let timeout = self.settings.key.idle_timeout;
        idle.retain(|i| now.duration_since(i.since) < timeout && !i.sender.is_closed());
        before - idle.len()
    }

    /// Idle HTTP/1.1 connections held now.
    pub fn idle_count(&self) -> usize {
        self.conns
            .get()
            .and_then(|c| c.idle.lock().ok().map(|i| i.len()))
            .unwrap_or(0)
    }

    /// Returns a connection whose response was read whole. Staleness is dealt with when a
    /// connection is taken ([`Pool::checkout`]) and by [`Pool::sweep`], not here on the hot path.
    fn put_back(&self, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.conns().idle.lock()
            && idle.len() < MAX_IDLE_PER_ENDPOINT
        {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Dials and shakes hands for a new HTTP/1.1 connection, under the breaker's limits; the
    /// caller runs the connection (pooled, or with upgrades for a tunnel).
    async fn dial_h1(
        &self,
    ) -> Result<
        (
            http1::SendRequest<UpstreamBody>,
            http1::Connection<TokioIo<Io>, UpstreamBody>,
            Permit,
        ),
        UpstreamError,
    > {
        let (pending, connection) = self.admit_dial()?;
        let stream = self.dial(Alpn::Http1).await?;
        drop(pending);
        let (sender, conn) = http1::Builder::new()
            // Flat writes for requests too; see `server::builder`.
            .writev(false)
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: self.addr,
                source,
            })?;
        Ok((sender, conn, connection))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let (sender, conn, permit) = self.dial_h1().await?;
        spawn_connection(
            conn,
            permit,
            tracing::debug_span!("upstream_h1", addr = %self.addr),
        );
        Ok(sender)
    }

    /// Sends an upgrade or CONNECT request on a new connection of its own (never pooled: after
    /// a 101 or 2xx the connection belongs to the tunnel). Take the upgraded IO from the
    /// response with `hyper::upgrade::on`.
    pub async fn send_upgrade(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut sender, conn, permit) = self.dial_h1().await?;
        spawn_connection(
            conn.with_upgrades(),
            permit,
            tracing::debug_span!("upstream_upgrade", addr = %self.addr),
        );
        sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Request {
                addr: self.addr,
                source,
            })
    }

    /// The shared HTTP/2 connection, dialled once when missing or closed (concurrent
    /// requests wait for the same dial instead of opening one each).
    async fn h2_sender(&self) -> Result<http2::SendRequest<UpstreamBody>, UpstreamError> {
        if let Some(sender) = self.open_h2() {
            return Ok(sender);
        }
        let _dialling = self.conns().h2_dial.lock().await;
        if let Some(sender) = self.open_h2() {
            return Ok(sender);
        }
        let (pending, connection) = self.admit_dial()?;
        let stream = self.dial(Alpn::H2).await?;
        drop(pending);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: self.addr,
                source,
            })?;
        spawn_connection(
            conn,
            connection,
            tracing::debug_span!("upstream_h2", addr = %self.addr),
        );
        if let Ok(mut slot) = self.conns().h2.lock() {
            *slot = Some(sender.clone());
        }
        Ok(sender)
    }

    fn open_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let slot = self.conns.get()?.h2.lock().ok()?;
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

/// Runs an upstream connection's IO in a task of its own until the connection closes (when
/// the peer closes, or when its last request handle is dropped). The connection counts
/// against the service's `max_connections` until then.
fn spawn_connection<F>(conn: F, permit: Permit, span: tracing::Span)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            drop(permit);
        }
        .instrument(span),
    );
}
