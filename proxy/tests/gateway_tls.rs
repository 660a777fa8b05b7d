//! Gateway mode: a listener terminates TLS for clients outside the mesh with certificates
//! from files, picked by SNI, and picks up renewed files without a restart; a broken file
//! keeps the certificates in use, and a config naming a bad file is refused whole.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{ProxyProcess, TempDir, Upstream, free_port};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            root: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a leaf for `names` as `stem.crt` / `stem.key`; returns its serial (hex).
    fn issue(&self, dir: &Path, stem: &str, names: &[&str], serial: u8) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(vec![serial].into());
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
    }
}

/// A TLS client that trusts `ca`: the serial of the certificate the server chose for `sni`,
/// and the answer to `GET /` over that connection.
async fn fetch(ca: &Ca, addr: SocketAddr, sni: &str) -> (Vec<u8>, u16) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let serial = parsed.raw_serial().to_vec();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = send
        .send_request(
            hyper::Request::get("/")
                .header("host", sni)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    (serial, status)
}

fn gateway_yaml(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"
listeners:
  - name: edge
    address: 127.0.0.1:{port}
    protocol: http
    tls:
      certificates:
        - {{ cert: {d}/a.crt, key: {d}/a.key }}
        - {{ cert: {d}/b.crt, key: {d}/b.key, server_names: ["*.b.example"] }}
    routes:
      - backends: [ {{ service: app }} ]
services:
  - name: app
    protocol: http1
    endpoints: [ {{ address: "{upstream}" }} ]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_sni_reloaded_when_the_files_change() {
    let dir = TempDir::new("gateway");
    let ca = Ca::new();
    ca.issue(&dir.0, "a", &["a.example", "www.a.example"], 1);
    ca.issue(&dir.0, "b", &["*.b.example", "other.example"], 2);
    let app = Upstream::start("app").await;
    let port = free_port();
    let config = dir.0.join("tern.yaml");
    std::fs::write(&config, gateway_yaml(&dir.0, port, app.addr)).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = ProxyProcess::spawn(&config, admin, &dir.0);
    proxy.wait_ready().await;
    let edge: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // By SNI: a's DNS names, b's configured wildcard; an unknown name gets the first.
    assert_eq!(fetch(&ca, edge, "a.example").await, (vec![1], 200));
    assert_eq!(fetch(&ca, edge, "www.a.example").await, (vec![1], 200));
    assert_eq!(fetch(&ca, edge, "api.b.example").await, (vec![2], 200));
    assert_eq!(app.hits(), 3);

    // Renewed files are used from the next handshake, without a restart.
    ca.issue(&dir.0, "a", &["a.example"], 3);
    let mut serial = vec![];
    for _ in 0..60 {
        serial = fetch(&ca, edge, "a.example").await.0;
        if serial == vec![3] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(serial, vec![3], "{}", proxy.log());
    assert!(
        proxy
            .metric(r#"tern_tls_gateway_certificate_reloads_total{listener="edge",result="ok"}"#)
            .await
            >= 1.0
    );

    // A half-written key: the certificates in use stay, and the failure is counted.
    std::fs::write(dir.0.join("a.key"), "-----BEGIN PRIVATE KEY-----\ntrunc").unwrap();
    let mut failed = 0.0;
    for _ in 0..60 {
        failed = proxy
            .metric(
                r#"tern_tls_gateway_certificate_reloads_total{listener="edge",result="failed"}"#,
            )
            .await;
        if failed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed >= 1.0, "{}", proxy.log());
    assert_eq!(fetch(&ca, edge, "a.example").await, (vec![3], 200));

    // Fixed files are picked up again.
    ca.issue(&dir.0, "a", &["a.example"], 4);
    let mut serial = vec![];
    for _ in 0..60 {
        serial = fetch(&ca, edge, "a.example").await.0;
        if serial == vec![4] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(serial, vec![4], "{}", proxy.log());

    // A config naming a missing file is refused whole; the running one stays.
    let broken = gateway_yaml(&dir.0, port, app.addr).replace("b.crt", "missing.crt");
    std::fs::write(&config, broken).unwrap();
    let mut logged = false;
    for _ in 0..60 {
        if proxy.log().contains("missing.crt") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "{}", proxy.log());
    assert_eq!(fetch(&ca, edge, "api.b.example").await, (vec![2], 200));
}
