//! The runtime view of one configuration: listeners with their routes, services with their
//! balancers and endpoints, metric handles resolved. Built from a [`Config`] plus the previous
//! snapshot, so that endpoints that stay keep their load, EWMA and connection pools.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::balance::{Balancer, Candidate, Load};
use crate::config::{
    BreakerConfig, Config, Listener, ListenerKind, OutlierConfig, Route, Service, UpstreamProtocol,
};
use crate::health::Health;
use crate::http::pool::{MeshUpstream, Pool};
use crate::metrics::{EndpointMetrics, ListenerMetrics, Metrics, ServiceMetrics};
use crate::resilience::breaker::Breaker;
use crate::resilience::budget::RetryBudget;
use crate::resilience::outlier::{Observation, Outlier, OutlierGroup};
use crate::tls::MeshTls;

/// Everything the data path reads, swapped as one unit on every config change.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every applied configuration.
    pub version: u64,
    /// Where the config came from and a hash of it, shown in `/config_dump`.
    pub source: String,
    pub config: Arc<Config>,
    pub listeners: HashMap<Arc<str>, Arc<ListenerRt>>,
    pub services: HashMap<Arc<str>, Arc<ServiceRt>>,
    /// Unbound listeners by the original destination they take.
    pub unbound: HashMap<SocketAddr, Arc<str>>,
    /// TLS-terminating listeners' certificates (set by `App::apply`, which reads the files).
    pub gateways: HashMap<Arc<str>, Arc<crate::tls::gateway::GatewayTls>>,
    /// Set by `App::apply` when the config asks for access logs (kept across snapshots
    /// while its settings stay the same).
    pub access_log: Option<Arc<crate::telemetry::access_log::AccessLog>>,
    /// Likewise for tracing.
    pub tracing: Option<Arc<crate::telemetry::traces::Tracing>>,
}

#[derive(Debug)]
pub struct ListenerRt {
    pub config: Listener,
    pub kind: ListenerRtKind,
    pub metrics: ListenerMetrics,
}

#[derive(Debug)]
pub enum ListenerRtKind {
    Http {
        routes: Vec<RouteRt>,
    },
    Tcp {
        service: Arc<ServiceRt>,
    },
    /// Detected HTTP goes to `routes`, everything else to `service` as opaque TCP.
    Auto {
        routes: Vec<RouteRt>,
        service: Arc<ServiceRt>,
    },
}

#[derive(Debug)]
pub struct RouteRt {
    pub config: Route,
    pub backends: Backends,
    /// Counts requests and retries over a sliding window. Every route has one: without a
    /// policy, the safe default retries (connect failures) spend from it too.
    pub budget: RetryBudget,
    /// Rebuilt with each snapshot (buckets start full after a config change).
    pub limiter: Option<crate::traffic::rate_limit::RateLimiter>,
}

/// A weighted split over services; cumulative weights make a pick one random draw.
#[derive(Debug)]
pub struct Backends {
    services: Vec<Arc<ServiceRt>>,
    cumulative: Vec<u32>,
}

impl Backends {
    /// Each service with its weight.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<ServiceRt>, u32)> {
        let mut previous = 0;
        self.services
            .iter()
            .zip(&self.cumulative)
            .map(move |(s, c)| {
                let w = c - previous;
                previous = *c;
                (s, w)
            })
    }

    pub fn pick(&self, rng: &mut fastrand::Rng) -> &Arc<ServiceRt> {
        if self.services.len() == 1 {
            return &self.services[0];
        }
        let total = self.cumulative.last().copied().unwrap_or(1).max(1);
        let ticket = rng.u32(..total);
        let index = self.cumulative.partition_point(|&c| c <= ticket);
        &self.services[index.min(self.services.len() - 1)]
    }
}

#[derive(Debug)]
pub struct ServiceRt {
    pub config: Service,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub metrics: ServiceMetrics,
    pub shared: Arc<ServiceShared>,
    /// Set when the service has an identity: its connections are mTLS, checked against it.
    pub mesh: Option<MeshUpstream>,
}

/// Per-service state that outlives config changes: circuit-breaker counts and the outlier
/// group (so that an overload or an ejection is not forgotten by a reload).
#[derive(Debug, Default)]
pub struct ServiceShared {
    pub breaker: Arc<Breaker>,
    pub outliers: OutlierGroup,
}

impl ServiceRt {
    /// Picks the endpoint for the next request or connection.
    pub fn pick(&self, rng: &mut fastrand::Rng, now: Instant) -> Option<(usize, &Endpoint)> {
        self.pick_avoiding(rng, now, &[])
    }

