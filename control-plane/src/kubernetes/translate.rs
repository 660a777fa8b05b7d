//! Services, EndpointSlices and Pods in, mesh services out: the pure half of the Kubernetes
//! source.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use tern_proxy::config::{RawEndpoint, RawLoadBalancer, RawService};
use tern_proxy::identity::SpiffeId;

use super::annotations::{self, InvalidAnnotation};
use super::identity::{self, Override, Pods, TrustDomain, Withheld, Workload};
use super::protocol::protocol_of;

/// Set by the EndpointSlice controller (and by hand on hand-made slices) to tie a slice to
/// its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pure: the mesh services these Kubernetes objects describe, sorted by name; identities
/// are formed in `trust_domain`.
pub fn services_from(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    trust_domain: &TrustDomain,
) -> Vec<RawService> {
    translate(services, slices, pods, trust_domain).services
}

/// The mesh services, and what was ignored on the way.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Translation {
    /// Sorted by name; endpoints sorted by address.
    pub services: Vec<RawService>,
    /// Sorted and without repeats, so callers can log each distinct one once.
    pub warnings: Vec<Warning>,
}

/// Something in a Kubernetes object the translation ignored; the rest was still served.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub(crate) enum Warning {
    #[error("{kind} {object}: {problem}")]
    Annotation {
        kind: &'static str,
        object: String,
        problem: String,
    },
    #[error("EndpointSlice {slice}: address {address:?} is not an IP address; endpoint skipped")]
    InvalidAddress { slice: String, address: String },
    #[error("EndpointSlice {slice}: addressType {address_type:?} is not supported; slice skipped")]
    UnsupportedAddressType { slice: String, address_type: String },
    #[error(
        "Service {service} port {port}: {count} ready endpoint(s) run no Tern sidecar beside \
         meshed ones; withheld, the others are spoken to over mTLS as {identity}"
    )]
    Unmeshed {
        service: String,
        port: u16,
        count: usize,
        identity: String,
    },
    #[error(
        "Service {service} port {port}: {count} ready endpoint(s) run as another service \
         account than most; withheld, the others are spoken to over mTLS as {identity} \
         (annotation tern.dev/identity pins one)"
    )]
    OtherIdentity {
        service: String,
        port: u16,
        count: usize,
        identity: String,
    },
    #[error(
        "Service {service} port {port}: {count} ready endpoint(s) belong to pods not seen; \
         withheld until they are"
    )]
    PodsNotSeen {
        service: String,
        port: u16,
        count: usize,
    },
}

/// What one EndpointSlice contributes, worked out once and used for every port of its Service.
struct SliceView<'a> {
    name: &'a str,
    ports: &'a [EndpointPort],
    weight: Option<u32>,
    ready: Vec<(IpAddr, Workload)>,
}

/// Settings a Service's annotations give all of its ports.
struct PortSettings {
    load_balancer: RawLoadBalancer,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    identity: Option<Override>,
}

/// What the translation looks things up in.
struct Context<'a> {
    pods: Pods<'a>,
    trust_domain: &'a TrustDomain,
}

