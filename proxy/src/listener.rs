//! Binding listeners and running their accept loops; each connection becomes a tracked task,
//! admitted under the listener's connection cap and the memory guard.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::authz::Deny;
use crate::config::{Listener, ListenerKind};
use crate::detect::{self, Outcome, ServerFirstMemory};
use crate::http::forward::ConnContext;
use crate::http::server;
use crate::identity::SpiffeId;
use crate::overload::{ConnLimit, ConnSlot, MemoryGuard};
use crate::store::Store;
use crate::tls::inbound::{self, Arrival, InboundError};
use crate::tls::{Alpn, Io, MeshTls};

const BACKLOG: i32 = 1024;

/// A running listener: where it is bound and how to stop its accept loop.
#[derive(Debug)]
pub struct ListenerHandle {
    /// The address from the config (port 0 means "any free port").
    pub configured: SocketAddr,
    /// The address actually bound.
    pub bound: SocketAddr,
    pub protocol: &'static str,
    /// Serves until the drain deadline (see `App::drain`).
    pub outbound: bool,
    stop: CancellationToken,
    /// Fired when the listener is retired: its connections drain.
    retired: CancellationToken,
    task: JoinHandle<()>,
}

impl ListenerHandle {
    /// Stops accepting and drains the listener's connections: HTTP ones finish their
    /// in-flight requests and close (GOAWAY, `Connection: close`), TCP ones and tunnels get
    /// the drain timeout. For a listener that is removed, or rebound on a new address or
    /// protocol. A change of routes, policies or endpoints never retires a listener.
    pub async fn retire(self) {
        self.retired.cancel();
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds a listening socket without starting to accept.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// What every accept loop shares with the rest of the proxy.
#[derive(Clone, Debug)]
pub struct Shared {
    pub store: Store,
    /// Every connection is a task here, so that draining can wait for them.
    pub tracker: TaskTracker,
    pub drain: CancellationToken,
    /// The parent of outbound listeners' tokens: never cancelled by the process drain, so
    /// they serve until the drain deadline and are retired then.
    pub outbound: CancellationToken,
    pub memory: Arc<MemoryGuard>,
    /// The proxy's mTLS, when it has an identity.
    pub mesh: Option<Arc<MeshTls>>,
}

/// Starts the accept loop of a bound listener.
pub fn start(
    config: &Listener,
    listener: TcpListener,
    shared: Shared,
) -> std::io::Result<ListenerHandle> {
    let bound = listener.local_addr()?;
    let parent = if config.outbound {
        &shared.outbound
    } else {
        &shared.drain
    };
    let stop = parent.child_token();
    // Connections drain with the process (inbound) or when this listener is retired.
    let retired = parent.child_token();
    let name = Arc::clone(&config.name);
    let span = tracing::info_span!("listener", name = %name, address = %bound);
    let kind = Arc::new(Kind::of(config));
    let task = tokio::spawn(
        accept_loop(listener, name, kind, shared, retired.clone(), stop.clone()).instrument(span),
    );
    Ok(ListenerHandle {
        configured: config.address,
        bound,
        protocol: config.kind.protocol(),
        outbound: config.outbound,
        stop,
        retired,
        task,
    })
}

type HttpBuilder = hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>;

impl Kind {
    fn of(config: &Listener) -> Kind {
        match &config.kind {
            ListenerKind::Http { .. } => Kind::Http {
                builder: Arc::new(server::builder(config.header_timeout)),
                header_timeout: config.header_timeout,
            },
            ListenerKind::Tcp { .. } => Kind::Tcp,
            ListenerKind::Auto { detect_timeout, .. } => Kind::Auto {
                builder: Arc::new(server::builder(config.header_timeout)),
                header_timeout: config.header_timeout,
                memory: Arc::new(ServerFirstMemory::default()),
                timeout: *detect_timeout,
            },
        }
    }

    /// Whether this was built from a listener config like `config` (so may serve it).
    fn fits(&self, config: &Listener) -> bool {
        match (self, &config.kind) {
            (Kind::Http { header_timeout, .. }, ListenerKind::Http { .. }) => {
                *header_timeout == config.header_timeout
            }
            (Kind::Tcp, ListenerKind::Tcp { .. }) => true,
            (
                Kind::Auto {
                    header_timeout,
                    timeout,
                    ..
                },
                ListenerKind::Auto { detect_timeout, .. },
            ) => *header_timeout == config.header_timeout && timeout == detect_timeout,
            _ => false,
        }
    }
}

/// The serving state of the unbound listeners an original-destination listener hands
/// connections to, made on first use and kept while their config fits (so that an auto
/// listener's server-first memory lasts).
#[derive(Default)]
struct Handoff {
    kinds: std::sync::Mutex<std::collections::HashMap<Arc<str>, Arc<Kind>>>,
}

impl Handoff {
    fn kind(&self, config: &Listener) -> Arc<Kind> {
        let Ok(mut kinds) = self.kinds.lock() else {
            return Arc::new(Kind::of(config));
        };
        match kinds.get(&config.name) {
            Some(kind) if kind.fits(config) => Arc::clone(kind),
            _ => {
                let kind = Arc::new(Kind::of(config));
                kinds.insert(Arc::clone(&config.name), Arc::clone(&kind));
                kind
            }
        }
    }
}

/// Where an accepted connection is served: by its own listener, or (intercepted) by the
/// unbound listener for its original destination.
fn route_connection(
    store: &Store,
    own: &Arc<str>,
    own_kind: &Arc<Kind>,
    handoff: &Handoff,
    stream: &TcpStream,
) -> (Arc<str>, Arc<Kind>, Option<SocketAddr>) {
    let snapshot = store.load();
    let intercepts = snapshot
        .listeners
        .get(own)
        .is_some_and(|l| l.config.original_destination);
    if !intercepts {
        return (Arc::clone(own), Arc::clone(own_kind), None);
    }
    let original = crate::intercept::original_destination(stream);
    match original.and_then(|dst| snapshot.unbound_listener(dst)) {
        Some(target) => (
            Arc::clone(&target.config.name),
            handoff.kind(&target.config),
            original,
        ),
        None => (Arc::clone(own), Arc::clone(own_kind), original),
    }
}

enum Kind {
    Http {
        builder: Arc<HttpBuilder>,
        header_timeout: Duration,
    },
    Tcp,
    Auto {
        builder: Arc<HttpBuilder>,
        header_timeout: Duration,
        /// Destinations that spoke first, for this listener's lifetime.
        memory: Arc<ServerFirstMemory>,
        timeout: Duration,
    },
}

/// `retired` fires when this listener's connections must drain (the listener was retired,
/// or the process drains); `stop` ends the accept loop.
async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    kind: Arc<Kind>,
    shared: Shared,
    retired: CancellationToken,
    stop: CancellationToken,
) {
    tracing::info!("accepting connections");
    let open = ConnLimit::default();
    let handoff = Arc::new(Handoff::default());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning; the loop stays alive.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Accepting and closing at once, rather than leaving connections in the backlog,
        // tells a flooding client no at once and keeps the backlog for clients after it.
        let Some(slot) = admit(&shared.store, &shared.memory, &name, &open) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::debug_span!("conn", %client);
        let (kind, shared_conn, name, retired, handoff) = (
            Arc::clone(&kind),
            shared.clone(),
            Arc::clone(&name),
            retired.clone(),
            Arc::clone(&handoff),
        );
        shared.tracker.spawn(
            async move {
                let _slot = slot;
                let (name, kind, original) =
                    route_connection(&shared_conn.store, &name, &kind, &handoff, &stream);
                serve_connection(&kind, stream, client, original, name, shared_conn, retired).await
            }
            .instrument(span),
        );
    }
    tracing::info!("stopped accepting connections");
}

