//! The Kubernetes source: Services, EndpointSlices and Pods from every namespace, served as
//! mesh services.
//!
//! [`run`] keeps three reflector caches (Services, EndpointSlices, and Pods slimmed to their
//! containers' names and service account) fed by kube-runtime watchers, and after each change
//! publishes [`services_from`] of their contents. The translation is pure and follows these
//! rules:
//!
//! **One mesh service per (Service, ServicePort)**, named `NAME.NAMESPACE.svc.cluster.local:PORT`
//! where `PORT` is the ServicePort's `port` (what clients dial), not its `targetPort`. The
//! cluster domain is always `cluster.local`. Skipped:
//! - Services of type `ExternalName`: they are a DNS alias with no endpoints to balance over.
//! - ServicePorts whose `protocol` is UDP or SCTP: the mesh proxies TCP only.
//!
//! Headless Services (`clusterIP: None`) are served like any other: their clients resolve
//! DNS to pod addresses and pick one themselves, which is what the mesh does for them.
//! A Service with no ready endpoint is still served, with an empty endpoint list, so routes
//! that name it stay valid and answer "no endpoints" instead of failing validation.
//!
//! **Endpoints** come from the EndpointSlices labelled `kubernetes.io/service-name=NAME` in
//! the Service's namespace, whoever manages them (so hand-written slices for selector-less
//! Services work too):
//! - Only endpoints whose `conditions.ready` is true or missing (the API says missing means
//!   ready). `ready` already excludes terminating endpoints, and the EndpointSlice controller
//!   sets it for every endpoint when the Service has `publishNotReadyAddresses`, so the mesh
//!   honours both without looking at `serving` or `terminating`.
//! - The port is the slice port whose `name` (missing equals empty) and `protocol` (missing
//!   equals TCP) match the ServicePort's. A named `targetPort` can resolve to different
//!   numbers in different pods, and the controller then puts those pods in different slices,
//!   each with its own number; matching per slice keeps each pod on its own port. A slice
//!   without that port, or with no port number, contributes nothing to that ServicePort.
//! - Address types IPv4 and IPv6 (both families of a dual-stack Service are served); FQDN
//!   slices are skipped with a warning. Only an endpoint's first address is used, as the API
//!   allows ("these are all assumed to be fungible").
//! - The same `address:port` in two slices (it happens briefly while the controller moves
//!   endpoints between slices) is served once; the slice whose name sorts first decides its
//!   weight. Endpoints are sorted by address, so the output is stable.
//!
//! **Weights**: Kubernetes has none. An EndpointSlice annotation `tern.dev/weight: "N"`
//! (1 to 10000) gives all its endpoints weight N, for canary slices; without it endpoints
//! carry no weight (the proxy's default of 1).
//!
//! **Protocol** of a ServicePort, first match wins:
//! 1. `appProtocol`, when set (case-insensitive): `http` is HTTP/1; `http2`, `h2c`,
//!    `kubernetes.io/h2c` and `grpc` are HTTP/2 cleartext; anything else is TCP. `https`,
//!    `tls`, `kubernetes.io/ws` and `kubernetes.io/wss` are TCP on purpose: the bytes are
//!    encrypted, or an upgraded connection the HTTP proxy does not carry. An unknown value
//!    is TCP too, because the port's owner said what it speaks and it is nothing we parse.
//! 2. Otherwise the port name's prefix before the first `-` (Istio's convention):
//!    `http` is HTTP/1; `http2`, `h2c` and `grpc` are HTTP/2; anything else is TCP.
//! 3. Unnamed and unrecognised ports are TCP: opaque forwarding is correct for every
//!    protocol, while parsing a non-HTTP port as HTTP would break it.
//!
//! **Identity** (mTLS or plaintext, and which SPIFFE ID the endpoints must present) comes
//! from the pods behind each port's ready endpoints: `identity.rs` has the rules. In short, pods running a `tern-proxy` container are meshed and present
//! `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`; a port whose pods are meshed is
//! spoken to over mTLS, and endpoints that could not answer that (unmeshed pods, other
//! service accounts, pods not seen) are withheld, never spoken to in plaintext.
//!
//! **Service annotations** (all ports of the Service): `tern.dev/load-balancer` (`round_robin`,
//! `least_request` or `peak_ewma`), `tern.dev/connect-timeout` and `tern.dev/idle-timeout`
//! (durations such as `500ms` or `2s`), `tern.dev/identity` (a service account of the
//! Service's namespace, a full `spiffe://` ID, or `none` for plaintext: replaces the derived
//! identity and serves every ready endpoint).
//!
//! An invalid annotation or address never drops a Service: the value is ignored, the
//! default applies, and [`run`] logs a warning once per distinct problem.

mod annotations;
mod identity;
mod protocol;
mod translate;
mod watch;

pub use identity::{InvalidTrustDomain, TrustDomain};
pub use translate::services_from;
pub use watch::{Source, run};
