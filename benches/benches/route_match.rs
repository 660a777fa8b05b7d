//! Route matching over a listener's routes, as the request path runs it (`route::find`).
//!
//! Ten routes that all need host + path prefix + header; requests that match the first,
//! match the tenth (after nine prefix misses), or match none (the tenth fails on its header).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http::request::Parts;
use prometheus_client::registry::Registry;
use tern_proxy::config::parse_yaml;
use tern_proxy::http::route;
use tern_proxy::metrics::Metrics;
use tern_proxy::snapshot::{ListenerRtKind, Snapshot};

const ROUTES: usize = 10;

fn config_yaml() -> String {
    let mut yaml = String::from(
        "listeners:\n  - name: bench\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n",
    );
    for i in 1..=ROUTES {
        yaml.push_str(&format!(
            "      - match:\n          host: api.example.com\n          path_prefix: /svc{i}/\n          headers: {{ x-tenant: tenant-{i} }}\n        backends: [ {{ service: svc{i} }} ]\n"
        ));
    }
    yaml.push_str("services:\n");
    for i in 1..=ROUTES {
        yaml.push_str(&format!(
            "  - name: svc{i}\n    protocol: http1\n    endpoints: [ {{ address: 127.0.0.1:{} }} ]\n",
            20000 + i
        ));
    }
    yaml
}

fn request(path: &str, tenant: &str) -> Parts {
    Request::builder()
        .uri(path)
        .header("host", "API.example.com:8080")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .header("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736")
        .header("x-tenant", tenant)
        .body(())
        .expect("valid request")
        .into_parts()
        .0
}

fn bench_route_match(c: &mut Criterion) {
    let config = parse_yaml(&config_yaml()).expect("bench config is valid");
    let metrics = Metrics::new(&mut Registry::default());
    let snapshot = Snapshot::build(
        Arc::new(config),
        "bench".into(),
        &Snapshot::empty(),
        &metrics,
        None,
    );
    let listener = snapshot.listeners.get("bench").expect("listener bench");
    let ListenerRtKind::Http { routes } = &listener.kind else {
        panic!("bench listener is http");
    };
    assert_eq!(routes.len(), ROUTES);

    let first = request("/svc1/orders?id=7", "tenant-1");
    let tenth = request("/svc10/orders?id=7", "tenant-10");
    let none = request("/svc10/orders?id=7", "tenant-99");
    // The scenarios are what they claim to be.
    let index = |p: &Parts| {
        route::find(routes, p).map(|r| routes.iter().position(|x| std::ptr::eq(x, r)).unwrap())
    };
    assert_eq!(index(&first), Some(0));
    assert_eq!(index(&tenth), Some(ROUTES - 1));
    assert_eq!(index(&none), None);

    let mut group = c.benchmark_group("route_find_10_routes");
    for (name, parts) in [
        ("first_matches", &first),
        ("tenth_matches", &tenth),
        ("no_match", &none),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| route::find(black_box(routes), black_box(parts)).is_some())
        });
    }
    group.finish();

    // The single predicate, without the host extraction and the scan.
    let matcher = &routes[ROUTES - 1].config.matcher;
    let host = route::request_host(&tenth);
    c.bench_function("route_matches_one/host_prefix_header", |b| {
        b.iter(|| {
            route::matches(
                black_box(matcher),
                black_box(host),
                black_box(tenth.uri.path()),
                black_box(&tenth.headers),
            )
        })
    });
}

criterion_group!(benches, bench_route_match);
criterion_main!(benches);
