//! An OTLP/gRPC trace receiver for tests: a tonic server with the OpenTelemetry protocol
//! types that keeps every span it gets with its resource's `service.name`; TLS optional.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// How the receiver answers each export (it keeps the spans either way).
    pub answer: Arc<Mutex<Answer>>,
}

#[derive(Clone, Debug, Default)]
pub enum Answer {
    #[default]
    Accept,
    /// A partial success: this many spans rejected, with a message.
    Reject(i64, String),
    /// A failed call with this status.
    Fail(tonic::Code),
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        drop(spans);
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        match self.answer.lock().unwrap().clone() {
            Answer::Accept => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Answer::Reject(rejected_spans, error_message) => {
                Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans,
                        error_message,
                    }),
                }))
            }
            Answer::Fail(code) => Err(tonic::Status::new(code, "receiver says no")),
        }
    }
}

/// A receiver on a free loopback port; with `tls`, it serves that identity.
pub async fn receiver(tls: Option<tonic::transport::Identity>) -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver::default();
    let service = TraceServiceServer::new(r.clone());
    let mut server = tonic::transport::Server::builder();
    if let Some(identity) = tls {
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap();
    }
    tokio::spawn(async move {
        server
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, r)
}

/// A proxy config tracing at `ratio` to `otlp` (a URL), one HTTP listener `web` to `api`.
pub fn config(otlp: &str, ratio: f64, api: SocketAddr) -> String {
    format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "{otlp}", sample_ratio: {ratio}, service_name: web-sidecar }}
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes: [ {{ backends: [ {{ service: api }} ] }} ]
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{api}" }} ]
"#
    )
}
