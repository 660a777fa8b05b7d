//! The resources a proxy holds, and the pure step from them to a Tern config file model.
//!
//! xDS delivers a mesh in pieces (clusters, then their endpoints, then listeners, then their
//! routes). Until every piece a listener or cluster refers to has arrived, the assembly is
//! *waiting* and the proxy keeps its current config; this is Envoy's "warming".

use std::collections::{BTreeMap, BTreeSet};

use super::decode::{
    EndpointSource, RouteSource, XdsCluster, XdsEndpoints, XdsListener, XdsRoutes,
};
use crate::config::{RawConfig, RawListener, RawListenerProtocol, RawService, RawServiceProtocol};

/// Everything the proxy has accepted, by type and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsState {
    pub listeners: BTreeMap<String, XdsListener>,
    pub routes: BTreeMap<String, XdsRoutes>,
    pub clusters: BTreeMap<String, XdsCluster>,
    pub endpoints: BTreeMap<String, XdsEndpoints>,
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

    /// The config these resources describe, or what is still missing.
    pub fn assemble(&self) -> Assembly {
        let mut listeners = Vec::new();
        let mut tcp_clusters = BTreeSet::new();
        let mut used_clusters = BTreeSet::new();
        for l in self.listeners.values() {
            match l {
                XdsListener::Api { .. } => {}
                XdsListener::Http {
                    name,
                    address,
                    routes,
                    request_header_timeout,
                } => {
                    let routes = match routes {
                        RouteSource::Inline(r) => r.clone(),
                        RouteSource::Rds(rds) => match self.routes.get(rds) {
                            Some(r) => r.routes.clone(),
                            None => {
                                return Assembly::Waiting(format!(
                                    "RouteConfiguration {rds:?} of listener {name:?}"
                                ));
                            }
                        },
                    };
                    for b in routes.iter().flat_map(|r| r.backends.iter()) {
                        used_clusters.insert(b.service.clone());
                    }
                    listeners.push(RawListener {
                        name: name.clone(),
                        address: address.clone(),
                        protocol: RawListenerProtocol::Http,
                        routes,
                        service: None,
                        request_header_timeout: request_header_timeout.clone(),
                    });
                }
                XdsListener::Tcp {
                    name,
                    address,
                    cluster,
                } => {
                    tcp_clusters.insert(cluster.clone());
                    used_clusters.insert(cluster.clone());
                    listeners.push(RawListener {
                        name: name.clone(),
                        address: address.clone(),
                        protocol: RawListenerProtocol::Tcp,
                        routes: Vec::new(),
                        service: Some(cluster.clone()),
                        request_header_timeout: None,
                    });
                }
            }
        }
        if let Some(missing) = used_clusters
            .iter()
            .find(|c| !self.clusters.contains_key(*c))
        {
            return Assembly::Waiting(format!("Cluster {missing:?}"));
        }
        let mut services = Vec::with_capacity(self.clusters.len());
        for c in self.clusters.values() {
            let endpoints = match &c.endpoints {
                EndpointSource::Static(e) => e.clone(),
                EndpointSource::Eds(name) => match self.endpoints.get(name) {
                    Some(e) => e.endpoints.clone(),
                    None => {
                        return Assembly::Waiting(format!(
                            "ClusterLoadAssignment {name:?} of cluster {:?}",
                            c.name
                        ));
                    }
                },
            };
            let protocol = c.protocol.unwrap_or(if tcp_clusters.contains(&c.name) {
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
            });
        }
        Assembly::Ready(RawConfig {
            admin: None,
            drain_timeout: None,
            listeners,
            services,
        })
    }
}