/// [`services_from`] plus warnings, over anything that borrows as the API types so the
/// watcher can pass its cached `Arc`s without cloning every object.
pub(crate) fn translate<S, E, P>(
    services: &[S],
    slices: &[E],
    pods: &[P],
    trust_domain: &TrustDomain,
) -> Translation
where
    S: Borrow<Service>,
    E: Borrow<EndpointSlice>,
    P: Borrow<Pod>,
{
    let mut warnings = Vec::new();
    let context = Context {
        pods: identity::index_pods(pods),
        trust_domain,
    };
    let slices_of = group_slices(slices, &context, &mut warnings);
    let mut out = Vec::new();
    for service in services {
        let service = service.borrow();
        let (Some(name), Some(namespace)) = (
            service.metadata.name.as_deref(),
            service.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        let slices = slices_of
            .get(&(namespace, name))
            .map_or(&[][..], Vec::as_slice);
        add_service(
            service,
            name,
            namespace,
            slices,
            &context,
            &mut out,
            &mut warnings,
        );
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    // Two ServicePorts with one number and protocol are rejected by the API server; if it
    // ever happens, one entry keeps the snapshot valid.
    out.dedup_by(|a, b| a.name == b.name);
    warnings.sort();
    warnings.dedup();
    Translation {
        services: out,
        warnings,
    }
}

/// The usable slices, by (namespace, service name), each list sorted by slice name so that
/// the first slice decides a duplicated endpoint's weight whatever order the cache gave.
fn group_slices<'a, E: Borrow<EndpointSlice>>(
    slices: &'a [E],
    context: &Context,
    warnings: &mut Vec<Warning>,
) -> HashMap<(&'a str, &'a str), Vec<SliceView<'a>>> {
    let mut by_service: HashMap<(&str, &str), Vec<SliceView>> = HashMap::new();
    for slice in slices {
        let slice = slice.borrow();
        let meta = &slice.metadata;
        let (Some(name), Some(namespace), Some(service)) = (
            meta.name.as_deref(),
            meta.namespace.as_deref(),
            meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        if let Some(view) = view_slice(slice, name, namespace, context, warnings) {
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(view);
        }
    }
    for views in by_service.values_mut() {
        views.sort_by(|a, b| a.name.cmp(b.name));
    }
    by_service
}

fn view_slice<'a>(
    slice: &'a EndpointSlice,
    name: &'a str,
    namespace: &str,
    context: &Context,
    warnings: &mut Vec<Warning>,
) -> Option<SliceView<'a>> {
    let qualified = || format!("{namespace}/{name}");
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        warnings.push(Warning::UnsupportedAddressType {
            slice: qualified(),
            address_type: slice.address_type.clone(),
        });
        return None;
    }
    let weight = match annotations::get(slice.metadata.annotations.as_ref(), annotations::WEIGHT)
        .map(annotations::weight)
    {
        None => None,
        Some(Ok(weight)) => Some(weight),
        Some(Err(invalid)) => {
            warnings.push(annotation_warning("EndpointSlice", qualified(), &invalid));
            None
        }
    };
    let mut ready = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        // The API: a missing `ready` means ready.
        let is_ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        if !is_ready {
            continue;
        }
        // The API: all addresses of an endpoint are fungible; consumers may use the first.
        let Some(address) = endpoint.addresses.first() else {
            continue;
        };
        match address.parse::<IpAddr>() {
            Ok(ip) => ready.push((
                ip,
                identity::workload_of(endpoint, namespace, &context.pods, context.trust_domain),
            )),
            Err(_) => warnings.push(Warning::InvalidAddress {
                slice: qualified(),
                address: address.clone(),
            }),
        }
    }
    Some(SliceView {
        name,
        ports: slice.ports.as_deref().unwrap_or_default(),
        weight,
        ready,
    })
}

