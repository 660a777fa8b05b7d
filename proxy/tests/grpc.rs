//! gRPC end to end through the proxy: a tonic client, the proxy, a tonic server behind an
//! `http2` service. Unary, server streaming (not buffered) and bidirectional calls, with status
//! codes carried in trailers.
#![allow(clippy::unwrap_used)]

mod support;

use std::pin::Pin;
use std::time::Duration;

use support::Proxy;
use tern_proto::testing::v1::echo_client::EchoClient;
use tern_proto::testing::v1::echo_server::{Echo, EchoServer};
use tern_proto::testing::v1::{EchoReply, EchoRequest, StreamRequest};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

struct Service {
    name: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = req.into_inner().message;
        if message == "fail" {
            return Err(Status::permission_denied("told to fail"));
        }
        Ok(Response::new(EchoReply {
            message,
            server: self.name.clone(),
            sequence: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        let server = self.name.clone();
        let interval = Duration::from_millis(u64::from(req.interval_millis));
        let stream = async_stream(req.count, move |i| {
            let (server, message) = (server.clone(), req.message.clone());
            async move {
                tokio::time::sleep(interval).await;
                EchoReply {
                    message,
                    server,
                    sequence: i,
                }
            }
        });
        Ok(Response::new(stream))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let server = self.name.clone();
        let mut sequence = 0;
        let stream = req.into_inner().map(move |m| {
            sequence += 1;
            m.map(|m| EchoReply {
                message: m.message,
                server: server.clone(),
                sequence,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn async_stream<F, Fut>(count: u32, make: F) -> ReplyStream
where
    F: Fn(u32) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = EchoReply> + Send + 'static,
{
    Box::pin(tokio_stream::iter(0..count).then(make).map(Ok))
}

async fn grpc_server(name: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = EchoServer::new(Service {
        name: name.to_string(),
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn setup() -> (Proxy, EchoClient<tonic::transport::Channel>) {
    let (g1, g2) = (grpc_server("g1").await, grpc_server("g2").await);
    let yaml = format!(
        r#"
listeners:
  - name: grpc
    address: 127.0.0.1:0
    protocol: http
    routes: [ {{ backends: [ {{ service: echo }} ] }} ]
services:
  - name: echo
    protocol: http2
    load_balancer: least_request
    endpoints: [ {{ address: "{g1}" }}, {{ address: "{g2}" }} ]
"#
    );
    let proxy = Proxy::start(&yaml).await;
    let client = EchoClient::connect(format!("http://{}", proxy.addr("grpc")))
        .await
        .unwrap();
    (proxy, client)
}

#[tokio::test]
async fn unary_calls_are_balanced_and_errors_keep_their_status() {
    let (_proxy, mut client) = setup().await;
    let mut servers = std::collections::HashSet::new();
    for i in 0..20 {
        let reply = client
            .unary(EchoRequest {
                message: format!("hi {i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.message, format!("hi {i}"));
        servers.insert(reply.server);
    }
    assert_eq!(servers.len(), 2, "both servers answered");
    // A trailers-only error response crosses the proxy intact.
    let err = client
        .unary(EchoRequest {
            message: "fail".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "told to fail");
}

#[tokio::test]
async fn server_stream_is_relayed_as_it_is_produced() {
    let (_proxy, mut client) = setup().await;
    let start = tokio::time::Instant::now();
    let req = StreamRequest {
        message: "tick".into(),
        count: 5,
        interval_millis: 200,
    };
    let mut stream = client.server_stream(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let first_at = start.elapsed();
    assert_eq!(first.sequence, 0);
    // The whole stream takes ~1 s; the first message must arrive long before that.
    assert!(
        first_at < Duration::from_millis(700),
        "first message after {first_at:?}: buffered?"
    );
    let mut n = 1;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.sequence, n);
        n += 1;
    }
    assert_eq!(n, 5);
}

#[tokio::test]
async fn bidirectional_stream_round_trips() {
    let (_proxy, mut client) = setup().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = client.bidi_stream(outbound).await.unwrap().into_inner();
    for i in 0..10 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap();
        let reply = inbound.message().await.unwrap().unwrap();
        assert_eq!(reply.message, format!("m{i}"));
        assert_eq!(reply.sequence, i + 1);
    }
    drop(tx);
    assert!(
        inbound.message().await.unwrap().is_none(),
        "stream ends cleanly with OK status"
    );
}
