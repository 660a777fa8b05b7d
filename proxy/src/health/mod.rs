//! Active health checks: each endpoint of a service with a `health_check` is probed on its
//! own jittered schedule (HTTP GET or TCP connect); `healthy_threshold` successes in a row
//! make it healthy, `unhealthy_threshold` failures make it unhealthy, and the balancer skips
//! unhealthy endpoints (all of them unhealthy: it ignores health rather than fail).

mod checker;
mod probe;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

pub use checker::Checkers;
pub use probe::probe;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Http {
        path: String,
        expected_statuses: Vec<u16>,
    },
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// An endpoint's health as checks see it. Endpoints start `Unknown`, which counts as
/// healthy: adding a check, or an endpoint, never takes traffic away before a probe fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Unknown,
    Healthy,
    Unhealthy,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

/// Shared per endpoint; the balancer reads it without locking.
#[derive(Debug, Default)]
pub struct Health {
    state: AtomicU8,
    streak: Mutex<(u32, u32)>,
}

impl Health {
    pub fn state(&self) -> HealthState {
        match self.state.load(Ordering::Acquire) {
            1 => HealthState::Healthy,
            2 => HealthState::Unhealthy,
            _ => HealthState::Unknown,
        }
    }

    pub fn is_unhealthy(&self) -> bool {
        self.state.load(Ordering::Acquire) == 2
    }

    /// Records one probe; returns the new state when it changed.
    pub fn record(&self, config: &HealthCheckConfig, ok: bool) -> Option<HealthState> {
        let Ok(mut streak) = self.streak.lock() else {
            return None;
        };
        let (successes, failures) = &mut *streak;
        let before = self.state();
        let after = if ok {
            *successes += 1;
            *failures = 0;
            if *successes >= config.healthy_threshold.max(1) || before == HealthState::Unknown {
                HealthState::Healthy
            } else {
                before
            }
        } else {
            *failures += 1;
            *successes = 0;
            if *failures >= config.unhealthy_threshold.max(1) {
                HealthState::Unhealthy
            } else {
                before
            }
        };
        self.state.store(
            match after {
                HealthState::Unknown => 0,
                HealthState::Healthy => 1,
                HealthState::Unhealthy => 2,
            },
            Ordering::Release,
        );
        (after != before).then_some(after)
    }

    /// Forgets the checks' verdict (the service's check was removed).
    pub fn reset(&self) {
        self.state.store(0, Ordering::Release);
        if let Ok(mut s) = self.streak.lock() {
            *s = (0, 0);
        }
    }
}

/// The next probe's delay: the interval ± 10%, so that a fleet of proxies does not probe an
/// endpoint in step.
pub fn jittered(interval: Duration, rng: &mut fastrand::Rng) -> Duration {
    let tenth = interval / 10;
    let nanos = u64::try_from(tenth.as_nanos() * 2).unwrap_or(u64::MAX);
    interval - tenth + Duration::from_nanos(rng.u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthCheckConfig {
        HealthCheckConfig {
            kind: ProbeKind::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn thresholds_decide_transitions() {
        let h = Health::default();
        let c = config();
        assert_eq!(h.state(), HealthState::Unknown);
        assert_eq!(
            h.record(&c, true),
            Some(HealthState::Healthy),
            "unknown becomes healthy at once"
        );
        assert_eq!(h.record(&c, false), None);
        assert_eq!(h.record(&c, false), None);
        assert_eq!(h.record(&c, false), Some(HealthState::Unhealthy));
        assert!(h.is_unhealthy());
        assert_eq!(h.record(&c, true), None, "one success is not enough");
        assert_eq!(h.record(&c, false), None);
        assert_eq!(h.record(&c, true), None);
        assert_eq!(h.record(&c, true), Some(HealthState::Healthy));
        h.reset();
        assert_eq!(h.state(), HealthState::Unknown);
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let mut rng = fastrand::Rng::with_seed(9);
        let i = Duration::from_secs(5);
        let samples: Vec<Duration> = (0..100).map(|_| jittered(i, &mut rng)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= i * 9 / 10 && *d <= i * 11 / 10)
        );
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 90);
    }
}
