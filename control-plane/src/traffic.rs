//! Tern's per-route traffic policy and tracing as Envoy's own filters, so Envoy enforces them
//! too: every HTTP connection manager lists `local_ratelimit` and `fault` (both inert at that
//! level) before the router, and a route with a policy configures them in its
//! `typed_per_filter_config`. What Envoy's local rate limit cannot say (Tern's bucket key) travels
//! in the route's `metadata.filter_metadata["tern"]` as `rate_limit_key`. Tracing becomes the
//! connection manager's OpenTelemetry provider.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    GrpcService, RuntimeFractionalPercent, grpc_service,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing as trace};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, Percent, TokenBucket, fractional_percent,
};
use envoy_types::pb::google::protobuf::{self as pbuf, Any, UInt32Value};
use envoy_types::util::pack_any;
use tern_proxy::config::Route;
use tern_proxy::telemetry::traces::TracingConfig;
use tern_proxy::traffic::fault::FaultConfig;
use tern_proxy::traffic::rate_limit::{RateKey, RateLimitConfig};

use crate::resources::duration;

pub const LOCAL_RATELIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const OPENTELEMETRY_TRACER: &str = "envoy.tracers.opentelemetry";
/// The `tern` metadata field naming a route's rate limit key.
pub const RATE_LIMIT_KEY: &str = "rate_limit_key";
/// Envoy's local rate limiter refuses fill intervals shorter than 50 ms.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);
const MAX_FILLS_PER_SECOND: f64 = 20.0;

/// The filters before the router. Both are inert without a route's own config: no token bucket
/// at this level, and an `HTTPFault` with neither delay nor abort.
pub fn policy_filters() -> Vec<HttpFilter> {
    let local_rate_limit = LocalRateLimit {
        stat_prefix: "tern_rate_limit".to_string(),
        ..Default::default()
    };
    vec![
        http_filter_of(LOCAL_RATELIMIT_FILTER, pack_any(local_rate_limit)),
        http_filter_of(FAULT_FILTER, pack_any(HttpFault::default())),
    ]
}

/// A route's `typed_per_filter_config`, keyed by the filter names of [`policy_filters`].
pub fn per_filter_config(route: &Route) -> HashMap<String, Any> {
    let mut out = HashMap::new();
    if let Some(l) = &route.rate_limit {
        out.insert(
            LOCAL_RATELIMIT_FILTER.to_string(),
            pack_any(local_rate_limit(l)),
        );
    }
    if let Some(f) = &route.fault {
        out.insert(FAULT_FILTER.to_string(), pack_any(fault(f)));
    }
    out
}

/// The route's rate limit key in Tern's own syntax (`client_ip`, `header:NAME`,
/// `peer_identity`, `none`), for the route's Tern metadata.
pub fn rate_limit_key(l: &RateLimitConfig) -> pbuf::Value {
    let text = match &l.key {
        RateKey::ClientIp => "client_ip".to_string(),
        RateKey::Header(name) => format!("header:{name}"),
        RateKey::PeerIdentity => "peer_identity".to_string(),
        RateKey::None => "none".to_string(),
    };
    pbuf::Value {
        kind: Some(pbuf::value::Kind::StringValue(text)),
    }
}

/// The connection manager's tracing: OpenTelemetry over gRPC to the OTLP receiver.
pub fn tracing(t: &TracingConfig) -> http_connection_manager::Tracing {
    // Tern's endpoint is a URL (`http://host:port`); a gRPC target is `host:port`, with TLS
    // asked for by channel credentials rather than a scheme.
    let (target, tls) = match t.otlp_endpoint.split_once("://") {
        Some((scheme, rest)) => (rest.trim_end_matches('/'), scheme == "https"),
        None => (t.otlp_endpoint.as_str(), false),
    };
    let channel_credentials = tls.then(|| grpc_service::google_grpc::ChannelCredentials {
        credential_specifier: Some(
            grpc_service::google_grpc::channel_credentials::CredentialSpecifier::SslCredentials(
                Default::default(),
            ),
        ),
    });
    let otel = OpenTelemetryConfig {
        grpc_service: Some(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::GoogleGrpc(
                grpc_service::GoogleGrpc {
                    target_uri: target.to_string(),
                    channel_credentials,
                    stat_prefix: "tern_otlp".to_string(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        service_name: t.service_name.clone(),
        ..Default::default()
    };
    http_connection_manager::Tracing {
        random_sampling: Some(Percent {
            value: t.sample_ratio * 100.0,
        }),
        provider: Some(trace::Http {
            name: OPENTELEMETRY_TRACER.to_string(),
            config_type: Some(trace::http::ConfigType::TypedConfig(pack_any(otel))),
        }),
        ..Default::default()
    }
}

fn local_rate_limit(l: &RateLimitConfig) -> LocalRateLimit {
    let all = || {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: fractional_percent::DenominatorType::Hundred as i32,
            }),
            // Envoy requires a key; nothing sets it, so the default holds.
            runtime_key: "tern_rate_limit".to_string(),
        })
    };
    LocalRateLimit {
        stat_prefix: "tern_rate_limit".to_string(),
        token_bucket: Some(token_bucket(l.requests_per_second, l.burst)),
        // Envoy's defaults are 0% of requests, "for safety".
        filter_enabled: all(),
        filter_enforced: all(),
        // The seconds until the bucket has a token again, as Tern answers.
        enable_retry_after_header: true,
        ..Default::default()
    }
}

