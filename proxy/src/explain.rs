//! `GET /explain`: what the proxy would do with a request like this one, from the config in
//! force: the listener, the route (by the same `route::find` the request path uses), the
//! backend services with their split, each candidate endpoint's live state, the policies
//! applied, and the config version it was all decided from. Pure: a snapshot and a question
//! in, a JSON answer out; the admin server does the IO.

use std::fmt::Write as _;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::resilience::outlier::OutlierState;
use crate::snapshot::{ListenerRtKind, RouteRt, ServiceRt, Snapshot};

/// The request to explain, from the query string.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub listener: String,
    pub host: Option<String>,
    pub path: String,
    pub method: Method,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `format=text` asks for the readable rendering.
    pub text: bool,
}

impl Question {
    /// `listener=web&host=api.local&path=/v2/x&method=GET&header=x-canary:1&format=text`.
    pub fn parse(query: &str) -> Result<Question, String> {
        let mut listener = None;
        let mut host = None;
        let mut path = "/".to_string();
        let mut method = Method::GET;
        let mut headers = Vec::new();
        let mut text = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "listener" => listener = Some(value),
                "host" => host = Some(value),
                "path" => {
                    if !value.starts_with('/') {
                        return Err(format!("path {value:?} must start with /"));
                    }
                    path = value;
                }
                "method" => {
                    method = Method::from_bytes(value.as_bytes())
                        .map_err(|_| format!("invalid method {value:?}"))?;
                }
                "header" => {
                    let (name, v) = value
                        .split_once(':')
                        .ok_or_else(|| format!("header {value:?} is not name:value"))?;
                    let name = HeaderName::from_bytes(name.trim().as_bytes())
                        .map_err(|_| format!("invalid header name {name:?}"))?;
                    let v = HeaderValue::from_str(v.trim())
                        .map_err(|_| format!("invalid value for header {name}"))?;
                    headers.push((name, v));
                }
                "format" => text = value == "text",
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        let listener = listener.ok_or("missing listener=NAME")?;
        Ok(Question {
            listener,
            host,
            path,
            method,
            headers,
            text,
        })
    }

