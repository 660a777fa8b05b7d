//! The mesh end to end on loopback: the control plane's CA issues certificates to `tern-proxy`
//! processes that hold their keys in memory; a client sidecar carries HTTP/1.1 as HTTP/2
//! over mTLS to a server sidecar, which checks the caller's SPIFFE ID, tells the app who
//! called, refuses plaintext and callers outside its allow list, and rotates certificates
//! under load without dropping a request.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use support::{ProxyProcess, TempDir, Upstream, free_port, get, http1_client, raw_exchange};
use tern_control_plane::ca::{self, BootstrapTokens, CaOptions, Credentials, RootSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/default/sa/api";
const INTRUDER: &str = "spiffe://cluster.local/ns/default/sa/intruder";

/// A CA on loopback with a bootstrap token per identity.
struct Mesh {
    dir: TempDir,
    ca: SocketAddr,
    roots: PathBuf,
    registry: Registry,
    stop: CancellationToken,
}

impl Mesh {
    async fn start(tag: &str, lifetime: Duration) -> Mesh {
        let dir = TempDir::new(tag);
        let tokens = format!(
            "{WEB} token-of-web-0123456789\n{API} token-of-api-0123456789\n{INTRUDER} token-of-intruder-0123456789\n"
        );
        let roots = dir.0.join("roots.pem");
        let mut registry = Registry::default();
        let metrics = tern_control_plane::metrics::Metrics::new(&mut registry);
        let stop = CancellationToken::new();
        let running = ca::start(
            CaOptions {
                address: "127.0.0.1:0".parse().unwrap(),
                trust_domain: "cluster.local".into(),
                root: RootSource::Generate,
                lifetime,
                server_names: vec![ca::DEFAULT_SERVER_NAME.into()],
                credentials: Credentials {
                    bootstrap: BootstrapTokens::parse(&tokens).unwrap(),
                    token_review: None,
                },
                roots_out: Some(roots.clone()),
            },
            metrics,
            &TaskTracker::new(),
            stop.clone(),
        )
        .await
        .unwrap();
        Mesh {
            dir,
            ca: running.address,
            roots,
            registry,
            stop,
        }
    }

    /// A proxy process with `identity`, showing the CA the token of `token_of`.
    fn proxy(&self, name: &str, identity: &str, token_of: &str, yaml: &str) -> ProxyProcess {
        let dir = self.dir.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        let short = token_of.rsplit('/').next().unwrap();
        std::fs::write(&token, format!("token-of-{short}-0123456789\n")).unwrap();
        let config = dir.join("tern.yaml");
        std::fs::write(&config, yaml).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--identity",
            identity,
            "--ca",
            &self.ca.to_string(),
            "--ca-roots",
            self.roots.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ]
        .map(String::from);
        ProxyProcess::spawn_with(&args, admin, &dir)
    }

    fn ca_metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The server side: a strict HTTP port that lets `web` in and names the caller to the app,
/// and a strict TCP port.
fn server_yaml(http: u16, tcp: u16, app: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - name: inbound
    address: 127.0.0.1:{http}
    protocol: http
    mtls:
      mode: strict
      authorization: {{ default: deny, identities: ["{WEB}"] }}
      peer_identity_header: x-peer-identity
    routes:
      - backends: [ {{ service: app }} ]
  - name: inbound-tcp
    address: 127.0.0.1:{tcp}
    protocol: tcp
    service: echo
    mtls: {{ mode: strict, authorization: {{ namespaces: [default] }} }}
services:
  - name: app
    protocol: http1
    endpoints: [ {{ address: "{app}" }} ]
  - name: echo
    protocol: tcp
    endpoints: [ {{ address: "{echo}" }} ]
"#
    )
}

