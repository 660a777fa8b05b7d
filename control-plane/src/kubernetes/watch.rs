//! Keeps Services, EndpointSlices and Pods cached from cluster-wide watches and publishes
//! their translation after every change.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tern_proxy::config::RawService;
use tokio::sync::watch;

use super::identity::TrustDomain;
use super::translate::{Warning, translate};

/// Pods that ended (a Job's, say) hold no endpoint; leaving them out keeps the cache to the
/// pods that may.
const LIVE_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// What the Kubernetes source needs: a client, and the trust domain identities are in (the
/// CA's `--trust-domain`, so that derived IDs are the ones it issues).
#[derive(Clone)]
pub struct Source {
    pub client: Client,
    pub trust_domain: TrustDomain,
}

/// Watches Services, EndpointSlices and Pods in all namespaces (kube::runtime::watcher +
/// reflector stores, which re-list and resume watches from resourceVersion), and after every
/// change sends the recomputed `services_from` (only when it differs from the last sent).
/// Returns only on a fatal error. Sends the first value only once all three initial lists
/// are complete (so the control plane does not serve a half-listed cluster, nor endpoints
/// whose pods it has not had the chance to see).
///
/// API errors (refused lists, broken watches, expired resource versions) are not fatal: they
/// are logged and retried with kube's default backoff (0.8 s doubling to 30 s), and the last
/// value sent stays in force meanwhile. To stop, drop or abort the future.
pub async fn run(
    source: Source,
    out: watch::Sender<Option<Arc<Vec<RawService>>>>,
) -> anyhow::Result<()> {
    let Source {
        client,
        trust_domain,
    } = source;
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let mut service_events = pin!(
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default()
        )
        .default_backoff()
        .reflect(services_writer)
    );
    let mut slice_events = pin!(
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
        )
        .default_backoff()
        .reflect(slices_writer)
    );
    let cached = pods.clone();
    let mut pod_events = pin!(
        watcher(
            Api::<Pod>::all(client),
            watcher::Config::default().fields(LIVE_PODS)
        )
        .default_backoff()
        .modify(slim)
        // Most pod updates are status; once slimmed they equal the cached pod and would only
        // cost a recomputation that changes nothing.
        .filter(move |event| std::future::ready(!repeats_cache(event, &cached)))
        .reflect(pods_writer)
    );
    let mut services_listed = false;
    let mut slices_listed = false;
    let mut pods_listed = false;
    let mut dirty = false;
    let mut reported = HashSet::new();
    loop {
        // Biased towards events so that a burst (one HTTP chunk, a re-list) is applied whole
        // before the one recomputation; tokio's cooperative budget makes the streams yield
        // now and then, so a long burst cannot starve publishing.
        tokio::select! {
            biased;
            event = service_events.next() => {
                dirty |= observe("Service", event, &mut services_listed)?;
            }
            event = slice_events.next() => {
                dirty |= observe("EndpointSlice", event, &mut slices_listed)?;
            }
            event = pod_events.next() => {
                dirty |= observe("Pod", event, &mut pods_listed)?;
            }
            () = std::future::ready(()),
                if dirty && services_listed && slices_listed && pods_listed =>
            {
                dirty = false;
                publish(&services, &slices, &pods, &trust_domain, &out, &mut reported);
            }
        }
    }
}

/// Logs `event` and says whether it changed the cache; `listed` becomes true once the
/// first complete list is in the cache.
fn observe<K>(
    kind: &str,
    event: Option<watcher::Result<watcher::Event<K>>>,
    listed: &mut bool,
) -> anyhow::Result<bool> {
    match event {
        // kube's watcher retries forever, so an end means something is badly wrong.
        None => anyhow::bail!("the {kind} watch stream ended"),
        // The API server keeps a few minutes of history; a watch that fell further behind
        // is told so and the watcher re-lists. Routine, so not a warning.
        Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
            tracing::info!(reason = %status.message, "{kind} watch expired; re-listing after a backoff");
            Ok(false)
        }
        Some(Err(error)) => {
            tracing::warn!(%error, "{kind} watch failed; retrying after a backoff");
            Ok(false)
        }
        Some(Ok(event)) => {
            if matches!(event, watcher::Event::InitDone) {
                if !*listed {
                    tracing::debug!("{kind}s listed");
                }
                *listed = true;
            }
            Ok(changes_cache(&event))
        }
    }
}

/// A re-list fills a side buffer that replaces the cache in one go at `InitDone`, so the
/// cache never holds half a list and `Init`/`InitApply` change nothing visible.
fn changes_cache<K>(event: &watcher::Event<K>) -> bool {
    match event {
        watcher::Event::Init | watcher::Event::InitApply(_) => false,
        watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_) => true,
    }
}

/// Keeps only what the translation reads of a Pod (its names, uid, containers' names and
/// restart policies, service account), so a cluster's pods cost little memory: a full Pod
/// with its status and managed fields is often 10 kB or more.
fn slim(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    // The watcher takes resource versions from the objects before this runs, so dropping
    // them here loses nothing and lets equal pods compare equal.
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        ..ObjectMeta::default()
    };
    pod.status = None;
    if let Some(spec) = pod.spec.take() {
        let names = |containers: Vec<Container>| -> Vec<Container> {
            containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    restart_policy: c.restart_policy,
                    ..Container::default()
                })
                .collect()
        };
        pod.spec = Some(PodSpec {
            containers: names(spec.containers),
            init_containers: spec.init_containers.map(names),
            service_account_name: spec.service_account_name,
            service_account: spec.service_account,
            ..PodSpec::default()
        });
    }
}