fn add_service(
    service: &Service,
    name: &str,
    namespace: &str,
    slices: &[SliceView],
    context: &Context,
    out: &mut Vec<RawService>,
    warnings: &mut Vec<Warning>,
) {
    let Some(spec) = &service.spec else {
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let qualified = format!("{namespace}/{name}");
    let settings = port_settings(service, &qualified, namespace, context, warnings);
    for port in spec.ports.iter().flatten() {
        if !is_tcp(port.protocol.as_deref()) {
            continue;
        }
        let Some(number) = port_number(port.port) else {
            continue;
        };
        let candidates = candidates_of(port, slices);
        let decision = identity::decide(
            candidates.values().map(|(_, workload)| *workload),
            settings.identity.as_ref(),
        );
        report_withheld(
            &decision.withheld,
            decision.identity.as_ref(),
            &qualified,
            number,
            warnings,
        );
        let endpoints = candidates
            .into_iter()
            .filter(|(_, (_, workload))| decision.serves(workload))
            .map(|(address, (weight, _))| RawEndpoint {
                address: address.to_string(),
                weight,
            })
            .collect();
        out.push(RawService {
            name: format!("{name}.{namespace}.svc.cluster.local:{number}"),
            protocol: protocol_of(port),
            load_balancer: settings.load_balancer,
            connect_timeout: settings.connect_timeout.clone(),
            idle_timeout: settings.idle_timeout.clone(),
            endpoints,
            circuit_breaker: None,
            outlier_detection: None,
            health_check: None,
            identity: decision.identity.as_ref().map(ToString::to_string),
            original_destination: None,
        });
    }
}

fn port_settings(
    service: &Service,
    qualified: &str,
    namespace: &str,
    context: &Context,
    warnings: &mut Vec<Warning>,
) -> PortSettings {
    let found = service.metadata.annotations.as_ref();
    let load_balancer = annotations::get(found, annotations::LOAD_BALANCER)
        .and_then(|v| keep(annotations::load_balancer(v), qualified, warnings))
        .unwrap_or_default();
    let connect_timeout = annotations::get(found, annotations::CONNECT_TIMEOUT).and_then(|v| {
        keep(
            annotations::duration(annotations::CONNECT_TIMEOUT, v),
            qualified,
            warnings,
        )
    });
    let idle_timeout = annotations::get(found, annotations::IDLE_TIMEOUT).and_then(|v| {
        keep(
            annotations::duration(annotations::IDLE_TIMEOUT, v),
            qualified,
            warnings,
        )
    });
    let identity = annotations::get(found, annotations::IDENTITY).and_then(|v| {
        keep(
            annotations::identity(v, namespace, context.trust_domain),
            qualified,
            warnings,
        )
    });
    PortSettings {
        load_balancer,
        connect_timeout,
        idle_timeout,
        identity,
    }
}

/// A Service annotation's value, or `None` and a warning.
fn keep<T>(
    result: Result<T, InvalidAnnotation>,
    service: &str,
    warnings: &mut Vec<Warning>,
) -> Option<T> {
    result
        .map_err(|invalid| {
            warnings.push(annotation_warning("Service", service.to_string(), &invalid))
        })
        .ok()
}

/// The ready endpoints of `port` across `slices`, each address once (with its weight and
/// workload), sorted; the identity decision then picks which are served.
fn candidates_of<'a>(
    port: &ServicePort,
    slices: &'a [SliceView],
) -> BTreeMap<SocketAddr, (Option<u32>, &'a Workload)> {
    let mut chosen = BTreeMap::new();
    for slice in slices {
        // Per slice: a named targetPort may have a different number in each slice.
        let Some(number) = slice
            .ports
            .iter()
            .find(|p| same_port(p, port))
            .and_then(|p| p.port)
            .and_then(port_number)
        else {
            continue;
        };
        for (ip, workload) in &slice.ready {
            chosen
                .entry(SocketAddr::new(*ip, number))
                .or_insert((slice.weight, workload));
        }
    }
    chosen
}

fn report_withheld(
    withheld: &Withheld,
    identity: Option<&SpiffeId>,
    service: &str,
    port: u16,
    warnings: &mut Vec<Warning>,
) {
    let identity = || identity.map(ToString::to_string).unwrap_or_default();
    if withheld.unmeshed > 0 {
        warnings.push(Warning::Unmeshed {
            service: service.to_string(),
            port,
            count: withheld.unmeshed,
            identity: identity(),
        });
    }
    if withheld.other_identity > 0 {
        warnings.push(Warning::OtherIdentity {
            service: service.to_string(),
            port,
            count: withheld.other_identity,
            identity: identity(),
        });
    }
    if withheld.unknown > 0 {
        warnings.push(Warning::PodsNotSeen {
            service: service.to_string(),
            port,
            count: withheld.unknown,
        });
    }
}

/// The EndpointSlice controller copies the ServicePort's name and protocol into the slice;
/// a missing name is the empty name of a Service's single unnamed port.
fn same_port(slice_port: &EndpointPort, port: &ServicePort) -> bool {
    slice_port.name.as_deref().unwrap_or_default() == port.name.as_deref().unwrap_or_default()
        && slice_port.protocol.as_deref().unwrap_or("TCP")
            == port.protocol.as_deref().unwrap_or("TCP")
}

/// The API's default protocol is TCP.
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

fn annotation_warning(kind: &'static str, object: String, invalid: &InvalidAnnotation) -> Warning {
    Warning::Annotation {
        kind,
        object,
        problem: invalid.to_string(),
    }
}

#[cfg(test)]
mod tests;
