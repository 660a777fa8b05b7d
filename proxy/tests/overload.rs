//! Overload as a process sees it: a flood of idle and slow connections against a listener's
//! `max_connections` keeps RSS bounded and leaves room for well-behaved clients; the memory
//! guard sheds new requests (503, `x-tern-overloaded`) and connections over `memory_limit`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FLOOD: usize = 3000;
const MAX_CONNECTIONS: usize = 500;
/// Held flood connections are dropped after this; long enough for the flood to be opened.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Allowed RSS growth while the flood is held. What the proxy keeps per admitted connection
/// is a task, a socket registration and, for the half that sent a partial head, hyper's read
/// buffer (8 KiB, grown to hold the 1 KiB partial header): about 12 KiB each, 500 x 12 KiB =
/// 6 MiB, doubled for allocator slack. The 2,500 refused connections must add nothing
/// lasting. Without the cap the same flood holds 3,000 connections: about 36 MiB, over.
const RSS_BUDGET: u64 = 12 << 20;

fn config(listen: SocketAddr, upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"{extra}
listeners:
  - name: web
    address: "{listen}"
    protocol: http
    max_connections: {MAX_CONNECTIONS}
    request_header_timeout: {}s
    routes:
      - backends: [ {{ service: api }} ]
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{upstream}" }} ]
"#,
        HEADER_TIMEOUT.as_secs()
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn start(dir: &TempDir, up: &Upstream, extra: &str) -> (ProxyProcess, SocketAddr) {
    let (listen, admin) = (local(free_port()), local(free_port()));
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, config(listen, up.addr, extra)).unwrap();
    let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    proxy.wait_ready().await;
    (proxy, listen)
}

/// Opens `n` connections, 100 at a time; odd ones send half a request head and stall.
async fn flood(listen: SocketAddr, n: usize) -> Vec<TcpStream> {
    let partial = format!(
        "GET / HTTP/1.1\r\nHost: flood\r\nX-Pad: {}",
        "a".repeat(1024)
    );
    let mut held = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(100) {
        let opened = (0..100.min(n - batch * 100)).map(|i| {
            let partial = partial.clone();
            async move {
                let mut s =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(listen))
                        .await
                        .expect("connect timed out")
                        .expect("connect failed");
                if i % 2 == 1 {
                    // A refused connection may be closed already; that is fine.
                    let _ = s.write_all(partial.as_bytes()).await;
                }
                s
            }
        });
        held.extend(futures_util::future::join_all(opened).await);
    }
    held
}

