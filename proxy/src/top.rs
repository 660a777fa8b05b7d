//! `tern-proxy top`: a live table of services and endpoints (request rate, success rate,
//! p50/p99, in flight, ejection and health), refreshed every second and sorted by traffic,
//! from the admin port's `/metrics` and `/endpoints`. 80 columns, plain ANSI; `--once`
//! prints one frame for scripts.
//!
//! Parsing, the rates between two samples and the rendering are pure; `run` is the loop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// One scrape: counter and histogram samples by series, plus the `/endpoints` JSON.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// (metric name, sorted labels) -> value.
    pub samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    pub endpoints: serde_json::Value,
}

/// Parses the Prometheus text format (what `/metrics` answers without an OpenMetrics
/// `Accept`): `name{a="x",b="y"} value` lines; comments skipped.
pub fn parse_metrics(text: &str) -> BTreeMap<(String, Vec<(String, String)>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        out.insert((name.to_string(), labels), value);
    }
    out
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        // Values here never hold escaped quotes (names and addresses).
        let Some((value, tail)) = after.split_once('"') else {
            break;
        };
        labels.push((key.trim_start_matches(',').to_string(), value.to_string()));
        rest = tail;
    }
    labels.sort();
    labels
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    /// Endpoint rows are indented under their service.
    pub endpoint: bool,
    pub rps: f64,
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub in_flight: u64,
    pub state: String,
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Rows from two scrapes `dt` apart: services sorted by traffic, each followed by its
/// endpoints sorted by traffic.
pub fn rows(before: &Scrape, after: &Scrape, dt: Duration) -> Vec<Row> {
    let secs = dt.as_secs_f64().max(0.001);
    // (service, endpoint) -> (total, 5xx) answers in the interval.
    let mut answers: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    // service -> le -> bucket count delta
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for ((name, labels), v) in &after.samples {
        let delta = v - before
            .samples
            .get(&(name.clone(), labels.clone()))
            .copied()
            .unwrap_or(0.0);
        match name.as_str() {
            "tern_upstream_requests_total" => {
                let (Some(s), Some(e)) = (label(labels, "service"), label(labels, "endpoint"))
                else {
                    continue;
                };
                let entry = answers.entry((s.to_string(), e.to_string())).or_default();
                entry.0 += delta;
                if label(labels, "status_class") == Some("5xx") {
                    entry.1 += delta;
                }
            }
            "tern_upstream_response_seconds_bucket" => {
                let (Some(s), Some(le)) = (label(labels, "service"), label(labels, "le")) else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                buckets.entry(s.to_string()).or_default().push((le, delta));
            }
            _ => {}
        }
    }
    let mut services: BTreeMap<String, (Row, Vec<Row>)> = BTreeMap::new();
    for s in after.endpoints["services"].as_array().into_iter().flatten() {
        let service = s["service"].as_str().unwrap_or("?").to_string();
        let mut eps = Vec::new();
        let (mut total, mut failed, mut in_flight) = (0.0, 0.0, 0);
        for e in s["endpoints"].as_array().into_iter().flatten() {
            let address = e["address"].as_str().unwrap_or("?").to_string();
            let (n, bad) = answers
                .get(&(service.clone(), address.clone()))
                .copied()
                .unwrap_or((0.0, 0.0));
            total += n;
            failed += bad;
            let flight = e["in_flight"].as_u64().unwrap_or(0);
            in_flight += flight;
            let state = match (e["outlier"].as_str(), e["health"].as_str()) {
                (Some("ejected"), _) => format!(
                    "ejected {:.0}s",
                    e["ejection_seconds_left"].as_f64().unwrap_or(0.0)
                ),
                (Some("probation"), _) => "probation".into(),
                (_, Some("unhealthy")) => "unhealthy".into(),
                (_, Some(h)) if h != "unknown" => h.to_string(),
                _ => "up".into(),
            };
            eps.push(Row {
                name: address,
                endpoint: true,
                rps: n / secs,
                success: (n > 0.0).then(|| (n - bad) / n),
                p50_ms: None,
                p99_ms: None,
                in_flight: flight,
                state,
            });
        }
        eps.sort_by(|a, b| b.rps.total_cmp(&a.rps).then(a.name.cmp(&b.name)));
        let mut b = buckets.remove(&service).unwrap_or_default();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let row = Row {
            name: service.clone(),
            endpoint: false,
            rps: total / secs,
            success: (total > 0.0).then(|| (total - failed) / total),
            p50_ms: quantile(&b, 0.5).map(|s| s * 1000.0),
            p99_ms: quantile(&b, 0.99).map(|s| s * 1000.0),
            in_flight,
            state: s["load_balancer"].as_str().unwrap_or("").to_string(),
        };
        services.insert(service, (row, eps));
    }
    let mut ordered: Vec<(Row, Vec<Row>)> = services.into_values().collect();
    ordered.sort_by(|a, b| b.0.rps.total_cmp(&a.0.rps).then(a.0.name.cmp(&b.0.name)));
    ordered
        .into_iter()
        .flat_map(|(s, eps)| std::iter::once(s).chain(eps))
        .collect()
}

/// The quantile from cumulative bucket deltas `(upper bound, count)`, interpolated linearly
/// within the bucket as Prometheus' `histogram_quantile` does.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = count - prev.1;
            let into = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * into);
        }
        prev = (le, count);
    }
    None
}

