//! The proxy as a process: bad config exits 2 before binding, admin endpoints, reload on file
//! change and SIGHUP under load with no failed request, invalid reloads rejected, `wait-ready`,
//! and the two ways to stop it (SIGTERM, `POST /shutdown`), both draining in-flight work.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;

fn config(listen: SocketAddr, endpoints: &[(SocketAddr, u32)], lb: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(a, w)| format!("      - {{ address: \"{a}\", weight: {w} }}\n"))
        .collect();
    format!(
        r#"drain_timeout: 5s
listeners:
  - name: web
    address: "{listen}"
    protocol: http
    routes:
      - backends: [ {{ service: api }} ]
services:
  - name: api
    protocol: http1
    load_balancer: {lb}
    endpoints:
{eps}"#
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn bad_config_exits_2_naming_the_field_before_binding() {
    let dir = TempDir::new("badcfg");
    let port = free_port();
    let path = dir.0.join("bad.yaml");
    let yaml = config(local(port), &[(local(1), 1)], "round_robin")
        .replace("load_balancer:", "load_balancr:");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("services[0]") && stderr.contains("load_balancr"),
        "{stderr}"
    );
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind(local(port)).expect("port must still be free");

    let unknown = config(local(port), &[(local(1), 1)], "round_robin")
        .replace("service: api }", "service: nope }");
    std::fs::write(&path, unknown).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("listeners[0].routes[0].backends[0].service: unknown service \"nope\"")
    );
}

#[tokio::test]
async fn admin_serves_ready_metrics_config_dump_and_endpoints() {
    let dir = TempDir::new("admin");
    let up = Upstream::start("a").await;
    let (listen, admin) = (local(free_port()), local(free_port()));
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, config(listen, &[(up.addr, 3)], "peak_ewma")).unwrap();
    let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    proxy.wait_ready().await;
    let client = http1_client();
    for _ in 0..5 {
        assert_eq!(
            get(&client, listen, "x", "/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(proxy.admin_get("/live").await.status, StatusCode::OK);
    let metrics = proxy.admin_get("/metrics").await.body;
    for needle in [
        "tern_requests_total{listener=\"web\",status_class=\"2xx\"} 5",
        &format!(
            "tern_upstream_requests_total{{service=\"api\",endpoint=\"{}\",status_class=\"2xx\"}} 5",
            up.addr
        ),
        "tern_request_duration_seconds_bucket{le=",
        "tern_upstream_in_flight{service=\"api\"",
        "tern_config_reloads_total",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let dump: serde_json::Value =
        serde_json::from_str(&proxy.admin_get("/config_dump").await.body).unwrap();
    assert_eq!(dump["config"]["services"][0]["load_balancer"], "peak_ewma");
    assert_eq!(dump["version"], 1);
    let eps: serde_json::Value =
        serde_json::from_str(&proxy.admin_get("/endpoints").await.body).unwrap();
    let ep = &eps["services"][0]["endpoints"][0];
    assert_eq!(ep["weight"], 3);
    assert_eq!(ep["in_flight"], 0);
    assert!(ep["ewma_ms"].as_f64().unwrap() > 0.0);
}

/// Clients keep sending while the file changes (re-weighting, adding and removing
/// endpoints, then SIGHUP): not one request may fail.
#[tokio::test]
async fn reload_under_load_fails_no_request_and_rejects_invalid_files() {
    let dir = TempDir::new("reload");
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let (listen, admin) = (local(free_port()), local(free_port()));
    let path = dir.0.join("c.yaml");
    std::fs::write(
        &path,
        config(listen, &[(a.addr, 1), (b.addr, 1)], "round_robin"),
    )
    .unwrap();
    let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    proxy.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = http1_client();
            // Bounded in count and time.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    get(&client, listen, "x", "/", &[("x-delay-ms", "2")]).await
                })
                .await;
                match r {
                    Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let steps: [&[(SocketAddr, u32)]; 4] = [
        &[(a.addr, 5), (b.addr, 1)],
        &[(a.addr, 1), (b.addr, 1), (c.addr, 2)],
        &[(c.addr, 1)],
        &[(b.addr, 1), (c.addr, 1)],
    ];
    for (i, eps) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(&path, config(listen, eps, "least_request")).unwrap();
        proxy.wait_for_version(i as u64 + 2).await;
    }
    let c_before = c.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.hits() > c_before, "the last config routes to c");

    // An invalid edit is rejected; the running config keeps serving.
    std::fs::write(&path, "listeners: [ { name: web, address: nope } ]").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dump: serde_json::Value =
        serde_json::from_str(&proxy.admin_get("/config_dump").await.body).unwrap();
    assert_eq!(dump["version"], 5, "the invalid file was not applied");
    assert!(
        proxy
            .admin_get("/metrics")
            .await
            .body
            .contains("tern_config_reloads_total{result=\"failed\"} 1")
    );
    assert!(proxy.log().contains("config rejected"), "{}", proxy.log());

    // SIGHUP re-reads the (fixed) file.
    std::fs::write(&path, config(listen, &[(a.addr, 1)], "round_robin")).unwrap();
    proxy.signal("HUP");
    proxy.wait_for_version(6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 200, "only {ok} requests completed");
    assert_eq!(failed, 0, "{failed} requests failed out of {}", ok + failed);
}

