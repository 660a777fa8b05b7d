use super::*;
use crate::config::parse_yaml;

const ISSUE_EXAMPLE: &str = r#"
admin: { address: 127.0.0.1:15000 }
listeners:
  - name: web
    address: 127.0.0.1:10080
    protocol: http
    routes:
      - match: { host: api.local, path_prefix: /v2, headers: { x-canary: "1" } }
        backends: [ { service: api-v2, weight: 10 }, { service: api, weight: 90 } ]
      - backends: [ { service: api } ]
  - name: raw
    address: 127.0.0.1:10081
    protocol: tcp
    service: echo
services:
  - name: api
    protocol: http1
    load_balancer: round_robin
    endpoints:
      - { address: 127.0.0.1:9001, weight: 1 }
  - name: api-v2
    protocol: http2
    load_balancer: peak_ewma
    endpoints: [ { address: 127.0.0.1:9002 } ]
  - name: echo
    protocol: tcp
    endpoints: [ { address: 127.0.0.1:9003 } ]
"#;

fn field_error(yaml: &str) -> (String, String) {
    match parse_yaml(yaml) {
        Err(ConfigError::Field { path, reason }) => (path, reason),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn accepts_the_documented_shape() {
    let config = parse_yaml(ISSUE_EXAMPLE).expect("valid");
    assert_eq!(config.admin, Some("127.0.0.1:15000".parse().unwrap()));
    assert_eq!(config.listeners.len(), 2);
    let ListenerKind::Http { routes } = &config.listeners[0].kind else {
        panic!("http listener")
    };
    assert_eq!(routes[0].matcher.host.as_deref(), Some("api.local"));
    assert_eq!(
        routes[0].matcher.path,
        Some(PathMatch::Prefix("/v2".into()))
    );
    assert_eq!(routes[0].matcher.headers.len(), 1);
    assert_eq!(routes[0].backends[1].weight, 90);
    assert_eq!(routes[1].backends[0].weight, 1);
    assert_eq!(config.services[1].load_balancer, LoadBalancerKind::PeakEwma);
    assert_eq!(config.services[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
}

#[test]
fn unknown_field_names_its_path() {
    let yaml = ISSUE_EXAMPLE.replace("load_balancer: round_robin", "load_balancr: round_robin");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "services[0].load_balancr");
    assert!(reason.contains("unknown field"), "{reason}");
}

#[test]
fn wrong_type_names_its_path() {
    let yaml = ISSUE_EXAMPLE.replace("weight: 90", "weight: ninety");
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "listeners[0].routes[0].backends[1].weight");
}

#[test]
fn unknown_enum_value_names_its_path() {
    let yaml = ISSUE_EXAMPLE.replace("load_balancer: peak_ewma", "load_balancer: random");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "services[1].load_balancer");
    assert!(reason.contains("random"), "{reason}");
}

#[test]
fn unknown_service_is_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("service: api-v2", "service: api-v3");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "listeners[0].routes[0].backends[0].service");
    assert!(reason.contains("unknown service \"api-v3\""), "{reason}");
}

#[test]
fn duplicate_names_are_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("name: api-v2", "name: api");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "services[1].name");
    assert!(reason.contains("duplicate"), "{reason}");

    let yaml = ISSUE_EXAMPLE.replace("name: raw", "name: web");
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "listeners[1].name");
}

#[test]
fn bad_address_is_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("127.0.0.1:9003", "localhost:9003");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "services[2].endpoints[0].address");
    assert!(reason.contains("invalid address"), "{reason}");
}

#[test]
fn protocol_mismatches_are_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("service: echo", "service: api");
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "listeners[1].service");

    let yaml = ISSUE_EXAMPLE.replace(
        "backends: [ { service: api } ]",
        "backends: [ { service: echo } ]",
    );
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "listeners[0].routes[1].backends[0].service");
}

