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

pub use load::{InFlight, Load, RECENT_FAILURE_WINDOW};
pub use peak_ewma::{DECAY_TAU, DEFAULT_RTT};
pub use round_robin::RoundRobin;

/// Something a balancer can pick: a weight and the shared load it reads.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn load(&self) -> &Load;
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
        if endpoints.len() <= 1 {
            return if endpoints.is_empty() { None } else { Some(0) };
        }
        // When every endpoint failed recently, ignore failures rather than refuse traffic.
        let any_available = endpoints.iter().any(|e| e.load().is_available(now));
        let available = |i: usize| !any_available || endpoints[i].load().is_available(now);
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
