//! Keeps one probing task per checked endpoint: started when an endpoint (or a service's
//! check) appears, stopped when it goes or the check changes. Driven by each config apply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{HealthCheckConfig, HealthState, jittered, probe};
use crate::snapshot::{EndpointState, Snapshot};

type Key = (Arc<str>, SocketAddr);

/// The running probe tasks, by service and endpoint address.
#[derive(Debug, Default)]
pub struct Checkers {
    running: Mutex<HashMap<Key, (HealthCheckConfig, CancellationToken)>>,
}

impl Checkers {
    /// Makes the running probes match `snapshot`. Cheap when nothing changed.
    pub fn reconcile(&self, snapshot: &Snapshot, tracker: &TaskTracker, stop: &CancellationToken) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        let mut wanted: HashMap<Key, (HealthCheckConfig, Arc<EndpointState>)> = HashMap::new();
        for (name, service) in &snapshot.services {
            for e in &service.endpoints {
                match &service.config.health_check {
                    Some(check) => {
                        wanted.insert(
                            (Arc::clone(name), e.state.addr),
                            (check.clone(), Arc::clone(&e.state)),
                        );
                    }
                    // No check (any more): the endpoint's health is what passive signals say.
                    None => e.state.health.reset(),
                }
            }
        }
        running.retain(|key, (config, token)| {
            let keep = wanted.get(key).is_some_and(|(c, _)| c == config);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (key, (config, health)) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let token = stop.child_token();
            let (service, addr) = key.clone();
            tracker.spawn(
                run(config.clone(), addr, health, token.clone())
                    .instrument(tracing::info_span!("health_check", %service, endpoint = %addr)),
            );
            running.insert(key, (config, token));
        }
    }
}

async fn run(
    config: HealthCheckConfig,
    addr: SocketAddr,
    endpoint: Arc<EndpointState>,
    stop: CancellationToken,
) {
    let mut rng = fastrand::Rng::new();
    // A random first delay spreads the probes of many endpoints and many proxies.
    let first = config.interval.mul_f64(rng.f64());
    let mut delay = first;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let ok = probe(&config, addr).await;
        if let Some(state) = endpoint.health.record(&config, ok) {
            match state {
                HealthState::Unhealthy => tracing::warn!("endpoint failed its health checks"),
                _ => tracing::info!(state = state.as_str(), "endpoint health changed"),
            }
        }
        delay = jittered(config.interval, &mut rng);
    }
}