#[test]
fn zero_weight_and_bad_durations_are_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("weight: 1 }", "weight: 0 }");
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "services[0].endpoints[0].weight");

    let yaml = ISSUE_EXAMPLE.replace(
        "admin: { address: 127.0.0.1:15000 }",
        "drain_timeout: 10 seconds",
    );
    let (path, _) = field_error(&yaml);
    assert_eq!(path, "drain_timeout");
}

#[test]
fn shared_addresses_are_rejected() {
    let yaml = ISSUE_EXAMPLE.replace("127.0.0.1:10081", "127.0.0.1:10080");
    let (path, reason) = field_error(&yaml);
    assert_eq!(path, "listeners[1].address");
    assert!(reason.contains("already used"), "{reason}");
}

#[test]
fn yaml_syntax_errors_are_reported() {
    assert!(matches!(
        parse_yaml("listeners: [ {"),
        Err(ConfigError::Syntax(_))
    ));
}

#[test]
fn shipped_example_is_valid() {
    let text = include_str!("../../../../deploy/examples/static.yaml");
    let config = parse_yaml(text).expect("deploy/examples/static.yaml must stay valid");
    assert_eq!(config.listeners.len(), 2);
}

#[test]
fn shipped_mesh_example_is_valid() {
    let text = include_str!("../../../../deploy/examples/mesh.yaml");
    let config = parse_yaml(text).expect("deploy/examples/mesh.yaml must stay valid");
    assert_eq!(config.services.len(), 3);
}

