//! Which protocol the mesh speaks to a ServicePort: `appProtocol`, else the port name, else TCP.

use k8s_openapi::api::core::v1::ServicePort;
use tern_proxy::config::RawServiceProtocol;

/// The protocol the mesh uses for `port` (rules in the module doc of `kubernetes`).
pub fn protocol_of(port: &ServicePort) -> RawServiceProtocol {
    match port.app_protocol.as_deref() {
        // An explicit appProtocol is authoritative even when it is one we do not parse.
        Some(app_protocol) => {
            from_app_protocol(app_protocol.trim()).unwrap_or(RawServiceProtocol::Tcp)
        }
        None => port
            .name
            .as_deref()
            .and_then(from_port_name)
            .unwrap_or(RawServiceProtocol::Tcp),
    }
}

fn from_app_protocol(app_protocol: &str) -> Option<RawServiceProtocol> {
    let lower = app_protocol.to_ascii_lowercase();
    match lower.as_str() {
        "http" => Some(RawServiceProtocol::Http1),
        "http2" | "h2c" | "kubernetes.io/h2c" | "grpc" => Some(RawServiceProtocol::Http2),
        _ => None,
    }
}

/// Istio's naming convention: `<protocol>[-<suffix>]`.
fn from_port_name(name: &str) -> Option<RawServiceProtocol> {
    let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
    match prefix.as_str() {
        "http" => Some(RawServiceProtocol::Http1),
        "http2" | "h2c" | "grpc" => Some(RawServiceProtocol::Http2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RawServiceProtocol::{Http1, Http2, Tcp};

    fn port(name: Option<&str>, app_protocol: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            app_protocol: app_protocol.map(str::to_string),
            port: 80,
            ..ServicePort::default()
        }
    }

    #[test]
    fn protocol_table() {
        let cases = [
            // appProtocol decides when present.
            (None, Some("http"), Http1),
            (None, Some("HTTP"), Http1),
            (None, Some("http2"), Http2),
            (None, Some("h2c"), Http2),
            (None, Some("kubernetes.io/h2c"), Http2),
            (None, Some("grpc"), Http2),
            (None, Some("tcp"), Tcp),
            (None, Some("https"), Tcp),
            (None, Some("kubernetes.io/ws"), Tcp),
            (None, Some("kubernetes.io/wss"), Tcp),
            (Some("http-web"), Some("tcp"), Tcp),
            (Some("tcp-db"), Some("grpc"), Http2),
            // An unknown appProtocol is not overridden by an HTTP-looking name.
            (Some("http-admin"), Some("example.com/custom"), Tcp),
            // Otherwise the name's prefix before the first '-'.
            (Some("http"), None, Http1),
            (Some("http-web"), None, Http1),
            (Some("HTTP-web"), None, Http1),
            (Some("http2"), None, Http2),
            (Some("grpc"), None, Http2),
            (Some("grpc-api"), None, Http2),
            (Some("h2c-internal"), None, Http2),
            (Some("tcp-db"), None, Tcp),
            (Some("https"), None, Tcp),
            (Some("httpx"), None, Tcp),
            (Some("web"), None, Tcp),
            (Some("metrics"), None, Tcp),
            // Unnamed and unknown default to TCP.
            (None, None, Tcp),
            (Some(""), None, Tcp),
        ];
        for (name, app_protocol, want) in cases {
            assert_eq!(
                protocol_of(&port(name, app_protocol)),
                want,
                "name {name:?}, appProtocol {app_protocol:?}"
            );
        }
    }
}
