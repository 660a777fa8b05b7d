//! The resources a proxy holds, and the pure step from them to a Tern config file model.
//!
//! xDS delivers a mesh in pieces (clusters, then their endpoints, then listeners, then their
//! routes). Until every piece a listener or cluster refers to has arrived, the assembly is
//! *waiting* and the proxy keeps its current config; this is Envoy's "warming".

use std::collections::{BTreeMap, BTreeSet};

use super::decode::{
    EndpointSource, RouteSource, XdsCluster, XdsEndpoints, XdsListener, XdsRoutes,
};
use super::traffic::PolicyFilters;
use crate::config::{
    RawConfig, RawListener, RawListenerProtocol, RawRoute, RawService, RawServiceProtocol,
    RawTelemetry, RawTracing,
};

/// Everything the proxy has accepted, by type and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsState {
    pub listeners: BTreeMap<String, XdsListener>,
    pub routes: BTreeMap<String, XdsRoutes>,
    pub clusters: BTreeMap<String, XdsCluster>,
    pub endpoints: BTreeMap<String, XdsEndpoints>,
}

/// What [`XdsState::assemble_warm`] makes of the resources held.
#[derive(Debug, Clone, PartialEq)]
pub struct Warm {
    /// The config to run.
    pub config: RawConfig,
    /// What is still missing, for logs and `/config_dump`.
    pub warming: Vec<String>,
    /// New listeners not bound yet (waiting), with no routes: checked now (address, name) so
    /// that an invalid one is refused when it arrives, not when its routes do.
    pub pending: Vec<RawListener>,
    /// What was taken one way where the resources say several (for the log).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Assembly {
    Ready(RawConfig),
    /// Something referenced has not arrived yet; says what.
    Waiting(String),
}

