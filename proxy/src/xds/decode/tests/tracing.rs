//! The connection manager's tracing provider: OpenTelemetry over gRPC as Envoy configs write
//! it, and the tracers and targets Tern's exporter cannot use.

use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing as trace,
};
use envoy_types::pb::envoy::r#type::v3::Percent;

use super::traffic::state_of;
use super::*;
use crate::config::RawTracing;

fn decode_listener(hcm: HttpConnectionManager) -> Result<XdsListener, InvalidResource> {
    XdsListener::try_from(&http_listener("web", hcm))
}

fn tracing_of(l: &XdsListener) -> Option<RawTracing> {
    match l {
        XdsListener::Http { tracing, .. } => tracing.clone(),
        other => panic!("an HTTP listener, got {other:?}"),
    }
}

pub(super) fn otel(target: grpc_service::TargetSpecifier, service_name: &str) -> trace::Http {
    trace::Http {
        name: "envoy.tracers.opentelemetry".into(),
        config_type: Some(trace::http::ConfigType::TypedConfig(pack_any(
            OpenTelemetryConfig {
                grpc_service: Some(GrpcService {
                    target_specifier: Some(target),
                    ..Default::default()
                }),
                service_name: service_name.into(),
                ..Default::default()
            },
        ))),
    }
}

pub(super) fn google(target_uri: &str, tls: bool) -> grpc_service::TargetSpecifier {
    grpc_service::TargetSpecifier::GoogleGrpc(grpc_service::GoogleGrpc {
        target_uri: target_uri.into(),
        stat_prefix: "otlp".into(),
        channel_credentials: tls.then(|| grpc_service::google_grpc::ChannelCredentials {
            credential_specifier: Some(
                grpc_service::google_grpc::channel_credentials::CredentialSpecifier::SslCredentials(
                    Default::default(),
                ),
            ),
        }),
        ..Default::default()
    })
}

pub(super) fn traced(provider: trace::Http, sampling: Option<f64>) -> HttpConnectionManager {
    HttpConnectionManager {
        tracing: Some(http_connection_manager::Tracing {
            provider: Some(provider),
            random_sampling: sampling.map(|value| Percent { value }),
            ..Default::default()
        }),
        ..hcm_rds("r")
    }
}

#[test]
fn an_opentelemetry_provider_becomes_the_tracing_settings() {
    let l = decode_listener(traced(otel(google("otel:4317", false), "edge"), Some(25.0))).unwrap();
    assert_eq!(
        tracing_of(&l),
        Some(RawTracing {
            otlp_endpoint: "http://otel:4317".into(),
            sample_ratio: Some(0.25),
            service_name: Some("edge".into()),
        })
    );
    // TLS by channel credentials; a `dns:///` target; Envoy's 100 % when sampling is unset;
    // Tern's own service name when none is given.
    let l = decode_listener(traced(otel(google("dns:///otel:4317", true), ""), None)).unwrap();
    assert_eq!(
        tracing_of(&l),
        Some(RawTracing {
            otlp_endpoint: "https://otel:4317".into(),
            sample_ratio: Some(1.0),
            service_name: None,
        })
    );
    assert_eq!(
        tracing_of(&decode_listener(hcm_rds("r")).unwrap()),
        None,
        "no tracing"
    );
}

#[test]
fn tracers_tern_cannot_export_to_are_refused_with_the_field_named() {
    let at = "filter_chains[0].filters[0].tracing";
    let e = refused(decode_listener(traced(
        otel(
            grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                cluster_name: "otel".into(),
                ..Default::default()
            }),
            "x",
        ),
        None,
    )));
    assert_eq!(
        e.field,
        format!("{at}.provider.typed_config.grpc_service.envoy_grpc")
    );
    let zipkin = trace::Http {
        name: "envoy.tracers.zipkin".into(),
        config_type: Some(trace::http::ConfigType::TypedConfig(pack_any(
            ZipkinConfig::default(),
        ))),
    };
    let e = refused(decode_listener(traced(zipkin, None)));
    assert_eq!(e.field, format!("{at}.provider"));
    assert!(e.reason.contains("envoy.tracers.zipkin"), "{e}");
    let e = refused(decode_listener(traced(
        otel(google("otel:4317", false), "x"),
        Some(150.0),
    )));
    assert_eq!(e.field, format!("{at}.random_sampling"));
    let e = refused(decode_listener(traced(
        otel(google("unix:/run/otel.sock", false), "x"),
        None,
    )));
    assert_eq!(
        e.field,
        format!("{at}.provider.typed_config.grpc_service.google_grpc.target_uri")
    );
}

#[test]
fn the_first_http_listener_names_the_tracing_and_disagreement_is_reported() {
    let a = traced(otel(google("a:4317", false), "a"), Some(10.0));
    let b = traced(otel(google("b:4317", false), "b"), Some(10.0));
    let rc = route_config("r", vec![vhost("all", &["*"], vec![route_to("/", "api")])]);
    let state = state_of(vec![("zeta", b), ("alpha", a.clone())], rc.clone());
    let warm = state.assemble_warm(None);
    let tracing = warm.config.telemetry.clone().unwrap().tracing.unwrap();
    assert_eq!(tracing.otlp_endpoint, "http://a:4317", "alpha comes first");
    assert_eq!(warm.warnings.len(), 1, "{:?}", warm.warnings);
    assert!(warm.warnings[0].contains("zeta"), "{:?}", warm.warnings);
    // The config validates with it.
    let config = Config::try_from(warm.config).unwrap();
    assert_eq!(config.tracing.unwrap().sample_ratio, 0.1);

    let state = state_of(vec![("zeta", a.clone()), ("alpha", a)], rc.clone());
    assert!(state.assemble_warm(None).warnings.is_empty());
    // Without tracing in the snapshot there is none, as before.
    let state = state_of(vec![("alpha", hcm_rds("r"))], rc);
    assert_eq!(state.assemble_warm(None).config.telemetry, None);
}
