//! The snapshot every ADS stream serves from: all resources of one mesh version, each with a
//! content version so that streams send only what changed.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use tern_proxy::config::Config;
use tern_proxy::xds::TypeKind;
use tokio::time::Instant;

use crate::resources;

/// One resource as it goes on the wire.
#[derive(Debug)]
pub struct Resource {
    pub name: Arc<str>,
    /// A hash of the encoded bytes: equal versions mean identical resources.
    pub version: Arc<str>,
    pub any: Any,
    /// Hidden from wildcard subscriptions; sent when asked for by name.
    pub named_only: bool,
}

pub type ByName = BTreeMap<Arc<str>, Arc<Resource>>;

/// All resources of one mesh version.
#[derive(Debug)]
pub struct Resources {
    /// Increases by one with every published change; `version_info` in SotW responses.
    pub version: u64,
    /// When the change that produced this version was noticed (file edit, Kubernetes event),
    /// so that the time until every proxy ACKs it can be measured.
    pub changed_at: Instant,
    types: [ByName; 4],
}

impl Resources {
    pub fn empty() -> Self {
        Resources {
            version: 0,
            changed_at: Instant::now(),
            types: Default::default(),
        }
    }

    /// Encodes `config`, reusing the `Arc`s of resources that did not change so that memory
    /// stays one copy per resource however many versions streams are still holding.
    pub fn build(config: &Config, version: u64, changed_at: Instant, previous: &Resources) -> Self {
        let mut types: [ByName; 4] = Default::default();
        for (kind, packed) in resources::encode(config) {
            let before = previous.of(kind);
            let map = &mut types[kind.index()];
            for p in packed {
                let hash = content_version(&p.any.value);
                let reused = before
                    .get(p.name.as_str())
                    .filter(|r| *r.version == *hash)
                    .cloned();
                let resource = reused.unwrap_or_else(|| {
                    Arc::new(Resource {
                        name: Arc::from(p.name.as_str()),
                        version: Arc::from(hash.as_str()),
                        any: p.any,
                        named_only: p.named_only,
                    })
                });
                map.insert(Arc::clone(&resource.name), resource);
            }
        }
        Resources {
            version,
            changed_at,
            types,
        }
    }

    pub fn of(&self, kind: TypeKind) -> &ByName {
        &self.types[kind.index()]
    }

    pub fn count(&self, kind: TypeKind) -> usize {
        self.types[kind.index()].len()
    }
}

fn content_version(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}
