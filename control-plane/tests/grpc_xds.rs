//! A third-party proxyless gRPC client (Python grpcio and its xDS resolver) dials
//! `xds:///echo` with a bootstrap naming the control plane, resolves the service from the
//! control plane's API listener, cluster and endpoints, balances round robin across two real
//! tonic backends, and follows an edit of the mesh file that removes one of them.
//!
//! Needs `python3` with `grpcio` (`pip install grpcio`); without it the test prints why and
//! passes without running. Set `GRPC_TRACE=xds_client,xds_resolver GRPC_VERBOSITY=debug` to
//! see the client's side of the conversation in the failure message.

#![allow(clippy::unwrap_used)]

#[path = "grpc_xds/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use serde_json::json;
use support::{TempDir, WAIT, debug_nodes, eventually, nack_lines, tail, write_atomically};
use tern_proto::testing::v1::echo_server::{Echo, EchoServer};
use tern_proto::testing::v1::{EchoReply, EchoRequest, StreamRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_xds/client.py");
const NODE_ID: &str = "grpc-xds-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_xds_client_resolves_balances_and_follows_edits() -> anyhow::Result<()> {
    if let Err(why) = python_grpc().await {
        eprintln!(
            "SKIPPED grpc_xds: python3 with grpcio is not available ({why}); `pip install grpcio` to run this test"
        );
        return Ok(());
    }
    let dir = TempDir::new("tern-grpc-xds")?;
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let mesh = dir.join("mesh.yaml");
    write_atomically(&mesh, &mesh_yaml(&[a.addr, b.addr]))?;
    let control_plane = support::start_control_plane(&mesh).await?;
    let admin = control_plane.admin_address.context("admin address")?;

    let bootstrap = dir.join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        bootstrap_json(control_plane.xds_address).to_string(),
    )?;
    let mut client = PyClient::start(&bootstrap, &dir.join("client.log"))?;

    // Both backends answer: the client resolved the listener, cluster and endpoints.
    let seen = client
        .call_until("both backends answering", 10, |b| {
            b.errors.is_empty() && b.servers.len() == 2
        })
        .await?;
    eprintln!("first answers: {seen:?}");
    // With both subchannels ready, round robin alternates.
    let batch = client.call(20).await?;
    ensure!(batch.errors.is_empty(), "{batch:?}");
    let (on_a, on_b) = (batch.count("a"), batch.count("b"));
    ensure!(
        on_a + on_b == 20 && on_a.abs_diff(on_b) <= 1,
        "round robin should split 20 calls evenly between a and b: {batch:?}"
    );

    let node = eventually("the gRPC node ACKing lds, cds and eds", WAIT, || async {
        node_acks(admin, &["lds", "cds", "eds"]).await
    })
    .await?;
    eprintln!("/debug/nodes entry: {node}");
    let nacks = nack_lines(admin).await?;
    ensure!(nacks.is_empty(), "the gRPC client NACKed: {nacks:?}");

    // Remove backend a from the mesh: new calls reach only b.
    write_atomically(&mesh, &mesh_yaml(&[b.addr]))?;
    client
        .call_until("only b answering", 10, |b| {
            b.errors.is_empty() && b.count("b") == 10
        })
        .await?;
    let batch = client.call(20).await?;
    ensure!(
        batch.errors.is_empty() && batch.count("b") == 20,
        "after removing a, every call should reach b: {batch:?}"
    );

    client.quit().await?;
    control_plane.shutdown().await;
    Ok(())
}

/// Whether `python3 -c "import grpc"` works, within a bound.
async fn python_grpc() -> anyhow::Result<()> {
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("python3")
            .args(["-c", "import grpc"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status(),
    )
    .await
    .context("`python3 -c 'import grpc'` took over 30 s")?
    .context("running python3")?;
    ensure!(
        status.success(),
        "`python3 -c 'import grpc'` failed: {status}"
    );
    Ok(())
}

fn mesh_yaml(endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    format!(
        "services:\n  - name: echo\n    protocol: http2\n    endpoints: [ {} ]\n",
        endpoints.join(", ")
    )
}

/// The gRPC xDS bootstrap: one plaintext xDS server speaking v3.
fn bootstrap_json(xds: SocketAddr) -> serde_json::Value {
    json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{ "type": "insecure" }],
            "server_features": ["xds_v3"],
        }],
        "node": { "id": NODE_ID, "cluster": "tern-tests", "locality": { "zone": "local" } },
    })
}

