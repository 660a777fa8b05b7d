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
    /// Per type, the `version` at which its resources last changed. A stream that is up to
    /// date with a type at this version has nothing to diff for it.
    type_versions: [u64; 4],
}

impl Resources {
    pub fn empty() -> Self {
        Resources {
            version: 0,
            changed_at: Instant::now(),
            types: Default::default(),
            type_versions: [0; 4],
        }
    }

    /// Encodes `config`, reusing the `Arc`s of resources that did not change so that memory
    /// stays one copy per resource however many versions streams are still holding.
    pub fn build(config: &Config, version: u64, changed_at: Instant, previous: &Resources) -> Self {
        let mut types: [ByName; 4] = Default::default();
        let mut reused_count = [0usize; 4];
        for (kind, packed) in resources::encode(config) {
            let before = previous.of(kind);
            let map = &mut types[kind.index()];
            for p in packed {
                let hash = content_version(&p.any.value);
                let reused = before
                    .get(p.name.as_str())
                    .filter(|r| *r.version == *hash)
                    .cloned();
                if reused.is_some() {
                    reused_count[kind.index()] += 1;
                }
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
        // A type whose every resource was reused, with none added or removed, is unchanged.
        let type_versions = TypeKind::ALL.map(|kind| {
            let (i, before) = (kind.index(), previous.of(kind).len());
            if reused_count[i] == before && types[i].len() == before {
                previous.type_versions[i]
            } else {
                version
            }
        });
        Resources {
            version,
            changed_at,
            types,
            type_versions,
        }
    }

    /// The version at which `kind`'s resources last changed.
    pub fn type_version(&self, kind: TypeKind) -> u64 {
        self.type_versions[kind.index()]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(port: u16) -> Config {
        tern_proxy::config::parse_yaml(&format!(
            "services:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: 127.0.0.1:{port} }} ]\n"
        ))
        .expect("valid mesh")
    }

    #[test]
    fn only_changed_types_get_a_new_type_version() {
        let v1 = Resources::build(&mesh(9001), 1, Instant::now(), &Resources::empty());
        assert_eq!(v1.type_version(TypeKind::Cluster), 1);
        let v2 = Resources::build(&mesh(9002), 2, Instant::now(), &v1);
        assert_eq!(v2.type_version(TypeKind::Endpoint), 2);
        assert_eq!(v2.type_version(TypeKind::Cluster), 1);
        assert_eq!(v2.type_version(TypeKind::Listener), 1);
        assert_eq!(v2.type_version(TypeKind::Route), 0, "never had any");
        let v3 = Resources::build(&mesh(9002), 3, Instant::now(), &v2);
        assert_eq!(v3.type_version(TypeKind::Endpoint), 2);
    }
}
