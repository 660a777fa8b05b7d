//! Spans to a collector behind TLS (`otlp_endpoint: https://...`): the proxy checks the
//! collector's certificate against the system trust store, here the bundle `SSL_CERT_FILE`
//! names (a CA made by the test). Its own binary: the variable is process-wide.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::*;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|rs| rs.scope_spans.iter())
            .map(|ss| ss.spans.len())
            .sum();
        self.spans.fetch_add(n, Ordering::SeqCst);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A CA, and a receiver on 127.0.0.1 with a `localhost` certificate from it.
async fn tls_receiver(dir: &TempDir) -> (SocketAddr, Receiver) {
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
    let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver::default();
    let service = TraceServiceServer::new(r.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, r)
}

#[tokio::test]
async fn spans_reach_a_collector_over_tls() {
    let dir = TempDir::new("tern-otlp-tls");
    let (otlp, r) = tls_receiver(&dir).await;
    // SAFETY: the only test in this binary, and nothing has read the environment for TLS
    // roots yet (the exporter loads them when the proxy starts, below).
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SSL_CERT_FILE", dir.0.join("ca.pem"));
    }
    let api = Upstream::start("api").await;
    let proxy = Proxy::start(&format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "https://localhost:{port}", sample_ratio: 1.0 }}
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes: [ {{ backends: [ {{ service: api }} ] }} ]
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{api}" }} ]
"#,
        port = otlp.port(),
        api = api.addr
    ))
    .await;
    let client = http1_client();
    for _ in 0..5 {
        let reply = get(&client, proxy.addr("web"), "x", "/", &[]).await;
        assert_eq!(reply.status, 200);
    }
    // Five requests, a server and a client span each.
    for _ in 0..250 {
        if r.spans.load(Ordering::SeqCst) >= 10 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{} spans over TLS, expected 10",
        r.spans.load(Ordering::SeqCst)
    );
}
