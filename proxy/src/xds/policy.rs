//! Envoy's resilience fields read back into Tern's model: route timeout and retry policy,
//! cluster circuit breakers, outlier detection and health checks (the inverse of the control
//! plane's `resilience.rs`). What Tern cannot honour is refused with the field named.

use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    HealthCheck, Metadata, RoutingPriority, health_check,
};
use envoy_types::pb::envoy::config::route::v3::RetryPolicy;
use envoy_types::pb::google::protobuf as pbuf;

use super::decode::InvalidResource;
use crate::config::{
    RawBackoff, RawBudget, RawCircuitBreaker, RawHealthCheck, RawHttpCheck, RawOutlierDetection,
    RawRetry, RawTcpCheck, RetryOn,
};

/// Builds errors for one resource.
pub(super) type Err<'a> = &'a dyn Fn(String, String) -> InvalidResource;

/// Zero means "no timeout" in Envoy; so does unset in Tern (Envoy's implicit 15 s default is
/// not imposed: streams must not be cut by a default).
pub(super) fn route_timeout(t: Option<&pbuf::Duration>) -> Option<String> {
    t.filter(|d| d.seconds > 0 || d.nanos > 0)
        .map(duration_text)
}

pub(super) fn retry(
    p: Option<&RetryPolicy>,
    metadata: Option<&Metadata>,
    field: &str,
    err: Err<'_>,
) -> Result<Option<RawRetry>, InvalidResource> {
    let Some(p) = p else {
        return Ok(None);
    };
    let mut on = Vec::new();
    for name in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if RetryOn::parse(name).is_none() {
            return Err(err(
                format!("{field}.retry_policy.retry_on"),
                format!(
                    "condition {name:?} is not supported (Tern knows {})",
                    RetryOn::NAMES
                ),
            ));
        }
        on.push(name.to_string());
    }
    if !p.retry_host_predicate.is_empty() || p.retry_priority.is_some() {
        return Err(err(
            format!("{field}.retry_policy"),
            "retry host predicates and priorities are not supported (a retry always prefers another endpoint)".into(),
        ));
    }
    let mut status_codes = Vec::new();
    for code in &p.retriable_status_codes {
        match u16::try_from(*code) {
            Ok(c) if (100..=599).contains(&c) => status_codes.push(c),
            _ => {
                return Err(err(
                    format!("{field}.retry_policy.retriable_status_codes"),
                    format!("{code} is not an HTTP status"),
                ));
            }
        }
    }
    let backoff = p.retry_back_off.as_ref().map(|b| RawBackoff {
        base: b.base_interval.as_ref().map(duration_text),
        max: b.max_interval.as_ref().map(duration_text),
    });
    // `tern: { retry_budget: [ratio, min_per_second] }`, written by Tern's control plane.
    let budget = metadata
        .and_then(|m| m.filter_metadata.get("tern"))
        .and_then(|tern| tern.fields.get("retry_budget"))
        .and_then(|v| match &v.kind {
            Some(pbuf::value::Kind::ListValue(list)) => Some(list),
            _ => None,
        })
        .map(|list| {
            let n = |i: usize| match list.values.get(i).and_then(|v| v.kind.as_ref()) {
                Some(pbuf::value::Kind::NumberValue(n)) => Some(*n),
                _ => None,
            };
            RawBudget {
                ratio: n(0),
                min_per_second: n(1).map(|v| v.clamp(0.0, f64::from(u32::MAX)) as u32),
            }
        });
    Ok(Some(RawRetry {
        // Envoy's default is one retry.
        attempts: Some(p.num_retries.as_ref().map_or(1, |n| n.value)),
        on,
        status_codes,
        per_try_timeout: p
            .per_try_timeout
            .as_ref()
            .filter(|d| d.seconds > 0 || d.nanos > 0)
            .map(duration_text),
        backoff,
        budget,
    }))
}

