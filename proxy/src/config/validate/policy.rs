//! Validation of the resilience settings: route timeouts and retries, and a service's circuit
//! breaker, outlier detection and health check.

use std::time::Duration;

use super::super::load::ConfigError;
use super::super::model::*;
use super::super::*;
use super::opt_duration;

pub(super) fn route_timeout(at: &str, r: &RawRoute) -> Result<Option<Duration>, ConfigError> {
    r.timeout
        .as_deref()
        .map(|t| positive(&format!("{at}.timeout"), t))
        .transpose()
}

pub(super) fn retry(at: &str, r: Option<&RawRetry>) -> Result<Option<RetryPolicy>, ConfigError> {
    let Some(r) = r else {
        return Ok(None);
    };
    let attempts = r.attempts.unwrap_or(2);
    if attempts > 10 {
        return Err(ConfigError::field(
            format!("{at}.attempts"),
            format!("{attempts} retries is above the maximum of 10"),
        ));
    }
    let mut on = Vec::with_capacity(r.on.len());
    for (i, name) in r.on.iter().enumerate() {
        match RetryOn::parse(name) {
            Some(c) => on.push(c),
            None => {
                return Err(ConfigError::field(
                    format!("{at}.on[{i}]"),
                    format!("unknown condition {name:?} (one of: {})", RetryOn::NAMES),
                ));
            }
        }
    }
    if on.is_empty() {
        // Only what provably never reached the application, plus gateway errors.
        on = vec![
            RetryOn::ConnectFailure,
            RetryOn::GatewayError,
            RetryOn::Reset,
        ];
    }
    for (i, code) in r.status_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            return Err(ConfigError::field(
                format!("{at}.status_codes[{i}]"),
                format!("{code} is not an HTTP status"),
            ));
        }
    }
    if !r.status_codes.is_empty() && !on.contains(&RetryOn::RetriableStatusCodes) {
        on.push(RetryOn::RetriableStatusCodes);
    }
    let per_try_timeout = r
        .per_try_timeout
        .as_deref()
        .map(|t| positive(&format!("{at}.per_try_timeout"), t))
        .transpose()?;
    let backoff = r.backoff.clone().unwrap_or_default();
    let backoff_base = opt_duration(
        &format!("{at}.backoff.base"),
        backoff.base.as_deref(),
        Duration::from_millis(25),
    )?;
    let backoff_max = opt_duration(
        &format!("{at}.backoff.max"),
        backoff.max.as_deref(),
        Duration::from_millis(250),
    )?;
    if backoff_max < backoff_base {
        return Err(ConfigError::field(
            format!("{at}.backoff.max"),
            format!("{backoff_max:?} is below backoff.base {backoff_base:?}"),
        ));
    }
    let b = r.budget.clone().unwrap_or_default();
    let defaults = BudgetConfig::default();
    let ratio = b.ratio.unwrap_or(defaults.ratio);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(ConfigError::field(
            format!("{at}.budget.ratio"),
            format!("{ratio} is outside 0.0 to 1.0"),
        ));
    }
    Ok(Some(RetryPolicy {
        attempts,
        on,
        status_codes: r.status_codes.clone(),
        per_try_timeout,
        backoff_base,
        backoff_max,
        budget: BudgetConfig {
            ratio,
            min_per_second: b.min_per_second.unwrap_or(defaults.min_per_second),
        },
    }))
}

pub(super) fn breaker(
    at: &str,
    b: Option<&RawCircuitBreaker>,
) -> Result<BreakerConfig, ConfigError> {
    let d = BreakerConfig::default();
    let Some(b) = b else {
        return Ok(d);
    };
    let at = format!("{at}.circuit_breaker");
    let nonzero = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err(ConfigError::field(
            format!("{at}.{field}"),
            "must be at least 1",
        )),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    Ok(BreakerConfig {
        max_connections: nonzero("max_connections", b.max_connections, d.max_connections)?,
        max_pending_requests: nonzero(
            "max_pending_requests",
            b.max_pending_requests,
            d.max_pending_requests,
        )?,
        max_requests: nonzero("max_requests", b.max_requests, d.max_requests)?,
        // Zero retries in flight is a valid way to forbid retries for a service.
        max_retries: b.max_retries.unwrap_or(d.max_retries),
    })
}

