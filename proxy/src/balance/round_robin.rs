//! Smooth weighted round robin, precomputed into a schedule walked by one atomic cursor.
//!
//! The schedule is nginx's smooth algorithm (each step: add every weight to its running
//! score, take the highest, subtract the total from it), so weights 1,1,2 give a,c,b,c —
//! 25/25/50 with no bursts. Picking is then one `fetch_add`, with no lock on the hot path.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Weights are scaled down so that a schedule never exceeds this many slots.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin {
            schedule: schedule(weights),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next scheduled index that is `available`, skipping at most one full cycle.
    pub fn pick(&self, available: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        for _ in 0..len {
            let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            let index = self.schedule[slot] as usize;
            if available(index) {
                return Some(index);
            }
        }
        None
    }
}

/// The smooth weighted round-robin order of one cycle.
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let divisor = weights
        .iter()
        .copied()
        .filter(|&w| w > 0)
        .fold(0, gcd)
        .max(1);
    let mut weights: Vec<u64> = weights
        .iter()
        .map(|&w| u64::from(w.max(1) / divisor).max(1))
        .collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        for w in &mut weights {
            *w = (*w * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_order_has_no_bursts() {
        assert_eq!(schedule(&[1, 1, 2]), vec![2, 0, 1, 2]);
        assert_eq!(schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_are_reduced_by_their_gcd_and_capped() {
        assert_eq!(schedule(&[10, 10]).len(), 2);
        let big = schedule(&[10_000, 9_999, 1]);
        assert!(big.len() as u64 <= MAX_SCHEDULE + 3, "{}", big.len());
        assert!(big.contains(&2), "the lightest endpoint still gets a slot");
    }

    #[test]
    fn pick_skips_unavailable() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let picks: Vec<_> = (0..6).map(|_| rr.pick(|i| i != 1).unwrap()).collect();
        assert!(!picks.contains(&1));
        assert_eq!(RoundRobin::new(&[1, 1]).pick(|_| false), None);
    }
}
