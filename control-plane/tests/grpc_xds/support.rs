//! Shared by the third-party peer tests (`grpc_xds.rs`, `envoy_ads.rs`): a scratch directory,
//! a mesh file edited atomically, the control plane started in-process, bounded retries, a
//! one-shot HTTP/1 GET, and child processes that die with the test.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tern_control_plane::{Options, Running};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long anything in these tests may take to converge. Generous: CI machines are small
/// and shared, and a peer's first connection includes its own start-up.
pub const WAIT: Duration = Duration::from_secs(45);

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_nanos();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TERN_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes `text` to `path` by renaming a sibling, so the control plane's poller never reads a
/// half-written file.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Starts the control plane on `mesh` with ephemeral xDS and admin ports and quick polling.
pub async fn start_control_plane(mesh: &Path) -> anyhow::Result<Running> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "tern_control_plane=info".to_string()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    tern_control_plane::start(Options {
        config: Some(mesh.to_path_buf()),
        xds_address: "127.0.0.1:0".parse()?,
        admin_address: Some("127.0.0.1:0".parse()?),
        kubernetes: None,
        debounce: Duration::from_millis(50),
        watch_interval: Duration::from_millis(50),
        ca: None,
    })
    .await
}

/// A port that was free a moment ago, for peers whose config must name their own port.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Calls `attempt` until it succeeds or `within` has passed; the error then says what the
/// last attempt saw.
pub async fn eventually<T, F, Fut>(
    what: &str,
    within: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("the last attempt was still running"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not reached within {within:?}; last attempt: {last:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One GET on a fresh connection, bounded by a 5 s timeout.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let (status, _, body) = http_get_with(addr, path, &[]).await?;
    Ok((status, body))
}

/// A GET with request headers, answering the response headers too.
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, http::HeaderMap, Bytes)> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let mut request = Request::get(path).header(http::header::HOST, addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await?;
        let status = response.status();
        let response_headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        conn.abort();
        Ok((status, response_headers, body))
    })
    .await
    .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// The control plane's `/debug/nodes`.
pub async fn debug_nodes(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(admin, "/debug/nodes").await?;
    if status != StatusCode::OK {
        bail!("/debug/nodes answered {status}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The control plane's `tern_xds_nacks_total` samples, one line each.
pub async fn nack_lines(admin: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (_, body) = http_get(admin, "/metrics").await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("tern_xds_nacks_total"))
        .map(str::to_string)
        .collect())
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `program args` with stdout and stderr appended to `log`; killed when dropped.
pub fn spawn_logged(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", command.as_std().get_program()))
}
