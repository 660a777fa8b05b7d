//! Keeps Services and EndpointSlices cached from cluster-wide watches and publishes their
//! translation after every change.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tern_proxy::config::RawService;
use tokio::sync::watch;

use super::translate::{Warning, translate};

/// Watches Services and EndpointSlices in all namespaces (kube::runtime::watcher + reflector
/// stores, which re-list and resume watches from resourceVersion), and after every change
/// sends the recomputed `services_from` (only when it differs from the last sent). Returns
/// only on a fatal error. Sends the first value only once both initial lists are complete
/// (so the control plane does not serve a half-listed cluster).
///
/// API errors (refused lists, broken watches, expired resource versions) are not fatal: they
/// are logged and retried with kube's default backoff (0.8 s doubling to 30 s), and the last
/// value sent stays in force meanwhile. To stop, drop or abort the future.
pub async fn run(
    client: Client,
    out: watch::Sender<Option<Arc<Vec<RawService>>>>,
) -> anyhow::Result<()> {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
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
            Api::<EndpointSlice>::all(client),
            watcher::Config::default()
        )
        .default_backoff()
        .reflect(slices_writer)
    );
    let mut services_listed = false;
    let mut slices_listed = false;
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
            () = std::future::ready(()), if dirty && services_listed && slices_listed => {
                dirty = false;
                publish(&services, &slices, &out, &mut reported);
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

fn publish(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    out: &watch::Sender<Option<Arc<Vec<RawService>>>>,
    reported: &mut HashSet<Warning>,
) {
    let translation = translate(&services.state(), &slices.state());
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
    fn errors_are_retried_and_an_ended_stream_is_fatal() {
        let mut listed = false;
        let error = watcher::Error::NoResourceVersion;
        assert!(!observe::<Service>("Service", Some(Err(error)), &mut listed).expect("retried"));
        let fatal = observe::<Service>("Service", None, &mut listed).unwrap_err();
        assert_eq!(fatal.to_string(), "the Service watch stream ended");
    }
}
