//! Jittered exponential backoff for reconnecting to the control plane, so that a fleet of
//! proxies that lost the control plane together does not come back in lock step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    #[cfg(test)]
    fn seeded(base: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            rng: fastrand::Rng::with_seed(seed),
            ..Backoff::new(base, max)
        }
    }

    /// The wait before the next attempt: uniformly random in the upper half of
    /// `min(max, base × 2^attempt)` ("equal jitter": never zero, never above the cap).
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let cap = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        let jitter_nanos = self
            .rng
            .u64(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX));
        half + Duration::from_nanos(jitter_nanos)
    }

    /// After a connection that worked, start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_bounds_and_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::seeded(base, max, 7);
        for attempt in 0..12u32 {
            let cap = (base * 2u32.pow(attempt)).min(max);
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= base);
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|seed| {
                let mut b = Backoff::seeded(base, max, seed);
                b.next_delay();
                b.next_delay();
                b.next_delay()
            })
            .collect();
        assert!(
            delays.len() > 40,
            "50 proxies picked only {} distinct delays",
            delays.len()
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::seeded(Duration::from_secs(1), Duration::from_secs(30), 1);
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
