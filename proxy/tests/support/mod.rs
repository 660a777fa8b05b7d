//! Shared helpers for whole-proxy tests: real upstreams on loopback, an in-process proxy,
//! the proxy binary as a child process, and small HTTP clients.
#![allow(dead_code, clippy::unwrap_used)]

pub mod otlp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tern_proxy::app::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP upstream that reports what it saw. Request headers steer it:
/// `x-delay-ms` (answer late), `x-status` (status code). The request body is streamed back.
/// Response headers: `x-upstream` (its name), `x-seen-host`, `x-seen-xff`,
/// `x-seen-traceparent`, `x-seen-version`,
/// `x-seen-hop` (1 if any hop-by-hop header arrived), `x-seen-peer` (`x-peer-identity`).
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap(), false).await
    }

    /// `h2`: serve HTTP/2 prior knowledge only (a gRPC-style upstream).
    pub async fn start_on(name: &str, addr: SocketAddr, h2: bool) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (n, h, c) = (name.to_string(), hits.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let (n, h) = (n.clone(), h.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| upstream_answer(n.clone(), h.clone(), req));
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            conns,
        }
    }

    /// An `Upstream` value for an address that nothing serves (or a server made elsewhere).
    pub fn at(addr: SocketAddr, name: &str) -> Upstream {
        Upstream {
            addr,
            name: name.to_string(),
            hits: Default::default(),
            conns: Default::default(),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

async fn upstream_answer(
    name: String,
    hits: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if let Ok(ms) = header("x-delay-ms").parse::<u64>() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header("x-status")
        .parse::<u16>()
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok());
    let hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "x-hop-secret",
    ]
    .iter()
    .any(|h| req.headers().contains_key(*h));
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| header("host"));
    let mut response = Response::builder()
        .status(status.unwrap_or(StatusCode::OK))
        .header("x-upstream", &name)
        .header("x-seen-host", host)
        .header("x-seen-xff", header("x-forwarded-for"))
        .header("x-seen-traceparent", header("traceparent"))
        .header("x-seen-version", format!("{:?}", req.version()))
        .header("x-seen-hop", if hop { "1" } else { "0" })
        .header("x-seen-peer", header("x-peer-identity"))
        .header(
            "x-seen-path",
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        );
    if hop {
        response = response.header("connection", "keep-alive");
    }
    Ok(response.body(req.into_body().boxed()).unwrap())
}

/// A TCP echo server (echoes until the client half-closes, then closes its side).
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A proxy running in this process on the given YAML; listeners usually on port 0.
pub struct Proxy {
    pub app: App,
}

impl Proxy {
    pub async fn start(yaml: &str) -> Proxy {
        let config = tern_proxy::config::parse_yaml(yaml).unwrap();
        let app = App::new();
        app.apply(config, "test".into()).await.unwrap();
        app.set_ready(true);
        Proxy { app }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.app.bound_addresses()[listener]
    }

    /// The proxy's metrics in Prometheus text, as `/metrics` serves them.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, self.app.registry()).unwrap();
        text
    }

    /// The value of one unlabelled series in the metrics (the line starting with `series`),
    /// 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn http1_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn get(
    client: &TestClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::get(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(Full::new(Bytes::new())).unwrap()).await
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Writes raw bytes to `addr` and reads until the server closes or `wait` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A free loopback port (bound then released; fine for tests that start a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `tern-proxy` binary as a child process; killed when dropped.
pub struct ProxyProcess {
    pub child: Child,
    pub admin: SocketAddr,
    pub stderr: PathBuf,
}

impl ProxyProcess {
    pub fn spawn(config: &Path, admin: SocketAddr, dir: &Path) -> ProxyProcess {
        let args = [
            "--config".to_string(),
            config.display().to_string(),
            "--watch-interval".to_string(),
            "100ms".to_string(),
        ];
        Self::spawn_with(&args, admin, dir)
    }

    /// Runs the binary with `args` plus `--admin-address ADMIN`.
    /// Writes `yaml` as `tern.yaml` in `dir`, starts the binary on it with an admin port of
    /// its own, and waits until it is ready.
    pub async fn start_in(dir: &TempDir, yaml: &str) -> ProxyProcess {
        let path = dir.0.join("tern.yaml");
        std::fs::write(&path, yaml).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut proxy = ProxyProcess::spawn(&path, admin, &dir.0);
        proxy.wait_ready().await;
        proxy
    }

    pub fn spawn_with(args: &[String], admin: SocketAddr, dir: &Path) -> ProxyProcess {
        let stderr = dir.join("proxy.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tern-proxy"))
            .args(args)
            .arg("--admin-address")
            .arg(admin.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        ProxyProcess {
            child,
            admin,
            stderr,
        }
    }

    pub async fn wait_ready(&mut self) {
        let client = http1_client();
        for _ in 0..200 {
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_millis(500),
                client.request(
                    Request::get(format!("http://{}/ready", self.admin))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                ),
            )
            .await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited early with {status}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy never became ready: {}", self.log());
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let client = http1_client();
        get(&client, self.admin, "admin", path, &[]).await
    }

    /// Waits until `/config_dump` reports at least `version` (a reload was applied).
    pub async fn wait_for_version(&self, version: u64) {
        for _ in 0..100 {
            let dump: serde_json::Value =
                serde_json::from_str(&self.admin_get("/config_dump").await.body).unwrap();
            if dump["version"].as_u64() >= Some(version) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("config version {version} never applied: {}", self.log());
    }

    /// The child's resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        tern_proxy::overload::parse_vm_rss(&status).unwrap()
    }

    /// The value of one series in `/metrics` (the line starting with `series`), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics").await.body;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tern-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP/2 prior-knowledge connection to `addr`, for requests whose `:authority` differs
/// from the address dialled.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// One HTTP/1.1 connection to `addr`, for tests that need to know which connection a request
/// travels on.
pub async fn http1_connect(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A GET on a given HTTP/1.1 connection.
pub async fn get_on(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> Reply {
    let req = Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}
