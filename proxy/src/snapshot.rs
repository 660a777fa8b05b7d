//! The runtime view of one configuration: listeners with their routes, services with their
//! balancers and endpoints, metric handles resolved. Built from a [`Config`] plus the previous
//! snapshot, so that endpoints that stay keep their load, EWMA and connection pools.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::balance::{Balancer, Candidate, InFlight, Load, LoadOwner};
use crate::config::{Config, Listener, ListenerKind, Route, Service};
use crate::health::Health;
use crate::http::pool::{MeshUpstream, Pool, PoolSettings};
use crate::metrics::{EndpointMetrics, ListenerMetrics, Metrics, ServiceCounters, ServiceMetrics};
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
    /// The listener's settings; its routes are in `kind`, resolved.
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
    /// The service's settings. Its endpoint list is left empty: `endpoints` below is the
    /// one copy (a mesh holds thousands).
    pub config: Service,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub metrics: ServiceMetrics,
    pub shared: Arc<ServiceShared>,
    /// How its endpoints are dialled (protocol, timeouts, limits, mTLS identity), shared by
    /// their pools.
    pub pools: Arc<PoolSettings>,
}

/// Per-service state that outlives config changes: circuit-breaker counts and the outlier
/// group (so that an overload or an ejection is not forgotten by a reload).
#[derive(Debug, Default)]
pub struct ServiceShared {
    pub breaker: Arc<Breaker>,
    pub outliers: OutlierGroup,
    pub counters: Arc<ServiceCounters>,
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
            .pick_where(&self.endpoints, rng, now, avoid, |e| self.eligible(e, now))
            .map(|i| (i, &self.endpoints[i]))
    }

    /// May `endpoint` get traffic now: not recently refusing connections, not failing health
    /// checks, not ejected under this service's outlier settings.
    pub fn eligible(&self, endpoint: &Endpoint, now: Instant) -> bool {
        if !endpoint.eligible(now) {
            return false;
        }
        match &self.config.outlier_detection {
            Some(config) => !endpoint
                .state
                .outlier
                .is_ejected(config, &self.shared.outliers, now),
            None => true,
        }
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
            tracing::warn!(service = %self.config.name, endpoint = %endpoint.state.addr, ejected_for = ?time, ?observation, "outlier detection ejected an endpoint");
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

/// An endpoint as this snapshot weighs it: its state (shared across snapshots while the
/// address stays) and its connection pool (shared while the service's connection settings
/// stay too).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub weight: u32,
    pub state: Arc<EndpointState>,
    pub pool: Arc<Pool>,
}

impl Candidate for Endpoint {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn load(&self) -> &Load {
        &self.state.load
    }
    /// Ejection is the service's call ([`ServiceRt::eligible`]): it holds the settings.
    fn eligible(&self, now: Instant) -> bool {
        self.state.load.is_available(now) && !self.state.health.is_unhealthy()
    }
}

/// What survives a reload for an endpoint that stays: load and EWMA, health verdict,
/// outlier record, counters. One allocation, kept small on purpose: a mesh has thousands of
/// endpoints and every sidecar holds all of them (budgets in `proxy/tests/memory.rs`).
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint's address, also its label in metrics and logs.
    pub addr: SocketAddr,
    pub load: Load,
    /// Active health check verdict.
    pub health: Health,
    /// Passive outlier detection.
    pub outlier: Outlier,
    pub metrics: EndpointMetrics,
    /// The client-span attributes of an attempt to this endpoint (`server.address`,
    /// `server.port`, `tern.endpoint`, `tern.service`), encoded on the first sampled
    /// attempt: formatting the address for every attempt was a fifth of its span's cost.
    /// Empty (24 bytes) while nothing is traced.
    pub span_attributes: std::sync::OnceLock<Box<[u8]>>,
}

impl EndpointState {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        EndpointState {
            addr,
            load: Load::new(now),
            health: Health::default(),
            outlier: Outlier::default(),
            metrics: EndpointMetrics::default(),
            span_attributes: std::sync::OnceLock::new(),
        }
    }

    /// Counts a request as in flight to this endpoint until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        InFlight::start(Arc::clone(self) as Arc<dyn LoadOwner>)
    }
}

