//! Wiring: applies configurations (bind, swap, reconcile listeners), serves admin, reloads
//! on SIGHUP or file change, and drains on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::telemetry::access_log::AccessLog;
use crate::telemetry::traces::Tracing;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, ConfigError, load_file};
use crate::listener::{self, ListenerHandle};
use crate::metrics::{Metrics, ReloadResult};
use crate::overload::{MemoryGuard, PressureChange, REFRESH_INTERVAL};
use crate::snapshot::Snapshot;
use crate::store::{Store, new_store};

/// Why a configuration could not be applied (the running one stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listener {listener}: cannot bind {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    /// mTLS is asked for but the proxy was started without an identity: refusing keeps the
    /// promise that a meshed hop is never plaintext.
    #[error(
        "{what} needs mTLS, but this proxy has no identity (start it with --identity and --ca)"
    )]
    NoIdentity { what: String },
    #[error("listener {listener}: tls: {source}")]
    Tls {
        listener: String,
        source: crate::tls::gateway::GatewayError,
    },
}

/// A running proxy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    metrics: Arc<Metrics>,
    registry: Registry,
    drain: CancellationToken,
    /// Parent of outbound listeners' tokens; never cancelled (see `drain`).
    outbound: CancellationToken,
    /// Fired by `POST /shutdown`; `main` treats it as SIGTERM.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    listeners: tokio::sync::Mutex<HashMap<Arc<str>, ListenerHandle>>,
    bound: std::sync::Mutex<HashMap<String, SocketAddr>>,
    ready: AtomicBool,
    /// Set once the idle-connection sweeper runs (started by the first `apply`).
    sweeping: AtomicBool,
    /// What the xDS client reports about itself, for `/config_dump`.
    xds_status: std::sync::Mutex<Option<serde_json::Value>>,
    /// One probing task per endpoint of services with an active health check.
    health_checks: crate::health::Checkers,
    memory: Arc<MemoryGuard>,
    /// `--memory-limit` in bytes, 0 when unset; wins over the config's `memory_limit` (an
    /// xDS-fed proxy has no file to set it in).
    memory_limit_flag: AtomicU64,
    /// The proxy's identity and mTLS; `None` without `--identity`.
    mesh: Option<Arc<crate::tls::MeshTls>>,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    pub fn new() -> Self {
        Self::with_mesh(None)
    }

    /// A proxy with a workload identity: inbound mTLS on listeners that ask for it, outbound
    /// mTLS to services that have an identity, and not ready until a certificate is held.
    pub fn with_mesh(mesh: Option<Arc<crate::tls::MeshTls>>) -> Self {
        let store = new_store();
        let mut registry = Registry::default();
        let identity = mesh
            .as_ref()
            .map(|m| m.identity().counters.clone())
            .unwrap_or_default();
        let metrics = Metrics::with_identity(&mut registry, identity);
        registry.register_collector(Box::new(crate::admin::EndpointCollector::new(Arc::clone(
            &store,
        ))));
        App {
            inner: Arc::new(Inner {
                store,
                metrics,
                registry,
                drain: CancellationToken::new(),
                outbound: CancellationToken::new(),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                listeners: tokio::sync::Mutex::new(HashMap::new()),
                bound: std::sync::Mutex::new(HashMap::new()),
                ready: AtomicBool::new(false),
                sweeping: AtomicBool::new(false),
                xds_status: std::sync::Mutex::new(None),
                health_checks: Default::default(),
                memory: Arc::default(),
                memory_limit_flag: AtomicU64::new(0),
                mesh,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// True once listeners are bound, a config is in force and (with an identity) a
    /// certificate is held, until draining starts.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
            && !self.is_draining()
            && self
                .inner
                .mesh
                .as_ref()
                .is_none_or(|m| m.identity().is_held())
    }

    pub fn mesh(&self) -> Option<&Arc<crate::tls::MeshTls>> {
        self.inner.mesh.as_ref()
    }

    /// Marks the proxy ready (or not). Draining wins: a config that finishes applying after
    /// SIGTERM (an xDS response in flight) must not turn `/ready` back to 200.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    /// Records the xDS client's state (server, versions accepted, last error).
    pub fn set_xds_status(&self, status: serde_json::Value) {
        if let Ok(mut s) = self.inner.xds_status.lock() {
            *s = Some(status);
        }
    }

    pub fn xds_status(&self) -> Option<serde_json::Value> {
        self.inner.xds_status.lock().ok().and_then(|s| s.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_cancelled()
    }

    /// The address each listener is actually bound to, by listener name.
    pub fn bound_addresses(&self) -> HashMap<String, SocketAddr> {
        self.inner
            .bound
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Applies a validated config: binds new listeners first (a bind failure rejects the whole
    /// config and changes nothing), swaps the snapshot, then retires listeners that are gone
    /// or rebound (their connections drain; see `ListenerHandle::retire`). Connections of
    /// listeners that stay see the new config on their next request and are never touched.
    pub async fn apply(&self, config: Config, source: String) -> Result<u64, ApplyError> {
        let inner = &self.inner;
        if !inner.sweeping.swap(true, Ordering::AcqRel) {
            self.spawn_pool_sweeper();
            // SIGUSR1 asks an access log writer to reopen its file. Registering a handler
            // once replaces the default action (terminate) for the process's lifetime, so a
            // logrotate `postrotate` kill never takes down a proxy that logs to stdout.
            if let Err(e) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            {
                tracing::warn!(error = %e, "cannot handle SIGUSR1");
            }
            self.spawn_memory_guard();
        }
        if inner.mesh.is_none() {
            needs_no_identity(&config)?;
        }
        // Certificate files are read before anything changes: a bad file rejects the config.
        let gateways = load_gateways(&config, &inner.store.load())?;
        let config = Arc::new(config);
        let mut running = inner.listeners.lock().await;

        // Listeners whose address or protocol changed are restarted; the old socket is
        // released first when the new one wants the same address.
        let mut to_bind = Vec::new();
        for l in config.listeners.iter().filter(|l| l.bind) {
            match running.get(&l.name) {
                Some(h) if h.configured == l.address && h.protocol == l.kind.protocol() => {}
                _ => to_bind.push(l),
            }
        }
        let mut released = Vec::new();
        for l in &to_bind {
            let holder = running
                .iter()
                .find(|(_, h)| h.configured == l.address && l.address.port() != 0)
                .map(|(name, _)| Arc::clone(name));
            if let Some(name) = holder
                && let Some(handle) = running.remove(&name)
            {
                handle.retire().await;
                released.push(name);
            }
        }
        let mut bound = Vec::with_capacity(to_bind.len());
        for l in &to_bind {
            match listener::bind(l.address) {
                Ok(socket) => bound.push((*l, socket)),
                Err(source) => {
                    if !released.is_empty() {
                        tracing::warn!(listeners = ?released, "listeners were released for a rebind that failed");
                    }
                    return Err(ApplyError::Bind {
                        listener: l.name.to_string(),
                        address: l.address,
                        source,
                    });
                }
            }
        }

        let previous = inner.store.load_full();
        let mut next = Snapshot::build(
            Arc::clone(&config),
            source,
            &previous,
            &inner.metrics,
            inner.mesh.as_ref(),
        );
        if next.access_log.is_none()
            && let Some(settings) = &config.access_log
        {
            // The old writer (if any) finishes its queue once the last snapshot holding it
            // is gone.
            next.access_log = Some(Arc::new(AccessLog::start(
                settings.clone(),
                inner.metrics.access_log.clone(),
            )));
        }
        if next.tracing.is_none()
            && let Some(settings) = &config.tracing
        {
            match Tracing::start(settings.clone(), inner.metrics.traces.clone()) {
                Ok(t) => next.tracing = Some(Arc::new(t)),
                // The config was validated; a failure here is the exporter's own setup.
                Err(e) => tracing::error!(error = %e, "tracing disabled"),
            }
        }
        next.gateways = gateways;
        let next = Arc::new(next);
        let version = next.version;
        inner.store.store(Arc::clone(&next));
        inner
            .health_checks
            .reconcile(&next, &inner.tracker, &inner.drain);
        // A new limit is in force before the first connection of a new listener is accepted.
        self.refresh_memory();

        for (l, socket) in bound {
            if let Some(old) = running.remove(&l.name) {
                old.retire().await;
            }
            let shared = listener::Shared {
                store: Arc::clone(&inner.store),
                tracker: inner.tracker.clone(),
                drain: inner.drain.clone(),
                outbound: inner.outbound.clone(),
                memory: Arc::clone(&inner.memory),
                mesh: inner.mesh.clone(),
            };
            match listener::start(l, socket, shared) {
                Ok(handle) => {
                    running.insert(Arc::clone(&l.name), handle);
                }
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "listener could not start")
                }
            }
        }
        let gone: Vec<Arc<str>> = running
            .keys()
            .filter(|name| !config.listeners.iter().any(|l| &l.name == *name && l.bind))
            .cloned()
            .collect();
        for name in gone {
            if let Some(handle) = running.remove(&name) {
                tracing::info!(listener = %name, "listener removed");
                handle.retire().await;
            }
        }
        if let Ok(mut b) = inner.bound.lock() {
            *b = running
                .iter()
                .map(|(n, h)| (n.to_string(), h.bound))
                .collect();
        }
        Ok(version)
    }

    /// Starts the admin server on `addr`; returns the bound address.
    pub async fn serve_admin(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let socket = listener::bind(addr)?;
        let bound = socket.local_addr()?;
        let app = self.clone();
        tokio::spawn(
            crate::admin::serve(socket, app)
                .instrument(tracing::info_span!("admin", address = %bound)),
        );
        Ok(bound)
    }

    /// Stops accepting, lets in-flight requests finish (HTTP/2 GOAWAY, HTTP/1 close), and
    /// waits for connections to end, up to `timeout`. Returns whether everything finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.set_ready(false);
        self.inner.drain.cancel();
        let mut running = self.inner.listeners.lock().await;
        // Inbound listeners stop now and tell their clients to go elsewhere; outbound ones
        // keep serving the app's own calls (its shutdown work) until the deadline.
        let mut outbound = Vec::new();
        for (_, handle) in running.drain() {
            if handle.outbound {
                outbound.push(handle);
            } else {
                handle.retire().await;
            }
        }
        drop(running);
        self.inner.tracker.close();
        let done = tokio::time::timeout(timeout, self.inner.tracker.wait())
            .await
            .is_ok();
        for handle in outbound {
            handle.retire().await;
        }
        if !done {
            tracing::warn!(
                remaining = self.inner.tracker.len(),
                ?timeout,
                "drain timeout: closing remaining connections"
            );
        }
        done
    }

    /// Asks the process to drain and exit, as SIGTERM does (`POST /shutdown`).
    pub fn request_shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Completes once [`App::request_shutdown`] has been called.
    pub async fn shutdown_requested(&self) {
        self.inner.shutdown.cancelled().await;
    }

    /// A token that fires when draining starts.
    pub fn drain_signal(&self) -> CancellationToken {
        self.inner.drain.clone()
    }

    /// Watches `path`: reloads when its content changes (checked every `interval`) or on
    /// SIGHUP. An invalid file is logged and counted; the running config stays.
    pub fn spawn_reloader(
        &self,
        path: PathBuf,
        initial: &str,
        interval: Duration,
    ) -> std::io::Result<()> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let app = self.clone();
        let mut last_seen = hash(initial);
        let task = async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let drain = app.drain_signal();
            loop {
                let forced = tokio::select! {
                    () = drain.cancelled() => break,
                    _ = hangup.recv() => true,
                    _ = tick.tick() => false,
                };
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        if forced {
                            tracing::error!(path = %path.display(), error = %e, "reload failed: cannot read config");
                            app.metrics().count_reload(ReloadResult::Failed);
                        }
                        continue;
                    }
                };
                let h = hash(&text);
                if h == last_seen && !forced {
                    continue;
                }
                last_seen = h;
                app.reload_text(&path, &text).await;
            }
        };
        tokio::spawn(task.instrument(tracing::info_span!("reloader")));
        Ok(())
    }

    /// Every second, closes pooled upstream connections idle past their service's timeout.
    fn spawn_pool_sweeper(&self) {
        let app = self.clone();
        let task = async move {
            let drain = app.drain_signal();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = drain.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let snapshot = app.store().load_full();
                // Gateway certificates whose files changed (renewed by cert-manager or
                // certbot) are used from the next handshake; a bad file keeps the old ones.
                for (listener, gateway) in &snapshot.gateways {
                    let result = match gateway.reload_if_changed() {
                        Ok(false) => continue,
                        Ok(true) => {
                            tracing::info!(%listener, "gateway certificates reloaded");
                            "ok"
                        }
                        Err(e) => {
                            tracing::warn!(%listener, error = %e, "gateway certificates not reloaded; keeping those in use");
                            "failed"
                        }
                    };
                    app.metrics()
                        .gateway_reloads
                        .get_or_create(&crate::metrics::TlsLabels {
                            listener: listener.to_string(),
                            result,
                        })
                        .inc();
                }
                let closed: usize = snapshot
                    .services
                    .values()
                    .flat_map(|s| s.endpoints.iter())
                    .map(|e| e.pool.sweep())
                    .sum();
                if closed > 0 {
                    tracing::debug!(closed, "closed idle upstream connections");
                }
            }
        };
        tokio::spawn(task.instrument(tracing::info_span!("pool_sweeper")));
    }

    /// Sets `--memory-limit` (bytes); it overrides the config's `memory_limit`.
    pub fn set_memory_limit(&self, limit: Option<u64>) {
        self.inner
            .memory_limit_flag
            .store(limit.unwrap_or(0), Ordering::Relaxed);
        self.refresh_memory();
    }

    /// The limit in force: the flag, else the config's.
    fn memory_limit(&self) -> Option<u64> {
        match self.inner.memory_limit_flag.load(Ordering::Relaxed) {
            0 => self.inner.store.load().config.memory_limit,
            flag => Some(flag),
        }
    }

    /// Re-reads RSS against the limit in force; logs and exports the outcome.
    fn refresh_memory(&self) {
        let limit = self.memory_limit();
        let guard = &self.inner.memory;
        let change = guard.refresh(limit);
        let metrics = self.metrics();
        metrics
            .resident_memory
            .set(i64::try_from(guard.rss()).unwrap_or(i64::MAX));
        metrics
            .memory_overloaded
            .set(i64::from(guard.is_overloaded()));
        match change {
            Some(PressureChange::Entered) => tracing::warn!(
                rss = guard.rss(),
                limit,
                "resident memory over 90% of memory_limit: refusing new connections, answering new requests 503"
            ),
            Some(PressureChange::Left) => tracing::info!(
                rss = guard.rss(),
                limit,
                "resident memory back under 85% of memory_limit: serving new work again"
            ),
            None => {}
        }
    }

    /// Re-reads RSS every [`REFRESH_INTERVAL`]: one reader for the whole process, so the
    /// request path only loads a flag.
    fn spawn_memory_guard(&self) {
        let app = self.clone();
        let task = async move {
            let drain = app.drain_signal();
            let mut tick = tokio::time::interval(REFRESH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = drain.cancelled() => break,
                    _ = tick.tick() => app.refresh_memory(),
                }
            }
        };
        tokio::spawn(task.instrument(tracing::info_span!("memory_guard")));
    }

    async fn reload_text(&self, path: &std::path::Path, text: &str) {
        let config = match crate::config::parse_yaml(text) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "config rejected; keeping the running config");
                self.metrics().count_reload(ReloadResult::Failed);
                return;
            }
        };
        match self.apply(config, source_label(path, text)).await {
            Ok(version) => {
                tracing::info!(path = %path.display(), version, "config reloaded");
                self.metrics().count_reload(ReloadResult::Ok);
            }
            Err(e) => {
                tracing::error!(error = %e, "config rejected; keeping the running config");
                self.metrics().count_reload(ReloadResult::Failed);
            }
        }
    }
}