#[test]
fn listener_connection_cap_defaults_and_is_bounded() {
    let config = parse_yaml(ISSUE_EXAMPLE).expect("valid");
    assert_eq!(config.listeners[0].max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(config.memory_limit, None);
    let capped = ISSUE_EXAMPLE.replace(
        "    service: echo\n",
        "    service: echo\n    max_connections: 500\n",
    );
    assert_eq!(
        parse_yaml(&capped).expect("valid").listeners[1].max_connections,
        500
    );
    let zero = ISSUE_EXAMPLE.replace(
        "    service: echo\n",
        "    service: echo\n    max_connections: 0\n",
    );
    let (path, reason) = field_error(&zero);
    assert_eq!(path, "listeners[1].max_connections");
    assert!(reason.contains("at least 1"), "{reason}");
    let huge = ISSUE_EXAMPLE.replace(
        "    service: echo\n",
        "    service: echo\n    max_connections: 2000000\n",
    );
    assert_eq!(field_error(&huge).0, "listeners[1].max_connections");
}

#[test]
fn memory_limit_takes_sizes_and_names_the_field_when_wrong() {
    let with = |v: &str| format!("memory_limit: {v}\n{ISSUE_EXAMPLE}");
    assert_eq!(
        parse_yaml(&with("512MiB")).expect("valid").memory_limit,
        Some(512 << 20)
    );
    assert_eq!(
        parse_yaml(&with("1Gi")).expect("valid").memory_limit,
        Some(1 << 30)
    );
    let (path, reason) = field_error(&with("512"));
    assert_eq!(path, "memory_limit");
    assert!(reason.contains("minimum of 1MiB"), "{reason}");
    let (path, reason) = field_error(&with("512XB"));
    assert_eq!(path, "memory_limit");
    assert!(reason.contains("unknown unit"), "{reason}");
}

const SIDECAR: &str = r#"
listeners:
  - name: outbound
    address: 127.0.0.1:15001
    protocol: tcp
    service: passthrough
    original_destination: true
  - name: api-vip
    address: 10.96.0.10:80
    bind: false
    protocol: http
    routes: [ { backends: [ { service: api } ] } ]
services:
  - name: passthrough
    protocol: tcp
    original_destination: { host: 127.0.0.1 }
  - name: api
    protocol: http1
    endpoints: [ { address: 10.1.0.5:8080 } ]
"#;

#[test]
fn sidecar_interception_validates_and_says_what_is_wrong() {
    let config = parse_yaml(SIDECAR).expect("valid");
    assert!(config.listeners[0].original_destination && config.listeners[0].bind);
    assert!(!config.listeners[1].bind);
    let passthrough = config.services[0].original_destination.unwrap();
    assert_eq!(
        passthrough.target("10.1.2.3:5432".parse().unwrap()),
        "127.0.0.1:5432".parse::<SocketAddr>().unwrap()
    );

    let alone = SIDECAR.replace("    original_destination: true\n", "");
    let (path, reason) = field_error(&alone);
    assert_eq!(path, "listeners");
    assert!(reason.contains("original_destination: true"), "{reason}");

    let http_passthrough = SIDECAR.replace(
        "  - name: passthrough\n    protocol: tcp",
        "  - name: passthrough\n    protocol: http1",
    );
    let (path, _) = field_error(&http_passthrough);
    assert_eq!(path, "services[0].original_destination");

    let with_endpoints = SIDECAR.replace(
        "    original_destination: { host: 127.0.0.1 }\n",
        "    original_destination: {}\n    endpoints: [ { address: 127.0.0.1:1 } ]\n",
    );
    let (path, reason) = field_error(&with_endpoints);
    assert_eq!(path, "services[0].original_destination");
    assert!(reason.contains("no endpoints"), "{reason}");

    let bad_host = SIDECAR.replace("{ host: 127.0.0.1 }", "{ host: localhost }");
    assert_eq!(
        field_error(&bad_host).0,
        "services[0].original_destination.host"
    );

    let routed = SIDECAR.replace(
        "routes: [ { backends: [ { service: api } ] } ]",
        "routes: [ { backends: [ { service: passthrough } ] } ]",
    );
    let (path, reason) = field_error(&routed);
    assert_eq!(path, "listeners[1].routes[0].backends[0].service");
    assert!(
        reason.contains("needs an http1 or http2 service"),
        "{reason}"
    );

    let no_port = SIDECAR.replace("10.96.0.10:80", "10.96.0.10:0");
    assert_eq!(field_error(&no_port).0, "listeners[1].address");

    let twice = SIDECAR.replace(
        "services:\n",
        "  - name: again\n    address: 10.96.0.10:80\n    bind: false\n    protocol: tcp\n    service: passthrough\nservices:\n",
    );
    let (path, reason) = field_error(&twice);
    assert_eq!(path, "listeners[2].address");
    assert!(reason.contains("already"), "{reason}");
}

#[test]
fn gateway_tls_validates_and_names_the_field() {
    let base = |extra: &str, protocol: &str| {
        format!(
            "listeners:\n  - name: edge\n    address: 127.0.0.1:0\n    protocol: {protocol}\n    service: echo\n{extra}services:\n  - name: echo\n    protocol: tcp\n    endpoints: [ {{ address: 127.0.0.1:9 }} ]\n"
        )
    };
    let tls = "    tls: { certificates: [ { cert: /etc/tls/a.crt, key: /etc/tls/a.key, server_names: [\"*.Example.com\"] } ] }\n";
    let config = parse_yaml(&base(tls, "tcp")).expect("valid");
    let gateway = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(gateway.certificates[0].server_names, ["*.example.com"]);

    let (path, _) = field_error(&base(tls, "auto"));
    assert_eq!(path, "listeners[0].tls");
    let both = format!("{tls}    mtls: {{ mode: strict }}\n");
    let (path, reason) = field_error(&base(&both, "tcp"));
    assert_eq!(path, "listeners[0].tls");
    assert!(reason.contains("not both"), "{reason}");
    let none = "    tls: { certificates: [] }\n";
    assert_eq!(
        field_error(&base(none, "tcp")).0,
        "listeners[0].tls.certificates"
    );
    let bad = tls.replace("*.Example.com", "exa mple.com");
    assert_eq!(
        field_error(&base(&bad, "tcp")).0,
        "listeners[0].tls.certificates[0].server_names[0]"
    );
}
