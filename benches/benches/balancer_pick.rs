//! One balancer decision (`Balancer::pick`) over 3, 10 and 100 endpoints, per algorithm.
//!
//! Endpoints carry uneven weights, in-flight counts and latency estimates, so the
//! power-of-two-choices comparisons do real work; none has failed recently.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tern_proxy::balance::{Balancer, Candidate, InFlight, Load};
use tern_proxy::config::LoadBalancerKind;
use tokio::time::Instant;

struct BenchEndpoint {
    weight: u32,
    load: Arc<Load>,
}

impl Candidate for BenchEndpoint {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn load(&self) -> &Load {
        &self.load
    }
}

/// `n` endpoints with weights 1..=3, 0..=4 requests in flight and EWMAs of 1..=7 ms.
/// The returned guards keep the in-flight counts up.
fn endpoints(n: usize) -> (Vec<BenchEndpoint>, Vec<InFlight>) {
    let now = Instant::now();
    let mut guards = Vec::new();
    let list = (0..n)
        .map(|i| {
            let load = Arc::new(Load::new(now));
            load.observe(Duration::from_millis(1 + (i as u64 * 3) % 7), now);
            for _ in 0..(i % 5) {
                guards.push(load.start());
            }
            BenchEndpoint {
                weight: 1 + (i as u32 % 3),
                load,
            }
        })
        .collect();
    (list, guards)
}

fn bench_pick(c: &mut Criterion) {
    let kinds = [
        LoadBalancerKind::RoundRobin,
        LoadBalancerKind::LeastRequest,
        LoadBalancerKind::PeakEwma,
    ];
    let mut group = c.benchmark_group("balancer_pick");
    for kind in kinds {
        for n in [3usize, 10, 100] {
            let (list, _guards) = endpoints(n);
            let balancer = Balancer::new(kind, &list);
            let mut rng = fastrand::Rng::with_seed(7);
            assert!(balancer.pick(&list, &mut rng, Instant::now()).is_some());
            // The request path passes the instant it already took; keep clock reads out.
            let now = Instant::now();
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &list, |b, list| {
                b.iter(|| {
                    balancer
                        .pick(black_box(list), &mut rng, black_box(now))
                        .expect("non-empty list")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pick);
criterion_main!(benches);
