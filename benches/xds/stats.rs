//! Percentiles over latency samples, and reading the control plane's own push-latency
//! histogram out of its `/metrics` text.

use std::time::Duration;

/// The nearest-rank percentile (`p` in 0..=100) of `samples`, in milliseconds; `NaN` if empty.
pub fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    ms(sorted[index])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sum and count of `tern_xds_push_latency_seconds{type="eds"}` (OpenMetrics text).
pub fn eds_push_latency(metrics: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| -> Option<f64> {
        let name = format!("tern_xds_push_latency_seconds_{suffix}{{");
        samples(metrics)
            .filter(|l| l.starts_with(&name) && l.contains("type=\"eds\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .reduce(|a, b| a + b)
    };
    Some((value("sum")?, value("count")?))
}

/// Total of `tern_xds_nacks_total` over all labels (0 if none were counted).
pub fn nacks(metrics: &str) -> f64 {
    samples(metrics)
        .filter(|l| l.starts_with("tern_xds_nacks_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// The sample lines, with the stray leading `_` that the control plane's registry puts in
/// front of every name (`Registry::with_prefix("")`) removed.
fn samples(metrics: &str) -> impl Iterator<Item = &str> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.strip_prefix('_').unwrap_or(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&samples, 100.0), 100.0);
        assert_eq!(percentile_ms(&samples[..1], 99.0), 1.0);
        assert!(percentile_ms(&[], 50.0).is_nan());
    }

    #[test]
    fn reads_the_histogram() {
        let text = "\
tern_xds_push_latency_seconds_sum{type=\"eds\",protocol=\"sotw\"} 1.5
tern_xds_push_latency_seconds_count{type=\"eds\",protocol=\"sotw\"} 100
tern_xds_push_latency_seconds_bucket{le=\"0.001\",type=\"eds\",protocol=\"sotw\"} 0
tern_xds_push_latency_seconds_sum{type=\"cds\",protocol=\"sotw\"} 9
_tern_xds_nacks_total{type=\"eds\",reason=\"x y\"} 2
";
        assert_eq!(eds_push_latency(text), Some((1.5, 100.0)));
        assert_eq!(nacks(text), 2.0);
        assert_eq!(nacks("").to_string(), "0");
    }
}