    /// Picks an endpoint other than those in `avoid` (the ones a retry already tried), unless
    /// they are all that is left.
    pub fn pick_avoiding(
        &self,
        rng: &mut fastrand::Rng,
        now: Instant,
        avoid: &[usize],
    ) -> Option<(usize, &Endpoint)> {
        self.balancer
            .pick_avoiding(&self.endpoints, rng, now, avoid)
            .map(|i| (i, &self.endpoints[i]))
    }

    /// Feeds passive outlier detection with what a request (or connection) to `endpoint`
    /// came to; ejects it when a threshold is reached.
    pub fn observe(&self, endpoint: &Endpoint, observation: Observation, now: Instant) {
        let Some(config) = &self.config.outlier_detection else {
            return;
        };
        let ejected =
            endpoint
                .state
                .outlier
                .observe(config, observation, now, self.endpoints.len(), || {
                    self.ejected_count()
                });
        if let Some(time) = ejected {
            endpoint.state.metrics.ejections.inc();
            tracing::warn!(service = %self.config.name, endpoint = %endpoint.state.label, ejected_for = ?time, ?observation, "outlier detection ejected an endpoint");
        }
    }

    /// How many endpoints are ejected now (counted only when an ejection is considered).
    pub fn ejected_count(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.state.outlier.is_marked_ejected())
            .count()
    }
}

/// An endpoint as this snapshot weighs it, pointing at state shared across snapshots.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub weight: u32,
    pub state: Arc<EndpointState>,
    /// The service's outlier settings and group, for the balancer's eligibility check.
    outlier: Option<(OutlierConfig, Arc<ServiceShared>)>,
}

impl Candidate for Endpoint {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn load(&self) -> &Load {
        &self.state.load
    }
    fn eligible(&self, now: Instant) -> bool {
        if !self.state.load.is_available(now) || self.state.health.is_unhealthy() {
            return false;
        }
        match &self.outlier {
            Some((config, shared)) => !self.state.outlier.is_ejected(config, &shared.outliers, now),
            None => true,
        }
    }
}

/// What survives a reload for an endpoint that stays: load, EWMA, pool, counters.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `ip:port`, the endpoint's label.
    pub label: String,
    pub load: Arc<Load>,
    pub metrics: Arc<EndpointMetrics>,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    breaker: BreakerConfig,
    identity: Option<crate::identity::SpiffeId>,
    /// HTTP connections to this endpoint (unused by TCP services).
    pub pool: Arc<Pool>,
    /// Active health check verdict (kept across config changes).
    pub health: Arc<Health>,
    /// Passive outlier detection (kept across config changes).
    pub outlier: Arc<Outlier>,
}

