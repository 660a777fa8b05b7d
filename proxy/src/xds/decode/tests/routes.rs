//! RouteConfigurations: virtual host order, matches, actions, weights, and what is refused.

use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, Route,
    RouteConfiguration, WeightedCluster, header_matcher, route, route_action, route_match,
    weighted_cluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::*;

fn decode(rc: &RouteConfiguration) -> Result<Vec<RawRoute>, InvalidResource> {
    XdsRoutes::try_from(rc).map(|r| {
        assert_eq!(r.name, rc.name);
        r.routes
    })
}

/// One virtual host for every domain with this one route.
fn one(route: Route) -> RouteConfiguration {
    route_config("rc", vec![vhost("all", &["*"], vec![route])])
}

fn header(name: &str, spec: header_matcher::HeaderMatchSpecifier) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn string_match(pattern: string_matcher::MatchPattern) -> header_matcher::HeaderMatchSpecifier {
    header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn with_headers(headers: Vec<HeaderMatcher>) -> Route {
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().headers = headers;
    r
}

fn with_action(f: impl FnOnce(&mut RouteAction)) -> Route {
    let mut r = route_to("/", "api");
    let Some(route::Action::Route(a)) = &mut r.action else {
        unreachable!()
    };
    f(a);
    r
}

fn weights(list: &[(&str, Option<u32>)]) -> Route {
    with_action(|a| {
        a.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters: list
                    .iter()
                    .map(|(name, weight)| weighted_cluster::ClusterWeight {
                        name: name.to_string(),
                        weight: weight.map(|value| UInt32Value { value }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        ))
    })
}

#[test]
fn paths_headers_and_clusters() {
    let mut exact = route_to("/", "exact");
    exact.r#match.as_mut().unwrap().path_specifier =
        Some(route_match::PathSpecifier::Path("/healthz".into()));
    let mut canary = route_to("/v2", "api-v2");
    canary.r#match.as_mut().unwrap().headers = vec![header(
        "X-Canary",
        string_match(string_matcher::MatchPattern::Exact("1".into())),
    )];
    let rc = route_config(
        "rc",
        vec![vhost(
            "all",
            &["*"],
            vec![exact, canary, route_to("/", "api"), route_to("", "never")],
        )],
    );
    let routes = decode(&rc).unwrap();
    assert_eq!(routes.len(), 4);
    let m = |i: usize| routes[i].matcher.clone().unwrap_or_default();
    assert_eq!(m(0).path.as_deref(), Some("/healthz"));
    assert_eq!(m(0).path_prefix, None);
    assert_eq!(m(1).path_prefix.as_deref(), Some("/v2"));
    assert_eq!(
        m(1).headers.into_iter().collect::<Vec<_>>(),
        vec![("x-canary".to_string(), "1".to_string())],
        "header names are lower-cased"
    );
    // "/" and "" match every path: no path condition at all.
    assert_eq!(m(2), RawMatch::default());
    assert_eq!(m(3), RawMatch::default());
    let services: Vec<_> = routes
        .iter()
        .map(|r| (r.backends[0].service.as_str(), r.backends[0].weight))
        .collect();
    assert_eq!(
        services,
        [
            ("exact", None),
            ("api-v2", None),
            ("api", None),
            ("never", None)
        ]
    );
}

#[test]
fn virtual_hosts_are_laid_out_exact_then_suffix_then_star() {
    let rc = route_config(
        "rc",
        vec![
            vhost("default", &["*"], vec![route_to("/", "default")]),
            vhost("wild", &["*.example.com"], vec![route_to("/", "wild")]),
            vhost(
                "api",
                &["API.local:8080", "api.internal"],
                vec![route_to("/v1", "api-v1"), route_to("/", "api")],
            ),
        ],
    );
    let routes = decode(&rc).unwrap();
    let layout: Vec<_> = routes
        .iter()
        .map(|r| (host_of(r), r.backends[0].service.as_str()))
        .collect();
    assert_eq!(
        layout,
        [
            // Each domain of a virtual host gets its own copy of the routes, in route order,
            // lower-cased and without the port.
            (Some("api.local"), "api-v1"),
            (Some("api.local"), "api"),
            (Some("api.internal"), "api-v1"),
            (Some("api.internal"), "api"),
            (Some("*.example.com"), "wild"),
            (None, "default"),
        ]
    );
    // The route's own path condition stays beside the host.
    assert_eq!(
        routes[0].matcher.as_ref().unwrap().path_prefix.as_deref(),
        Some("/v1")
    );
    // And Tern's router now picks what Envoy would.
    assert_eq!(
        pick(&routes, "api.local", "/v1/x").as_deref(),
        Some("api-v1")
    );
    assert_eq!(pick(&routes, "api.internal", "/").as_deref(), Some("api"));
    assert_eq!(pick(&routes, "a.example.com", "/").as_deref(), Some("wild"));
    assert_eq!(
        pick(&routes, "example.com", "/").as_deref(),
        Some("default")
    );
    assert_eq!(pick(&routes, "other", "/").as_deref(), Some("default"));
}