/// One frame, at most 80 columns wide.
pub fn render(admin: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tern top  {admin}  (services, then their endpoints; by traffic)"
    );
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>7} {:>7} {:>5}  {:<12}",
        "SERVICE / ENDPOINT", "RPS", "SUCCESS", "P50 ms", "P99 ms", "INFL", "STATE"
    );
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    for r in rows {
        let name = if r.endpoint {
            format!("  {}", r.name)
        } else {
            r.name.clone()
        };
        let name: String = name.chars().take(24).collect();
        let success = match r.success {
            Some(s) => format!("{:.1}%", s * 100.0),
            None => "-".into(),
        };
        let line = format!(
            "{:<24} {:>8.1} {:>8} {:>7} {:>7} {:>5}  {:<12}",
            name,
            r.rps,
            success,
            opt(r.p50_ms, 1),
            opt(r.p99_ms, 1),
            r.in_flight,
            r.state.chars().take(12).collect::<String>()
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

async fn scrape(admin: &str) -> Result<Scrape, String> {
    let timeout = Duration::from_secs(2);
    let (status, metrics) = crate::admin_client::get(admin, "/metrics", timeout).await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let (status, endpoints) = crate::admin_client::get(admin, "/endpoints", timeout).await?;
    if status != 200 {
        return Err(format!("/endpoints answered {status}"));
    }
    Ok(Scrape {
        samples: parse_metrics(&metrics),
        endpoints: serde_json::from_str(&endpoints).map_err(|e| format!("/endpoints: {e}"))?,
    })
}

/// Prints a frame every `interval` (or one frame with `once`), until interrupted.
pub async fn run(admin: &str, interval: Duration, once: bool) -> Result<(), String> {
    let mut before = scrape(admin).await?;
    let mut at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let after = scrape(admin).await?;
        let now = tokio::time::Instant::now();
        let frame = render(admin, &rows(&before, &after, now - at));
        if once {
            print!("{frame}");
            return Ok(());
        }
        // Home and clear, then the frame: no flicker from scrolling.
        print!("\x1b[H\x1b[2J{frame}");
        before = after;
        at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "tern_upstream_requests_total{service=\"api\",endpoint=\"10.0.0.1:80\",status_class=\"2xx\"} 100\n\
        tern_upstream_requests_total{service=\"api\",endpoint=\"10.0.0.1:80\",status_class=\"5xx\"} 0\n\
        tern_upstream_response_seconds_bucket{le=\"0.001\",service=\"api\"} 0\n\
        tern_upstream_response_seconds_bucket{le=\"0.01\",service=\"api\"} 50\n\
        tern_upstream_response_seconds_bucket{le=\"+Inf\",service=\"api\"} 100\n";
    const AFTER: &str = "# HELP x y\ntern_upstream_requests_total{service=\"api\",endpoint=\"10.0.0.1:80\",status_class=\"2xx\"} 190\n\
        tern_upstream_requests_total{service=\"api\",endpoint=\"10.0.0.1:80\",status_class=\"5xx\"} 10\n\
        tern_upstream_response_seconds_bucket{le=\"0.001\",service=\"api\"} 50\n\
        tern_upstream_response_seconds_bucket{le=\"0.01\",service=\"api\"} 150\n\
        tern_upstream_response_seconds_bucket{le=\"+Inf\",service=\"api\"} 200\n";

    fn scrape(text: &str) -> Scrape {
        Scrape {
            samples: parse_metrics(text),
            endpoints: serde_json::json!({ "services": [ { "service": "api", "load_balancer": "round_robin",
                "endpoints": [ { "address": "10.0.0.1:80", "in_flight": 2, "outlier": "ejected",
                                 "ejection_seconds_left": 12.4, "health": "unknown" },
                               { "address": "10.0.0.2:80", "in_flight": 0, "outlier": "healthy", "health": "healthy" } ] } ] }),
        }
    }

    #[test]
    fn rates_success_and_quantiles_come_from_the_interval() {
        let rows = rows(&scrape(BEFORE), &scrape(AFTER), Duration::from_secs(2));
        assert_eq!(rows.len(), 3);
        let api = &rows[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.rps, 50.0);
        assert_eq!(api.success, Some(0.9));
        // 100 answers in the interval: 50 under 1 ms, 50 between 1 and 10 ms.
        assert_eq!(api.p50_ms, Some(1.0));
        assert!(
            (api.p99_ms.unwrap() - 9.82).abs() < 0.01,
            "{:?}",
            api.p99_ms
        );
        assert_eq!(api.in_flight, 2);
        assert_eq!(rows[1].name, "10.0.0.1:80");
        assert_eq!(rows[1].state, "ejected 12s");
        assert_eq!(rows[2].state, "healthy");
        assert_eq!(rows[2].success, None);
    }

    #[test]
    fn frames_fit_80_columns() {
        let rows = rows(&scrape(BEFORE), &scrape(AFTER), Duration::from_secs(1));
        let frame = render("127.0.0.1:15000", &rows);
        assert!(frame.lines().all(|l| l.chars().count() <= 80), "{frame}");
        assert!(frame.contains("ejected 12s"), "{frame}");
    }
}