impl EndpointState {
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

impl Snapshot {
    /// The unbound listener for an intercepted connection's original destination: the one
    /// for that exact address, else the one for any address on its port.
    pub fn unbound_listener(&self, original: SocketAddr) -> Option<&Arc<ListenerRt>> {
        if self.unbound.is_empty() {
            return None;
        }
        let any = match original {
            SocketAddr::V4(_) => {
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), original.port())
            }
            SocketAddr::V6(_) => {
                SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), original.port())
            }
        };
        let name = self
            .unbound
            .get(&original)
            .or_else(|| self.unbound.get(&any))?;
        self.listeners.get(name)
    }

    /// An empty snapshot: no listeners, no services.
    pub fn empty() -> Self {
        Snapshot {
            version: 0,
            source: "none".into(),
            config: Arc::new(Config {
                admin: None,
                drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
                opaque_ports: crate::detect::DEFAULT_OPAQUE_PORTS.to_vec(),
                access_log: None,
                tracing: None,
                memory_limit: None,
                listeners: Vec::new(),
                services: Vec::new(),
                raw: Default::default(),
            }),
            listeners: HashMap::new(),
            services: HashMap::new(),
            unbound: HashMap::new(),
            gateways: HashMap::new(),
            access_log: None,
            tracing: None,
        }
    }

    /// Builds the next snapshot, reusing endpoint state of `previous` where it still applies.
    pub fn build(
        config: Arc<Config>,
        source: String,
        previous: &Snapshot,
        metrics: &Metrics,
        tls: Option<&Arc<MeshTls>>,
    ) -> Snapshot {
        let now = Instant::now();
        let mut services = HashMap::with_capacity(config.services.len());
        for service in &config.services {
            let old = previous.services.get(&service.name);
            let service_metrics = metrics.service(&service.name);
            // `App::apply` refuses a service with an identity on a proxy without one, so a
            // meshed service is never dialled in plaintext.
            let mesh = service
                .identity
                .clone()
                .zip(tls)
                .map(|(identity, tls)| MeshUpstream {
                    tls: Arc::clone(tls),
                    identity,
                    failures: service_metrics.tls_failures.clone(),
                });
            let shared = old.map_or_else(Arc::default, |o| Arc::clone(&o.shared));
            let outlier = service.outlier_detection.map(|c| (c, Arc::clone(&shared)));
            let endpoints: Vec<Endpoint> = service
                .endpoints
                .iter()
                .map(|e| {
                    let old_state =
                        old.and_then(|o| o.endpoints.iter().find(|x| x.state.addr == e.address));
                    let state = match old_state {
                        Some(x) if x.state.settings_match(service) => Arc::clone(&x.state),
                        // Settings changed: new pool, but the balancer's view of the endpoint,
                        // its health and its outlier record stay.
                        Some(x) => Arc::new(EndpointState::new(
                            service,
                            e.address,
                            Carried {
                                load: Arc::clone(&x.state.load),
                                health: Arc::clone(&x.state.health),
                                outlier: Arc::clone(&x.state.outlier),
                                metrics: Arc::clone(&x.state.metrics),
                            },
                            &shared.breaker,
                            mesh.as_ref(),
                        )),
                        None => Arc::new(EndpointState::new(
                            service,
                            e.address,
                            Carried {
                                load: Arc::new(Load::new(now)),
                                health: Arc::default(),
                                outlier: Arc::default(),
                                metrics: Arc::default(),
                            },
                            &shared.breaker,
                            mesh.as_ref(),
                        )),
                    };
                    Endpoint {
                        weight: e.weight,
                        state,
                        outlier: outlier.clone(),
                    }
                })
                .collect();
            let balancer = Balancer::new(service.load_balancer, &endpoints);
            let rt = ServiceRt {
                config: service.clone(),
                endpoints,
                balancer,
                metrics: service_metrics,
                shared,
                mesh,
            };
            services.insert(Arc::clone(&service.name), Arc::new(rt));
        }
        let listeners = config
            .listeners
            .iter()
            .filter_map(|l| {
                let kind = match &l.kind {
                    ListenerKind::Http { routes } => ListenerRtKind::Http {
                        routes: routes
                            .iter()
                            .filter_map(|r| route_rt(r, &services))
                            .collect(),
                    },
                    ListenerKind::Tcp { service } => ListenerRtKind::Tcp {
                        service: Arc::clone(services.get(service)?),
                    },
                    ListenerKind::Auto {
                        routes, service, ..
                    } => ListenerRtKind::Auto {
                        routes: routes
                            .iter()
                            .filter_map(|r| route_rt(r, &services))
                            .collect(),
                        service: Arc::clone(services.get(service)?),
                    },
                };
                let rt = ListenerRt {
                    config: l.clone(),
                    kind,
                    metrics: metrics.listener(&l.name),
                };
                Some((Arc::clone(&l.name), Arc::new(rt)))
            })
            .collect();

        // The running writer stays while its settings do; `App::apply` starts a new one.
        let access_log = previous
            .access_log
            .clone()
            .filter(|log| Some(log.config()) == config.access_log.as_ref());
        let tracing = previous
            .tracing
            .clone()
            .filter(|t| Some(t.config()) == config.tracing.as_ref());
        let unbound = config
            .listeners
            .iter()
            .filter(|l| !l.bind)
            .map(|l| (l.address, Arc::clone(&l.name)))
            .collect();
        Snapshot {
            version: previous.version + 1,
            source,
            config,
            listeners,
            services,
            unbound,
            gateways: HashMap::new(),
            access_log,
            tracing,
        }
    }
}

fn route_rt(route: &Route, services: &HashMap<Arc<str>, Arc<ServiceRt>>) -> Option<RouteRt> {
    let mut resolved = Vec::with_capacity(route.backends.len());
    let mut cumulative = Vec::with_capacity(route.backends.len());
    let mut total = 0u32;
    for b in &route.backends {
        // Validation guarantees the name resolves; a miss would be a bug, so skip the backend.
        let service = services.get(&b.service)?;
        total = total.saturating_add(b.weight);
        resolved.push(Arc::clone(service));
        cumulative.push(total);
    }
    Some(RouteRt {
        config: route.clone(),
        backends: Backends {
            services: resolved,
            cumulative,
        },
        limiter: route
            .rate_limit
            .clone()
            .map(crate::traffic::rate_limit::RateLimiter::new),
        budget: RetryBudget::new(
            route.retry.as_ref().map(|r| r.budget).unwrap_or_default(),
            Instant::now(),
        ),
    })
}

