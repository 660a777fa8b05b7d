//! Just enough of the Envoy messages to follow the protocol: names, the route names listeners
//! reference, and the ports of a ClusterLoadAssignment.
//!
//! These are wire-compatible subsets of the real messages (same field numbers; prost skips
//! the fields not declared), so that 100 simulated proxies sharing one core decode cheaply and
//! the load generator does not become what is measured. The tests check them against the real
//! `envoy-types` messages.

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// `Cluster.name`, `Listener.name`, `RouteConfiguration.name`: field 1 in each.
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// `Listener`: `name` = 1, `filter_chains` = 3.
#[derive(Clone, PartialEq, Message)]
struct ListenerLite {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "3")]
    filter_chains: Vec<FilterChainLite>,
}

/// `FilterChain.filters` = 3.
#[derive(Clone, PartialEq, Message)]
struct FilterChainLite {
    #[prost(message, repeated, tag = "3")]
    filters: Vec<FilterLite>,
}

/// `Filter.typed_config` = 4 (a member of the `config_type` oneof).
#[derive(Clone, PartialEq, Message)]
struct FilterLite {
    #[prost(message, optional, tag = "4")]
    typed_config: Option<Any>,
}

/// `HttpConnectionManager.rds` = 3 (a member of the `route_specifier` oneof).
#[derive(Clone, PartialEq, Message)]
struct HcmLite {
    #[prost(message, optional, tag = "3")]
    rds: Option<RdsLite>,
}

/// `Rds.route_config_name` = 2.
#[derive(Clone, PartialEq, Message)]
struct RdsLite {
    #[prost(string, tag = "2")]
    route_config_name: String,
}

/// `ClusterLoadAssignment`: `cluster_name` = 1, `endpoints` = 2.
#[derive(Clone, PartialEq, Message)]
struct ClaLite {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(message, repeated, tag = "2")]
    endpoints: Vec<LocalityLite>,
}

/// `LocalityLbEndpoints.lb_endpoints` = 2.
#[derive(Clone, PartialEq, Message)]
struct LocalityLite {
    #[prost(message, repeated, tag = "2")]
    lb_endpoints: Vec<LbEndpointLite>,
}

/// `LbEndpoint.endpoint` = 1 (a member of the `host_identifier` oneof).
#[derive(Clone, PartialEq, Message)]
struct LbEndpointLite {
    #[prost(message, optional, tag = "1")]
    endpoint: Option<EndpointLite>,
}

/// `Endpoint.address` = 1.
#[derive(Clone, PartialEq, Message)]
struct EndpointLite {
    #[prost(message, optional, tag = "1")]
    address: Option<AddressLite>,
}

/// `Address.socket_address` = 1 (a member of the `address` oneof).
#[derive(Clone, PartialEq, Message)]
struct AddressLite {
    #[prost(message, optional, tag = "1")]
    socket_address: Option<SocketAddressLite>,
}

/// `SocketAddress.port_value` = 3 (a member of the `port_specifier` oneof).
#[derive(Clone, PartialEq, Message)]
struct SocketAddressLite {
    #[prost(uint32, tag = "3")]
    port_value: u32,
}

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The name of a Cluster or RouteConfiguration.
pub fn name_of(any: &Any) -> anyhow::Result<String> {
    Ok(Named::decode(any.value.as_slice())?.name)
}

/// A listener's name and the route configuration it asks for over RDS, if any (API
/// listeners and TCP listeners carry their routes inline or have none).
pub fn listener_of(any: &Any) -> anyhow::Result<(String, Option<String>)> {
    let listener = ListenerLite::decode(any.value.as_slice())?;
    let mut rds = None;
    for filter in listener.filter_chains.iter().flat_map(|c| &c.filters) {
        if let Some(config) = &filter.typed_config
            && config.type_url == HCM_TYPE
            && let Some(r) = HcmLite::decode(config.value.as_slice())?.rds
        {
            rds = Some(r.route_config_name);
        }
    }
    Ok((listener.name, rds))
}

/// A ClusterLoadAssignment's cluster name and its highest endpoint port.
pub fn load_assignment_of(any: &Any) -> anyhow::Result<(String, u32)> {
    let cla = ClaLite::decode(any.value.as_slice())?;
    let max_port = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| {
            e.endpoint
                .as_ref()?
                .address
                .as_ref()?
                .socket_address
                .as_ref()
        })
        .map(|s| s.port_value)
        .max()
        .unwrap_or(0);
    Ok((cla.cluster_name, max_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        Address, AggregatedConfigSource, ConfigSource, SocketAddress, address, config_source,
        socket_address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    use envoy_types::pb::envoy::config::listener::v3::{
        ApiListener, Filter, FilterChain, Listener, filter,
    };
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, Rds, http_connection_manager,
    };
    use envoy_types::pb::google::protobuf::UInt32Value;
    use envoy_types::util::pack_any;

    #[test]
    fn hcm_type_url_is_envoys() {
        assert_eq!(
            pack_any(HttpConnectionManager::default()).type_url,
            HCM_TYPE
        );
    }

    #[test]
    fn listener_with_rds_and_api_listener() {
        let hcm = HttpConnectionManager {
            stat_prefix: "web".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ConfigSource {
                    config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource {},
                    )),
                    ..Default::default()
                }),
                route_config_name: "web-routes".into(),
            })),
            ..Default::default()
        };
        let listener = Listener {
            name: "web".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            listener_of(&pack_any(listener)).expect("decodes"),
            ("web".to_string(), Some("web-routes".to_string()))
        );
        let api = Listener {
            name: "svc".into(),
            api_listener: Some(ApiListener {
                api_listener: Some(pack_any(HttpConnectionManager::default())),
            }),
            ..Default::default()
        };
        assert_eq!(
            listener_of(&pack_any(api)).expect("decodes"),
            ("svc".to_string(), None)
        );
        let rc = RouteConfiguration {
            name: "web-routes".into(),
            ..Default::default()
        };
        assert_eq!(name_of(&pack_any(rc)).expect("decodes"), "web-routes");
    }

    #[test]
    fn load_assignment_highest_port() {
        let endpoint = |port| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.1".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: 2 }),
            ..Default::default()
        };
        let cla = ClusterLoadAssignment {
            cluster_name: "svc-0001".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint(8080), endpoint(20_007), endpoint(8081)],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            load_assignment_of(&pack_any(cla)).expect("decodes"),
            ("svc-0001".to_string(), 20_007)
        );
    }
}