/// The client side: plaintext from the app, mTLS to the server sidecar, which must be `api`.
fn client_yaml(http: u16, tcp: u16, server_http: u16, server_tcp: u16) -> String {
    format!(
        r#"
listeners:
  - name: outbound
    address: 127.0.0.1:{http}
    protocol: http
    routes:
      - backends: [ {{ service: api }} ]
  - name: outbound-tcp
    address: 127.0.0.1:{tcp}
    protocol: tcp
    service: api-tcp
services:
  - name: api
    protocol: http1
    identity: "{API}"
    endpoints: [ {{ address: "127.0.0.1:{server_http}" }} ]
  - name: api-tcp
    protocol: tcp
    identity: "{API}"
    endpoints: [ {{ address: "127.0.0.1:{server_tcp}" }} ]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_speak_mtls_and_the_server_decides_who_may_call() {
    let mesh = Mesh::start("mtls", Duration::from_secs(3600)).await;
    let app = Upstream::start("app").await;
    let echo = support::tcp_echo().await;
    let (sh, st) = (free_port(), free_port());
    let mut server = mesh.proxy("server", API, API, &server_yaml(sh, st, app.addr, echo));
    server.wait_ready().await;
    let (ch, ct) = (free_port(), free_port());
    let mut client = mesh.proxy("client", WEB, WEB, &client_yaml(ch, ct, sh, st));
    client.wait_ready().await;
    let outbound: SocketAddr = format!("127.0.0.1:{ch}").parse().unwrap();

    // HTTP/1.1 in, HTTP/2 over mTLS between the proxies, HTTP/1.1 out; the app learns the
    // caller's identity, and a value the client made up for that header is not passed on.
    let http = http1_client();
    for _ in 0..20 {
        let reply = get(
            &http,
            outbound,
            "api.default",
            "/hello",
            &[(
                "x-peer-identity",
                "spiffe://cluster.local/ns/kube-system/sa/admin",
            )],
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("x-upstream"), "app");
        assert_eq!(reply.header("x-seen-peer"), WEB);
        assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(reply.header("x-seen-path"), "/hello");
    }
    assert_eq!(app.hits(), 20);
    let metrics = server.admin_get("/metrics").await.body;
    assert!(
        metrics.contains(r#"tern_tls_inbound_handshakes_total{listener="inbound",result="ok"} 1"#),
        "20 requests share one multiplexed mTLS connection:\n{metrics}"
    );
    // Who called, by the identity the client proved.
    let by_peer = format!(
        r#"tern_inbound_peer_requests_total{{listener="inbound",client_id="{WEB}",status_class="2xx"}} 20"#
    );
    assert!(metrics.contains(&by_peer), "{by_peer}:\n{metrics}");
    let conns =
        format!(r#"tern_inbound_peer_connections_total{{listener="inbound",client_id="{WEB}"}} 1"#);
    assert!(metrics.contains(&conns), "{conns}:\n{metrics}");
    assert!(
        server
            .metric("tern_identity_certificate_renewals_total")
            .await
            >= 1.0
    );
    assert!(
        server
            .metric("tern_identity_certificate_expiry_timestamp_seconds")
            .await
            > 1.0e9
    );

    // Opaque TCP over mTLS: bytes both ways, half-close carried.
    let mut stream = TcpStream::connect(("127.0.0.1", ct)).await.unwrap();
    let payload = vec![b'm'; 200_000];
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), payload.len());

    // A pod without a sidecar: plaintext to the strict ports gets nothing, and is counted.
    let server_http: SocketAddr = format!("127.0.0.1:{sh}").parse().unwrap();
    let answer = raw_exchange(
        server_http,
        b"GET / HTTP/1.1\r\nhost: app\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(answer, "", "a strict port answered plaintext");
    let mut raw = TcpStream::connect(("127.0.0.1", st)).await.unwrap();
    raw.write_all(b"plaintext").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a strict TCP port passed plaintext on");
    assert_eq!(app.hits(), 20);

    // A meshed caller outside the allow list: 403 with a reason, counted by reason.
    let (ih, it) = (free_port(), free_port());
    let mut intruder = mesh.proxy("intruder", INTRUDER, INTRUDER, &client_yaml(ih, it, sh, st));
    intruder.wait_ready().await;
    let reply = get(
        &http,
        format!("127.0.0.1:{ih}").parse().unwrap(),
        "api.default",
        "/",
        &[],
    )
    .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains(INTRUDER), "{}", reply.body);
    assert_eq!(app.hits(), 20);
    let metrics = server.admin_get("/metrics").await.body;
    assert!(
        metrics.contains(r#"tern_authz_denied_total{listener="inbound",reason="not_allowed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tern_authz_denied_total{listener="inbound",reason="no_identity"} 1"#),
        "{metrics}"
    );
    let denied = format!(
        r#"tern_inbound_peer_requests_total{{listener="inbound",client_id="{INTRUDER}",status_class="4xx"}} 1"#
    );
    assert!(metrics.contains(&denied), "{denied}:\n{metrics}");
    assert!(
        metrics.contains(&format!(
            r#"tern_inbound_peer_connections_total{{listener="inbound-tcp",client_id="{WEB}"}} 1"#
        )),
        "{metrics}"
    );

    // The client checks the server's identity too: a service whose endpoint presents
    // another identity is not spoken to.
    let (wh, wt) = (free_port(), free_port());
    let wrong = client_yaml(wh, wt, sh, st).replace(API, INTRUDER);
    let mut misled = mesh.proxy("misled", WEB, WEB, &wrong);
    misled.wait_ready().await;
    let reply = get(
        &http,
        format!("127.0.0.1:{wh}").parse().unwrap(),
        "api.default",
        "/",
        &[],
    )
    .await;
    assert!(
        reply.status.is_server_error(),
        "{} {}",
        reply.status,
        reply.body
    );
    assert_eq!(app.hits(), 20);
    assert!(
        misled
            .admin_get("/metrics")
            .await
            .body
            .contains("tern_tls_upstream_failures_total{service=\"api\""),
        "{}",
        misled.admin_get("/metrics").await.body
    );
    let ca_metrics = mesh.ca_metrics();
    assert!(
        ca_metrics.contains("tern_ca_certificates_issued_total 4"),
        "{ca_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_identity_gets_no_certificate_and_no_readiness() {
    let mesh = Mesh::start("mtls-refuse", Duration::from_secs(3600)).await;
    let app = Upstream::start("app").await;
    let echo = support::tcp_echo().await;
    let (sh, st) = (free_port(), free_port());
    // Asks to be `api` with web's token.
    let impostor = mesh.proxy("impostor", API, WEB, &server_yaml(sh, st, app.addr, echo));
    for _ in 0..200 {
        if TcpStream::connect(impostor.admin).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut refused = 0.0;
    for _ in 0..100 {
        refused = impostor
            .metric("tern_identity_certificate_failures_total")
            .await;
        if refused >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused >= 2.0, "retried with backoff: {}", impostor.log());
    let ready = impostor.admin_get("/ready").await;
    assert_eq!(ready.status, 503, "ready without a certificate");
    assert_eq!(
        impostor
            .metric("tern_identity_certificate_renewals_total")
            .await,
        0.0
    );
    assert!(
        impostor.log().contains("the token proves"),
        "{}",
        impostor.log()
    );
    let ca_metrics = mesh.ca_metrics();
    assert!(
        ca_metrics.contains(r#"tern_ca_refusals_total{reason="wrong_identity"}"#),
        "{ca_metrics}"
    );
    assert!(!ca_metrics.contains("tern_ca_certificates_issued_total 1"));
    // Nothing listens in the clear meanwhile: the strict port refuses the handshake.
    let answer = raw_exchange(
        format!("127.0.0.1:{sh}").parse().unwrap(),
        b"GET / HTTP/1.1\r\nhost: app\r\n\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(answer, "");
    assert_eq!(app.hits(), 0);
}

/// Certificates that live 3 s are renewed about every 2 s on both sides while requests flow
/// over new and pooled mTLS connections: none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_drops_no_request() {
    let mesh = Mesh::start("mtls-rotate", Duration::from_secs(3)).await;
    let app = Upstream::start("app").await;
    let echo = support::tcp_echo().await;
    let (sh, st) = (free_port(), free_port());
    let mut server = mesh.proxy("server", API, API, &server_yaml(sh, st, app.addr, echo));
    server.wait_ready().await;
    let (ch, ct) = (free_port(), free_port());
    let mut client = mesh.proxy("client", WEB, WEB, &client_yaml(ch, ct, sh, st));
    client.wait_ready().await;
    let outbound: SocketAddr = format!("127.0.0.1:{ch}").parse().unwrap();

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        workers.push(tokio::spawn(async move {
            // Workers 0-1 reuse a connection to the client sidecar; 2-3 open one per
            // request, and every 3 s the opaque TCP path makes fresh handshakes.
            let http = http1_client();
            let mut n = 0u32;
            while tokio::time::Instant::now() < deadline && n < 20_000 {
                n += 1;
                let reply = if w < 2 {
                    get(&http, outbound, "api.default", "/", &[]).await
                } else {
                    get(&http1_client(), outbound, "api.default", "/", &[]).await
                };
                if reply.status == 200 && reply.header("x-seen-peer") == WEB {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // New mTLS connections during the rotation: opaque TCP dials the server sidecar afresh
    // each time, with whichever certificates both sides hold at that moment.
    let mut tcp_ok = 0;
    while tokio::time::Instant::now() < deadline {
        let mut stream = TcpStream::connect(("127.0.0.1", ct)).await.unwrap();
        stream.write_all(b"rotate").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"rotate");
        tcp_ok += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{ok} ok, {failed} failed\n{}", client.log());
    assert!(ok > 100, "{ok}");
    assert!(tcp_ok > 20, "{tcp_ok}");
    for proxy in [&server, &client] {
        let renewals = proxy
            .metric("tern_identity_certificate_renewals_total")
            .await;
        assert!(renewals >= 3.0, "renewals {renewals}: {}", proxy.log());
        assert_eq!(
            proxy
                .metric("tern_identity_certificate_failures_total")
                .await,
            0.0
        );
    }
}