/// Starts a proxy in front of one upstream; returns it with the listener address.
async fn running_proxy(dir: &TempDir, up: &Upstream) -> (ProxyProcess, SocketAddr) {
    let (listen, admin) = (local(free_port()), local(free_port()));
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, config(listen, &[(up.addr, 1)], "round_robin")).unwrap();
    let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    proxy.wait_ready().await;
    (proxy, listen)
}

/// Requests that take 1 s, over HTTP/1.1 and HTTP/2, sent now; they are in flight when the
/// caller stops the proxy.
fn slow_requests(
    listen: SocketAddr,
) -> (
    tokio::task::JoinHandle<Reply>,
    tokio::task::JoinHandle<Reply>,
) {
    let h1 = tokio::spawn(async move {
        get(
            &http1_client(),
            listen,
            "x",
            "/slow",
            &[("x-delay-ms", "1000")],
        )
        .await
    });
    let h2 = tokio::spawn(async move {
        get(
            &h2c_client(),
            listen,
            "x",
            "/slow",
            &[("x-delay-ms", "1000")],
        )
        .await
    });
    (h1, h2)
}

/// While draining: `/ready` is 503, the listener accepts nothing, the admin server answers.
async fn assert_draining(proxy: &ProxyProcess, listen: SocketAddr) {
    let ready = tokio::time::timeout(Duration::from_secs(2), proxy.admin_get("/ready"))
        .await
        .expect("admin answers during drain");
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.body, "draining\n");
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "listener must be closed while draining"
    );
}

/// The in-flight requests complete; HTTP/1.1 is told the connection ends with this response
/// (hyper's graceful shutdown adds `Connection: close`); the process exits 0.
async fn assert_drained(
    proxy: &mut ProxyProcess,
    (h1, h2): (
        tokio::task::JoinHandle<Reply>,
        tokio::task::JoinHandle<Reply>,
    ),
) {
    let h1 = h1.await.unwrap();
    assert_eq!(
        h1.status,
        StatusCode::OK,
        "the in-flight HTTP/1.1 request completes"
    );
    assert_eq!(h1.header("connection"), "close");
    let h2 = h2.await.unwrap();
    assert_eq!(
        h2.status,
        StatusCode::OK,
        "the in-flight HTTP/2 request completes"
    );
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let dir = TempDir::new("drain");
    let up = Upstream::start("a").await;
    let (mut proxy, listen) = running_proxy(&dir, &up).await;

    let slow = slow_requests(listen);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_draining(&proxy, listen).await;
    assert_drained(&mut proxy, slow).await;
}

/// `POST /shutdown` is SIGTERM over HTTP, for a batch Job's app that must stop its sidecar.
#[tokio::test]
async fn post_shutdown_drains_in_flight_requests_then_exits_0() {
    let dir = TempDir::new("shutdown");
    let up = Upstream::start("a").await;
    let (mut proxy, listen) = running_proxy(&dir, &up).await;

    let wrong = proxy.admin_get("/shutdown").await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), "POST");
    assert_eq!(proxy.admin_get("/ready").await.status, StatusCode::OK);

    let slow = slow_requests(listen);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let post = Request::post(format!("http://{}/shutdown", proxy.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let accepted = send(&http1_client(), post).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_draining(&proxy, listen).await;
    assert_drained(&mut proxy, slow).await;
    assert!(
        proxy.log().contains("POST /shutdown: draining"),
        "{}",
        proxy.log()
    );
}

fn wait_ready_command(admin: SocketAddr, timeout: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-proxy"));
    cmd.args([
        "wait-ready",
        "--admin",
        &admin.to_string(),
        "--timeout",
        timeout,
    ])
    .args(["--interval", "50ms"])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

#[tokio::test]
async fn wait_ready_times_out_against_a_closed_port() {
    let closed = local(free_port());
    let start = Instant::now();
    let out = wait_ready_command(closed, "500ms").output().unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "http://{closed}/ready did not answer 200 within 500ms"
        )) && stderr.contains("connect"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "gave up after {took:?}"
    );
}