impl LoadOwner for EndpointState {
    fn owned_load(&self) -> &Load {
        &self.load
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
            let shared = old.map_or_else(Arc::default, |o| Arc::clone(&o.shared));
            let service_metrics = metrics.service(&service.name, Arc::clone(&shared.counters));
            // `App::apply` refuses a service with an identity on a proxy without one, so a
            // meshed service is never dialled in plaintext.
            let mesh = service
                .identity
                .clone()
                .zip(tls)
                .map(|(identity, tls)| MeshUpstream {
                    tls: Arc::clone(tls),
                    identity,
                    counters: Arc::clone(&shared.counters),
                });
            let settings = PoolSettings::new(service, Arc::clone(&shared.breaker), mesh);
            // Same connection settings: the pools (and their open connections) carry over.
            let (pools, old_pools) = match old {
                Some(o) if o.pools.key() == settings.key() => (Arc::clone(&o.pools), true),
                _ => (Arc::new(settings), false),
            };
            let previous_endpoints = EndpointIndex::new(old.map_or(&[][..], |o| &o.endpoints));
            let endpoints: Vec<Endpoint> = service
                .endpoints
                .iter()
                .map(|e| match previous_endpoints.get(e.address) {
                    Some(x) => Endpoint {
                        weight: e.weight,
                        state: Arc::clone(&x.state),
                        pool: if old_pools {
                            Arc::clone(&x.pool)
                        } else {
                            Arc::new(Pool::new(e.address, Arc::clone(&pools)))
                        },
                    },
                    None => Endpoint {
                        weight: e.weight,
                        state: Arc::new(EndpointState::new(e.address, now)),
                        pool: Arc::new(Pool::new(e.address, Arc::clone(&pools))),
                    },
                })
                .collect();
            let balancer = Balancer::new(service.load_balancer, &endpoints);
            let rt = ServiceRt {
                config: Service {
                    endpoints: Vec::new(),
                    ..service.clone()
                },
                endpoints,
                balancer,
                metrics: service_metrics,
                shared,
                pools,
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
                    config: l.settings(),
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

/// The previous snapshot's endpoints of a service by address: a scan for a few, a map for
/// many (so that a reload of a service with thousands of endpoints stays linear).
enum EndpointIndex<'a> {
    Scan(&'a [Endpoint]),
    Map(HashMap<SocketAddr, &'a Endpoint>),
}

impl<'a> EndpointIndex<'a> {
    fn new(endpoints: &'a [Endpoint]) -> Self {
        if endpoints.len() <= 16 {
            EndpointIndex::Scan(endpoints)
        } else {
            EndpointIndex::Map(endpoints.iter().map(|e| (e.state.addr, e)).collect())
        }
    }

    fn get(&self, addr: SocketAddr) -> Option<&'a Endpoint> {
        match self {
            EndpointIndex::Scan(list) => list.iter().find(|e| e.state.addr == addr),
            EndpointIndex::Map(map) => map.get(&addr).copied(),
        }
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
        let kept_pool = Arc::clone(&first.services["api"].endpoints[1].pool);
        let _in_flight = kept.start();
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
        assert!(
            Arc::ptr_eq(&api.endpoints[0].pool, &kept_pool),
            "same connection settings: same pool, open connections reused"
        );
        assert!(
            api.config.endpoints.is_empty(),
            "endpoints are held once, in `endpoints`"
        );

        // A connection setting changes: a new pool, the same endpoint state.
        let yaml = "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes: [ { backends: [ { service: api } ] } ]\nservices:\n  - name: api\n    protocol: http1\n    connect_timeout: 3s\n    endpoints: [ { address: \"127.0.0.1:2\" } ]\n";
        let third = Snapshot::build(
            Arc::new(parse_yaml(yaml).unwrap()),
            "c".into(),
            &second,
            &metrics,
            None,
        );
        let api = &third.services["api"];
        assert!(Arc::ptr_eq(&api.endpoints[0].state, &kept));
        assert!(!Arc::ptr_eq(&api.endpoints[0].pool, &kept_pool));
        assert_eq!(api.endpoints[0].state.load.in_flight(), 1);
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
