//! Retry budgets: retries may add at most `ratio` of the recent request volume, plus a small
//! floor so that low-traffic services can still retry. A failing service is therefore never
//! hammered with `attempts ×` its traffic (the retry storm that budgets exist to prevent).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The window over which requests and retries are counted.
const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per original request, e.g. 0.2.
    pub ratio: f64,
    /// Retries allowed per second regardless of the ratio.
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// A sliding window of one-second slots counting requests and retries.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    /// Index of the slot `current_second` falls in.
    current_second: u64,
    /// Per-second counts: u32 is plenty (4 billion a second) and halves the window, which
    /// every route has.
    requests: [u32; SLOTS],
    retries: [u32; SLOTS],
}

impl Window {
    fn advance(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        if second <= self.current_second {
            return;
        }
        let gap = (second - self.current_second).min(SLOTS as u64);
        for k in 1..=gap {
            let slot = ((self.current_second + k) % SLOTS as u64) as usize;
            self.requests[slot] = 0;
            self.retries[slot] = 0;
        }
        self.current_second = second;
    }

    fn slot(&self) -> usize {
        (self.current_second % SLOTS as u64) as usize
    }
}

impl RetryBudget {
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        RetryBudget {
            config,
            window: Mutex::new(Window {
                origin: now,
                current_second: 0,
                requests: [0; SLOTS],
                retries: [0; SLOTS],
            }),
        }
    }

    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// Counts an original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        if let Ok(mut w) = self.window.lock() {
            w.advance(now);
            let s = w.slot();
            w.requests[s] = w.requests[s].saturating_add(1);
        }
    }

    /// Takes one retry from the budget; `false` means the budget is spent and the request
    /// must not be retried.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        w.advance(now);
        let requests: u64 = w.requests.iter().map(|&n| u64::from(n)).sum();
        let retries: u64 = w.retries.iter().map(|&n| u64::from(n)).sum();
        let allowed = (self.config.ratio * requests as f64).floor() as u64
            + u64::from(self.config.min_per_second) * WINDOW.as_secs();
        if retries >= allowed {
            return false;
        }
        let s = w.slot();
        w.retries[s] = w.retries[s].saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_by_ratio_plus_floor() {
        let now = Instant::now();
        let budget = RetryBudget::new(
            BudgetConfig {
                ratio: 0.2,
                min_per_second: 1,
            },
            now,
        );
        for _ in 0..1000 {
            budget.deposit(now);
        }
        // 0.2 × 1000 + 1/s × 10 s.
        let granted = (0..1000).filter(|_| budget.try_withdraw(now)).count();
        assert_eq!(granted, 210);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_lets_a_quiet_service_retry() {
        let now = Instant::now();
        let budget = RetryBudget::new(
            BudgetConfig {
                ratio: 0.0,
                min_per_second: 2,
            },
            now,
        );
        assert_eq!((0..100).filter(|_| budget.try_withdraw(now)).count(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_budget_refills_as_the_window_slides() {
        let start = Instant::now();
        let budget = RetryBudget::new(
            BudgetConfig {
                ratio: 0.5,
                min_per_second: 0,
            },
            start,
        );
        for _ in 0..10 {
            budget.deposit(start);
        }
        assert_eq!((0..10).filter(|_| budget.try_withdraw(start)).count(), 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !budget.try_withdraw(Instant::now()),
            "still inside the window"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        let later = Instant::now();
        for _ in 0..4 {
            budget.deposit(later);
        }
        assert_eq!(
            (0..10).filter(|_| budget.try_withdraw(later)).count(),
            2,
            "old requests and retries left the window"
        );
    }
}