/// One accepted connection (`original`: where it was going, when intercepted): mTLS as the listener's mode says, authorization, then HTTP or
/// opaque TCP by the listener's protocol (and, on auto listeners, by ALPN or the first bytes).
async fn serve_connection(
    kind: &Kind,
    stream: TcpStream,
    client: SocketAddr,
    original: Option<SocketAddr>,
    name: Arc<str>,
    shared: Shared,
    retired: CancellationToken,
) {
    // One snapshot read per connection: the listener and, for a gateway, its certificates.
    let (listener, gateway) = {
        let snapshot = shared.store.load();
        let Some(listener) = snapshot.listeners.get(&name).cloned() else {
            return;
        };
        (listener, snapshot.gateways.get(&name).cloned())
    };
    let mtls = &listener.config.mtls;
    let wait = match kind {
        Kind::Http { header_timeout, .. } => *header_timeout,
        Kind::Auto { timeout, .. } => *timeout,
        Kind::Tcp => crate::detect::DEFAULT_DETECT_TIMEOUT,
    };
    let metrics = &listener.metrics;
    let gateway_free = gateway.is_none();
    let arrived = match gateway {
        // A gateway: TLS for outside clients, no peer identity.
        Some(gateway) => {
            match tokio::time::timeout(wait, gateway.acceptor().accept(stream)).await {
                Ok(Ok(tls)) => {
                    metrics.tls_accepts[0].inc();
                    Ok(Gate::Gateway(Io::Server(Box::new(tls))))
                }
                Ok(Err(e)) => {
                    metrics.tls_accepts[1].inc();
                    tracing::debug!(error = %e, "gateway TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_accepts[1].inc();
                    tracing::debug!("gateway TLS handshake timed out");
                    return;
                }
            }
        }
        None => inbound::arrive(mtls.mode, shared.mesh.as_deref(), stream, wait)
            .await
            .map(Gate::Mesh),
    };
    let (io, peer) = match arrived {
        Ok(Gate::Gateway(io)) => (io, None),
        Ok(Gate::Mesh(Arrival::Plain(stream))) => (Io::Plain(stream), None),
        Ok(Gate::Mesh(Arrival::Mutual(io, peer))) => {
            metrics.tls_accepts[0].inc();
            (io, Some(peer))
        }
        Err(e) => {
            metrics.tls_accepts[1].inc();
            if matches!(e, InboundError::Plaintext) {
                metrics.authz_denied[Deny::NoIdentity.index()].inc();
            }
            tracing::debug!(error = %e, "inbound connection refused");
            return;
        }
    };
    // Who calls is worth a series only where identity exists: listeners with mTLS on.
    let peer_metrics = (gateway_free && mtls.mode != crate::config::MtlsMode::Disabled)
        .then(|| metrics.peer(peer.as_ref()));
    let denied = mtls
        .authorization
        .as_ref()
        .and_then(|a| a.decide(peer.as_ref()).err());
    let context = |peer: Option<SpiffeId>| {
        Arc::new(
            ConnContext::new(
                Arc::clone(&shared.store),
                Arc::clone(&name),
                client,
                shared.tracker.clone(),
                retired.clone(),
                Arc::clone(&shared.memory),
            )
            .with_peer(peer, denied, mtls.peer_identity_header.as_ref())
            .with_peer_metrics(peer_metrics.clone()),
        )
    };
    // A denied TCP connection is closed; a denied HTTP one gets a 403 per request (the
    // reason is worth telling, and the count is per request).
    let tcp = |io: Io, peer: Option<SpiffeId>| async {
        if let Some(deny) = denied {
            metrics.authz_denied[deny.index()].inc();
            tracing::info!(%client, peer = ?peer.as_ref().map(SpiffeId::as_str), reason = deny.as_str(), "connection denied by authorization");
            return;
        }
        crate::tcp::serve(
            &shared.store,
            &name,
            io,
            client,
            original,
            peer,
            retired.clone(),
        )
        .await;
    };
    match kind {
        Kind::Http {
            builder,
            header_timeout,
        } => server::serve(builder, *header_timeout, io, context(peer), retired.clone()).await,
        Kind::Tcp => tcp(io, peer).await,
        Kind::Auto {
            builder,
            header_timeout,
            memory,
            timeout,
        } => match io {
            Io::Plain(stream) => {
                // The destination this listener stands for; with interception it is the
                // connection's original destination.
                let destination = original
                    .or_else(|| stream.local_addr().ok())
                    .unwrap_or(client);
                let config = Arc::clone(&shared.store.load().config);
                let outcome =
                    detect::sniff(&stream, destination, &config.opaque_ports, memory, *timeout)
                        .await;
                metrics.detections[outcome.index()].inc();
                tracing::debug!(outcome = outcome.as_str(), "protocol detected");
                match outcome {
                    o if o.is_http() => {
                        let ctx = context(peer);
                        server::serve(
                            builder,
                            *header_timeout,
                            Io::Plain(stream),
                            ctx,
                            retired.clone(),
                        )
                        .await
                    }
                    Outcome::Closed => {}
                    _ => tcp(Io::Plain(stream), peer).await,
                }
            }
            // Between proxies ALPN says what the connection carries.
            tls => match Alpn::of(tls.alpn()) {
                Some(Alpn::H2 | Alpn::Http1) => {
                    let ctx = context(peer);
                    server::serve(builder, *header_timeout, tls, ctx, retired.clone()).await
                }
                _ => tcp(tls, peer).await,
            },
        },
    }
}

/// How a connection came through its listener's TLS, if any.
enum Gate {
    /// Gateway TLS terminated (an outside client: no mesh identity).
    Gateway(Io),
    Mesh(Arrival),
}

/// Whether an accepted connection may stay: not while the memory guard sheds (a flood must
/// not grow the process), nor past the listener's `max_connections`. Refusals are counted.
fn admit(store: &Store, memory: &MemoryGuard, name: &str, open: &ConnLimit) -> Option<ConnSlot> {
    let snapshot = store.load();
    let listener = snapshot.listeners.get(name)?;
    if memory.is_overloaded() {
        listener.metrics.shed_connections.inc();
        return None;
    }
    let slot = open.try_acquire(listener.config.max_connections as usize);
    if slot.is_none() {
        listener.metrics.overflow.inc();
    }
    slot
}