/// Without an identity, a config must not ask for mTLS anywhere.
/// The TLS state of every TLS-terminating listener: kept from `previous` when its
/// certificate settings are unchanged (the reload check follows the files), read afresh
/// otherwise.
fn load_gateways(
    config: &Config,
    previous: &Snapshot,
) -> Result<HashMap<Arc<str>, Arc<crate::tls::gateway::GatewayTls>>, ApplyError> {
    let mut gateways = HashMap::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        let kept = previous
            .gateways
            .get(&l.name)
            .filter(|g| g.config() == tls)
            .cloned();
        let gateway = match kept {
            Some(g) => g,
            None => {
                crate::tls::gateway::GatewayTls::load(tls).map_err(|source| ApplyError::Tls {
                    listener: l.name.to_string(),
                    source,
                })?
            }
        };
        gateways.insert(Arc::clone(&l.name), gateway);
    }
    Ok(gateways)
}

fn needs_no_identity(config: &Config) -> Result<(), ApplyError> {
    if let Some(l) = config
        .listeners
        .iter()
        .find(|l| l.mtls.mode != crate::config::MtlsMode::Disabled)
    {
        return Err(ApplyError::NoIdentity {
            what: format!("listener {} (mtls.mode {})", l.name, l.mtls.mode.as_str()),
        });
    }
    if let Some(s) = config.services.iter().find(|s| s.identity.is_some()) {
        return Err(ApplyError::NoIdentity {
            what: format!("service {} (identity set)", s.name),
        });
    }
    Ok(())
}

/// Loads a config file for startup.
pub fn load(path: &std::path::Path) -> Result<(Config, String, String), ConfigError> {
    let (config, text) = load_file(path)?;
    let source = source_label(path, &text);
    Ok((config, text, source))
}

/// `file:PATH#HASH`, shown in `/config_dump` so operators can tell which file is in force.
pub fn source_label(path: &std::path::Path, text: &str) -> String {
    format!("file:{}#{:016x}", path.display(), hash(text))
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