/// What an endpoint keeps when its service's connection settings change.
struct Carried {
    load: Arc<Load>,
    health: Arc<Health>,
    outlier: Arc<Outlier>,
    metrics: Arc<EndpointMetrics>,
}

impl EndpointState {
    fn new(
        service: &Service,
        addr: SocketAddr,
        carried: Carried,
        breaker: &Arc<Breaker>,
        mesh: Option<&MeshUpstream>,
    ) -> Self {
        let label = addr.to_string();
        EndpointState {
            addr,
            metrics: carried.metrics,
            label,
            load: carried.load,
            health: carried.health,
            outlier: carried.outlier,
            protocol: service.protocol,
            connect_timeout: service.connect_timeout,
            idle_timeout: service.idle_timeout,
            breaker: service.circuit_breaker,
            identity: service.identity.clone(),
            pool: Arc::new(Pool::new(
                addr,
                service.protocol,
                service.connect_timeout,
                service.idle_timeout,
                Arc::clone(breaker),
                service.circuit_breaker,
                mesh.cloned(),
            )),
        }
    }

    fn settings_match(&self, service: &Service) -> bool {
        self.protocol == service.protocol
            && self.connect_timeout == service.connect_timeout
            && self.idle_timeout == service.idle_timeout
            && self.breaker == service.circuit_breaker
            && self.identity == service.identity
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::config::parse_yaml;

    fn config(endpoints: &[(&str, u32)], lb: &str) -> Arc<Config> {
        let eps: String = endpoints
            .iter()
            .map(|(a, w)| format!("      - {{ address: \"{a}\", weight: {w} }}\n"))
            .collect();
        let yaml = format!(
            "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\nservices:\n  - name: api\n    protocol: http1\n    load_balancer: {lb}\n    endpoints:\n{eps}"
        );
        Arc::new(parse_yaml(&yaml).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_that_stay_keep_their_state_across_changes() {
        let metrics = Metrics::new(&mut Registry::default());
        let first = Snapshot::build(
            config(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)], "peak_ewma"),
            "a".into(),
            &Snapshot::empty(),
            &metrics,
            None,
        );
        let kept = Arc::clone(&first.services["api"].endpoints[1].state);
        let _in_flight = kept.load.start();
        kept.load.observe(Duration::from_millis(7), Instant::now());

        // Re-weight, add an endpoint, drop another, change the balancer.
        let second = Snapshot::build(
            config(&[("127.0.0.1:2", 5), ("127.0.0.1:3", 1)], "least_request"),
            "b".into(),
            &first,
            &metrics,
            None,
        );
        let api = &second.services["api"];
        assert_eq!(second.version, first.version + 1);
        assert!(
            Arc::ptr_eq(&api.endpoints[0].state, &kept),
            "same endpoint state object"
        );
        assert_eq!(api.endpoints[0].weight, 5);
        assert_eq!(api.endpoints[0].state.load.in_flight(), 1);
        assert_eq!(
            api.endpoints[0].state.load.ewma(Instant::now()),
            Duration::from_millis(7)
        );
        assert_eq!(api.endpoints[1].state.load.in_flight(), 0);
        assert_eq!(
            api.balancer.kind(),
            crate::config::LoadBalancerKind::LeastRequest
        );
    }

    #[test]
    fn weighted_backends_follow_weights() {
        let yaml = "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes: [ { backends: [ { service: a, weight: 1 }, { service: b, weight: 9 } ] } ]\nservices:\n  - { name: a, protocol: http1 }\n  - { name: b, protocol: http1 }\n";
        let metrics = Metrics::new(&mut Registry::default());
        let snap = Snapshot::build(
            Arc::new(parse_yaml(yaml).unwrap()),
            "t".into(),
            &Snapshot::empty(),
            &metrics,
            None,
        );
        let ListenerRtKind::Http { routes } = &snap.listeners["web"].kind else {
            panic!("http")
        };
        let mut rng = fastrand::Rng::with_seed(5);
        let a = (0..10_000)
            .filter(|_| &*routes[0].backends.pick(&mut rng).config.name == "a")
            .count();
        assert!((800..1200).contains(&a), "{a}");
    }
}