pub(super) fn outlier(
    at: &str,
    o: Option<&RawOutlierDetection>,
) -> Result<Option<OutlierConfig>, ConfigError> {
    let Some(o) = o else {
        return Ok(None);
    };
    let at = format!("{at}.outlier_detection");
    let d = OutlierConfig::default();
    let max_ejection_percent = o.max_ejection_percent.unwrap_or(d.max_ejection_percent);
    if max_ejection_percent > 100 {
        return Err(ConfigError::field(
            format!("{at}.max_ejection_percent"),
            format!("{max_ejection_percent} is above 100"),
        ));
    }
    let base_ejection_time = opt_duration(
        &format!("{at}.base_ejection_time"),
        o.base_ejection_time.as_deref(),
        d.base_ejection_time,
    )?;
    Ok(Some(OutlierConfig {
        consecutive_5xx: o.consecutive_5xx.unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: o
            .consecutive_gateway_failure
            .unwrap_or(d.consecutive_gateway_failure),
        consecutive_connect_failure: o
            .consecutive_connect_failure
            .unwrap_or(d.consecutive_connect_failure),
        interval: positive_or(&format!("{at}.interval"), o.interval.as_deref(), d.interval)?,
        base_ejection_time,
        max_ejection_time: opt_duration(
            &format!("{at}.max_ejection_time"),
            o.max_ejection_time.as_deref(),
            d.max_ejection_time.max(base_ejection_time),
        )?,
        max_ejection_percent,
    }))
}

pub(super) fn health_check(
    at: &str,
    h: Option<&RawHealthCheck>,
) -> Result<Option<HealthCheckConfig>, ConfigError> {
    let Some(h) = h else {
        return Ok(None);
    };
    let at = format!("{at}.health_check");
    let kind = match (&h.http, &h.tcp) {
        (Some(http), None) => {
            if !http.path.starts_with('/') {
                return Err(ConfigError::field(
                    format!("{at}.http.path"),
                    format!("{:?} must start with /", http.path),
                ));
            }
            let expected_statuses = if http.expected_statuses.is_empty() {
                vec![200]
            } else {
                http.expected_statuses.clone()
            };
            ProbeKind::Http {
                path: http.path.clone(),
                expected_statuses,
            }
        }
        (None, Some(_)) => ProbeKind::Tcp,
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(at, "give either http or tcp, not both"));
        }
        (None, None) => {
            return Err(ConfigError::field(
                at,
                "missing: give http: { path: ... } or tcp: {}",
            ));
        }
    };
    let interval = positive_or(
        &format!("{at}.interval"),
        h.interval.as_deref(),
        Duration::from_secs(5),
    )?;
    let timeout = positive_or(
        &format!("{at}.timeout"),
        h.timeout.as_deref(),
        Duration::from_secs(1),
    )?;
    let threshold = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err(ConfigError::field(
            format!("{at}.{field}"),
            "must be at least 1",
        )),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    Ok(Some(HealthCheckConfig {
        kind,
        interval,
        timeout,
        healthy_threshold: threshold("healthy_threshold", h.healthy_threshold, 2)?,
        unhealthy_threshold: threshold("unhealthy_threshold", h.unhealthy_threshold, 3)?,
    }))
}

fn positive(at: &str, text: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(text).map_err(|e| ConfigError::field(at, e))?;
    if d.is_zero() {
        return Err(ConfigError::field(at, "must be above zero"));
    }
    Ok(d)
}

fn positive_or(at: &str, text: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    text.map_or(Ok(default), |t| positive(at, t))
}