impl XdsState {
    /// The RouteConfigurations the listeners refer to: the RDS subscription.
    pub fn wanted_routes(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| match l {
                XdsListener::Http {
                    routes: RouteSource::Rds(name),
                    ..
                } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    /// The ClusterLoadAssignments the clusters refer to: the EDS subscription.
    pub fn wanted_endpoints(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| match &c.endpoints {
                EndpointSource::Eds(name) => Some(name.clone()),
                EndpointSource::Static(_) => None,
            })
            .collect()
    }

    /// Drops routes and endpoints nothing refers to any more (in SotW they are not deleted
    /// explicitly: they stop being subscribed).
    pub fn prune(&mut self) {
        let routes = self.wanted_routes();
        self.routes.retain(|name, _| routes.contains(name));
        let endpoints = self.wanted_endpoints();
        self.endpoints.retain(|name, _| endpoints.contains(name));
    }

    /// The config these resources describe, or the first thing still missing.
    pub fn assemble(&self) -> Assembly {
        let mut warm = self.assemble_warm(None);
        if warm.warming.is_empty() {
            Assembly::Ready(warm.config)
        } else {
            Assembly::Waiting(warm.warming.swap_remove(0))
        }
    }

    /// The config to run now, warming per resource as Envoy does: a listener whose routes,
    /// or the clusters they name, have not arrived keeps its `previous` version (a new one is
    /// not bound yet); a cluster whose endpoints have not arrived keeps its previous endpoints
    /// (a new one starts with none). Nothing missing holds back anything else.
    pub fn assemble_warm(&self, previous: Option<&RawConfig>) -> Warm {
        let mut warming = Vec::new();
        let mut pending = Vec::new();
        let previous_listener =
            |name: &str| previous.and_then(|p| p.listeners.iter().find(|l| l.name == name));
        let previous_service =
            |name: &str| previous.and_then(|p| p.services.iter().find(|s| s.name == name));

        let mut listeners = Vec::new();
        for l in self.listeners.values() {
            match l {
                XdsListener::Api { .. } => {}
                XdsListener::Http {
                    name,
                    address,
                    routes,
                    request_header_timeout,
                    opaque,
                    mtls,
                    filters,
                    tracing: _,
                } => {
                    let listener = |routes: Vec<RawRoute>| RawListener {
                        name: name.clone(),
                        address: address.clone(),
                        protocol: match opaque {
                            Some(_) => RawListenerProtocol::Auto,
                            None => RawListenerProtocol::Http,
                        },
                        routes: routes.into_iter().map(|r| run_by(r, *filters)).collect(),
                        service: opaque.as_ref().map(|o| o.cluster.clone()),
                        request_header_timeout: request_header_timeout.clone(),
                        detect_timeout: opaque.as_ref().map(|o| o.detect_timeout.clone()),
                        direction: None,
                        max_connections: None,
                        mtls: mtls.clone(),
                        bind: None,
                        original_destination: None,
                        tls: None,
                    };
                    let missing = match routes {
                        RouteSource::Inline(r) => self.missing_cluster(r, previous),
                        RouteSource::Rds(rds) => match self.routes.get(rds) {
                            Some(r) => self.missing_cluster(&r.routes, previous),
                            None => Some(format!("RouteConfiguration {rds:?}")),
                        },
                    }
                    .or_else(|| {
                        opaque
                            .as_ref()
                            .filter(|o| !self.cluster_ready(&o.cluster, previous))
                            .map(|o| format!("Cluster {:?}", o.cluster))
                    });
                    match missing {
                        None => {
                            let routes = match routes {
                                RouteSource::Inline(r) => r.clone(),
                                RouteSource::Rds(rds) => self
                                    .routes
                                    .get(rds)
                                    .map(|r| r.routes.clone())
                                    .unwrap_or_default(),
                            };
                            listeners.push(listener(routes));
                        }
                        Some(what) => {
                            warming.push(format!("{what} of listener {name:?}"));
                            match previous_listener(name) {
                                Some(old) => listeners.push(old.clone()),
                                None => pending.push(listener(Vec::new())),
                            }
                        }
                    }
                }
                XdsListener::Tcp {
                    name,
                    address,
                    cluster,
                    mtls,
                } => {
                    let listener = RawListener {
                        name: name.clone(),
                        address: address.clone(),
                        protocol: RawListenerProtocol::Tcp,
                        routes: Vec::new(),
                        service: Some(cluster.clone()),
                        request_header_timeout: None,
                        detect_timeout: None,
                        direction: None,
                        max_connections: None,
                        mtls: mtls.clone(),
                        bind: None,
                        original_destination: None,
                        tls: None,
                    };
                    if self.cluster_ready(cluster, previous) {
                        listeners.push(listener);
                    } else {
                        warming.push(format!("Cluster {cluster:?} of listener {name:?}"));
                        match previous_listener(name) {
                            Some(old) => listeners.push(old.clone()),
                            None => pending.push(listener),
                        }
                    }
                }
            }
        }
        let tcp_clusters: BTreeSet<&str> = listeners
            .iter()
            .filter_map(|l| l.service.as_deref())
            .collect();

        let mut services = Vec::with_capacity(self.clusters.len());
        for c in self.clusters.values() {
            let endpoints = match &c.endpoints {
                EndpointSource::Static(e) => e.clone(),
                EndpointSource::Eds(name) => match self.endpoints.get(name) {
                    Some(e) => e.endpoints.clone(),
                    None => {
                        warming.push(format!(
                            "ClusterLoadAssignment {name:?} of cluster {:?}",
                            c.name
                        ));
                        previous_service(&c.name)
                            .map(|s| s.endpoints.clone())
                            .unwrap_or_default()
                    }
                },
            };
            let protocol = c
                .protocol
                .unwrap_or(if tcp_clusters.contains(c.name.as_str()) {
                    RawServiceProtocol::Tcp
                } else {
                    RawServiceProtocol::Http1
                });
            services.push(RawService {
                name: c.name.clone(),
                protocol,
                load_balancer: c.load_balancer,
                connect_timeout: c.connect_timeout.clone(),
                idle_timeout: c.idle_timeout.clone(),
                endpoints,
                circuit_breaker: c.circuit_breaker.clone(),
                outlier_detection: c.outlier_detection.clone(),
                health_check: c.health_check.clone(),
                identity: c.identity.clone(),
                original_destination: None,
            });
        }

        // A listener kept from before may name a cluster that has since been removed: it gets
        // an empty placeholder, so its requests get 503 ("no endpoints") as from Envoy.
        let mut referenced: Vec<(String, RawServiceProtocol)> = Vec::new();
        for l in &listeners {
            if let Some(c) = &l.service {
                referenced.push((c.clone(), RawServiceProtocol::Tcp));
            }
            for b in l.routes.iter().flat_map(|r| r.backends.iter()) {
                referenced.push((b.service.clone(), RawServiceProtocol::Http1));
            }
        }
        for (name, protocol) in referenced {
            if services.iter().any(|s| s.name == name) {
                continue;
            }
            warming.push(format!("Cluster {name:?}"));
            services.push(RawService {
                name,
                protocol,
                load_balancer: Default::default(),
                connect_timeout: None,
                idle_timeout: None,
                endpoints: Vec::new(),
                circuit_breaker: None,
                outlier_detection: None,
                health_check: None,
                identity: None,
                original_destination: None,
            });
        }
        warming.sort();
        warming.dedup();
        let (tracing, warnings) = self.tracing();
        Warm {
            config: RawConfig {
                admin: None,
                drain_timeout: None,
                opaque_ports: None,
                telemetry: tracing.map(|t| {
                    Box::new(RawTelemetry {
                        access_log: None,
                        tracing: Some(t),
                    })
                }),
                memory_limit: None,
                listeners,
                services,
            },
            warming,
            pending,
            warnings,
        }
    }

    /// A proxy has one trace exporter while each connection manager names a provider: the
    /// first HTTP listener's, by name, is taken (a control plane sends them all the same).
    fn tracing(&self) -> (Option<RawTracing>, Vec<String>) {
        let mut http = self.listeners.values().filter_map(|l| match l {
            XdsListener::Http { name, tracing, .. } => Some((name, tracing)),
            _ => None,
        });
        let Some((first, chosen)) = http.next() else {
            return (None, Vec::new());
        };
        let differ: Vec<&str> = http
            .filter(|(_, t)| *t != chosen)
            .map(|(name, _)| name.as_str())
            .collect();
        let warnings = if differ.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "listeners {differ:?} name other tracing than listener {first:?}; the proxy \
                 traces as {first:?} says"
            )]
        };
        (chosen.clone(), warnings)
    }

    /// The first cluster `routes` name that is not warm yet.
    fn missing_cluster(&self, routes: &[RawRoute], previous: Option<&RawConfig>) -> Option<String> {
        routes
            .iter()
            .flat_map(|r| r.backends.iter())
            .find(|b| !self.cluster_ready(&b.service, previous))
            .map(|b| match self.clusters.get(&b.service) {
                Some(_) => format!("ClusterLoadAssignment of cluster {:?}", b.service),
                None => format!("Cluster {:?}", b.service),
            })
    }

    /// A cluster is warm when it has its endpoints: static ones, its ClusterLoadAssignment,
    /// or those it had in the config running now.
    fn cluster_ready(&self, name: &str, previous: Option<&RawConfig>) -> bool {
        match self.clusters.get(name).map(|c| &c.endpoints) {
            None => false,
            Some(EndpointSource::Static(_)) => true,
            Some(EndpointSource::Eds(cla)) => {
                self.endpoints.contains_key(cla)
                    || previous.is_some_and(|p| p.services.iter().any(|s| s.name == name))
            }
        }
    }
}

/// A route's policy takes effect only if its connection manager runs the filter.
fn run_by(mut route: RawRoute, filters: PolicyFilters) -> RawRoute {
    if !filters.rate_limit {
        route.rate_limit = None;
    }
    if !filters.fault {
        route.fault = None;
    }
    route
}
