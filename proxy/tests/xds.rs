//! The proxy following a real control plane over ADS (both in this process, on real sockets):
//! endpoint changes and control plane restarts under load, with zero failed requests, in both
//! protocol variants; per-route rate limits and faults, and tracing, carried over xDS.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::{ProxyProcess, TempDir, Upstream, free_port, get, http1_client};
use tern_control_plane::{Options, Running};
use tern_proxy::app::App;
use tern_proxy::xds::{XdsOptions, XdsProtocol};
use tokio_util::sync::CancellationToken;

/// A mesh file the test edits, the control plane serving it, and one proxy following it.
struct Mesh {
    dir: TempDir,
    file: PathBuf,
    cp: Option<Running>,
    xds: SocketAddr,
    app: App,
    stop: CancellationToken,
}

fn mesh_yaml(endpoints: &[(SocketAddr, u32)]) -> String {
    let mut y = String::from(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - backends: [ { service: api } ]\nservices:\n  - name: api\n    protocol: http1\n    endpoints:\n",
    );
    for (addr, weight) in endpoints {
        y.push_str(&format!(
            "      - {{ address: \"{addr}\", weight: {weight} }}\n"
        ));
    }
    if endpoints.is_empty() {
        y = y.replace("    endpoints:\n", "    endpoints: []\n");
    }
    y
}

async fn start_cp(file: &std::path::Path, xds: SocketAddr) -> Running {
    tern_control_plane::start(Options {
        config: Some(file.to_path_buf()),
        xds_address: xds,
        admin_address: Some("127.0.0.1:0".parse().unwrap()),
        kubernetes: None,
        debounce: Duration::from_millis(5),
        watch_interval: Duration::from_millis(10),
        ca: None,
    })
    .await
    .expect("control plane starts")
}

impl Mesh {
    async fn start(tag: &str, protocol: XdsProtocol, endpoints: &[(SocketAddr, u32)]) -> Mesh {
        Mesh::start_yaml(tag, protocol, &mesh_yaml(endpoints)).await
    }

    async fn start_yaml(tag: &str, protocol: XdsProtocol, yaml: &str) -> Mesh {
        let dir = TempDir::new(tag);
        let file = dir.0.join("mesh.yaml");
        std::fs::write(&file, yaml).unwrap();
        let cp = start_cp(&file, "127.0.0.1:0".parse().unwrap()).await;
        let xds = cp.xds_address;
        let app = App::new();
        let stop = CancellationToken::new();
        tokio::spawn(tern_proxy::xds::run(
            app.clone(),
            XdsOptions {
                server: xds.to_string(),
                node: format!("{tag}-proxy"),
                protocol,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
            },
            stop.clone(),
        ));
        let mesh = Mesh {
            dir,
            file,
            cp: Some(cp),
            xds,
            app,
            stop,
        };
        mesh.wait("the first config", |app| app.is_ready()).await;
        mesh
    }

    fn web(&self) -> SocketAddr {
        match self.app.bound_addresses().get("web") {
            Some(addr) => *addr,
            None => panic!(
                "listener web is not bound; xds status: {:?}; config: {:?}",
                self.app.xds_status(),
                self.app.store().load().config.raw
            ),
        }
    }

