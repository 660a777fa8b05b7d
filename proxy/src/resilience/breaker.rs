//! Circuit breaking: per-service caps on concurrent requests, requests waiting for a
//! connection, retries in flight and upstream connections. Past a cap the proxy answers at
//! once (503 with `x-tern-overloaded: true`) instead of queueing, so memory stays flat under
//! overload. The counters live in per-service state that survives config changes; the caps
//! come from the config in force.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for BreakerConfig {
    /// Envoy's defaults.
    fn default() -> Self {
        BreakerConfig {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Which cap was hit, for metrics and the answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::PendingRequests => "max_pending_requests",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }
}

/// Live counts of one service.
#[derive(Debug, Default)]
pub struct Breaker {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// Holds one unit of a counter until dropped.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    limit: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker
            .counter(self.limit)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::PendingRequests => &self.pending,
            Limit::Requests => &self.requests,
            Limit::Retries => &self.retries,
        }
    }

    /// Takes one unit of `limit` if the count is below `max`.
    pub fn try_acquire(self: &Arc<Self>, limit: Limit, max: u32) -> Result<Permit, Limit> {
        let counter = self.counter(limit);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| limit)?;
        Ok(Permit {
            breaker: Arc::clone(self),
            limit,
        })
    }

    pub fn current(&self, limit: Limit) -> u32 {
        self.counter(limit).load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_permits_give_back() {
        let b = Arc::new(Breaker::default());
        let held: Vec<Permit> = (0..3)
            .map(|_| b.try_acquire(Limit::Requests, 3).expect("under the cap"))
            .collect();
        assert_eq!(
            b.try_acquire(Limit::Requests, 3).err(),
            Some(Limit::Requests)
        );
        assert!(
            b.try_acquire(Limit::Retries, 3).is_ok(),
            "caps are independent"
        );
        drop(held);
        assert_eq!(b.current(Limit::Requests), 0);
        assert!(b.try_acquire(Limit::Requests, 3).is_ok());
    }

    #[test]
    fn a_zero_cap_refuses_everything() {
        let b = Arc::new(Breaker::default());
        assert!(b.try_acquire(Limit::Retries, 0).is_err());
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_cap() {
        let b = Arc::new(Breaker::default());
        let granted = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(p) = b.try_acquire(Limit::Connections, 50)
                            && let Ok(mut g) = granted.lock()
                        {
                            g.push(p);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.lock().map(|g| g.len()).unwrap_or(0), 50);
    }
}