/// A bucket holding `burst` tokens that refills at `rate` per second. Envoy adds
/// `tokens_per_fill` all at once every `fill_interval`, while Tern refills continuously; the
/// shortest interval Envoy allows with whole tokens comes closest. The interval is exact to the
/// nanosecond, so the rate survives to about eight significant digits.
pub fn token_bucket(rate: f64, burst: u32) -> TokenBucket {
    // Divided rather than multiplied by 0.05 s, which has no exact binary form: 1000 / 20 is
    // exactly 50 tokens, where 1000 * 0.05 rounds up to 51.
    let tokens = (rate / MAX_FILLS_PER_SECOND)
        .ceil()
        .clamp(1.0, f64::from(u32::MAX));
    let interval = Duration::try_from_secs_f64(tokens / rate)
        .unwrap_or(Duration::MAX)
        .max(MIN_FILL_INTERVAL);
    TokenBucket {
        max_tokens: burst,
        tokens_per_fill: Some(UInt32Value {
            value: tokens as u32,
        }),
        fill_interval: Some(duration(interval)),
    }
}

fn fault(f: &FaultConfig) -> HttpFault {
    HttpFault {
        delay: f.delay.map(|(percent, delay)| FaultDelay {
            percentage: Some(per_million(percent)),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(
                delay,
            ))),
        }),
        abort: f.abort.map(|(percent, status)| FaultAbort {
            percentage: Some(per_million(percent)),
            error_type: Some(fault_abort::ErrorType::HttpStatus(u32::from(status))),
            ..Default::default()
        }),
        // Tern's condition is the header's presence.
        headers: f
            .header
            .iter()
            .map(|name| HeaderMatcher {
                name: name.to_string(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(
                    true,
                )),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Per million so that fractional percents (0.5 %, 12.25 %) survive; Tern's percent is a float
/// and anything finer than a ten-thousandth of a percent is rounded.
fn per_million(percent: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (percent * 10_000.0).round().clamp(0.0, 1_000_000.0) as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

fn http_filter_of(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(b: &TokenBucket) -> f64 {
        let d = b
            .fill_interval
            .as_ref()
            .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
        f64::from(b.tokens_per_fill.as_ref().map_or(1, |t| t.value)) / d
    }

    #[test]
    fn token_buckets_keep_the_rate_with_the_shortest_interval_envoy_allows() {
        for (rps, tokens, millis) in [
            (10.0, 1, 100),
            (2.5, 1, 400),
            (0.5, 1, 2000),
            (20.0, 1, 50),
            (1000.0, 50, 50),
            (30.0, 2, 66),
        ] {
            let b = token_bucket(rps, 7);
            assert_eq!(b.max_tokens, 7);
            assert_eq!(b.tokens_per_fill.as_ref().unwrap().value, tokens, "{rps}");
            let d = b.fill_interval.as_ref().unwrap();
            assert_eq!(
                d.seconds * 1000 + i64::from(d.nanos) / 1_000_000,
                millis,
                "{rps}"
            );
            assert!(d.seconds * 1000 + i64::from(d.nanos / 1_000_000) >= 50);
            assert!((rate(&b) - rps).abs() / rps < 1e-8, "{rps}: {}", rate(&b));
        }
        let odd = token_bucket(12.345, 1);
        assert!((rate(&odd) - 12.345).abs() < 1e-6);
    }

    #[test]
    fn percents_are_per_million() {
        let p = per_million(0.5);
        assert_eq!(p.numerator, 5_000);
        assert_eq!(
            p.denominator,
            fractional_percent::DenominatorType::Million as i32
        );
        assert_eq!(per_million(100.0).numerator, 1_000_000);
        assert_eq!(per_million(12.3456).numerator, 123_456);
    }

    #[test]
    fn tracing_targets_the_receiver_as_a_grpc_target() {
        let t = tracing(&TracingConfig {
            otlp_endpoint: "https://otel.example:4317".into(),
            sample_ratio: 0.25,
            service_name: "edge".into(),
        });
        assert_eq!(t.random_sampling.unwrap().value, 25.0);
        let provider = t.provider.unwrap();
        assert_eq!(provider.name, OPENTELEMETRY_TRACER);
        let Some(trace::http::ConfigType::TypedConfig(any)) = provider.config_type else {
            panic!("typed config")
        };
        let otel: OpenTelemetryConfig = prost::Message::decode(any.value.as_slice()).unwrap();
        assert_eq!(otel.service_name, "edge");
        let Some(grpc_service::TargetSpecifier::GoogleGrpc(g)) =
            otel.grpc_service.unwrap().target_specifier
        else {
            panic!("google grpc")
        };
        assert_eq!(g.target_uri, "otel.example:4317");
        assert!(g.channel_credentials.is_some(), "https asks for TLS");
    }
}