/// The node's `/debug/nodes` entry once it has ACKed every type in `types`.
async fn node_acks(admin: SocketAddr, types: &[&str]) -> anyhow::Result<serde_json::Value> {
    let nodes = debug_nodes(admin).await?;
    let node = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["node"] == NODE_ID))
        .with_context(|| format!("{NODE_ID} not in /debug/nodes: {nodes}"))?;
    for t in types {
        ensure!(
            node["acked"][t].is_string(),
            "{NODE_ID} has not ACKed {t}: {node}"
        );
    }
    ensure!(
        node["last_nack"].as_object().is_none_or(|m| m.is_empty()),
        "{NODE_ID} NACKed: {node}"
    );
    Ok(node.clone())
}

/// One tonic Echo server that names itself in every reply.
struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(EchoServer::new(Named(name)))
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Backend { addr, task })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Named(&'static str);

type NoStream = futures_util::stream::Empty<Result<EchoReply, Status>>;

#[tonic::async_trait]
impl Echo for Named {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            server: self.0.to_string(),
            sequence: 0,
        }))
    }

    type ServerStreamStream = NoStream;

    async fn server_stream(&self, _: Request<StreamRequest>) -> Result<Response<NoStream>, Status> {
        Err(Status::unimplemented("only Unary in this test"))
    }

    type BidiStreamStream = NoStream;

    async fn bidi_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<NoStream>, Status> {
        Err(Status::unimplemented("only Unary in this test"))
    }
}

/// What one `call N` command saw.
#[derive(Debug, Deserialize)]
struct Batch {
    servers: BTreeMap<String, u32>,
    errors: Vec<String>,
}

impl Batch {
    fn count(&self, server: &str) -> u32 {
        self.servers.get(server).copied().unwrap_or(0)
    }
}

/// `client.py` running against the bootstrap, driven one command at a time.
struct PyClient {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl PyClient {
    fn start(bootstrap: &Path, log: &Path) -> anyhow::Result<PyClient> {
        let stderr = std::fs::File::create(log)?;
        let mut child = Command::new("python3")
            .arg(CLIENT)
            .arg("xds:///echo")
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting python3 client.py")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = child.stdout.take().context("client stdout")?;
        Ok(PyClient {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            log: log.to_path_buf(),
        })
    }

    /// Makes `n` unary calls; bounded by the client's own per-call timeouts plus slack.
    async fn call(&mut self, n: u32) -> anyhow::Result<Batch> {
        let bound = Duration::from_secs(40 + 5 * u64::from(n));
        let line = tokio::time::timeout(bound, async {
            self.stdin
                .write_all(format!("call {n}\n").as_bytes())
                .await?;
            self.stdin.flush().await?;
            self.lines.next_line().await
        })
        .await
        .with_context(|| format!("client.py did not answer `call {n}` within {bound:?}"))?
        .context("talking to client.py")?;
        let Some(line) = line else {
            bail!("client.py exited: {}", tail(&self.log, 40));
        };
        serde_json::from_str(&line).with_context(|| format!("client.py printed {line:?}"))
    }

    /// Calls in batches of `n` until a batch satisfies `done`, for at most [`WAIT`].
    async fn call_until(
        &mut self,
        what: &str,
        n: u32,
        done: impl Fn(&Batch) -> bool,
    ) -> anyhow::Result<Batch> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let batch = self.call(n).await?;
            if done(&batch) {
                return Ok(batch);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what}: not reached within {WAIT:?}; last batch: {batch:?}\nclient.py log:\n{}",
                    tail(&self.log, 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn quit(mut self) -> anyhow::Result<()> {
        self.stdin.write_all(b"quit\n").await?;
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .context("client.py did not exit within 15 s of `quit`")??;
        ensure!(
            status.success(),
            "client.py exited with {status}: {}",
            tail(&self.log, 40)
        );
        Ok(())
    }
}
