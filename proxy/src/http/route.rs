//! Route matching: a pure function from a request's host, path and headers to a route.

use http::HeaderMap;
use http::request::Parts;

use crate::config::{PathMatch, RouteMatch};
use crate::snapshot::RouteRt;

/// The first route whose match accepts the request (first match wins).
pub fn find<'a>(routes: &'a [RouteRt], parts: &Parts) -> Option<&'a RouteRt> {
    let host = request_host(parts);
    let path = parts.uri.path();
    routes
        .iter()
        .find(|r| matches(&r.config.matcher, host, path, &parts.headers))
}

/// Whether a request with this host (port already removed), path and headers matches.
pub fn matches(m: &RouteMatch, host: Option<&str>, path: &str, headers: &HeaderMap) -> bool {
    if let Some(want) = &m.host {
        let Some(host) = host else { return false };
        if !host_matches(want, host) {
            return false;
        }
    }
    match &m.path {
        Some(PathMatch::Prefix(prefix)) if !path.starts_with(prefix.as_str()) => return false,
        Some(PathMatch::Exact(exact)) if path != exact => return false,
        _ => {}
    }
    m.headers
        .iter()
        .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
}

/// The request's authority host: the URI's (HTTP/2, absolute-form) or else `Host`, port removed.
pub fn request_host(parts: &Parts) -> Option<&str> {
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(authority))
}

fn strip_port(authority: &str) -> &str {
    // Keep userinfo out and handle bracketed IPv6 literals: "[::1]:80" -> "[::1]".
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

/// `want` is lower case; `*.example.com` matches any name ending in `.example.com`.
fn host_matches(want: &str, host: &str) -> bool {
    match want.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => host.eq_ignore_ascii_case(want),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue, Request};

    fn parts(uri: &str, host: Option<&str>, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn m(host: Option<&str>, path: Option<PathMatch>, headers: &[(&str, &str)]) -> RouteMatch {
        RouteMatch {
            host: host.map(str::to_string),
            path,
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
        }
    }

    fn check(matcher: &RouteMatch, p: &Parts) -> bool {
        matches(matcher, request_host(p), p.uri.path(), &p.headers)
    }

    #[test]
    fn host_ignores_port_and_case() {
        let rule = m(Some("api.local"), None, &[]);
        assert!(check(&rule, &parts("/", Some("API.local:8080"), &[])));
        assert!(check(&rule, &parts("http://api.local:81/x", None, &[])));
        assert!(!check(&rule, &parts("/", Some("web.local"), &[])));
        assert!(!check(&rule, &parts("/", None, &[])));
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let rule = m(Some("*.example.com"), None, &[]);
        assert!(check(&rule, &parts("/", Some("a.example.com"), &[])));
        assert!(check(&rule, &parts("/", Some("a.b.EXAMPLE.com:443"), &[])));
        assert!(!check(&rule, &parts("/", Some("example.com"), &[])));
    }

    #[test]
    fn ipv6_host_keeps_brackets() {
        assert_eq!(
            request_host(&parts("/", Some("[::1]:8080"), &[])),
            Some("[::1]")
        );
        assert_eq!(request_host(&parts("/", Some("[::1]"), &[])), Some("[::1]"));
    }

    #[test]
    fn path_prefix_and_exact() {
        let prefix = m(None, Some(PathMatch::Prefix("/v2".into())), &[]);
        assert!(check(&prefix, &parts("/v2/users?x=1", None, &[])));
        assert!(!check(&prefix, &parts("/v1/users", None, &[])));
        let exact = m(None, Some(PathMatch::Exact("/healthz".into())), &[]);
        assert!(check(&exact, &parts("/healthz?verbose", None, &[])));
        assert!(!check(&exact, &parts("/healthz/x", None, &[])));
    }

    #[test]
    fn headers_must_all_match_exactly() {
        let rule = m(None, None, &[("x-canary", "1"), ("x-team", "blue")]);
        assert!(check(
            &rule,
            &parts("/", None, &[("x-canary", "1"), ("x-team", "blue")])
        ));
        assert!(!check(&rule, &parts("/", None, &[("x-canary", "1")])));
        assert!(!check(
            &rule,
            &parts("/", None, &[("x-canary", "11"), ("x-team", "blue")])
        ));
        // Any one of repeated values may match.
        assert!(check(
            &rule,
            &parts(
                "/",
                None,
                &[("x-canary", "0"), ("x-canary", "1"), ("x-team", "blue")]
            )
        ));
    }

    #[test]
    fn empty_match_accepts_everything() {
        assert!(check(
            &RouteMatch::default(),
            &parts("/anything", None, &[])
        ));
    }
}
