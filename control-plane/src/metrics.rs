//! The control plane's own Prometheus metrics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `cds`, `eds`, `lds` or `rds`.
    pub r#type: &'static str,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NackLabels {
    pub r#type: &'static str,
    /// The proxy's `error_detail`, cut to 120 characters (bounded: one value per distinct error).
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// `ok` or `invalid`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `bad_request`, `unauthenticated`, `wrong_identity`, `foreign_trust_domain`, `bad_csr`.
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub connected: Family<ProtocolLabels, Gauge>,
    pub pushes: Family<TypeLabels, Counter>,
    pub resources_sent: Family<TypeLabels, Counter>,
    pub acks: Family<TypeLabels, Counter>,
    pub nacks: Family<NackLabels, Counter>,
    pub push_latency: Family<TypeLabels, Histogram>,
    pub model_updates: Family<ModelLabels, Counter>,
    pub model_version: Gauge,
    pub resources: Family<TypeLabels, Gauge>,
    pub ca_issued: Counter,
    pub ca_refused: Family<RefusalLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            connected: Family::default(),
            pushes: Family::default(),
            resources_sent: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            push_latency: Family::new_with_constructor(latency_histogram),
            model_updates: Family::default(),
            model_version: Gauge::default(),
            resources: Family::default(),
            ca_issued: Counter::default(),
            ca_refused: Family::default(),
        };
        registry.register(
            "tern_xds_connected_streams",
            "ADS streams open now",
            m.connected.clone(),
        );
        registry.register(
            "tern_xds_pushes",
            "Discovery responses sent",
            m.pushes.clone(),
        );
        registry.register(
            "tern_xds_resources_sent",
            "Resources carried by discovery responses",
            m.resources_sent.clone(),
        );
        registry.register(
            "tern_xds_acks",
            "Responses ACKed by proxies",
            m.acks.clone(),
        );
        registry.register(
            "tern_xds_nacks",
            "Responses NACKed by proxies, by reason",
            m.nacks.clone(),
        );
        registry.register(
            "tern_xds_push_latency_seconds",
            "From a mesh change being noticed to a proxy ACKing the push that carries it",
            m.push_latency.clone(),
        );
        registry.register(
            "tern_xds_model_updates",
            "Mesh model updates from the file or Kubernetes, by outcome",
            m.model_updates.clone(),
        );
        registry.register(
            "tern_xds_model_version",
            "Version of the mesh being served",
            m.model_version.clone(),
        );
        registry.register(
            "tern_xds_resources",
            "Resources in the served snapshot",
            m.resources.clone(),
        );
        registry.register(
            "tern_ca_certificates_issued",
            "Workload certificates the mesh CA signed",
            m.ca_issued.clone(),
        );
        registry.register(
            "tern_ca_refusals",
            "Certify calls the mesh CA refused, by reason",
            m.ca_refused.clone(),
        );
        Arc::new(m)
    }
}