/// Envoy: "the longest wildcards match first" (suffix wildcards by length, whatever the
/// order of the virtual hosts).
#[test]
fn longer_suffix_wildcards_win_over_shorter_ones() {
    let rc = route_config(
        "rc",
        vec![
            vhost("com", &["*.com"], vec![route_to("/", "any-com")]),
            vhost(
                "example",
                &["*.example.com"],
                vec![route_to("/", "example")],
            ),
        ],
    );
    let routes = decode(&rc).unwrap();
    assert_eq!(
        pick(&routes, "a.example.com", "/").as_deref(),
        Some("example")
    );
    assert_eq!(
        pick(&routes, "a.other.com", "/").as_deref(),
        Some("any-com")
    );
}

/// Envoy picks one virtual host by domain and then a route in it; when none of its routes
/// matches, the answer is 404 — it does not go on to a less specific virtual host. Tern may
/// refuse such a configuration, but must not route it differently.
#[test]

fn a_request_does_not_fall_through_to_a_less_specific_virtual_host() {
    let rc = route_config(
        "rc",
        vec![
            vhost("api", &["api.local"], vec![route_to("/v1", "api-v1")]),
            vhost("default", &["*"], vec![route_to("/", "default")]),
        ],
    );
    match decode(&rc) {
        Err(e) => assert_eq!(e.field, "virtual_hosts[0]", "{e}"),
        Ok(routes) => {
            assert_eq!(
                pick(&routes, "api.local", "/v1/x").as_deref(),
                Some("api-v1")
            );
            assert_eq!(pick(&routes, "api.local", "/v2").as_deref(), None);
        }
    }
    // Without a less specific host to fall through to, there is nothing to get wrong.
    let alone = route_config(
        "rc",
        vec![vhost(
            "api",
            &["api.local"],
            vec![route_to("/v1", "api-v1")],
        )],
    );
    let routes = decode(&alone).unwrap();
    assert_eq!(pick(&routes, "api.local", "/v2"), None);
}

#[test]
fn domains_with_a_wildcard_elsewhere_are_refused() {
    for domain in ["api.*", "a*.example.com", "*-api.example.com"] {
        let rc = route_config(
            "rc",
            vec![vhost("v", &["ok.local", domain], vec![route_to("/", "a")])],
        );
        let e = refused(decode(&rc));
        assert_eq!(e.kind, "RouteConfiguration");
        assert_eq!(e.field, "virtual_hosts[0].domains[1]", "{domain}");
    }
}

#[test]
fn a_virtual_host_without_domains_contributes_nothing() {
    let rc = route_config("rc", vec![vhost("v", &[], vec![route_to("/", "a")])]);
    assert!(decode(&rc).unwrap().is_empty());
}

#[test]
#[allow(deprecated)] // `exact_match`: older servers still send it
fn authority_matchers_become_the_host() {
    let exact = with_headers(vec![header(
        ":authority",
        string_match(string_matcher::MatchPattern::Exact("api.local".into())),
    )]);
    let routes = decode(&one(exact)).unwrap();
    assert_eq!(host_of(&routes[0]), Some("api.local"));
    assert!(routes[0].matcher.as_ref().unwrap().headers.is_empty());

    let suffix = with_headers(vec![header(
        ":authority",
        string_match(string_matcher::MatchPattern::Suffix(".example.com".into())),
    )]);
    let routes = decode(&one(suffix)).unwrap();
    assert_eq!(host_of(&routes[0]), Some("*.example.com"));

    let host = with_headers(vec![header(
        "Host",
        header_matcher::HeaderMatchSpecifier::ExactMatch("web.local".into()),
    )]);
    let routes = decode(&one(host)).unwrap();
    assert_eq!(host_of(&routes[0]), Some("web.local"));
}

