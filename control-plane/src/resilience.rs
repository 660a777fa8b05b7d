//! Tern's resilience settings as Envoy's own fields, so Envoy and gRPC read them too:
//! `RouteAction.timeout` and `retry_policy`, `Cluster.circuit_breakers`, `outlier_detection`
//! and `health_checks`. The retry budget (a ratio of requests over a window) has no Envoy
//! equivalent (Envoy's budget counts concurrent retries), so it travels in the route's
//! `metadata.filter_metadata["tern"]`.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, OutlierDetection, circuit_breakers,
};
use envoy_types::pb::envoy::config::core::v3::{HealthCheck, health_check};
use envoy_types::pb::envoy::config::route::v3::{RetryPolicy as PbRetryPolicy, retry_policy};
use envoy_types::pb::envoy::r#type::v3::Int64Range;
use envoy_types::pb::google::protobuf::{self as pbuf, UInt32Value};
use tern_proxy::config::{BreakerConfig, HealthCheckConfig, OutlierConfig, ProbeKind, RetryPolicy};

use crate::resources::duration;

/// Envoy's route timeout defaults to 15 s when unset; Tern's means "no limit", which Envoy
/// spells as zero.
pub fn route_timeout(timeout: Option<Duration>) -> pbuf::Duration {
    duration(timeout.unwrap_or(Duration::ZERO))
}

pub fn retry_policy(p: &RetryPolicy) -> PbRetryPolicy {
    PbRetryPolicy {
        retry_on: p
            .on
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(","),
        num_retries: Some(UInt32Value { value: p.attempts }),
        per_try_timeout: p.per_try_timeout.map(duration),
        retriable_status_codes: p.status_codes.iter().map(|c| u32::from(*c)).collect(),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(duration(p.backoff_base)),
            max_interval: Some(duration(p.backoff_max)),
        }),
        ..Default::default()
    }
}

/// The `tern` metadata field holding a route's retry budget.
pub const RETRY_BUDGET: &str = "retry_budget";

/// The route's retry budget, for Tern proxies: `tern: { retry_budget: [ratio, min_per_second] }`.
pub fn budget(p: &RetryPolicy) -> pbuf::Value {
    pbuf::Value {
        kind: Some(pbuf::value::Kind::ListValue(pbuf::ListValue {
            values: vec![
                number(p.budget.ratio),
                number(f64::from(p.budget.min_per_second)),
            ],
        })),
    }
}

pub fn circuit_breakers(b: &BreakerConfig) -> CircuitBreakers {
    let u = |value| Some(UInt32Value { value });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: u(b.max_connections),
            max_pending_requests: u(b.max_pending_requests),
            max_requests: u(b.max_requests),
            max_retries: u(b.max_retries),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn outlier_detection(o: &OutlierConfig) -> OutlierDetection {
    let u = |value| Some(UInt32Value { value });
    OutlierDetection {
        consecutive_5xx: u(o.consecutive_5xx),
        consecutive_gateway_failure: u(o.consecutive_gateway_failure),
        // Connection failures are "locally originated" errors in Envoy's terms, counted on
        // their own only when the split is on.
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: u(o.consecutive_connect_failure),
        interval: Some(duration(o.interval)),
        base_ejection_time: Some(duration(o.base_ejection_time)),
        max_ejection_time: Some(duration(o.max_ejection_time)),
        max_ejection_percent: u(o.max_ejection_percent),
        ..Default::default()
    }
}

pub fn health_checks(h: &HealthCheckConfig) -> Vec<HealthCheck> {
    let checker = match &h.kind {
        ProbeKind::Http {
            path,
            expected_statuses,
        } => health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: path.clone(),
            expected_statuses: expected_statuses
                .iter()
                .map(|s| Int64Range {
                    start: i64::from(*s),
                    end: i64::from(*s) + 1,
                })
                .collect(),
            ..Default::default()
        }),
        ProbeKind::Tcp => {
            health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default())
        }
    };
    vec![HealthCheck {
        timeout: Some(duration(h.timeout)),
        interval: Some(duration(h.interval)),
        interval_jitter_percent: 10,
        healthy_threshold: Some(UInt32Value {
            value: h.healthy_threshold,
        }),
        unhealthy_threshold: Some(UInt32Value {
            value: h.unhealthy_threshold,
        }),
        health_checker: Some(checker),
        ..Default::default()
    }]
}

fn number(n: f64) -> pbuf::Value {
    pbuf::Value {
        kind: Some(pbuf::value::Kind::NumberValue(n)),
    }
}
