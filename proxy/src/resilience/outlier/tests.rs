use super::*;

fn config() -> OutlierConfig {
    OutlierConfig {
        consecutive_5xx: 5,
        consecutive_gateway_failure: 3,
        consecutive_connect_failure: 2,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(100),
        max_ejection_percent: 50,
    }
}

fn fail(o: &Outlier, obs: Observation, n: usize) -> Option<Duration> {
    let cfg = config();
    let mut last = None;
    for _ in 0..n {
        last = o.observe(&cfg, obs, Instant::now(), 4, || 0);
    }
    last
}

#[tokio::test(start_paused = true)]
async fn each_threshold_ejects() {
    let o = Outlier::default();
    assert_eq!(fail(&o, Observation::Status(500), 4), None);
    assert_eq!(
        fail(&o, Observation::Status(500), 1),
        Some(Duration::from_secs(30))
    );

    let o = Outlier::default();
    assert_eq!(
        fail(&o, Observation::Status(503), 3),
        Some(Duration::from_secs(30))
    );

    let o = Outlier::default();
    assert_eq!(
        fail(&o, Observation::ConnectFailure, 2),
        Some(Duration::from_secs(30))
    );

    let o = Outlier::default();
    assert_eq!(
        fail(&o, Observation::Reset, 3),
        Some(Duration::from_secs(30))
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_count() {
    let o = Outlier::default();
    let cfg = config();
    for _ in 0..10 {
        fail(&o, Observation::Status(500), 4);
        assert_eq!(
            o.observe(&cfg, Observation::Success, Instant::now(), 4, || 0),
            None
        );
    }
    assert_eq!(o.state(Instant::now()), OutlierState::Healthy);
}

#[tokio::test(start_paused = true)]
async fn ejection_ends_on_time_then_probation_reejects_with_longer_time() {
    let cfg = config();
    let group = OutlierGroup::default();
    let o = Outlier::default();
    fail(&o, Observation::Status(503), 3);
    assert!(o.is_ejected(&cfg, &group, Instant::now()));
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(o.is_ejected(&cfg, &group, Instant::now()));
    assert_eq!(
        o.state(Instant::now()),
        OutlierState::Ejected {
            remaining: Duration::from_secs(1)
        }
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!o.is_ejected(&cfg, &group, Instant::now()), "time is up");
    assert_eq!(o.state(Instant::now()), OutlierState::Probation);
    // One failure on probation is enough, and the second ejection lasts twice as long.
    assert_eq!(
        o.observe(&cfg, Observation::Status(503), Instant::now(), 4, || 0),
        Some(Duration::from_secs(60))
    );
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(!o.is_ejected(&cfg, &group, Instant::now()));
    fail(&o, Observation::Status(503), 1);
    assert_eq!(
        o.state(Instant::now()),
        OutlierState::Ejected {
            remaining: Duration::from_secs(90)
        }
    );
    tokio::time::advance(Duration::from_secs(90)).await;
    assert!(!o.is_ejected(&cfg, &group, Instant::now()));
    fail(&o, Observation::Status(503), 1);
    assert_eq!(
        o.state(Instant::now()),
        OutlierState::Ejected {
            remaining: Duration::from_secs(100)
        },
        "capped at max_ejection_time"
    );
    assert_eq!(o.total_ejections(), 4);
}

#[tokio::test(start_paused = true)]
async fn probation_success_returns_to_healthy() {
    let cfg = config();
    let group = OutlierGroup::default();
    let o = Outlier::default();
    fail(&o, Observation::ConnectFailure, 2);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(!o.is_ejected(&cfg, &group, Instant::now()));
    o.observe(&cfg, Observation::Success, Instant::now(), 4, || 0);
    assert_eq!(o.state(Instant::now()), OutlierState::Healthy);
    assert_eq!(
        fail(&o, Observation::ConnectFailure, 1),
        None,
        "a full threshold again"
    );
}

#[tokio::test(start_paused = true)]
async fn ejected_endpoints_come_back_one_per_interval() {
    let cfg = config();
    let group = OutlierGroup::default();
    let a = Outlier::default();
    let b = Outlier::default();
    fail(&a, Observation::ConnectFailure, 2);
    fail(&b, Observation::ConnectFailure, 2);
    tokio::time::advance(Duration::from_secs(30)).await;
    let now = Instant::now();
    assert!(!a.is_ejected(&cfg, &group, now));
    assert!(b.is_ejected(&cfg, &group, now), "b waits for the interval");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(b.is_ejected(&cfg, &group, Instant::now()));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!b.is_ejected(&cfg, &group, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn never_ejects_past_the_percentage_or_the_last_endpoint() {
    let cfg = config();
    let now = Instant::now();
    let o = Outlier::default();
    for _ in 0..2 {
        assert_eq!(
            o.observe(&cfg, Observation::ConnectFailure, now, 4, || 2),
            None,
            "2 of 4 is 50%"
        );
    }
    let o = Outlier::default();
    for _ in 0..2 {
        assert_eq!(
            o.observe(&cfg, Observation::ConnectFailure, now, 1, || 0),
            None,
            "the only endpoint"
        );
    }
    let o = Outlier::default();
    o.observe(&cfg, Observation::ConnectFailure, now, 3, || 0);
    assert!(
        o.observe(&cfg, Observation::ConnectFailure, now, 3, || 0)
            .is_some(),
        "1 of 3 is allowed"
    );
}
