//! `otlp_sink`: an OTLP/gRPC trace receiver that counts spans and throws them away, for the
//! end-to-end benchmark's tracing rows (an exporter needs something to talk to, and a real
//! collector would compete for the cores being measured).
//!
//! Usage: otlp_sink --address 127.0.0.1:4317   (prints the span count on SIGTERM/Ctrl-C)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4317")]
    address: SocketAddr,
    /// Keep HTTP/2's initial 64 KiB flow-control windows instead of growing them.
    #[arg(long)]
    fixed_window: bool,
}

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter())
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = Sink::default();
    let spans = Arc::clone(&sink.spans);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    // The OpenTelemetry Collector's gRPC server (grpc-go) grows its flow-control windows from
    // bandwidth-delay estimates; tonic's equivalent is the adaptive window. With the fixed
    // 64 KiB window an exporter sending a 150 KiB batch stalls on window updates twice.
    tonic::transport::Server::builder()
        .http2_adaptive_window(Some(!args.fixed_window))
        .add_service(TraceServiceServer::new(sink))
        .serve_with_shutdown(args.address, stop)
        .await?;
    println!("spans received: {}", spans.load(Ordering::Relaxed));
    Ok(())
}