#[tokio::test]
async fn wait_ready_blocks_until_the_proxy_is_ready() {
    let dir = TempDir::new("waitready");
    let up = Upstream::start("a").await;
    let (listen, admin) = (local(free_port()), local(free_port()));
    let mut waiter = wait_ready_command(admin, "30s").spawn().unwrap();
    // Nothing listens yet: it keeps waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "wait-ready returned before any proxy ran"
    );

    let path = dir.0.join("c.yaml");
    std::fs::write(&path, config(listen, &[(up.addr, 1)], "round_robin")).unwrap();
    let _proxy = ProxyProcess::spawn(&path, admin, &dir.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = waiter.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "wait-ready never returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    // Ready means served: the listener answers at once.
    assert_eq!(
        get(&http1_client(), listen, "x", "/", &[]).await.status,
        StatusCode::OK
    );
}

/// `/explain` over HTTP and `tern-proxy explain` against a running proxy process.
#[tokio::test]
async fn explain_answers_over_the_admin_port_and_the_cli() {
    let api = Upstream::start("api").await;
    let dir = TempDir::new("explain");
    let port = free_port();
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{port}\n    protocol: http\n    routes:\n      - match: {{ host: api.local, headers: {{ x-canary: \"1\" }} }}\n        backends: [ {{ service: api }} ]\n        timeout: 3s\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n",
        api.addr
    );
    let proxy = ProxyProcess::start_in(&dir, &yaml).await;
    let admin = proxy.admin;

    let r = proxy
        .admin_get("/explain?listener=web&host=api.local&path=/x&header=x-canary:1")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["route"]["index"], 0);
    assert_eq!(v["route"]["timeout_ms"], 3000);
    assert_eq!(
        v["backends"][0]["endpoints"][0]["address"],
        api.addr.to_string()
    );
    assert!(
        v["config"]["source"]
            .as_str()
            .unwrap()
            .contains("tern.yaml")
    );
    let r = proxy
        .admin_get("/explain?listener=web&host=api.local&path=/x")
        .await;
    assert!(r.body.contains("404"), "{}", r.body);
    assert_eq!(proxy.admin_get("/explain?listener=nope").await.status, 400);
    assert_eq!(proxy.admin_get("/explain?host=x").await.status, 400);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
        .args([
            "explain",
            "--admin",
            &admin.to_string(),
            "--listener",
            "web",
        ])
        .args([
            "--host",
            "api.local",
            "--path",
            "/x",
            "--header",
            "x-canary:1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("route    #0") && text.contains(&api.addr.to_string()),
        "{text}"
    );
}

/// On SIGTERM an outbound listener (the app's own calls out) keeps serving new connections
/// until the drain deadline, while an inbound one stops at once.
#[tokio::test]
async fn outbound_listeners_serve_until_the_drain_deadline() {
    let api = Upstream::start("api").await;
    let dir = TempDir::new("outbound-drain");
    let (inbound, outbound) = (free_port(), free_port());
    let yaml = format!(
        "drain_timeout: 2s\nlisteners:\n  - name: in\n    address: 127.0.0.1:{inbound}\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\n  - name: out\n    address: 127.0.0.1:{outbound}\n    protocol: http\n    direction: outbound\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n",
        api.addr
    );
    let mut proxy = ProxyProcess::start_in(&dir, &yaml).await;
    let (inbound, outbound): (std::net::SocketAddr, std::net::SocketAddr) = (
        format!("127.0.0.1:{inbound}").parse().unwrap(),
        format!("127.0.0.1:{outbound}").parse().unwrap(),
    );
    // A keep-alive outbound connection, opened before the signal.
    let client = http1_client();
    assert_eq!(get(&client, outbound, "x", "/", &[]).await.status, 200);

    let started = std::time::Instant::now();
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(inbound).await.is_err(),
        "the inbound listener still accepts"
    );
    // A second into the drain, outbound calls on new and existing connections still work.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&client, outbound, "x", "/", &[]).await.status, 200);
    assert_eq!(
        get(&http1_client(), outbound, "x", "/", &[]).await.status,
        200
    );
    // Then the deadline ends it, exit 0.
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

/// `tern-proxy top --once` against a running proxy under traffic: one frame, 80 columns,
/// the service and its endpoint with a request rate.
#[tokio::test]
async fn top_prints_a_frame_of_services_and_endpoints() {
    let api = Upstream::start("api").await;
    let dir = TempDir::new("top");
    let port = free_port();
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{port}\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n",
        api.addr
    );
    let proxy = ProxyProcess::start_in(&dir, &yaml).await;
    let admin = proxy.admin;
    let web: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = http1_client();
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                get(&client, web, "x", "/", &[]).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
            .args([
                "top",
                "--once",
                "--interval",
                "500ms",
                "--admin",
                &admin.to_string(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let frame = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{frame} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(frame.lines().all(|l| l.chars().count() <= 80), "{frame}");
    let api_line = frame
        .lines()
        .find(|l| l.starts_with("api "))
        .unwrap_or_else(|| panic!("{frame}"));
    let rps: f64 = api_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(rps > 10.0, "{frame}");
    assert!(frame.contains(&format!("  {}", api.addr)), "{frame}");
}
