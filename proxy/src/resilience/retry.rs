//! Retry decisions: which outcomes a route's policy retries, and how long to wait first.
//! Pure functions; the request path in `http/forward.rs` does the IO.

use std::time::Duration;

use http::Method;

use super::budget::BudgetConfig;

/// A retry condition, as written in `retry.on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryOn {
    /// Any 5xx answer, and a per-try timeout.
    Status5xx,
    /// 502, 503, 504, and a per-try timeout.
    GatewayError,
    /// The connection could not be made (the request never left).
    ConnectFailure,
    /// The connection failed after the request was sent, before a response.
    Reset,
    /// A status listed in `status_codes`.
    RetriableStatusCodes,
    /// gRPC status codes, read from trailers-only responses.
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    pub fn parse(text: &str) -> Option<RetryOn> {
        Some(match text {
            "5xx" => RetryOn::Status5xx,
            "gateway-error" => RetryOn::GatewayError,
            "connect-failure" => RetryOn::ConnectFailure,
            "reset" => RetryOn::Reset,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "cancelled" => RetryOn::Cancelled,
            "deadline-exceeded" => RetryOn::DeadlineExceeded,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            "unavailable" => RetryOn::Unavailable,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::Status5xx => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
            RetryOn::Cancelled => "cancelled",
            RetryOn::DeadlineExceeded => "deadline-exceeded",
            RetryOn::ResourceExhausted => "resource-exhausted",
            RetryOn::Unavailable => "unavailable",
        }
    }

    pub const NAMES: &'static str = "5xx, gateway-error, connect-failure, reset, retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, unavailable";
}

/// A route's retry policy, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (Envoy's `num_retries`).
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget: BudgetConfig,
}

/// What a route without a retry policy does: retry only what provably never reached the
/// application (the connection could not be made), on another endpoint, bodiless requests
/// only (nothing is buffered for them). 5xx answers and resets after sending are retried
/// only when a route's policy asks for it.
pub fn safe_default() -> &'static RetryPolicy {
    static DEFAULT: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(|| RetryPolicy {
        attempts: 2,
        on: vec![RetryOn::ConnectFailure],
        status_codes: Vec::new(),
        per_try_timeout: None,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        budget: BudgetConfig::default(),
    });
    &DEFAULT
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailure,
    Reset,
    PerTryTimeout,
}

impl Attempt {
    /// How the failure reads in an answer's body.
    pub fn as_str(self) -> &'static str {
        match self {
            Attempt::Response { .. } => "error response",
            Attempt::ConnectFailure => "connect failure",
            Attempt::Reset => "connection reset",
            Attempt::PerTryTimeout => "per-try timeout",
        }
    }
}

/// The condition that makes `attempt` worth retrying under `policy`, if any. `method` limits
/// retries of requests that may have reached the application to idempotent methods; a
/// connect failure never reached it, so it is retried whatever the method.
pub fn retry_reason(policy: &RetryPolicy, method: &Method, attempt: Attempt) -> Option<RetryOn> {
    let has = |c: RetryOn| policy.on.contains(&c);
    // gRPC conditions are opted into by name and gRPC calls are all POSTs, so they apply
    // whatever the method (as gRPC's own retry policy does).
    if let Attempt::Response {
        grpc_status: Some(code),
        ..
    } = attempt
    {
        let wanted = match code {
            1 => Some(RetryOn::Cancelled),
            4 => Some(RetryOn::DeadlineExceeded),
            8 => Some(RetryOn::ResourceExhausted),
            14 => Some(RetryOn::Unavailable),
            _ => None,
        };
        if let Some(c) = wanted.filter(|c| has(*c)) {
            return Some(c);
        }
    }
    match attempt {
        Attempt::ConnectFailure => has(RetryOn::ConnectFailure).then_some(RetryOn::ConnectFailure),
        _ if !is_idempotent(method) => None,
        Attempt::Reset => has(RetryOn::Reset).then_some(RetryOn::Reset),
        Attempt::PerTryTimeout => [RetryOn::GatewayError, RetryOn::Status5xx]
            .into_iter()
            .find(|c| has(*c)),
        Attempt::Response { status, .. } => {
            if has(RetryOn::RetriableStatusCodes) && policy.status_codes.contains(&status) {
                return Some(RetryOn::RetriableStatusCodes);
            }
            if matches!(status, 502..=504) && has(RetryOn::GatewayError) {
                return Some(RetryOn::GatewayError);
            }
            if (500..=599).contains(&status) && has(RetryOn::Status5xx) {
                return Some(RetryOn::Status5xx);
            }
            None
        }
    }
}

