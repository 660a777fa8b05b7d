//! Packing resources so that equal resources give equal bytes: the content version of a
//! resource is a hash of them. prost writes a map in its `HashMap`'s iteration order, which
//! differs between instances, so the maps that can hold more than one entry (a cluster's
//! metadata; a route's metadata and `typed_per_filter_config`) are taken out and written last
//! from `BTreeMap`s. Protobuf parsers accept fields in any order, and a repeated field's
//! elements keep theirs.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::route::v3::{Route, RouteConfiguration, VirtualHost};
use envoy_types::pb::google::protobuf::{self as pbuf, Any};
use envoy_types::util::pack_any;
use prost::{Message, Name};

/// `Cluster.metadata` is tag 25.
pub fn pack_cluster(mut cluster: Cluster) -> Any {
    let metadata = cluster.metadata.take().map(sorted_metadata);
    let mut any = pack_any(cluster);
    if let Some(metadata) = metadata {
        prost::encoding::message::encode(25, &metadata, &mut any.value);
    }
    any
}

/// Virtual hosts (tag 2) and their routes (tag 3) are written one by one, as length-delimited
/// bytes, which is how a nested message is written anyway.
pub fn pack_route_configuration(mut rc: RouteConfiguration) -> Any {
    let hosts = std::mem::take(&mut rc.virtual_hosts);
    let mut value = rc.encode_to_vec();
    Nested {
        tag2: hosts.into_iter().map(virtual_host_bytes).collect(),
        tag3: Vec::new(),
    }
    .encode_raw(&mut value);
    Any {
        type_url: RouteConfiguration::type_url(),
        value,
    }
}

fn virtual_host_bytes(mut vh: VirtualHost) -> Vec<u8> {
    let routes = std::mem::take(&mut vh.routes);
    let mut out = vh.encode_to_vec();
    Nested {
        tag2: Vec::new(),
        tag3: routes.into_iter().map(route_bytes).collect(),
    }
    .encode_raw(&mut out);
    out
}

fn route_bytes(mut route: Route) -> Vec<u8> {
    let maps = RouteMaps {
        metadata: route.metadata.take().map(sorted_metadata),
        typed_per_filter_config: std::mem::take(&mut route.typed_per_filter_config)
            .into_iter()
            .collect(),
    };
    let mut out = route.encode_to_vec();
    maps.encode_raw(&mut out);
    out
}

fn sorted_metadata(m: Metadata) -> SortedMetadata {
    SortedMetadata {
        filter_metadata: m
            .filter_metadata
            .into_iter()
            .map(|(k, v)| {
                let fields = v.fields.into_iter().collect();
                (k, SortedStruct { fields })
            })
            .collect(),
    }
}

/// Already encoded messages, as the repeated message field of this tag.
#[derive(Clone, PartialEq, prost::Message)]
struct Nested {
    #[prost(bytes = "vec", repeated, tag = "2")]
    tag2: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    tag3: Vec<Vec<u8>>,
}

/// The maps of `envoy.config.route.v3.Route`, in key order.
#[derive(Clone, PartialEq, prost::Message)]
struct RouteMaps {
    #[prost(message, optional, tag = "4")]
    metadata: Option<SortedMetadata>,
    #[prost(btree_map = "string, message", tag = "13")]
    typed_per_filter_config: BTreeMap<String, Any>,
}

/// `envoy.config.core.v3.Metadata` (its `filter_metadata` only) with maps in key order.
#[derive(Clone, PartialEq, prost::Message)]
struct SortedMetadata {
    #[prost(btree_map = "string, message", tag = "1")]
    filter_metadata: BTreeMap<String, SortedStruct>,
}

/// `google.protobuf.Struct` with its fields in key order.
#[derive(Clone, PartialEq, prost::Message)]
struct SortedStruct {
    #[prost(btree_map = "string, message", tag = "1")]
    fields: BTreeMap<String, pbuf::Value>,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::route::v3::RouteMatch;

    use super::*;

    fn route(n: usize) -> Route {
        let mut fields = HashMap::new();
        for k in ["b", "a", "c", "retry_budget", "rate_limit_key"] {
            fields.insert(k.to_string(), pbuf::Value::default());
        }
        let mut filter_metadata = HashMap::new();
        filter_metadata.insert("tern".to_string(), pbuf::Struct { fields });
        let mut typed_per_filter_config = HashMap::new();
        for k in [
            "z",
            "envoy.filters.http.fault",
            "envoy.filters.http.local_ratelimit",
        ] {
            typed_per_filter_config.insert(k.to_string(), pack_any(pbuf::Duration::default()));
        }
        Route {
            name: format!("r{n}"),
            r#match: Some(RouteMatch::default()),
            metadata: Some(Metadata {
                filter_metadata,
                ..Default::default()
            }),
            typed_per_filter_config,
            ..Default::default()
        }
    }

    fn rc() -> RouteConfiguration {
        RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: (0..2)
                .map(|v| VirtualHost {
                    name: format!("v{v}"),
                    domains: vec!["*".into()],
                    routes: (0..3).map(route).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn equal_route_configurations_pack_to_equal_bytes_that_decode_to_them() {
        let first = pack_route_configuration(rc());
        for _ in 0..20 {
            assert_eq!(pack_route_configuration(rc()).value, first.value);
        }
        let decoded = RouteConfiguration::decode(first.value.as_slice()).unwrap();
        assert_eq!(decoded, rc());
    }
}
