//! The HTTP connection manager's tracing provider read back into Tern's tracing settings (the
//! inverse of the control plane's `traffic::tracing`): OpenTelemetry over gRPC to one OTLP
//! receiver, sampled at random_sampling. What Tern's exporter cannot do is refused.

use envoy_types::pb::envoy::config::core::v3::grpc_service;
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing as trace};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager;

use super::decode::InvalidResource;
use super::policy::Err;
use super::traffic::{decode, is};
use crate::config::RawTracing;

const OPENTELEMETRY: &str = "envoy.tracers.opentelemetry";

/// The connection manager's tracing provider, if it has one.
pub(super) fn provider(
    t: Option<&http_connection_manager::Tracing>,
    field: &str,
    err: Err<'_>,
) -> Result<Option<RawTracing>, InvalidResource> {
    let Some(t) = t else {
        return Ok(None);
    };
    let field = format!("{field}.tracing");
    // Envoy: without a provider, nothing is traced.
    let Some(provider) = &t.provider else {
        return Ok(None);
    };
    let otel: OpenTelemetryConfig = match &provider.config_type {
        Some(trace::http::ConfigType::TypedConfig(c)) if is::<OpenTelemetryConfig>(c) => {
            decode(c, &format!("{field}.provider"), err)?
        }
        _ => {
            return Err(err(
                format!("{field}.provider"),
                format!(
                    "tracer {:?} is not supported (Tern exports OTLP: {OPENTELEMETRY} with \
                     OpenTelemetryConfig)",
                    provider.name
                ),
            ));
        }
    };
    let at = format!("{field}.provider.typed_config");
    if otel.http_service.is_some() || otel.exporter.is_some() {
        return Err(err(
            at,
            "only OTLP over gRPC (grpc_service) is supported".into(),
        ));
    }
    if otel.sampler.is_some() {
        return Err(err(
            format!("{at}.sampler"),
            "not supported; Tern samples by random_sampling and the parent's flag".into(),
        ));
    }
    let google = match otel
        .grpc_service
        .as_ref()
        .and_then(|g| g.target_specifier.as_ref())
    {
        Some(grpc_service::TargetSpecifier::GoogleGrpc(g)) => g,
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(_)) => {
            return Err(err(
                format!("{at}.grpc_service.envoy_grpc"),
                "sending spans through a cluster is not supported; use google_grpc with the \
                 receiver's target_uri"
                    .into(),
            ));
        }
        None => return Err(err(format!("{at}.grpc_service"), "missing".into())),
    };
    if !google.call_credentials.is_empty() || !google.call_credentials_plugin.is_empty() {
        return Err(err(
            format!("{at}.grpc_service.google_grpc.call_credentials"),
            "not supported; Tern sends spans without credentials".into(),
        ));
    }
    let tls = matches!(
        google
            .channel_credentials
            .as_ref()
            .and_then(|c| c.credential_specifier.as_ref()),
        Some(
            grpc_service::google_grpc::channel_credentials::CredentialSpecifier::SslCredentials(_)
        )
    );
    let target = google.target_uri.trim();
    let otlp_endpoint = if target.starts_with("http://") || target.starts_with("https://") {
        target.to_string()
    } else {
        let authority = target.strip_prefix("dns:///").unwrap_or(target);
        if authority.is_empty() || authority.contains(['/', ' ']) {
            return Err(err(
                format!("{at}.grpc_service.google_grpc.target_uri"),
                format!("{target:?}: Tern takes host:port (or dns:///host:port)"),
            ));
        }
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{authority}")
    };
    // Envoy samples 100 % when unset.
    let random = t.random_sampling.as_ref().map_or(100.0, |p| p.value);
    if !(0.0..=100.0).contains(&random) {
        return Err(err(
            format!("{field}.random_sampling"),
            format!("{random} is not a percentage"),
        ));
    }
    if t.overall_sampling.as_ref().is_some_and(|p| p.value < 100.0) {
        return Err(err(
            format!("{field}.overall_sampling"),
            "below 100% is not supported (Tern always follows a sampled parent)".into(),
        ));
    }
    Ok(Some(RawTracing {
        otlp_endpoint,
        sample_ratio: Some(random / 100.0),
        service_name: (!otel.service_name.is_empty()).then(|| otel.service_name.clone()),
    }))
}
