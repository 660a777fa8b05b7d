use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;

struct Ep {
    weight: u32,
    load: Arc<Load>,
}

impl Candidate for Ep {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn load(&self) -> &Load {
        &self.load
    }
}

fn endpoints(weights: &[u32]) -> Vec<Ep> {
    let now = Instant::now();
    weights
        .iter()
        .map(|&weight| Ep {
            weight,
            load: Arc::new(Load::new(now)),
        })
        .collect()
}

fn counts(picks: impl Iterator<Item = usize>) -> HashMap<usize, usize> {
    let mut map = HashMap::new();
    for p in picks {
        *map.entry(p).or_default() += 1;
    }
    map
}

#[tokio::test(start_paused = true)]
async fn round_robin_follows_weights_smoothly() {
    let eps = endpoints(&[1, 1, 2]);
    let lb = Balancer::new(LoadBalancerKind::RoundRobin, &eps);
    let mut rng = Rng::with_seed(1);
    let now = Instant::now();
    let picks: Vec<usize> = (0..400)
        .map(|_| lb.pick(&eps, &mut rng, now).unwrap())
        .collect();
    let c = counts(picks.iter().copied());
    assert_eq!((c[&0], c[&1], c[&2]), (100, 100, 200));
    // Smooth: never more than two picks of the heavy endpoint in a row (nginx's order,
    // 2,0,1,2 repeated), never two of a light one.
    assert!(
        picks
            .windows(3)
            .all(|w| !(w[0] == 2 && w[1] == 2 && w[2] == 2))
    );
    assert!(picks.windows(2).all(|w| w[0] == 2 || w[0] != w[1]));
}

#[tokio::test(start_paused = true)]
async fn round_robin_avoids_an_endpoint_that_just_refused() {
    let eps = endpoints(&[1, 1, 1]);
    let lb = Balancer::new(LoadBalancerKind::RoundRobin, &eps);
    let mut rng = Rng::with_seed(1);
    eps[1].load.record_failure(Instant::now());
    let now = Instant::now();
    assert!((0..30).all(|_| lb.pick(&eps, &mut rng, now) != Some(1)));
    // The mark expires: the endpoint is tried again.
    tokio::time::advance(RECENT_FAILURE_WINDOW + Duration::from_millis(1)).await;
    let now = Instant::now();
    assert!((0..30).any(|_| lb.pick(&eps, &mut rng, now) == Some(1)));
}

