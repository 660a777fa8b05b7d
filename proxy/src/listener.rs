//! Binding listeners and running their accept loops; each connection becomes a tracked task,
//! admitted under the listener's connection cap and the memory guard.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Listener, ListenerKind};
use crate::detect::{self, Outcome, ServerFirstMemory};
use crate::http::forward::ConnContext;
use crate::http::server;
use crate::overload::{ConnLimit, ConnSlot, MemoryGuard};
use crate::store::Store;

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
    let kind = match &config.kind {
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
    };
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
    kind: Kind,
    shared: Shared,
    retired: CancellationToken,
    stop: CancellationToken,
) {
    tracing::info!("accepting connections");
    let open = ConnLimit::default();
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
        let context = || {
            Arc::new(ConnContext::new(
                Arc::clone(&shared.store),
                Arc::clone(&name),
                client,
                shared.tracker.clone(),
                retired.clone(),
                Arc::clone(&shared.memory),
            ))
        };
        match &kind {
            Kind::Http {
                builder,
                header_timeout,
            } => {
                let builder = Arc::clone(builder);
                let header_timeout = *header_timeout;
                let ctx = context();
                let drain = retired.clone();
                shared.tracker.spawn(
                    async move {
                        let _slot = slot;
                        server::serve(&builder, header_timeout, stream, ctx, drain).await
                    }
                    .instrument(span),
                );
            }
            Kind::Tcp => {
                let store = Arc::clone(&shared.store);
                let name = Arc::clone(&name);
                let drain = retired.clone();
                shared.tracker.spawn(
                    async move {
                        let _slot = slot;
                        crate::tcp::serve(&store, &name, stream, client, drain).await
                    }
                    .instrument(span),
                );
            }
            Kind::Auto {
                builder,
                header_timeout,
                memory,
                timeout,
            } => {
                let (builder, header_timeout, memory, timeout) = (
                    Arc::clone(builder),
                    *header_timeout,
                    Arc::clone(memory),
                    *timeout,
                );
                let ctx = context();
                let (store, name, drain) = (
                    Arc::clone(&shared.store),
                    Arc::clone(&name),
                    retired.clone(),
                );
                shared.tracker.spawn(
                    async move {
                        let _slot = slot;
                        // The destination this listener stands for; with interception it
                        // will be the connection's original destination.
                        let destination = stream.local_addr().unwrap_or(client);
                        let config = Arc::clone(&store.load().config);
                        let outcome = detect::sniff(
                            &stream,
                            destination,
                            &config.opaque_ports,
                            &memory,
                            timeout,
                        )
                        .await;
                        if let Some(l) = store.load().listeners.get(&name) {
                            l.metrics.detections[outcome.index()].inc();
                        }
                        tracing::debug!(outcome = outcome.as_str(), "protocol detected");
                        match outcome {
                            o if o.is_http() => {
                                server::serve(&builder, header_timeout, stream, ctx, drain).await
                            }
                            Outcome::Closed => {}
                            _ => crate::tcp::serve(&store, &name, stream, client, drain).await,
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }
    tracing::info!("stopped accepting connections");
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
