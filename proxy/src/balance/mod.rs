//! Load balancing: which endpoint of a service gets the next request or connection.
//!
//! Decisions are pure functions of the endpoint list, each endpoint's [`Load`], a random
//! source and the current time, so they are tested with seeded randomness and frozen time.
//! [`Load`] lives in shared per-endpoint state, so it survives endpoint-set changes.

mod least_request;
mod load;
mod peak_ewma;
mod round_robin;

use fastrand::Rng;
use tokio::time::Instant;

use crate::config::LoadBalancerKind;

pub use load::{InFlight, Load, LoadOwner, RECENT_FAILURE_WINDOW};
pub use peak_ewma::{DECAY_TAU, DEFAULT_RTT};
pub use round_robin::RoundRobin;

/// Something a balancer can pick: a weight and the shared load it reads.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn load(&self) -> &Load;
    /// May this endpoint get traffic now? (Not recently refusing connections, not ejected,
    /// not failing health checks.)
    fn eligible(&self, now: Instant) -> bool {
        self.load().is_available(now)
    }
}

/// The balancing policy of one service, over one endpoint list.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastRequest,
    PeakEwma,
}

impl Balancer {
    /// Builds the balancer for an endpoint list (round robin precomputes its schedule).
    pub fn new<C: Candidate>(kind: LoadBalancerKind, endpoints: &[C]) -> Self {
        match kind {
            LoadBalancerKind::RoundRobin => {
                let weights: Vec<u32> = endpoints.iter().map(Candidate::weight).collect();
                Balancer::RoundRobin(RoundRobin::new(&weights))
            }
            LoadBalancerKind::LeastRequest => Balancer::LeastRequest,
            LoadBalancerKind::PeakEwma => Balancer::PeakEwma,
        }
    }

    pub fn kind(&self) -> LoadBalancerKind {
        match self {
            Balancer::RoundRobin(_) => LoadBalancerKind::RoundRobin,
            Balancer::LeastRequest => LoadBalancerKind::LeastRequest,
            Balancer::PeakEwma => LoadBalancerKind::PeakEwma,
        }
    }

    /// Picks an endpoint index, preferring endpoints that have not failed recently.
    /// `None` only when the list is empty.
    pub fn pick<C: Candidate>(
        &self,
        endpoints: &[C],
        rng: &mut Rng,
        now: Instant,
    ) -> Option<usize> {
        self.pick_avoiding(endpoints, rng, now, &[])
    }

    /// Picks among eligible endpoints not in `avoid`; see [`Balancer::pick_where`].
    pub fn pick_avoiding<C: Candidate>(
        &self,
        endpoints: &[C],
        rng: &mut Rng,
        now: Instant,
        avoid: &[usize],
    ) -> Option<usize> {
        self.pick_where(endpoints, rng, now, avoid, |c| c.eligible(now))
    }

    /// Picks among endpoints that are `eligible` and not in `avoid`. When there are none,
    /// falls back to eligible ones, then to any not avoided, then to any: when every endpoint
    /// looks bad, spreading traffic over all of them ("panic routing") beats refusing it.
    /// The caller decides eligibility, so per-service settings (outlier detection) need not
    /// be copied into every endpoint.
    pub fn pick_where<C: Candidate>(
        &self,
        endpoints: &[C],
        rng: &mut Rng,
        now: Instant,
        avoid: &[usize],
        eligible: impl Fn(&C) -> bool,
    ) -> Option<usize> {
        if endpoints.len() <= 1 {
            return if endpoints.is_empty() { None } else { Some(0) };
        }
        // No allocation: eligibility is a few atomic loads, cheap to ask twice.
        let ok = |i: usize, use_health: bool, use_avoid: bool| {
            (!use_avoid || !avoid.contains(&i)) && (!use_health || eligible(&endpoints[i]))
        };
        let tier = [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .find(|&(h, a)| (0..endpoints.len()).any(|i| ok(i, h, a)))
            .unwrap_or((false, false));
        let available = |i: usize| ok(i, tier.0, tier.1);
        match self {
            Balancer::RoundRobin(rr) => rr.pick(available),
            Balancer::LeastRequest => {
                let cost = |i: usize| least_request::cost(&endpoints[i]);
                p2c(endpoints.len(), rng, available, cost)
            }
            Balancer::PeakEwma => {
                let cost = |i: usize| peak_ewma::cost(&endpoints[i], now);
                p2c(endpoints.len(), rng, available, cost)
            }
        }
    }
}

/// Power of two random choices: two distinct random endpoints, the cheaper wins.
/// Unavailable endpoints lose to available ones; if both drawn are unavailable, the first
/// available endpoint after a random start is taken.
fn p2c(
    n: usize,
    rng: &mut Rng,
    available: impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let a = rng.usize(..n);
    let b = (a + 1 + rng.usize(..n - 1)) % n;
    match (available(a), available(b)) {
        (true, true) => Some(if cost(b) < cost(a) { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => {
            let start = rng.usize(..n);
            (0..n).map(|k| (start + k) % n).find(|&i| available(i))
        }
    }
}

#[cfg(test)]
mod tests;