#[tokio::test(start_paused = true)]
async fn all_failing_still_picks_someone() {
    let eps = endpoints(&[1, 1]);
    let now = Instant::now();
    for e in &eps {
        e.load.record_failure(now);
    }
    let mut rng = Rng::with_seed(7);
    for kind in [
        LoadBalancerKind::RoundRobin,
        LoadBalancerKind::LeastRequest,
        LoadBalancerKind::PeakEwma,
    ] {
        assert!(
            Balancer::new(kind, &eps)
                .pick(&eps, &mut rng, now)
                .is_some(),
            "{kind:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn least_request_prefers_fewer_in_flight() {
    let eps = endpoints(&[1, 1, 1, 1]);
    let lb = Balancer::new(LoadBalancerKind::LeastRequest, &eps);
    let mut rng = Rng::with_seed(42);
    let now = Instant::now();
    // Endpoint 0 is busy with 10 requests; it only wins when drawn against... never.
    let _busy: Vec<_> = (0..10).map(|_| eps[0].load.start()).collect();
    let c = counts((0..1000).map(|_| lb.pick(&eps, &mut rng, now).unwrap()));
    assert_eq!(c.get(&0), None);
    // The others share the traffic roughly evenly.
    for i in 1..4 {
        assert!((250..420).contains(&c[&i]), "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn least_request_in_flight_guard_releases() {
    let eps = endpoints(&[1]);
    let guard = eps[0].load.start();
    assert_eq!(eps[0].load.in_flight(), 1);
    drop(guard);
    assert_eq!(eps[0].load.in_flight(), 0);
}

/// Three endpoints answering in 1 ms, 1 ms and 50 ms, 16 requests in flight at a time:
/// the slow one must get well under 10% of requests.
#[tokio::test(start_paused = true)]
async fn peak_ewma_starves_a_slow_endpoint() {
    let latencies = [
        Duration::from_millis(1),
        Duration::from_millis(1),
        Duration::from_millis(50),
    ];
    let eps = endpoints(&[1, 1, 1]);
    let lb = Balancer::new(LoadBalancerKind::PeakEwma, &eps);
    let mut rng = Rng::with_seed(3);
    let start = Instant::now();
    // (finish time, endpoint, guard) of requests in flight.
    let mut in_flight: Vec<(Instant, usize, InFlight)> = Vec::new();
    let mut picks = [0usize; 3];
    for _ in 0..5000 {
        while in_flight.len() >= 16 {
            let (at, _) = in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, f)| f.0)
                .map(|(i, f)| (f.0, i))
                .unwrap();
            let idx = in_flight.iter().position(|f| f.0 == at).unwrap();
            let (done_at, ep, guard) = in_flight.swap_remove(idx);
            let now = Instant::now();
            if done_at > now {
                tokio::time::advance(done_at - now).await;
            }
            eps[ep].load.observe(latencies[ep], Instant::now());
            drop(guard);
        }
        let now = Instant::now();
        let ep = lb.pick(&eps, &mut rng, now).unwrap();
        picks[ep] += 1;
        in_flight.push((now + latencies[ep], ep, eps[ep].load.start()));
    }
    let share = picks[2] as f64 / 5000.0;
    assert!(
        share < 0.05,
        "slow endpoint got {:.1}% ({picks:?})",
        share * 100.0
    );
    assert!(Instant::now() - start > Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_jumps_to_peaks_and_decays_toward_default() {
    let load = Load::new(Instant::now());
    assert_eq!(load.ewma(Instant::now()), DEFAULT_RTT);
    load.observe(Duration::from_millis(2), Instant::now());
    assert_eq!(load.ewma(Instant::now()), Duration::from_millis(2));
    // A slow answer raises the estimate at once.
    load.observe(Duration::from_millis(80), Instant::now());
    assert_eq!(load.ewma(Instant::now()), Duration::from_millis(80));
    // A fast answer right after moves it down only a little.
    tokio::time::advance(Duration::from_millis(10)).await;
    load.observe(Duration::from_millis(2), Instant::now());
    assert!(load.ewma(Instant::now()) > Duration::from_millis(75));
    // Idle for several time constants: back near the default.
    tokio::time::advance(DECAY_TAU * 5).await;
    let idle = load.ewma(Instant::now());
    assert!(
        idle.abs_diff(DEFAULT_RTT) < Duration::from_millis(1),
        "{idle:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_respects_weights_when_latencies_match() {
    let eps = endpoints(&[1, 3]);
    let lb = Balancer::new(LoadBalancerKind::PeakEwma, &eps);
    let mut rng = Rng::with_seed(9);
    let now = Instant::now();
    let _a = eps[0].load.start();
    let _b = eps[1].load.start();
    // Equal latency and one in flight each: cost 2×rtt vs 2×rtt/3, the heavier wins.
    assert!((0..50).all(|_| lb.pick(&eps, &mut rng, now) == Some(1)));
}

#[test]
fn empty_and_single_lists() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rng = Rng::with_seed(1);
        let none = endpoints(&[]);
        assert_eq!(
            Balancer::new(LoadBalancerKind::PeakEwma, &none).pick(&none, &mut rng, Instant::now()),
            None
        );
        let one = endpoints(&[5]);
        assert_eq!(
            Balancer::new(LoadBalancerKind::RoundRobin, &one).pick(&one, &mut rng, Instant::now()),
            Some(0)
        );
    });
}
