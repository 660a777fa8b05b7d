//! The mesh model: the mesh file and the Kubernetes services merged, validated and published
//! as a new xDS snapshot, with bursts of changes coalesced.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_proxy::config::{Config, ConfigError, RawConfig, RawService};
use tern_proxy::xds::TypeKind;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::Resources;
use crate::metrics::{Metrics, ModelLabels, TypeLabels};

pub type FileModel = Option<Arc<RawConfig>>;
pub type KubeModel = Option<Arc<Vec<RawService>>>;

/// Longer than any file system's timestamp granularity (1 s on the coarsest ones, a
/// scheduler tick on Linux).
const RACY: Duration = Duration::from_secs(2);

/// The mesh file's listeners and services plus the services Kubernetes describes. A name in
/// both is an error: the file must not silently shadow a cluster.
pub fn merge(
    file: Option<&RawConfig>,
    kubernetes: Option<&[RawService]>,
) -> Result<Config, ConfigError> {
    let mut raw = file.cloned().unwrap_or_default();
    if let Some(services) = kubernetes {
        raw.services.extend(services.iter().cloned());
    }
    Config::try_from(raw)
}

/// Watches the mesh file by polling its metadata (cheap, and it sees editors that replace the
/// file by renaming). A changed file that does not parse or validate is logged with the field
/// and the reason and counted; the last good model stays.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    out: watch::Sender<FileModel>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let stamp = |path: &PathBuf| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last_stamp = stamp(&path);
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    // A file read less than `RACY` after its mtime may change again within the same
    // timestamp tick, with the same length: its stamp proves nothing until it is older
    // (Git's "racily clean" entries), so it is re-read until then.
    let mut racy = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == last_stamp && !racy {
            continue;
        }
        last_stamp = now;
        let read_at = std::time::SystemTime::now();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        racy = match now.and_then(|(modified, _)| modified) {
            Some(modified) => read_at
                .duration_since(modified)
                .map_or(true, |age| age < RACY),
            None => true,
        };
        if text == last_text {
            continue;
        }
        last_text.clone_from(&text);
        match tern_proxy::config::parse_yaml(&text) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "mesh file changed");
                out.send_replace(Some(Arc::clone(&config.raw)));
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "mesh file rejected; serving the last good model");
                metrics
                    .model_updates
                    .get_or_create(&ModelLabels { outcome: "invalid" })
                    .inc();
            }
        }
    }
}

/// Publishes a new snapshot after every change of either source, waiting `debounce` after the
/// first change so that a burst (an editor's several writes, a rollout's many EndpointSlice
/// events) becomes one version. Marks the control plane ready after the first publication.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    mut file: watch::Receiver<FileModel>,
    mut kubernetes: watch::Receiver<KubeModel>,
    wait_for_kubernetes: bool,
    debounce: Duration,
    out: watch::Sender<Arc<Resources>>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut first = true;
    // A source that is not configured (or whose task ended) never changes again; the
    // others keep being served.
    let (mut file_open, mut kube_open) = (true, true);
    loop {
        if !first {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = file.changed(), if file_open => if r.is_err() { file_open = false; continue },
                r = kubernetes.changed(), if kube_open => if r.is_err() { kube_open = false; continue },
            }
        }
        let changed_at = Instant::now();
        if !first && !debounce.is_zero() {
            tokio::time::sleep(debounce).await;
        }
        first = false;
        let file_model = file.borrow_and_update().clone();
        let kube_model = kubernetes.borrow_and_update().clone();
        if wait_for_kubernetes && kube_model.is_none() {
            continue;
        }
        let config = match merge(
            file_model.as_deref(),
            kube_model.as_deref().map(Vec::as_slice),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "mesh model rejected; serving the last good model");
                metrics
                    .model_updates
                    .get_or_create(&ModelLabels { outcome: "invalid" })
                    .inc();
                continue;
            }
        };
        let previous = Arc::clone(&out.borrow());
        let version = previous.version + 1;
        let next = Resources::build(&config, version, changed_at, &previous);
        for kind in TypeKind::ALL {
            metrics
                .resources
                .get_or_create(&TypeLabels {
                    r#type: kind.short(),
                    protocol: "all",
                })
                .set(next.count(kind) as i64);
        }
        metrics.model_version.set(version as i64);
        metrics
            .model_updates
            .get_or_create(&ModelLabels { outcome: "ok" })
            .inc();
        tracing::info!(
            version,
            clusters = next.count(TypeKind::Cluster),
            listeners = next.count(TypeKind::Listener),
            "publishing mesh version"
        );
        out.send_replace(Arc::new(next));
        ready.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_kubernetes_services_and_rejects_duplicates() {
        let file = tern_proxy::config::parse_yaml(
            "services:\n  - name: api\n    protocol: http1\n    endpoints: [ { address: 127.0.0.1:9 } ]\n",
        )
        .expect("valid");
        let k8s = vec![RawService {
            name: "web.default.svc.cluster.local:80".into(),
            protocol: tern_proxy::config::RawServiceProtocol::Http1,
            load_balancer: Default::default(),
            connect_timeout: None,
            idle_timeout: None,
            endpoints: vec![],
            circuit_breaker: None,
            outlier_detection: None,
            health_check: None,
            identity: None,
            original_destination: None,
        }];
        let merged = merge(Some(&file.raw), Some(&k8s)).expect("merges");
        assert_eq!(merged.services.len(), 2);
        let mut dup = k8s.clone();
        dup[0].name = "api".into();
        let err = merge(Some(&file.raw), Some(&dup)).expect_err("duplicate");
        assert!(err.to_string().contains("duplicate service name"), "{err}");
    }
}
