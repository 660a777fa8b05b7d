//! Spans to a collector behind TLS (`otlp_endpoint: https://...`): the proxy checks the
//! collector's certificate against the system trust store, here the bundle `SSL_CERT_FILE`
//! names (a CA made by the test). Its own binary: the variable is process-wide.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::*;

/// A CA written to `dir/ca.pem`, and a `localhost` identity from it for the receiver.
fn tls_identity(dir: &TempDir) -> tonic::transport::Identity {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.0.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn spans_reach_a_collector_over_tls() {
    let dir = TempDir::new("tern-otlp-tls");
    let (otlp, r) = otlp::receiver(Some(tls_identity(&dir))).await;
    // SAFETY: the only test in this binary, and nothing has read the environment for TLS
    // roots yet (the exporter loads them when the proxy starts, below).
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SSL_CERT_FILE", dir.0.join("ca.pem"));
    }
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&otlp::config(
        &format!("https://localhost:{}", otlp.port()),
        1.0,
        api.addr,
    ))
    .await;
    let client = http1_client();
    for _ in 0..5 {
        let reply = get(&client, proxy.addr("web"), "x", "/", &[]).await;
        assert_eq!(reply.status, 200);
    }
    // Five requests, a server and a client span each.
    for _ in 0..250 {
        if r.spans.lock().unwrap().len() >= 10 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{} spans over TLS, expected 10",
        r.spans.lock().unwrap().len()
    );
}