/// RFC 9110 9.2.2: methods whose repetition has the same effect as one request.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Wait before retry number `retry` (0-based): "full jitter", uniformly random between zero
/// and `min(max, base × 2^retry)`, which spreads retries of many clients best.
pub fn backoff(base: Duration, max: Duration, retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let factor = 1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX);
    let cap = base.saturating_mul(factor).min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn]) -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            on: on.to_vec(),
            status_codes: vec![409],
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget: BudgetConfig::default(),
        }
    }

    fn status(s: u16) -> Attempt {
        Attempt::Response {
            status: s,
            grpc_status: None,
        }
    }

    #[test]
    fn conditions_match_their_outcomes() {
        let get = Method::GET;
        let p = policy(&[RetryOn::GatewayError]);
        assert_eq!(
            retry_reason(&p, &get, status(503)),
            Some(RetryOn::GatewayError)
        );
        assert_eq!(retry_reason(&p, &get, status(500)), None);
        assert_eq!(
            retry_reason(&p, &get, Attempt::PerTryTimeout),
            Some(RetryOn::GatewayError)
        );
        assert_eq!(retry_reason(&p, &get, Attempt::ConnectFailure), None);
        let p = policy(&[RetryOn::Status5xx]);
        assert_eq!(
            retry_reason(&p, &get, status(500)),
            Some(RetryOn::Status5xx)
        );
        assert_eq!(retry_reason(&p, &get, status(404)), None);
        let p = policy(&[RetryOn::RetriableStatusCodes]);
        assert_eq!(
            retry_reason(&p, &get, status(409)),
            Some(RetryOn::RetriableStatusCodes)
        );
        assert_eq!(retry_reason(&p, &get, status(503)), None);
        let p = policy(&[RetryOn::ConnectFailure, RetryOn::Reset]);
        assert_eq!(retry_reason(&p, &get, Attempt::Reset), Some(RetryOn::Reset));
        assert_eq!(retry_reason(&p, &get, status(503)), None);
    }

    #[test]
    fn grpc_codes_come_from_trailers_only_responses() {
        let p = policy(&[RetryOn::Unavailable, RetryOn::Cancelled]);
        let grpc = |code| Attempt::Response {
            status: 200,
            grpc_status: Some(code),
        };
        let post = Method::POST;
        assert_eq!(
            retry_reason(&p, &post, grpc(14)),
            Some(RetryOn::Unavailable),
            "gRPC calls are POSTs"
        );
        assert_eq!(retry_reason(&p, &post, grpc(1)), Some(RetryOn::Cancelled));
        assert_eq!(retry_reason(&p, &post, grpc(4)), None, "not in the policy");
        assert_eq!(retry_reason(&p, &post, grpc(0)), None);
    }

    #[test]
    fn non_idempotent_requests_are_retried_only_when_they_never_left() {
        let p = policy(&[RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::Status5xx]);
        let post = Method::POST;
        assert_eq!(
            retry_reason(&p, &post, Attempt::ConnectFailure),
            Some(RetryOn::ConnectFailure)
        );
        assert_eq!(retry_reason(&p, &post, Attempt::Reset), None);
        assert_eq!(retry_reason(&p, &post, status(503)), None);
        assert_eq!(
            retry_reason(&p, &Method::PUT, status(503)),
            Some(RetryOn::Status5xx)
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let mut rng = fastrand::Rng::with_seed(3);
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        for retry in 0..10 {
            let cap = (base * 2u32.pow(retry)).min(max);
            for _ in 0..100 {
                assert!(backoff(base, max, retry, &mut rng) <= cap);
            }
        }
        let samples: Vec<Duration> = (0..200).map(|_| backoff(base, max, 3, &mut rng)).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(150)));
    }

    #[test]
    fn names_round_trip() {
        for name in RetryOn::NAMES.split(", ") {
            assert_eq!(RetryOn::parse(name).map(RetryOn::as_str), Some(name));
        }
    }
}