#[test]
fn a_route_s_own_authority_match_is_kept_over_its_virtual_host_domain() {
    let r = with_headers(vec![header(
        ":authority",
        string_match(string_matcher::MatchPattern::Exact("a.example.com".into())),
    )]);
    let rc = route_config("rc", vec![vhost("v", &["*.example.com"], vec![r])]);
    let routes = decode(&rc).unwrap();
    assert_eq!(host_of(&routes[0]), Some("a.example.com"));
}

#[test]
#[allow(deprecated)] // `prefix_match`: older servers still send it
fn authority_suffixes_must_start_with_a_dot_and_other_headers_must_be_exact() {
    let cases = [
        (
            ":authority",
            string_match(string_matcher::MatchPattern::Suffix("example.com".into())),
        ),
        (
            "x-user",
            string_match(string_matcher::MatchPattern::Suffix(".example.com".into())),
        ),
        (
            "x-user",
            string_match(string_matcher::MatchPattern::Prefix("a".into())),
        ),
        (
            "x-user",
            string_match(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: ".*".into(),
                ..Default::default()
            })),
        ),
        (
            "x-user",
            header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        ),
        (
            "x-user",
            header_matcher::HeaderMatchSpecifier::PrefixMatch("a".into()),
        ),
    ];
    for (name, spec) in cases {
        let e = refused(decode(&one(with_headers(vec![header(name, spec.clone())]))));
        assert_eq!(
            e.field, "virtual_hosts[0].routes[0].match.headers[0]",
            "{name} {spec:?}"
        );
    }
}

#[test]
#[allow(deprecated)]
fn the_deprecated_exact_match_is_still_read() {
    let r = with_headers(vec![header(
        "x-canary",
        header_matcher::HeaderMatchSpecifier::ExactMatch("1".into()),
    )]);
    let routes = decode(&one(r)).unwrap();
    assert_eq!(
        routes[0].matcher.as_ref().unwrap().headers.get("x-canary"),
        Some(&"1".to_string())
    );
}

#[test]
#[allow(deprecated)]
fn inverted_header_matches_are_refused() {
    let mut h = header(
        "x-canary",
        header_matcher::HeaderMatchSpecifier::ExactMatch("1".into()),
    );
    h.invert_match = true;
    let e = refused(decode(&one(with_headers(vec![h]))));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].match.headers[0]");
    assert!(e.reason.contains("inverted"), "{e}");
}

#[test]
fn regex_paths_are_refused() {
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().path_specifier =
        Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/v[0-9]+/.*".into(),
            ..Default::default()
        }));
    let e = refused(decode(&one(r)));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].match");
    assert!(e.reason.contains("regex"), "{e}");
    assert_eq!(
        e.to_string(),
        "RouteConfiguration \"rc\": virtual_hosts[0].routes[0].match: only prefix and path \
         matches are supported (no regex or templates)"
    );
}

#[test]
fn other_match_conditions_are_refused() {
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().case_sensitive = Some(BoolValue { value: false });
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].match.case_sensitive"
    );
    // Explicitly case-sensitive is what Tern does anyway.
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().case_sensitive = Some(BoolValue { value: true });
    assert!(decode(&one(r)).is_ok());

    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().query_parameters = vec![QueryParameterMatcher {
        name: "debug".into(),
        ..Default::default()
    }];
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].match.query_parameters"
    );

    let mut r = route_to("/", "api");
    r.r#match = None;
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].match"
    );
    let mut r = route_to("/", "api");
    r.r#match.as_mut().unwrap().path_specifier = None;
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].match.path_specifier"
    );
}

#[test]
fn redirects_and_direct_responses_are_refused() {
    let mut r = route_to("/", "api");
    r.action = Some(route::Action::Redirect(RedirectAction::default()));
    let e = refused(decode(&one(r)));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].action");
    assert!(e.reason.contains("redirect"), "{e}");

    let mut r = route_to("/", "api");
    r.action = Some(route::Action::DirectResponse(DirectResponseAction {
        status: 200,
        ..Default::default()
    }));
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].action"
    );

    let mut r = route_to("/", "api");
    r.action = None;
    assert_eq!(
        refused(decode(&one(r))).field,
        "virtual_hosts[0].routes[0].action"
    );
}