/// An update of a pod to what the cache already holds.
fn repeats_cache(event: &watcher::Result<watcher::Event<Pod>>, cache: &Store<Pod>) -> bool {
    match event {
        Ok(watcher::Event::Apply(pod)) => cache
            .get(&ObjectRef::from_obj(pod))
            .is_some_and(|cached| *cached == *pod),
        _ => false,
    }
}

fn publish(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    pods: &Store<Pod>,
    trust_domain: &TrustDomain,
    out: &watch::Sender<Option<Arc<Vec<RawService>>>>,
    reported: &mut HashSet<Warning>,
) {
    let translation = translate(
        &services.state(),
        &slices.state(),
        &pods.state(),
        trust_domain,
    );
    // Every recomputation sees the same bad annotation again; say it once, and again only
    // if it goes away and comes back.
    for warning in &translation.warnings {
        if !reported.contains(warning) {
            tracing::warn!("kubernetes: {warning}");
        }
    }
    *reported = translation.warnings.into_iter().collect();

    let next = translation.services;
    let count = next.len();
    let endpoints: usize = next.iter().map(|s| s.endpoints.len()).sum();
    let mut first = false;
    let sent = out.send_if_modified(|current| {
        if current.as_deref() == Some(&next) {
            return false;
        }
        first = current.is_none();
        *current = Some(Arc::new(next));
        true
    });
    if first {
        tracing::info!(services = count, endpoints, "kubernetes: serving services");
    } else if sent {
        tracing::debug!(services = count, endpoints, "kubernetes: services changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_lists_and_watch_events_change_the_cache() {
        let service = Service::default();
        assert!(!changes_cache(&watcher::Event::Init::<Service>));
        assert!(!changes_cache(&watcher::Event::InitApply(service.clone())));
        assert!(changes_cache(&watcher::Event::InitDone::<Service>));
        assert!(changes_cache(&watcher::Event::Apply(service.clone())));
        assert!(changes_cache(&watcher::Event::Delete(service)));
    }

    #[test]
    fn listed_is_set_by_init_done_and_kept_through_a_re_list() {
        let mut listed = false;
        let seen = |e: watcher::Event<Service>, listed: &mut bool| {
            observe("Service", Some(Ok(e)), listed).expect("not fatal")
        };
        assert!(!seen(watcher::Event::Init, &mut listed));
        assert!(!seen(
            watcher::Event::InitApply(Service::default()),
            &mut listed
        ));
        assert!(!listed);
        assert!(seen(watcher::Event::InitDone, &mut listed));
        assert!(listed);
        // A re-list after an expired resource version: the old cache keeps being served.
        assert!(!seen(watcher::Event::Init, &mut listed));
        assert!(listed);
    }

    #[test]
    fn slimming_keeps_what_the_translation_reads_and_drops_the_rest() {
        let full: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "shop", "name": "web-1", "uid": "u1", "resourceVersion": "42",
                "labels": { "app": "web" }, "annotations": { "a": "b" },
                "managedFields": [{ "manager": "kubelet" }],
            },
            "spec": {
                "serviceAccountName": "web",
                "nodeName": "node-1",
                "initContainers": [{ "name": "tern-proxy", "restartPolicy": "Always",
                                     "image": "tern", "args": ["--xds=x"] }],
                "containers": [{ "name": "app", "image": "app", "env": [{ "name": "A" }] }],
            },
            "status": { "phase": "Running", "podIP": "10.0.0.1" },
        }))
        .expect("valid Pod");
        let mut slimmed = full.clone();
        slim(&mut slimmed);
        let want: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": "shop", "name": "web-1", "uid": "u1" },
            "spec": {
                "serviceAccountName": "web",
                "initContainers": [{ "name": "tern-proxy", "restartPolicy": "Always" }],
                "containers": [{ "name": "app" }],
            },
        }))
        .expect("valid Pod");
        assert_eq!(slimmed, want);

        // A status-only update slims to the same pod, and is not applied again.
        let mut status_update = full;
        status_update.metadata.resource_version = Some("43".into());
        status_update.status = None;
        slim(&mut status_update);
        let (cache, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&watcher::Event::Apply(slimmed.clone()));
        assert!(repeats_cache(
            &Ok(watcher::Event::Apply(status_update)),
            &cache
        ));
        let mut moved = slimmed.clone();
        if let Some(spec) = moved.spec.as_mut() {
            spec.service_account_name = Some("api".into());
        }
        assert!(!repeats_cache(&Ok(watcher::Event::Apply(moved)), &cache));
        assert!(!repeats_cache(&Ok(watcher::Event::Delete(slimmed)), &cache));
    }

    #[test]
    fn errors_are_retried_and_an_ended_stream_is_fatal() {
        let mut listed = false;
        let error = watcher::Error::NoResourceVersion;
        assert!(!observe::<Service>("Service", Some(Err(error)), &mut listed).expect("retried"));
        let fatal = observe::<Service>("Service", None, &mut listed).unwrap_err();
        assert_eq!(fatal.to_string(), "the Service watch stream ended");
    }
}