    fn parts(&self) -> Result<http::request::Parts, String> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(&self.path);
        if let Some(h) = &self.host {
            req = req.header(http::header::HOST, h);
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let (parts, ()) = req
            .body(())
            .map_err(|e| format!("not a request: {e}"))?
            .into_parts();
        Ok(parts)
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

/// The answer, or why the question cannot be answered (a 400).
pub fn explain(
    snapshot: &Snapshot,
    q: &Question,
    xds: Option<Value>,
    now: Instant,
) -> Result<Value, String> {
    let Some(listener) = snapshot.listeners.get(q.listener.as_str()) else {
        let mut known: Vec<&str> = snapshot.listeners.keys().map(|k| &**k).collect();
        known.sort();
        return Err(format!(
            "no listener {:?}; listeners: {}",
            q.listener,
            known.join(", ")
        ));
    };
    let mut answer = json!({
        "config": {
            "version": snapshot.version,
            "source": snapshot.source,
            "xds": xds,
        },
        "listener": {
            "name": &*listener.config.name,
            "address": listener.config.address.to_string(),
            "protocol": listener.config.kind.protocol(),
        },
        "request": {
            "method": q.method.as_str(),
            "host": q.host,
            "path": q.path,
            "headers": q.headers.iter().map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?"))).collect::<Vec<_>>(),
        },
    });
    let (routes, opaque) = match &listener.kind {
        ListenerRtKind::Http { routes } => (Some(routes), None),
        ListenerRtKind::Tcp { service } => (None, Some(service)),
        ListenerRtKind::Auto { routes, service } => (Some(routes), Some(service)),
    };
    if let Some(routes) = routes {
        let parts = q.parts()?;
        match crate::http::route::find(routes, &parts) {
            Some(route) => {
                let index = routes
                    .iter()
                    .position(|r| std::ptr::eq(r, route))
                    .unwrap_or(0);
                answer["route"] = route_json(route, index);
                answer["backends"] = backends_json(route, now);
                answer["decision"] = json!(format!(
                    "route {index} of listener {}",
                    listener.config.name
                ));
            }
            None => {
                answer["route"] = Value::Null;
                answer["decision"] =
                    json!("no route matches: the request would get 404 (tern_no_route_total)");
            }
        }
    }
    if let Some(service) = opaque {
        answer["opaque_tcp"] = service_json(service, 1, 1.0, now);
    }
    Ok(answer)
}

fn route_json(route: &RouteRt, index: usize) -> Value {
    let m = &route.config.matcher;
    let path = match &m.path {
        Some(crate::config::PathMatch::Prefix(p)) => json!({ "prefix": p }),
        Some(crate::config::PathMatch::Exact(p)) => json!({ "exact": p }),
        None => Value::Null,
    };
    let retry = route.config.retry.as_ref().map(|r| {
        json!({
            "attempts": r.attempts,
            "on": r.on.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            "status_codes": r.status_codes,
            "per_try_timeout_ms": r.per_try_timeout.map(|d| d.as_millis() as u64),
            "backoff_ms": [r.backoff_base.as_millis() as u64, r.backoff_max.as_millis() as u64],
            "budget": { "ratio": r.budget.ratio, "min_per_second": r.budget.min_per_second },
        })
    });
    json!({
        "index": index,
        "match": {
            "host": m.host,
            "path": path,
            "headers": m.headers.iter().map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?"))).collect::<Vec<_>>(),
        },
        "timeout_ms": route.config.timeout.map(|d| d.as_millis() as u64),
        "retry": retry.unwrap_or_else(|| json!("safe default: connect failures and refused streams of bodiless requests")),
    })
}

fn backends_json(route: &RouteRt, now: Instant) -> Value {
    let total: u32 = route.backends.iter().map(|(_, w)| w).sum::<u32>().max(1);
    Value::Array(
        route
            .backends
            .iter()
            .map(|(s, w)| service_json(s, w, f64::from(w) / f64::from(total), now))
            .collect(),
    )
}

fn service_json(s: &ServiceRt, weight: u32, share: f64, now: Instant) -> Value {
    let b = &s.config.circuit_breaker;
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let outlier = e.state.outlier.state(now);
            let left = match outlier {
                OutlierState::Ejected { remaining } => Some(remaining.as_secs_f64()),
                _ => None,
            };
            json!({
                "address": e.state.addr.to_string(),
                "weight": e.weight,
                "eligible": s.eligible(e, now),
                "health": e.state.health.state().as_str(),
                "outlier": outlier.as_str(),
                "ejection_seconds_left": left,
                "ewma_ms": e.state.load.ewma(now).as_secs_f64() * 1000.0,
                "in_flight": e.state.load.in_flight(),
            })
        })
        .collect();
    json!({
        "service": &*s.config.name,
        "weight": weight,
        "share": share,
        "protocol": format!("{:?}", s.config.protocol).to_lowercase(),
        "load_balancer": s.balancer.kind().as_str(),
        "connect_timeout_ms": s.config.connect_timeout.as_millis() as u64,
        "circuit_breaker": {
            "max_connections": b.max_connections,
            "max_pending_requests": b.max_pending_requests,
            "max_requests": b.max_requests,
            "max_retries": b.max_retries,
        },
        "outlier_detection": s.config.outlier_detection.as_ref().map(|o| format!("{o:?}")),
        "health_check": s.config.health_check.as_ref().map(|h| format!("{h:?}")),
        "endpoints": endpoints,
    })
}

/// The answer for people: one screen, most important first.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "listener {} ({}, {})",
        s(&v["listener"]["name"]),
        s(&v["listener"]["protocol"]),
        s(&v["listener"]["address"])
    );
    let _ = writeln!(
        out,
        "request  {} host={} path={} headers={}",
        s(&v["request"]["method"]),
        s(&v["request"]["host"]),
        s(&v["request"]["path"]),
        v["request"]["headers"]
    );
    let _ = writeln!(out, "decision {}", s(&v["decision"]));
    if v["route"].is_object() {
        let r = &v["route"];
        let _ = writeln!(
            out,
            "route    #{} match={} timeout_ms={} retry={}",
            r["index"],
            r["match"],
            s(&r["timeout_ms"]),
            r["retry"]
        );
    }
    for b in v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(v.get("opaque_tcp"))
    {
        let _ = writeln!(
            out,
            "service  {} share={:.0}% lb={} breaker={}",
            s(&b["service"]),
            b["share"].as_f64().unwrap_or(0.0) * 100.0,
            s(&b["load_balancer"]),
            b["circuit_breaker"]
        );
        for e in b["endpoints"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {:<22} weight={:<4} eligible={:<5} health={:<9} outlier={:<9} ewma_ms={:.2} in_flight={}",
                s(&e["address"]),
                e["weight"],
                e["eligible"],
                s(&e["health"]),
                s(&e["outlier"]),
                e["ewma_ms"].as_f64().unwrap_or(0.0),
                e["in_flight"]
            );
        }
    }
    let _ = writeln!(
        out,
        "config   version {} from {}",
        v["config"]["version"],
        s(&v["config"]["source"])
    );
    out
}

#[cfg(test)]
mod tests;