#[test]
fn rewrites_are_refused() {
    let r = with_action(|a| a.prefix_rewrite = "/v2/".into());
    let e = refused(decode(&one(r)));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].route");
    assert!(e.reason.contains("rewrite"), "{e}");

    let r = with_action(|a| {
        a.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "upstream.local".into(),
        ))
    });
    let e = refused(decode(&one(r)));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].route");
    assert!(e.reason.contains("host rewrites"), "{e}");
}

#[test]
fn weighted_clusters_skip_zero_weights() {
    let r = weights(&[
        ("a", Some(0)),
        ("b", Some(30)),
        ("c", None),
        ("d", Some(70)),
    ]);
    let routes = decode(&one(r)).unwrap();
    let backends: Vec<_> = routes[0]
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight))
        .collect();
    assert_eq!(backends, [("b", Some(30)), ("d", Some(70))]);
}

#[test]
fn weighted_clusters_above_10000_or_all_zero_are_refused() {
    let e = refused(decode(&one(weights(&[
        ("a", Some(1)),
        ("b", Some(10_001)),
    ]))));
    assert_eq!(
        e.field,
        "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[1].weight"
    );
    assert!(e.reason.contains("10001"), "{e}");
    assert!(decode(&one(weights(&[("a", Some(10_000))]))).is_ok());

    let e = refused(decode(&one(weights(&[("a", Some(0)), ("b", None)]))));
    assert_eq!(
        e.field,
        "virtual_hosts[0].routes[0].route.weighted_clusters"
    );
}

#[test]
fn a_route_needs_a_named_cluster() {
    for spec in [
        None,
        Some(route_action::ClusterSpecifier::Cluster(String::new())),
        Some(route_action::ClusterSpecifier::ClusterHeader(
            "x-cluster".into(),
        )),
    ] {
        let r = with_action(|a| a.cluster_specifier = spec.clone());
        assert_eq!(
            refused(decode(&one(r))).field,
            "virtual_hosts[0].routes[0].route.cluster",
            "{spec:?}"
        );
    }
}

#[test]
fn a_route_configuration_needs_a_name() {
    let mut rc = one(route_to("/", "a"));
    rc.name.clear();
    let e = refused(XdsRoutes::try_from(&rc));
    assert_eq!((e.kind, e.field.as_str()), ("RouteConfiguration", "name"));
}

/// Envoy would match these case-insensitively; Tern compares header values exactly, so the
/// route would silently match less. Refused, like every condition Tern cannot honour.
#[test]

fn case_insensitive_header_matches_are_refused() {
    let r = with_headers(vec![header(
        "x-team",
        header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact("Blue".into())),
            ignore_case: true,
        }),
    )]);
    let e = refused(decode(&one(r)));
    assert_eq!(e.field, "virtual_hosts[0].routes[0].match.headers[0]");
}

/// Conditions Tern does not check make a route match more than Envoy would (every request
/// instead of only gRPC ones, or only clients with a certificate, or a cookie).
#[test]
fn match_conditions_tern_cannot_check_are_refused() {
    use envoy_types::pb::envoy::config::route::v3::CookieMatcher;
    use envoy_types::pb::envoy::r#type::matcher::v3::{FilterStateMatcher, MetadataMatcher};

    type Set = fn(&mut RouteMatch);
    let cases: [(&str, Set); 5] = [
        ("grpc", |m| {
            m.grpc = Some(route_match::GrpcRouteMatchOptions::default())
        }),
        ("tls_context", |m| {
            m.tls_context = Some(route_match::TlsContextMatchOptions {
                presented: Some(BoolValue { value: true }),
                validated: None,
            })
        }),
        ("cookies", |m| {
            m.cookies = vec![CookieMatcher {
                name: "session".into(),
                ..Default::default()
            }]
        }),
        ("dynamic_metadata", |m| {
            m.dynamic_metadata = vec![MetadataMatcher::default()]
        }),
        ("filter_state", |m| {
            m.filter_state = vec![FilterStateMatcher::default()]
        }),
    ];
    for (name, set) in cases {
        let mut r = route_to("/", "api");
        set(r.r#match.as_mut().unwrap());
        let e = refused(decode(&one(r)));
        assert_eq!(e.field, format!("virtual_hosts[0].routes[0].match.{name}"));
    }
}
