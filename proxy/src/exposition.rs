//! The Prometheus text format (0.0.4) for scrapers that do not ask for OpenMetrics.
//! `prometheus-client` writes OpenMetrics, whose counter families are named without their
//! `_total` suffix and end in `# EOF`; classic parsers (older Prometheus, `promtool check
//! metrics`, many agents) then see `_total` samples with no HELP or TYPE. Rewriting the
//! OpenMetrics output is a pure text transformation, done per scrape, off the request path.

/// Whether a scrape's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// OpenMetrics text -> Prometheus text format 0.0.4.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE: hold it until the type says whether the name changes.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "counter" | "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_suffix_and_eof_goes() {
        let om = "# HELP tern_requests HTTP requests.\n# TYPE tern_requests counter\n\
                  tern_requests_total{listener=\"web\"} 3\n\
                  # HELP tern_up Up.\n# TYPE tern_up gauge\ntern_up 1\n\
                  # HELP tern_lat Latency.\n# TYPE tern_lat histogram\n# UNIT tern_lat seconds\n\
                  tern_lat_bucket{le=\"+Inf\"} 1\ntern_lat_sum 0.1\ntern_lat_count 1\n# EOF\n";
        let classic = to_classic(om);
        assert_eq!(
            classic,
            "# HELP tern_requests_total HTTP requests.\n# TYPE tern_requests_total counter\n\
             tern_requests_total{listener=\"web\"} 3\n\
             # HELP tern_up Up.\n# TYPE tern_up gauge\ntern_up 1\n\
             # HELP tern_lat Latency.\n# TYPE tern_lat histogram\n\
             tern_lat_bucket{le=\"+Inf\"} 1\ntern_lat_sum 0.1\ntern_lat_count 1\n"
        );
    }

    #[test]
    fn negotiation_follows_accept() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
