//! Local rate limiting: a token bucket per key (client IP, a header's value, the peer's
//! identity, or one bucket for the route). Buckets live in a bounded map: a flood of new keys
//! evicts full (idle) buckets first, then the least recently used, and never grows the map
//! past `MAX_KEYS`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Buckets kept per route.
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub enum RateKey {
    ClientIp,
    Header(http::HeaderName),
    /// The mTLS peer's SPIFFE id; until mesh identity exists every request is
    /// "unauthenticated" and shares one bucket.
    PeerIdentity,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: RateKey,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        RateLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Takes a token for `key`; `Err(wait)` says how long until one is available.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.config.burst);
        let rate = self.config.requests_per_second;
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned lock means a panic elsewhere; do not refuse traffic for it.
            return Ok(());
        };
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            evict(&mut buckets, rate, burst, now);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    pub fn keys(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

/// Drops buckets that have refilled (they would start full anyway); if none has, the least
/// recently used one.
fn evict(buckets: &mut HashMap<String, Bucket>, rate: f64, burst: f64, now: Instant) {
    let before = buckets.len();
    buckets.retain(|_, b| {
        b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
    });
    if buckets.len() < before {
        return;
    }
    if let Some(oldest) = buckets
        .iter()
        .min_by_key(|(_, b)| b.last)
        .map(|(k, _)| k.clone())
    {
        buckets.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            requests_per_second: rps,
            burst,
            key: RateKey::None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_about_the_rate() {
        let l = limiter(10.0, 20);
        let start = Instant::now();
        let first = (0..100).filter(|_| l.check("", start).is_ok()).count();
        assert_eq!(first, 20);
        let wait = l.check("", start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Over the next 5 s, one request every 10 ms: about 10 per second get through.
        let mut allowed = 0;
        for i in 1..=500 {
            if l.check("", start + Duration::from_millis(10 * i)).is_ok() {
                allowed += 1;
            }
        }
        assert!((49..=51).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_buckets() {
        let l = limiter(1.0, 1);
        let now = Instant::now();
        assert!(l.check("a", now).is_ok());
        assert!(l.check("a", now).is_err());
        assert!(l.check("b", now).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_flood_keeps_the_map_bounded() {
        let l = limiter(1.0, 5);
        let now = Instant::now();
        for i in 0..(MAX_KEYS + 5000) {
            let _ = l.check(&format!("10.0.{}.{}", i / 256, i % 256), now);
        }
        assert_eq!(l.keys(), MAX_KEYS);
        // A key that is being limited survives the flood when others have refilled.
        let l = limiter(100.0, 1);
        assert!(l.check("hot", now).is_ok());
        assert!(l.check("hot", now).is_err());
        for i in 0..MAX_KEYS {
            let _ = l.check(&format!("k{i}"), now + Duration::from_secs(1));
        }
        assert!(l.keys() <= MAX_KEYS);
    }
}