/// Whether the proxy has closed `stream` (EOF or reset) within `wait`.
async fn closed_by_peer(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An error page for the stalled head (hyper may answer 408): keep reading to EOF.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_connection_flood_keeps_rss_bounded_and_well_behaved_clients_served() {
    let dir = TempDir::new("flood");
    let up = Upstream::start("a").await;
    let (proxy, listen) = start(&dir, &up, "").await;

    // Warm up: the runtime, the pools and the allocator reach their working size first.
    let client = http1_client();
    for _ in 0..100 {
        assert_eq!(
            get(&client, listen, "x", "/", &[]).await.status,
            StatusCode::OK
        );
    }
    drop(client);
    let mut keep = http1_connect(listen).await;
    assert_eq!(get_on(&mut keep, "/").await.status, StatusCode::OK);
    let rss_before = proxy.rss();

    let started = Instant::now();
    let mut held = flood(listen, FLOOD).await;
    let flooded_in = started.elapsed();
    assert!(
        flooded_in < HEADER_TIMEOUT,
        "the flood took {flooded_in:?}; the proxy may have dropped some already"
    );
    // Let the proxy accept and refuse the whole backlog before measuring.
    let overflow_series = "tern_listener_overflow_total{listener=\"web\"}";
    let expected_overflow = (FLOOD - (MAX_CONNECTIONS - 1)) as f64;
    for _ in 0..100 {
        if proxy.metric(overflow_series).await >= expected_overflow {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_flooded = proxy.rss();
    let overflow = proxy.metric(overflow_series).await;
    let growth = rss_flooded.saturating_sub(rss_before);
    eprintln!(
        "flood of {FLOOD} opened in {flooded_in:?}; RSS {} KiB -> {} KiB (+{} KiB); overflow {overflow}",
        rss_before >> 10,
        rss_flooded >> 10,
        growth >> 10
    );
    // Every connection past the cap (one slot is `keep`'s) was refused at once. A few more
    // when a warm-up connection's close had not reached the proxy yet.
    assert!(
        (expected_overflow..=expected_overflow + 5.0).contains(&overflow),
        "overflow {overflow}, expected {expected_overflow}: {}",
        proxy.log()
    );
    assert!(
        growth < RSS_BUDGET,
        "RSS grew by {} KiB under the flood (budget {} KiB)",
        growth >> 10,
        RSS_BUDGET >> 10
    );

    // The client that was already connected is served during the flood.
    assert_eq!(get_on(&mut keep, "/").await.status, StatusCode::OK);
    let served_at = Instant::now();

    // The proxy drops what it held once the header timeout passes (the silent half never sent
    // a byte: hyper alone would wait for it forever) ...
    let (silent, stalled) = held.split_at_mut(FLOOD / 2);
    let margin = HEADER_TIMEOUT + Duration::from_secs(3);
    for (which, streams) in [("silent", silent), ("stalled", stalled)] {
        for s in streams.iter_mut().step_by(50) {
            assert!(
                closed_by_peer(s, margin).await,
                "a {which} flood connection is still open"
            );
        }
    }
    // ... and so does an idle keep-alive connection (hyper's header timeout between requests).
    let deadline = served_at + margin;
    while !keep.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the idle keep-alive connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_for = served_at.elapsed();
    assert!(
        idle_for >= HEADER_TIMEOUT - Duration::from_millis(100),
        "closed after {idle_for:?} idle, before the header timeout"
    );
    drop(held);

    // With the flood gone, new clients are served again.
    let client = http1_client();
    for _ in 0..3 {
        assert_eq!(
            get(&client, listen, "x", "/", &[]).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn the_memory_guard_sheds_work_over_the_limit_and_serves_under_it() {
    let dir = TempDir::new("memguard");
    let up = Upstream::start("a").await;
    let (proxy, listen) = start(&dir, &up, "memory_limit: 1GiB").await;
    let path = dir.0.join("c.yaml");

    let mut keep = http1_connect(listen).await;
    assert_eq!(get_on(&mut keep, "/").await.status, StatusCode::OK);
    assert_eq!(proxy.metric("tern_memory_overloaded").await, 0.0);

    // A limit below what the process already uses: new work is shed.
    std::fs::write(&path, config(listen, up.addr, "memory_limit: 1MiB")).unwrap();
    proxy.wait_for_version(2).await;
    let shed = get_on(&mut keep, "/").await;
    assert_eq!(
        shed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        shed.body
    );
    assert_eq!(shed.header("x-tern-overloaded"), "true");
    assert!(shed.body.contains("memory limit"), "{}", shed.body);
    let hits = up.hits();
    let fresh = raw_exchange(
        listen,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(fresh, "", "a new connection is closed without an answer");
    assert_eq!(up.hits(), hits, "nothing shed reached the upstream");
    assert_eq!(proxy.metric("tern_memory_overloaded").await, 1.0);
    assert_eq!(
        proxy
            .metric("tern_memory_shed_total{listener=\"web\",kind=\"request\"}")
            .await,
        1.0
    );
    assert!(
        proxy
            .metric("tern_memory_shed_total{listener=\"web\",kind=\"connection\"}")
            .await
            >= 1.0
    );
    assert!(
        proxy.log().contains("over 90% of memory_limit"),
        "{}",
        proxy.log()
    );
    // The admin server is not shed: orchestrators still see the proxy.
    assert_eq!(proxy.admin_get("/ready").await.status, StatusCode::OK);

    // A generous limit again: served.
    std::fs::write(&path, config(listen, up.addr, "memory_limit: 1GiB")).unwrap();
    proxy.wait_for_version(3).await;
    assert_eq!(get_on(&mut keep, "/").await.status, StatusCode::OK);
    assert_eq!(
        get(&http1_client(), listen, "x", "/", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(proxy.metric("tern_memory_overloaded").await, 0.0);
}
