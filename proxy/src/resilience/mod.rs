//! Resilience policies: retries with budgets, outlier ejection. Each is a pure state machine
//! over `tokio::time::Instant` (tested with frozen time); `http/forward.rs` drives them.

pub mod breaker;
pub mod budget;
pub mod outlier;
pub mod retry;
