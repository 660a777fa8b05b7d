//! Local rate limit and fault filters, per-route policy and tracing, as other control planes
//! write them (`HUNDRED` denominators, filters in either order, virtual-host-wide configs),
//! and what is refused.

use envoy_types::pb::envoy::config::core::v3::{ExtensionConfigSource, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{FilterConfig, HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, HttpStatus, TokenBucket, fractional_percent::DenominatorType,
};
use envoy_types::pb::google::protobuf::Any;

use super::*;
use crate::config::{RawFault, RawFaultAbort, RawFaultDelay, RawRateLimit};
use crate::xds::{Assembly, PolicyFilters, XdsState};

const RL: &str = "envoy.filters.http.local_ratelimit";
const FAULT: &str = "envoy.filters.http.fault";

fn filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

fn rl_filter() -> HttpFilter {
    filter(
        RL,
        pack_any(LocalRateLimit {
            stat_prefix: "http_local_rate_limiter".into(),
            ..Default::default()
        }),
    )
}

fn fault_filter() -> HttpFilter {
    filter(FAULT, pack_any(HttpFault::default()))
}

fn hcm_with(filters: Vec<HttpFilter>) -> HttpConnectionManager {
    HttpConnectionManager {
        http_filters: filters,
        ..hcm_rds("r")
    }
}

fn decode_listener(hcm: HttpConnectionManager) -> Result<XdsListener, InvalidResource> {
    XdsListener::try_from(&http_listener("web", hcm))
}

fn filters_of(l: &XdsListener) -> PolicyFilters {
    match l {
        XdsListener::Http { filters, .. } => *filters,
        other => panic!("an HTTP listener, got {other:?}"),
    }
}

fn hundred(n: u32) -> FractionalPercent {
    FractionalPercent {
        numerator: n,
        denominator: DenominatorType::Hundred as i32,
    }
}

fn runtime(n: u32) -> Option<RuntimeFractionalPercent> {
    Some(RuntimeFractionalPercent {
        default_value: Some(hundred(n)),
        runtime_key: "local_rate_limit_enabled".into(),
    })
}

/// What Envoy's documentation shows for a per-route limit: a bucket, enabled and enforced.
fn limit(max_tokens: u32, tokens_per_fill: u32, seconds: i64, nanos: i32) -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: "route_limit".into(),
        token_bucket: Some(TokenBucket {
            max_tokens,
            tokens_per_fill: Some(UInt32Value {
                value: tokens_per_fill,
            }),
            fill_interval: Some(pbuf::Duration { seconds, nanos }),
        }),
        filter_enabled: runtime(100),
        filter_enforced: runtime(100),
        ..Default::default()
    }
}

