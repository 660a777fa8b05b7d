//! Passive outlier detection: an endpoint that fails too many times in a row is ejected for a
//! while (longer each time), then comes back on probation, one endpoint of a service at a
//! time, and is ejected again at its first failure. Never ejects past `max_ejection_percent`
//! or the last endpoint: a service always keeps something to send to.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers (0: off).
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 answers, resets and timeouts (0: off).
    pub consecutive_gateway_failure: u32,
    /// Consecutive connection failures (0: off).
    pub consecutive_connect_failure: u32,
    /// The least time between two ejected endpoints of a service coming back.
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Ejection time grows as base × ejections, up to this.
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_connect_failure: 5,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// What one request (or connection) to an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Any answer below 500.
    Success,
    Status(u16),
    ConnectFailure,
    /// Reset or timed out after the request left.
    Reset,
}

/// Per service: when an ejected endpoint last came back (so they return one at a time).
#[derive(Debug, Default)]
pub struct OutlierGroup {
    last_return: Mutex<Option<Instant>>,
}

/// Where an endpoint stands, for `/endpoints` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierState {
    Healthy,
    Ejected {
        remaining: Duration,
    },
    /// Back after an ejection; the first failure ejects it again.
    Probation,
}

impl OutlierState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutlierState::Healthy => "healthy",
            OutlierState::Ejected { .. } => "ejected",
            OutlierState::Probation => "probation",
        }
    }
}

/// One endpoint's outlier state; shared by every snapshot that contains the endpoint.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Fast path for the balancer: false means "not ejected", no lock taken.
    ejected: AtomicBool,
    total_ejections: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_connect: u32,
    ejected_until: Option<Instant>,
    /// Ejections since the endpoint was last healthy for a good while; multiplies the time.
    ejections: u32,
    probation: bool,
    returned_at: Option<Instant>,
}

impl Outlier {
    /// Records an outcome. `ejected_in_service` counts the service's ejected endpoints and is
    /// only called when a threshold is reached. Returns the ejection time if this ejected it.
    pub fn observe(
        &self,
        config: &OutlierConfig,
        observation: Observation,
        now: Instant,
        endpoints_in_service: usize,
        ejected_in_service: impl FnOnce() -> usize,
    ) -> Option<Duration> {
        let Ok(mut s) = self.inner.lock() else {
            return None;
        };
        if s.ejected_until.is_some() {
            return None; // Late answers from before the ejection change nothing.
        }
        let failed = match observation {
            Observation::Success | Observation::Status(..=499) => {
                s.consecutive_5xx = 0;
                s.consecutive_gateway = 0;
                s.consecutive_connect = 0;
                if s.probation {
                    s.probation = false;
                } else if s.ejections > 0
                    && s.returned_at.is_some_and(|t| {
                        now.saturating_duration_since(t) >= config.max_ejection_time
                    })
                {
                    s.ejections = 0;
                }
                false
            }
            Observation::Status(code) => {
                s.consecutive_5xx += 1;
                if matches!(code, 502..=504) {
                    s.consecutive_gateway += 1;
                } else {
                    s.consecutive_gateway = 0;
                }
                s.consecutive_connect = 0;
                true
            }
            Observation::Reset => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
                s.consecutive_connect = 0;
                true
            }
            Observation::ConnectFailure => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
                s.consecutive_connect += 1;
                true
            }
        };
        if !failed {
            return None;
        }
        let reached = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let breached = s.probation
            || reached(s.consecutive_5xx, config.consecutive_5xx)
            || reached(s.consecutive_gateway, config.consecutive_gateway_failure)
            || reached(s.consecutive_connect, config.consecutive_connect_failure);
        if !breached {
            return None;
        }
        let ejected = ejected_in_service();
        let by_percent =
            (endpoints_in_service as u64 * u64::from(config.max_ejection_percent) / 100) as usize;
        let allowed = by_percent
            .max(usize::from(config.max_ejection_percent > 0))
            .min(endpoints_in_service.saturating_sub(1));
        if ejected >= allowed {
            return None;
        }
        s.ejections = s.ejections.saturating_add(1);
        let time = config
            .base_ejection_time
            .saturating_mul(s.ejections)
            .min(config.max_ejection_time.max(config.base_ejection_time));
        s.ejected_until = Some(now + time);
        s.probation = false;
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        s.consecutive_connect = 0;
        self.ejected.store(true, Ordering::Release);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        Some(time)
    }

    /// Whether the balancer must skip this endpoint now. An ejection that has run out ends
    /// here, at most one per service per `interval`, and the endpoint goes on probation.
    pub fn is_ejected(&self, config: &OutlierConfig, group: &OutlierGroup, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut s) = self.inner.lock() else {
            return false;
        };
        let Some(until) = s.ejected_until else {
            return false;
        };
        if now < until {
            return true;
        }
        let Ok(mut last) = group.last_return.lock() else {
            return true;
        };
        if last.is_some_and(|t| now.saturating_duration_since(t) < config.interval) {
            return true;
        }
        *last = Some(now);
        s.ejected_until = None;
        s.probation = true;
        s.returned_at = Some(now);
        self.ejected.store(false, Ordering::Release);
        false
    }

    /// Fast check without ending an ejection (for counting).
    pub fn is_marked_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    pub fn state(&self, now: Instant) -> OutlierState {
        let Ok(s) = self.inner.lock() else {
            return OutlierState::Healthy;
        };
        match s.ejected_until {
            Some(until) => OutlierState::Ejected {
                remaining: until.saturating_duration_since(now),
            },
            None if s.probation => OutlierState::Probation,
            None => OutlierState::Healthy,
        }
    }

    pub fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