    /// Rewrites the file the way editors do (write elsewhere, rename over).
    fn edit(&self, endpoints: &[(SocketAddr, u32)]) {
        let tmp = self.dir.0.join("mesh.yaml.tmp");
        std::fs::write(&tmp, mesh_yaml(endpoints)).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn edit_text(&self, text: &str) {
        let tmp = self.dir.0.join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn endpoint_count(&self) -> usize {
        let snapshot = self.app.store().load();
        snapshot
            .services
            .get("api")
            .map_or(0, |s| s.endpoints.len())
    }

    async fn wait(&self, what: &str, ok: impl Fn(&App) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok(&self.app) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; xds status: {:?}",
                self.app.xds_status()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Clients sending requests back to back until stopped (bounded: at most 60 s, 200k requests).
struct Load {
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    let client = http1_client();
                    let started = tokio::time::Instant::now();
                    let mut errors = Vec::new();
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(60)
                        {
                            break;
                        }
                        let req = http::Request::get(format!("http://{addr}/"))
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        match tokio::time::timeout(Duration::from_secs(5), client.request(req))
                            .await
                        {
                            Ok(Ok(r)) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Ok(r)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!("status {}", r.status()));
                            }
                            Ok(Err(e)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!("error {e}"));
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push("timeout".into());
                            }
                        }
                    }
                    errors
                })
            })
            .collect();
        Load { ok, stop, tasks }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Lets at least `n` more requests succeed.
    async fn progress(&self, n: usize) {
        let target = self.ok() + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.ok() < target {
            assert!(tokio::time::Instant::now() < deadline, "load stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

async fn endpoint_changes_under_load(protocol: XdsProtocol, tag: &str) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let mesh = Mesh::start(tag, protocol, &[(a.addr, 1), (b.addr, 1)]).await;
    let load = Load::start(mesh.web(), 4);
    load.progress(200).await;

    let state_of = |addr: SocketAddr| {
        let snapshot = mesh.app.store().load();
        let service = &snapshot.services["api"];
        let e = service
            .endpoints
            .iter()
            .find(|e| e.state.addr == addr)
            .expect("endpoint present");
        Arc::clone(&e.state)
    };
    let b_state = state_of(b.addr);

    // Add an endpoint: it starts getting traffic.
    mesh.edit(&[(a.addr, 1), (b.addr, 1), (c.addr, 1)]);
    mesh.wait("three endpoints", |_| mesh.endpoint_count() == 3)
        .await;
    assert!(
        Arc::ptr_eq(&b_state, &state_of(b.addr)),
        "an endpoint that stays keeps its balancer state (in flight, EWMA, pool)"
    );
    let before = c.hits();
    load.progress(300).await;
    assert!(c.hits() > before + 50, "the added endpoint gets traffic");

    // Remove one (it keeps running: in-flight requests to it must finish normally).
    mesh.edit(&[(b.addr, 1), (c.addr, 1)]);
    mesh.wait("two endpoints", |_| mesh.endpoint_count() == 2)
        .await;
    load.progress(50).await;
    let a_after_removal = a.hits();
    load.progress(300).await;
    assert!(
        a.hits() <= a_after_removal + 4,
        "a removed endpoint gets no new requests"
    );

    // Re-weight: c gets four times b's share.
    mesh.edit(&[(b.addr, 1), (c.addr, 4)]);
    mesh.wait("new weights", |app| {
        app.store()
            .load()
            .services
            .get("api")
            .is_some_and(|s| s.endpoints.iter().any(|e| e.weight == 4))
    })
    .await;
    let (b0, c0) = (b.hits(), c.hits());
    load.progress(1000).await;
    let (db, dc) = (b.hits() - b0, c.hits() - c0);
    assert!(dc > db * 3, "weights 1:4 gave b={db} c={dc}");

    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} failed requests (of {ok}): {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_endpoint_add_remove_reweight_under_load_loses_nothing() {
    endpoint_changes_under_load(XdsProtocol::Sotw, "xds-sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_endpoint_add_remove_reweight_under_load_loses_nothing() {
    endpoint_changes_under_load(XdsProtocol::Delta, "xds-delta").await;
}

async fn control_plane_restart(protocol: XdsProtocol, tag: &str) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut mesh = Mesh::start(tag, protocol, &[(a.addr, 1)]).await;
    let load = Load::start(mesh.web(), 4);
    load.progress(200).await;

    mesh.cp.take().unwrap().shutdown().await;
    mesh.wait("the proxy to notice", |app| {
        app.xds_status()
            .is_some_and(|s| s["connected"] == serde_json::json!(false))
    })
    .await;
    // Control plane down: the last good config keeps serving.
    load.progress(500).await;
    // An edit made while it is down is served once it is back.
    mesh.edit(&[(a.addr, 1), (b.addr, 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mesh.endpoint_count(), 1);

    mesh.cp = Some(start_cp(&mesh.file, mesh.xds).await);
    mesh.wait("the resync", |_| mesh.endpoint_count() == 2)
        .await;
    let before = b.hits();
    load.progress(300).await;
    assert!(
        b.hits() > before + 50,
        "the endpoint added while the control plane was away gets traffic"
    );

    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} failed requests (of {ok}): {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_control_plane_restart_under_load_loses_nothing() {
    control_plane_restart(XdsProtocol::Sotw, "xds-restart-sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_control_plane_restart_under_load_loses_nothing() {
    control_plane_restart(XdsProtocol::Delta, "xds-restart-delta").await;
}

#[tokio::test]
async fn an_invalid_mesh_edit_is_refused_by_the_control_plane_and_traffic_continues() {
    let a = Upstream::start("a").await;
    let mesh = Mesh::start("xds-invalid-edit", XdsProtocol::Sotw, &[(a.addr, 1)]).await;
    let client = http1_client();
    mesh.edit_text(&mesh_yaml(&[(a.addr, 1)]).replace("protocol: http1", "protocol: http7"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(&client, mesh.web(), "x", "/", &[]).await;
    assert_eq!(r.status, 200);
    let metrics = reqwest_metrics(mesh.cp.as_ref().unwrap()).await;
    assert!(
        metrics.contains("tern_xds_model_updates_total{outcome=\"invalid\"} 1"),
        "{metrics}"
    );
}

/// The mesh file's rate limit, fault and tracing reach the proxy as Envoy filters and are
/// enforced: the burst, then 429 with retry-after; the configured abort status.
async fn traffic_policy_over_xds(protocol: XdsProtocol, tag: &str) {
    let a = Upstream::start("a").await;
    let yaml = format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "http://127.0.0.1:9", sample_ratio: 0.5, service_name: {tag} }}
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - match: {{ path_prefix: /limited }}
        backends: [ {{ service: api }} ]
        rate_limit: {{ requests_per_second: 0.2, burst: 2, key: none }}
      - match: {{ path_prefix: /broken }}
        backends: [ {{ service: api }} ]
        fault: {{ abort: {{ percent: 100, status: 418 }} }}
      - match: {{ path_prefix: /chaos }}
        backends: [ {{ service: api }} ]
        fault: {{ abort: {{ percent: 100, status: 503 }}, header: x-chaos }}
      - backends: [ {{ service: api }} ]
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{}" }} ]
"#,
        a.addr
    );
    let mesh = Mesh::start_yaml(tag, protocol, &yaml).await;
    let client = http1_client();
    for _ in 0..2 {
        assert_eq!(
            get(&client, mesh.web(), "x", "/limited", &[]).await.status,
            200
        );
    }
    let limited = get(&client, mesh.web(), "x", "/limited", &[]).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    let wait: u64 = limited.header("retry-after").parse().unwrap();
    assert!((1..=5).contains(&wait), "retry-after {wait}");
    // Other routes have no bucket.
    assert_eq!(get(&client, mesh.web(), "x", "/", &[]).await.status, 200);

    let hits = a.hits();
    assert_eq!(
        get(&client, mesh.web(), "x", "/broken", &[]).await.status,
        418
    );
    assert_eq!(
        get(&client, mesh.web(), "x", "/chaos", &[]).await.status,
        200
    );
    let chaos = get(&client, mesh.web(), "x", "/chaos", &[("x-chaos", "1")]).await;
    assert_eq!(chaos.status, 503);
    assert_eq!(
        a.hits(),
        hits + 1,
        "aborted requests never reach the upstream"
    );

    let tracing = mesh.app.store().load().config.tracing.clone();
    let tracing = tracing.expect("tracing from the connection manager");
    assert_eq!(tracing.otlp_endpoint, "http://127.0.0.1:9");
    assert_eq!(tracing.sample_ratio, 0.5);
    assert_eq!(tracing.service_name, tag);
}

#[tokio::test]
async fn sotw_rate_limit_fault_and_tracing_arrive_and_are_enforced() {
    traffic_policy_over_xds(XdsProtocol::Sotw, "xds-traffic-sotw").await;
}

#[tokio::test]
async fn delta_rate_limit_fault_and_tracing_arrive_and_are_enforced() {
    traffic_policy_over_xds(XdsProtocol::Delta, "xds-traffic-delta").await;
}

async fn reqwest_metrics(cp: &Running) -> String {
    let client = http1_client();
    let r = get(&client, cp.admin_address.unwrap(), "cp", "/metrics", &[]).await;
    r.body
}

#[tokio::test]
async fn config_dump_shows_the_xds_versions_in_force() {
    let a = Upstream::start("a").await;
    let mesh = Mesh::start("xds-dump", XdsProtocol::Delta, &[(a.addr, 1)]).await;
    let addr = mesh
        .app
        .serve_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = http1_client();
    let r = get(&client, addr, "admin", "/config_dump", &[]).await;
    let dump: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(dump["xds"]["connected"], true, "{dump}");
    assert_eq!(dump["xds"]["protocol"], "delta");
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(dump["xds"]["versions_accepted"][t], "1", "{t}: {dump}");
    }
    assert!(
        dump["source"].as_str().unwrap().starts_with("xds:"),
        "{dump}"
    );
}

/// The binary: `tern-proxy --xds` is not ready before its first config, serves it, keeps
/// serving while the control plane is gone, and drains on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_binary_follows_the_control_plane() {
    let a = Upstream::start("a").await;
    let dir = TempDir::new("xds-binary");
    let file = dir.0.join("mesh.yaml");
    let web_port = free_port();
    std::fs::write(
        &file,
        mesh_yaml(&[(a.addr, 1)]).replace("127.0.0.1:0", &format!("127.0.0.1:{web_port}")),
    )
    .unwrap();
    let cp = start_cp(&file, "127.0.0.1:0".parse().unwrap()).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = [
        "--xds".to_string(),
        cp.xds_address.to_string(),
        "--node".to_string(),
        "binary-1".to_string(),
        "--xds-protocol".to_string(),
        "delta".to_string(),
    ];
    let mut proxy = ProxyProcess::spawn_with(&args, admin, &dir.0);
    proxy.wait_ready().await;
    let client = http1_client();
    let web: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    assert_eq!(get(&client, web, "x", "/", &[]).await.status, 200);

    cp.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        assert_eq!(get(&client, web, "x", "/", &[]).await.status, 200);
    }
    assert_eq!(
        proxy.admin_get("/ready").await.status,
        200,
        "still ready: the last config serves"
    );
    proxy.signal("TERM");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        proxy.log()
    );
}