/// The thresholds of the default priority; those for high-priority traffic do not apply.
pub(super) fn breaker(c: Option<&CircuitBreakers>) -> Option<RawCircuitBreaker> {
    let t = c?
        .thresholds
        .iter()
        .find(|t| t.priority == RoutingPriority::Default as i32)?;
    Some(RawCircuitBreaker {
        max_connections: t.max_connections.as_ref().map(|v| v.value),
        max_pending_requests: t.max_pending_requests.as_ref().map(|v| v.value),
        max_requests: t.max_requests.as_ref().map(|v| v.value),
        max_retries: t.max_retries.as_ref().map(|v| v.value),
    })
}

pub(super) fn outlier(o: Option<&OutlierDetection>) -> Option<RawOutlierDetection> {
    let o = o?;
    // Without the split, Envoy counts connection failures as 5xx; so does Tern's
    // consecutive_5xx, and the separate connect threshold stays at its default.
    let connect = if o.split_external_local_origin_errors {
        o.consecutive_local_origin_failure.as_ref().map(|v| v.value)
    } else {
        None
    };
    Some(RawOutlierDetection {
        consecutive_5xx: o.consecutive_5xx.as_ref().map(|v| v.value),
        consecutive_gateway_failure: o.consecutive_gateway_failure.as_ref().map(|v| v.value),
        consecutive_connect_failure: connect,
        interval: o.interval.as_ref().map(duration_text),
        base_ejection_time: o.base_ejection_time.as_ref().map(duration_text),
        max_ejection_time: o.max_ejection_time.as_ref().map(duration_text),
        max_ejection_percent: o.max_ejection_percent.as_ref().map(|v| v.value),
    })
}

pub(super) fn health_check(
    checks: &[HealthCheck],
    err: Err<'_>,
) -> Result<Option<RawHealthCheck>, InvalidResource> {
    let h = match checks {
        [] => return Ok(None),
        [one] => one,
        _ => {
            return Err(err(
                "health_checks".into(),
                format!("{} health checks; Tern runs one per cluster", checks.len()),
            ));
        }
    };
    let (http, tcp) = match &h.health_checker {
        Some(health_check::HealthChecker::HttpHealthCheck(http)) => {
            let mut expected = Vec::new();
            for (i, r) in http.expected_statuses.iter().enumerate() {
                let (Ok(start), Ok(end)) = (u16::try_from(r.start), u16::try_from(r.end)) else {
                    return Err(err(
                        format!("health_checks[0].http_health_check.expected_statuses[{i}]"),
                        "not a status range".into(),
                    ));
                };
                if end <= start || end > 600 {
                    return Err(err(
                        format!("health_checks[0].http_health_check.expected_statuses[{i}]"),
                        format!("[{start}, {end}) is not a status range"),
                    ));
                }
                expected.extend(start..end);
            }
            let path = if http.path.is_empty() {
                "/".to_string()
            } else {
                http.path.clone()
            };
            (
                Some(RawHttpCheck {
                    path,
                    expected_statuses: expected,
                }),
                None,
            )
        }
        Some(health_check::HealthChecker::TcpHealthCheck(tcp)) => {
            if tcp.send.is_some() || !tcp.receive.is_empty() {
                return Err(err(
                    "health_checks[0].tcp_health_check".into(),
                    "payload checks are not supported (connect only)".into(),
                ));
            }
            (None, Some(RawTcpCheck {}))
        }
        _ => {
            return Err(err(
                "health_checks[0]".into(),
                "only HTTP and TCP health checks are supported".into(),
            ));
        }
    };
    Ok(Some(RawHealthCheck {
        http,
        tcp,
        interval: h.interval.as_ref().map(duration_text),
        timeout: h.timeout.as_ref().map(duration_text),
        healthy_threshold: h.healthy_threshold.as_ref().map(|v| v.value),
        unhealthy_threshold: h.unhealthy_threshold.as_ref().map(|v| v.value),
    }))
}

/// Tern's duration syntax, rounded up to whole milliseconds.
pub(super) fn duration_text(d: &pbuf::Duration) -> String {
    let nanos = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    let millis = (nanos.max(0) + 999_999) / 1_000_000;
    format!("{millis}ms")
}
