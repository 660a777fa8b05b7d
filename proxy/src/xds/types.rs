//! The four xDS resource types Tern speaks, their type URLs and the order they are sent in.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Name;

/// A resource type. The order is the order of a full push (clusters before their endpoints,
/// listeners before their routes), which is the order the xDS specification recommends so
/// that nothing is referenced before it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TypeKind {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl TypeKind {
    pub const ALL: [TypeKind; 4] = [
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Listener,
        TypeKind::Route,
    ];

    pub fn type_url(self) -> String {
        match self {
            TypeKind::Cluster => Cluster::type_url(),
            TypeKind::Endpoint => ClusterLoadAssignment::type_url(),
            TypeKind::Listener => Listener::type_url(),
            TypeKind::Route => RouteConfiguration::type_url(),
        }
    }

    pub fn from_type_url(url: &str) -> Option<TypeKind> {
        TypeKind::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs, metrics labels and `/config_dump`.
    pub fn short(self) -> &'static str {
        match self {
            TypeKind::Cluster => "cds",
            TypeKind::Endpoint => "eds",
            TypeKind::Listener => "lds",
            TypeKind::Route => "rds",
        }
    }

    /// Listener and Cluster responses carry the whole state of the world; the other types may
    /// carry only what changed (xDS spec, "Resource types and SotW").
    pub fn is_full_state(self) -> bool {
        matches!(self, TypeKind::Cluster | TypeKind::Listener)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_are_envoys() {
        assert_eq!(
            TypeKind::Cluster.type_url(),
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
        assert_eq!(
            TypeKind::Endpoint.type_url(),
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
        );
        assert_eq!(
            TypeKind::Listener.type_url(),
            "type.googleapis.com/envoy.config.listener.v3.Listener"
        );
        assert_eq!(
            TypeKind::Route.type_url(),
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
        );
        for t in TypeKind::ALL {
            assert_eq!(TypeKind::from_type_url(&t.type_url()), Some(t));
        }
        assert_eq!(TypeKind::from_type_url("type.googleapis.com/x"), None);
    }
}
