//! A scripted ADS server that is not Tern's control plane: it answers nothing by itself,
//! hands each stream to the test, records every request the proxy sends and lets the test
//! push responses (either protocol variant) and read the proxy's answers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tern_proxy::xds::{TypeKind, XdsProtocol};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// One ADS stream as the test sees it: every request the proxy sent on it, and the way to
/// answer. Dropping it ends the stream (the server closes it).
pub struct Conn<Req, Resp> {
    pub log: Arc<Mutex<Vec<Req>>>,
    pub tx: mpsc::Sender<Result<Resp, Status>>,
}

pub type SotwConn = Conn<DiscoveryRequest, DiscoveryResponse>;
pub type DeltaConn = Conn<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// Hands each new stream to the test; answers nothing by itself.
pub struct ScriptedAds {
    sotw: mpsc::UnboundedSender<SotwConn>,
    delta: mpsc::UnboundedSender<DeltaConn>,
}

pub fn open<Req: Send + 'static, Resp>(
    mut inbound: Streaming<Req>,
) -> (Conn<Req, Resp>, ReceiverStream<Result<Resp, Status>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel(16);
    let recorder = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok(Some(req)) = inbound.message().await {
            recorder.lock().unwrap().push(req);
        }
    });
    (Conn { log, tx }, ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for ScriptedAds {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (conn, stream) = open(request.into_inner());
        self.sotw
            .send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(stream))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (conn, stream) = open(request.into_inner());
        self.delta
            .send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(stream))
    }
}

/// The server's end of the test: new streams arrive here.
pub struct Server {
    pub addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<SotwConn>,
    delta: mpsc::UnboundedReceiver<DeltaConn>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sotw_tx, sotw) = mpsc::unbounded_channel();
        let (delta_tx, delta) = mpsc::unbounded_channel();
        let service = AggregatedDiscoveryServiceServer::new(ScriptedAds {
            sotw: sotw_tx,
            delta: delta_tx,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Server { addr, sotw, delta }
    }

    /// The next stream the proxy opens.
    pub async fn accept(&mut self, protocol: XdsProtocol) -> Script {
        tokio::time::timeout(Duration::from_secs(10), async {
            match protocol {
                XdsProtocol::Sotw => Script::Sotw(self.sotw.recv().await.unwrap()),
                XdsProtocol::Delta => Script::Delta(self.delta.recv().await.unwrap()),
            }
        })
        .await
        .expect("the proxy opens an ADS stream")
    }
}

/// How the proxy answered one response.
#[derive(Debug)]
pub struct Answer {
    /// SotW only: the version the proxy says is in force.
    pub version_info: Option<String>,
    /// SotW only: the subscription repeated with the ACK.
    pub resource_names: Vec<String>,
    /// A NACK's `error_detail.message`.
    pub error: Option<String>,
}

/// One stream, either protocol: push responses, read the proxy's requests.
pub enum Script {
    Sotw(SotwConn),
    Delta(DeltaConn),
}

impl Script {
    /// Sends `resources` of `kind` as version `version`; returns the nonce.
    pub async fn push(&self, kind: TypeKind, version: &str, resources: Vec<(&str, Any)>) -> String {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let nonce = format!(
            "nonce-{}",
            NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let sent = match self {
            Script::Sotw(c) => {
                c.tx.send(Ok(DiscoveryResponse {
                    version_info: version.into(),
                    resources: resources.into_iter().map(|(_, any)| any).collect(),
                    type_url: kind.type_url(),
                    nonce: nonce.clone(),
                    ..Default::default()
                }))
                .await
                .is_ok()
            }
            Script::Delta(c) => {
                c.tx.send(Ok(DeltaDiscoveryResponse {
                    system_version_info: version.into(),
                    resources: resources
                        .into_iter()
                        .map(|(name, any)| Resource {
                            name: name.into(),
                            version: version.into(),
                            resource: Some(any),
                            ..Default::default()
                        })
                        .collect(),
                    type_url: kind.type_url(),
                    nonce: nonce.clone(),
                    ..Default::default()
                }))
                .await
                .is_ok()
            }
        };
        assert!(sent, "the stream is open");
        nonce
    }

    /// The proxy's answer to the response with `nonce`.
    pub async fn answer(&self, kind: TypeKind, nonce: &str) -> Answer {
        eventually(&format!("the answer to {nonce}"), || match self {
            Script::Sotw(c) => c.log.lock().unwrap().iter().find_map(|r| {
                (r.type_url == kind.type_url() && r.response_nonce == nonce).then(|| Answer {
                    version_info: Some(r.version_info.clone()),
                    resource_names: r.resource_names.clone(),
                    error: r.error_detail.as_ref().map(|e| e.message.clone()),
                })
            }),
            Script::Delta(c) => c.log.lock().unwrap().iter().find_map(|r| {
                (r.type_url == kind.type_url() && r.response_nonce == nonce).then(|| Answer {
                    version_info: None,
                    resource_names: Vec::new(),
                    error: r.error_detail.as_ref().map(|e| e.message.clone()),
                })
            }),
        })
        .await
    }

    /// What the proxy is subscribed to for `kind`, from all its requests so far.
    pub fn subscription(&self, kind: TypeKind) -> Option<BTreeSet<String>> {
        match self {
            Script::Sotw(c) => c
                .log
                .lock()
                .unwrap()
                .iter()
                .rfind(|r| r.type_url == kind.type_url())
                .map(|r| r.resource_names.iter().cloned().collect()),
            Script::Delta(c) => {
                let log = c.log.lock().unwrap();
                let mut names = None;
                for r in log.iter().filter(|r| r.type_url == kind.type_url()) {
                    let set: &mut BTreeSet<String> = names.get_or_insert_with(BTreeSet::new);
                    set.extend(r.resource_names_subscribe.iter().cloned());
                    for n in &r.resource_names_unsubscribe {
                        set.remove(n);
                    }
                }
                names
            }
        }
    }

    pub async fn wait_subscribed(&self, kind: TypeKind, names: &[&str]) {
        let want: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
        eventually(&format!("the {kind:?} subscription {want:?}"), || {
            (self.subscription(kind).as_ref() == Some(&want)).then_some(())
        })
        .await;
    }

    /// The node id of the first request, and the types the opening requests asked for.
    pub fn opening(&self) -> (String, Vec<String>) {
        match self {
            Script::Sotw(c) => {
                let log = c.log.lock().unwrap();
                (
                    log[0]
                        .node
                        .as_ref()
                        .map(|n| n.id.clone())
                        .unwrap_or_default(),
                    log.iter().map(|r| r.type_url.clone()).collect(),
                )
            }
            Script::Delta(c) => {
                let log = c.log.lock().unwrap();
                (
                    log[0]
                        .node
                        .as_ref()
                        .map(|n| n.id.clone())
                        .unwrap_or_default(),
                    log.iter().map(|r| r.type_url.clone()).collect(),
                )
            }
        }
    }

    pub fn request_count(&self) -> usize {
        match self {
            Script::Sotw(c) => c.log.lock().unwrap().len(),
            Script::Delta(c) => c.log.lock().unwrap().len(),
        }
    }
}

/// Polls `f` until it gives a value (10 s at most).
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
