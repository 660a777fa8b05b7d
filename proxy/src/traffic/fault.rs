//! Fault injection for chaos tests of the services behind a route: delay and abort a
//! percentage of requests, optionally only requests carrying a header.

use std::time::Duration;

use http::HeaderMap;

#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Percent of requests delayed, and by how long.
    pub delay: Option<(f64, Duration)>,
    /// Percent of requests answered with this status instead of being forwarded.
    pub abort: Option<(f64, u16)>,
    /// Only requests with this header get faults.
    pub header: Option<http::HeaderName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

/// What happens to one request; independent draws for delay and abort.
pub fn decide(config: &FaultConfig, headers: &HeaderMap, rng: &mut fastrand::Rng) -> Decision {
    if config
        .header
        .as_ref()
        .is_some_and(|h| !headers.contains_key(h))
    {
        return Decision::default();
    }
    let hit = |percent: f64, rng: &mut fastrand::Rng| rng.f64() * 100.0 < percent;
    Decision {
        delay: config.delay.and_then(|(p, d)| hit(p, rng).then_some(d)),
        abort: config.abort.and_then(|(p, s)| hit(p, rng).then_some(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_hold_within_statistical_bounds() {
        let config = FaultConfig {
            delay: Some((10.0, Duration::from_millis(100))),
            abort: Some((1.0, 503)),
            header: None,
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..n {
            let d = decide(&config, &HeaderMap::new(), &mut rng);
            delayed += usize::from(d.delay.is_some());
            aborted += usize::from(d.abort == Some(503));
        }
        // Binomial: 10 % of 100,000 has sd ~95; 1 % has sd ~31. Five sigma either way.
        assert!(
            (10_000 - 475..=10_000 + 475).contains(&delayed),
            "{delayed}"
        );
        assert!((1_000 - 155..=1_000 + 155).contains(&aborted), "{aborted}");
    }

    #[test]
    fn a_header_condition_spares_other_requests() {
        let config = FaultConfig {
            delay: None,
            abort: Some((100.0, 500)),
            header: Some(http::HeaderName::from_static("x-chaos")),
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(decide(&config, &HeaderMap::new(), &mut rng).abort, None);
        let mut h = HeaderMap::new();
        h.insert("x-chaos", http::HeaderValue::from_static("1"));
        assert_eq!(decide(&config, &h, &mut rng).abort, Some(500));
    }
}