fn abort(status: u32, percentage: FractionalPercent) -> HttpFault {
    HttpFault {
        abort: Some(FaultAbort {
            percentage: Some(percentage),
            error_type: Some(fault_abort::ErrorType::HttpStatus(status)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_config(mut r: Route, name: &str, config: Any) -> Route {
    r.typed_per_filter_config.insert(name.into(), config);
    r
}

fn decode_route(r: Route) -> Result<RawRoute, InvalidResource> {
    XdsRoutes::try_from(&route_config("rc", vec![vhost("all", &["*"], vec![r])]))
        .map(|mut rc| rc.routes.remove(0))
}

fn rate_limit_of(r: Route) -> Option<RawRateLimit> {
    decode_route(r).unwrap().rate_limit
}

fn fault_of(f: HttpFault) -> Result<Option<RawFault>, InvalidResource> {
    decode_route(with_config(route_to("/", "api"), FAULT, pack_any(f))).map(|r| r.fault)
}

const ROUTE: &str = "virtual_hosts[0].routes[0]";

#[test]
fn policy_filters_come_in_either_order_before_the_router() {
    for filters in [
        vec![rl_filter(), fault_filter(), router()],
        vec![fault_filter(), rl_filter(), router()],
    ] {
        let l = decode_listener(hcm_with(filters)).unwrap();
        assert_eq!(
            filters_of(&l),
            PolicyFilters {
                rate_limit: true,
                fault: true
            }
        );
    }
    // The connection manager Tern's control plane sent before, and Envoy's minimal one.
    let l = decode_listener(hcm_with(vec![router()])).unwrap();
    assert_eq!(filters_of(&l), PolicyFilters::default());
    let l = decode_listener(hcm_with(vec![fault_filter(), router()])).unwrap();
    assert_eq!(
        filters_of(&l),
        PolicyFilters {
            rate_limit: false,
            fault: true
        }
    );
    // Known by type whatever their names, as Envoy does.
    let mut renamed = rl_filter();
    renamed.name = "limits".into();
    let l = decode_listener(hcm_with(vec![renamed, router()])).unwrap();
    assert!(filters_of(&l).rate_limit);
}

#[test]
fn the_router_must_be_last_and_each_policy_filter_once() {
    let e = refused(decode_listener(hcm_with(vec![router(), rl_filter()])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    assert!(e.reason.contains("router must be the last"), "{e}");
    let e = refused(decode_listener(hcm_with(vec![router(), fault_filter()])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    let e = refused(decode_listener(hcm_with(vec![fault_filter()])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    assert!(e.reason.contains("last"), "{e}");
    let e = refused(decode_listener(hcm_with(vec![
        rl_filter(),
        rl_filter(),
        router(),
    ])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[1]");
    assert!(e.reason.contains("second"), "{e}");
}

#[test]
fn other_filters_and_discovered_configs_are_refused_with_the_filter_named() {
    let cors = filter(
        "envoy.filters.http.cors",
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(),
            value: Vec::new(),
        },
    );
    let e = refused(decode_listener(hcm_with(vec![
        rl_filter(),
        cors.clone(),
        router(),
    ])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[1]");
    assert!(e.reason.contains("envoy.filters.http.cors"), "{e}");
    let optional = HttpFilter {
        is_optional: true,
        ..cors
    };
    assert!(decode_listener(hcm_with(vec![rl_filter(), optional, router()])).is_ok());

    let ecds = HttpFilter {
        name: RL.into(),
        config_type: Some(http_filter::ConfigType::ConfigDiscovery(
            ExtensionConfigSource::default(),
        )),
        ..Default::default()
    };
    let e = refused(decode_listener(hcm_with(vec![ecds, router()])));
    assert_eq!(
        e.field,
        "filter_chains[0].filters[0].http_filters[0].config_discovery"
    );
}

#[test]
fn listener_wide_buckets_and_faults_are_refused() {
    let e = refused(decode_listener(hcm_with(vec![
        filter(RL, pack_any(limit(10, 10, 1, 0))),
        router(),
    ])));
    assert_eq!(
        e.field,
        "filter_chains[0].filters[0].http_filters[0].token_bucket"
    );
    // A bucket that is not enabled limits nothing.
    let mut off = limit(10, 10, 1, 0);
    off.filter_enabled = None;
    assert!(decode_listener(hcm_with(vec![filter(RL, pack_any(off)), router()])).is_ok());
    let e = refused(decode_listener(hcm_with(vec![
        filter(FAULT, pack_any(abort(503, hundred(10)))),
        router(),
    ])));
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    assert!(e.reason.contains("per route"), "{e}");
}

#[test]
fn a_route_bucket_becomes_a_rate_and_a_burst_with_the_key_from_tern_metadata() {
    let r = with_config(route_to("/", "api"), RL, pack_any(limit(20, 10, 1, 0)));
    assert_eq!(
        rate_limit_of(r.clone()),
        Some(RawRateLimit {
            requests_per_second: 10.0,
            burst: Some(20),
            // Envoy keeps one bucket per route.
            key: Some("none".into()),
        })
    );
    let mut keyed = r.clone();
    keyed.metadata = Some(tern_metadata(&[("rate_limit_key", "header:x-user")]));
    assert_eq!(
        rate_limit_of(keyed).unwrap().key.as_deref(),
        Some("header:x-user")
    );
    let mut bad = r;
    bad.metadata = Some(tern_metadata(&[("rate_limit_key", "cookie:session")]));
    let e = refused(decode_route(bad));
    assert_eq!(
        e.field,
        format!("{ROUTE}.metadata.filter_metadata.tern.rate_limit_key")
    );
}

#[test]
fn fractional_rates_survive_nanosecond_intervals() {
    let rate = |tokens, seconds, nanos| {
        rate_limit_of(with_config(
            route_to("/", "api"),
            RL,
            pack_any(limit(1, tokens, seconds, nanos)),
        ))
        .unwrap()
        .requests_per_second
    };
    assert_eq!(rate(1, 0, 400_000_000), 2.5);
    assert_eq!(rate(1, 2, 0), 0.5);
    assert_eq!(rate(50, 0, 50_000_000), 1000.0);
    // 1 / 12.345 s, rounded to the nanosecond by whoever wrote it.
    assert_eq!(rate(1, 0, 81_004_455), 12.345);
    assert_eq!(rate(1, 3, 0), 0.3333333);
}

#[test]
fn buckets_tern_cannot_run_are_refused_with_the_field_named() {
    let at = format!("{ROUTE}.typed_per_filter_config[{RL}]");
    let cases: Vec<(&str, LocalRateLimit)> = vec![
        ("token_bucket.fill_interval", limit(5, 1, 0, 0)),
        ("token_bucket.max_tokens", limit(0, 1, 1, 0)),
        ("token_bucket.tokens_per_fill", limit(5, 0, 1, 0)),
        (
            "filter_enabled",
            LocalRateLimit {
                filter_enabled: runtime(50),
                ..limit(5, 1, 1, 0)
            },
        ),
        (
            "status",
            LocalRateLimit {
                status: Some(HttpStatus { code: 503 }),
                ..limit(5, 1, 1, 0)
            },
        ),
        (
            "local_rate_limit_per_downstream_connection",
            LocalRateLimit {
                local_rate_limit_per_downstream_connection: true,
                ..limit(5, 1, 1, 0)
            },
        ),
        (
            "descriptors",
            LocalRateLimit {
                descriptors: vec![Default::default()],
                ..limit(5, 1, 1, 0)
            },
        ),
    ];
    for (field, l) in cases {
        let e = refused(decode_route(with_config(
            route_to("/", "api"),
            RL,
            pack_any(l),
        )));
        assert_eq!(e.field, format!("{at}.{field}"), "{e}");
    }
}

#[test]
fn a_bucket_that_is_not_enabled_or_not_enforced_limits_nothing() {
    let mut shadow = limit(5, 1, 1, 0);
    shadow.filter_enforced = None;
    assert_eq!(
        rate_limit_of(with_config(route_to("/", "api"), RL, pack_any(shadow))),
        None
    );
    let no_bucket = LocalRateLimit {
        stat_prefix: "x".into(),
        ..Default::default()
    };
    assert_eq!(
        rate_limit_of(with_config(route_to("/", "api"), RL, pack_any(no_bucket))),
        None
    );
}

#[test]
fn a_virtual_host_config_applies_to_routes_without_their_own() {
    let mut vh = vhost(
        "all",
        &["*"],
        vec![
            route_to("/own", "api"),
            with_config(
                route_to("/", "api"),
                FAULT,
                pack_any(abort(500, hundred(100))),
            ),
        ],
    );
    vh.routes[0]
        .typed_per_filter_config
        .insert(RL.into(), pack_any(limit(3, 1, 1, 0)));
    vh.typed_per_filter_config
        .insert(RL.into(), pack_any(limit(9, 9, 1, 0)));
    vh.typed_per_filter_config
        .insert(FAULT.into(), pack_any(abort(503, hundred(50))));
    let routes = XdsRoutes::try_from(&route_config("rc", vec![vh.clone()]))
        .unwrap()
        .routes;
    assert_eq!(routes[0].rate_limit.as_ref().unwrap().burst, Some(3));
    assert_eq!(
        routes[0]
            .fault
            .as_ref()
            .unwrap()
            .abort
            .as_ref()
            .unwrap()
            .status,
        503
    );
    assert_eq!(routes[1].rate_limit.as_ref().unwrap().burst, Some(9));
    assert_eq!(
        routes[1]
            .fault
            .as_ref()
            .unwrap()
            .abort
            .as_ref()
            .unwrap()
            .status,
        500
    );

    // A route turns an inherited filter off with a disabled FilterConfig.
    let off = FilterConfig {
        disabled: true,
        ..Default::default()
    };
    vh.routes[1]
        .typed_per_filter_config
        .insert(RL.into(), pack_any(off));
    let routes = XdsRoutes::try_from(&route_config("rc", vec![vh]))
        .unwrap()
        .routes;
    assert_eq!(routes[1].rate_limit, None);
}

#[test]
fn a_virtual_host_bucket_shared_by_several_routes_is_refused() {
    // Envoy makes one bucket of the virtual host's config for all its routes; Tern's are per
    // route, so two inheriting routes would get twice the requests through.
    let mut vh = vhost(
        "all",
        &["*"],
        vec![route_to("/a", "api"), route_to("/", "api")],
    );
    vh.typed_per_filter_config
        .insert(RL.into(), pack_any(limit(9, 9, 1, 0)));
    let e = refused(XdsRoutes::try_from(&route_config("rc", vec![vh])));
    assert_eq!(
        e.field,
        format!("virtual_hosts[0].typed_per_filter_config[{RL}]")
    );
    assert!(e.reason.contains("shared by 2 routes"), "{e}");
}

#[test]
fn a_filter_config_wrapper_is_unwrapped_and_disabled_means_none() {
    let wrapped = FilterConfig {
        config: Some(pack_any(abort(502, hundred(100)))),
        ..Default::default()
    };
    let r = decode_route(with_config(route_to("/", "api"), FAULT, pack_any(wrapped))).unwrap();
    assert_eq!(r.fault.unwrap().abort.unwrap().status, 502);
    let disabled = FilterConfig {
        config: Some(pack_any(abort(502, hundred(100)))),
        disabled: true,
        ..Default::default()
    };
    let r = decode_route(with_config(route_to("/", "api"), FAULT, pack_any(disabled))).unwrap();
    assert_eq!(r.fault, None);
}

#[test]
fn faults_take_any_denominator_a_fixed_delay_and_a_presence_condition() {
    let of = |numerator, denominator: DenominatorType| {
        fault_of(abort(
            503,
            FractionalPercent {
                numerator,
                denominator: denominator as i32,
            },
        ))
        .unwrap()
        .unwrap()
        .abort
        .unwrap()
        .percent
    };
    assert_eq!(of(5, DenominatorType::Hundred), 5.0);
    assert_eq!(of(2550, DenominatorType::TenThousand), 25.5);
    assert_eq!(of(5000, DenominatorType::Million), 0.5);
    assert_eq!(of(123_456, DenominatorType::Million), 12.3456);

    let f = HttpFault {
        delay: Some(FaultDelay {
            percentage: Some(hundred(100)),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(
                pbuf::Duration {
                    seconds: 0,
                    nanos: 150_000_000,
                },
            )),
        }),
        headers: vec![HeaderMatcher {
            name: "X-Chaos".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
            ..Default::default()
        }],
        ..abort(418, hundred(1))
    };
    assert_eq!(
        fault_of(f).unwrap(),
        Some(RawFault {
            delay: Some(RawFaultDelay {
                percent: 100.0,
                duration: "150ms".into()
            }),
            abort: Some(RawFaultAbort {
                percent: 1.0,
                status: 418
            }),
            header: Some("x-chaos".into()),
        })
    );
    // Neither delay nor abort: nothing to inject.
    assert_eq!(fault_of(HttpFault::default()).unwrap(), None);
}

#[test]
fn faults_tern_cannot_inject_are_refused_with_the_field_named() {
    let at = format!("{ROUTE}.typed_per_filter_config[{FAULT}]");
    let with_error = |e| HttpFault {
        abort: Some(FaultAbort {
            percentage: Some(hundred(10)),
            error_type: Some(e),
            ..Default::default()
        }),
        ..Default::default()
    };
    let presence = |name: &str| HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
        ..Default::default()
    };
    let cases: Vec<(&str, HttpFault)> = vec![
        (
            "abort.header_abort",
            with_error(fault_abort::ErrorType::HeaderAbort(Default::default())),
        ),
        (
            "abort.grpc_status",
            with_error(fault_abort::ErrorType::GrpcStatus(14)),
        ),
        (
            "abort.http_status",
            with_error(fault_abort::ErrorType::HttpStatus(99)),
        ),
        ("abort.percentage", abort(503, hundred(150))),
        (
            "delay.header_delay",
            HttpFault {
                delay: Some(FaultDelay {
                    percentage: Some(hundred(10)),
                    fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::HeaderDelay(
                        Default::default(),
                    )),
                }),
                ..Default::default()
            },
        ),
        (
            "headers",
            HttpFault {
                headers: vec![presence("a"), presence("b")],
                ..abort(503, hundred(10))
            },
        ),
        (
            "headers[0]",
            HttpFault {
                headers: vec![HeaderMatcher {
                    name: "x".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact("1".into())),
                            ignore_case: false,
                        }),
                    ),
                    ..Default::default()
                }],
                ..abort(503, hundred(10))
            },
        ),
        (
            "max_active_faults",
            HttpFault {
                max_active_faults: Some(UInt32Value { value: 3 }),
                ..abort(503, hundred(10))
            },
        ),
        (
            "upstream_cluster",
            HttpFault {
                upstream_cluster: "api".into(),
                ..abort(503, hundred(10))
            },
        ),
    ];
    for (field, f) in cases {
        let e = refused(fault_of(f));
        assert_eq!(e.field, format!("{at}.{field}"), "{e}");
    }
}

pub(super) fn state_of(
    listeners: Vec<(&str, HttpConnectionManager)>,
    rc: RouteConfiguration,
) -> XdsState {
    let mut state = XdsState::default();
    for (i, (name, hcm)) in listeners.into_iter().enumerate() {
        let mut l = http_listener(name, hcm);
        l.address = Some(socket("127.0.0.1", 8080 + i as u32));
        state
            .listeners
            .insert(name.into(), XdsListener::try_from(&l).unwrap());
    }
    state
        .routes
        .insert(rc.name.clone(), XdsRoutes::try_from(&rc).unwrap());
    let c = eds_cluster("api");
    state
        .clusters
        .insert("api".into(), XdsCluster::try_from(&c).unwrap());
    state.endpoints.insert(
        "api".into(),
        XdsEndpoints::try_from(&cla(
            "api",
            vec![locality(0, vec![lb_endpoint("10.0.0.1", 80)])],
        ))
        .unwrap(),
    );
    state
}

#[test]
fn route_policy_applies_only_where_the_connection_manager_runs_the_filter() {
    let route = with_config(
        with_config(route_to("/", "api"), RL, pack_any(limit(2, 1, 1, 0))),
        FAULT,
        pack_any(abort(503, hundred(100))),
    );
    let rc = route_config("r", vec![vhost("all", &["*"], vec![route])]);
    let policy = |hcm| {
        let Assembly::Ready(raw) = state_of(vec![("web", hcm)], rc.clone()).assemble() else {
            panic!("ready")
        };
        let r = raw.listeners[0].routes[0].clone();
        (r.rate_limit.is_some(), r.fault.is_some())
    };
    assert_eq!(
        policy(hcm_with(vec![rl_filter(), fault_filter(), router()])),
        (true, true)
    );
    assert_eq!(
        policy(hcm_with(vec![fault_filter(), router()])),
        (false, true)
    );
    assert_eq!(policy(hcm_with(vec![router()])), (false, false));
}
