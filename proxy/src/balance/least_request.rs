//! Least request: the cost of an endpoint is its requests in flight per unit of weight.

use super::Candidate;

/// `(in_flight + 1) / weight`: the +1 makes a heavier idle endpoint cheaper than a lighter one.
pub fn cost<C: Candidate>(endpoint: &C) -> f64 {
    f64::from(endpoint.load().in_flight() + 1) / f64::from(endpoint.weight().max(1))
}
