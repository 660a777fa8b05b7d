//! Peak-EWMA latency, as linkerd2-proxy balances: an estimate that jumps up to any slower
//! response at once and drifts down slowly, decaying toward a default while the endpoint is
//! idle so that a once-slow endpoint is eventually tried again.

use std::time::Duration;

use tokio::time::Instant;

use super::Candidate;

/// The estimate of an endpoint that has not answered yet (linkerd2-proxy uses 30 ms too).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the decay: after `DECAY_TAU` without samples, ~63% of the way back.
pub const DECAY_TAU: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    estimate_ns: f64,
    stamp: Instant,
    /// The default is only a prior: the first real sample replaces it outright.
    sampled: bool,
}

impl Ewma {
    pub fn new(now: Instant) -> Self {
        Ewma {
            estimate_ns: nanos(DEFAULT_RTT),
            stamp: now,
            sampled: false,
        }
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = nanos(rtt);
        if !self.sampled {
            self.sampled = true;
            self.estimate_ns = rtt;
            self.stamp = now;
            return;
        }
        let current = self.estimate(now).as_nanos() as f64;
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let w = weight(now.saturating_duration_since(self.stamp));
            // Against a tight stream of samples `w` is close to 1: the estimate falls slowly,
            // which is what keeps a single fast answer from hiding a slow endpoint.
            current * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }

    pub fn estimate(&self, now: Instant) -> Duration {
        let w = weight(now.saturating_duration_since(self.stamp));
        let ns = self.estimate_ns * w + nanos(DEFAULT_RTT) * (1.0 - w);
        Duration::from_nanos(ns.max(0.0) as u64)
    }
}

/// Cost used by power-of-two-choices: latency estimate × (in flight + 1) ÷ weight.
pub fn cost<C: Candidate>(endpoint: &C, now: Instant) -> f64 {
    let load = endpoint.load();
    let rtt = load.ewma(now).as_nanos() as f64;
    rtt * f64::from(load.in_flight() + 1) / f64::from(endpoint.weight().max(1))
}

fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY_TAU.as_secs_f64()).exp()
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}
