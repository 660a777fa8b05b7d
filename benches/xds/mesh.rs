//! The benchmark's mesh: generated, written as the YAML the control plane watches, and edited
//! one endpoint at a time with a port that says which edit it was.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use tokio::time::Instant;

/// Edit `k` sets one endpoint's port to `MARKER_BASE + k`; generated endpoints use port 8080,
/// so a port at or above this base in a ClusterLoadAssignment names the edit that put it there.
pub const MARKER_BASE: u32 = 20_000;
/// Edits are numbered from 1 and must stay below the highest port.
pub const MAX_EDITS: u32 = 65_535 - MARKER_BASE;

pub struct Mesh {
    services: Vec<Service>,
    listeners: usize,
    routes_per_listener: usize,
}

struct Service {
    name: String,
    endpoints: Vec<Endpoint>,
}

struct Endpoint {
    ip: [u8; 4],
    port: u32,
    weight: u32,
}

/// What one edit changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub number: u32,
    pub service: String,
    pub port: u32,
}

impl Mesh {
    /// `services` HTTP/1.1 services of `endpoints` endpoints each (every third one weight 2),
    /// and `listeners` HTTP listeners routing by path prefix to `routes_per_listener`
    /// services each, then to a default.
    pub fn generate(
        services: usize,
        endpoints: usize,
        listeners: usize,
        routes_per_listener: usize,
    ) -> Mesh {
        let services = (0..services)
            .map(|s| Service {
                name: service_name(s),
                endpoints: (0..endpoints)
                    .map(|e| Endpoint {
                        ip: [
                            10,
                            ((s >> 8) & 0xff) as u8,
                            (s & 0xff) as u8,
                            (e % 250 + 1) as u8,
                        ],
                        port: 8080 + (e / 250) as u32,
                        weight: if e % 3 == 2 { 2 } else { 1 },
                    })
                    .collect(),
            })
            .collect();
        Mesh {
            services,
            listeners,
            routes_per_listener,
        }
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Edit `number` (from 1): one endpoint of one service gets the marker port. Services and
    /// endpoints are visited in a fixed stride so that successive edits touch different ones.
    pub fn edit(&mut self, number: u32) -> Edit {
        let service = (number as usize * 397) % self.services.len();
        let svc = &mut self.services[service];
        let endpoint = number as usize % svc.endpoints.len();
        let port = MARKER_BASE + number;
        svc.endpoints[endpoint].port = port;
        Edit {
            number,
            service: svc.name.clone(),
            port,
        }
    }

    pub fn to_yaml(&self) -> String {
        let mut out = String::with_capacity(64 + self.services.len() * 64 * 11);
        out.push_str("listeners:\n");
        for l in 0..self.listeners {
            let _ = writeln!(out, "  - name: web-{l:03}");
            let _ = writeln!(out, "    address: 127.0.0.1:{}", 10_000 + l);
            out.push_str("    protocol: http\n    routes:\n");
            for r in 0..self.routes_per_listener {
                let target =
                    &self.services[(l * self.routes_per_listener + r) % self.services.len()];
                let _ = writeln!(
                    out,
                    "      - match: {{ path_prefix: /{name} }}\n        backends: [ {{ service: {name} }} ]",
                    name = target.name
                );
            }
            let fallback = &self.services[l % self.services.len()];
            let _ = writeln!(
                out,
                "      - backends: [ {{ service: {} }} ]",
                fallback.name
            );
        }
        out.push_str("services:\n");
        for s in &self.services {
            let _ = writeln!(out, "  - name: {}", s.name);
            out.push_str("    protocol: http1\n    load_balancer: round_robin\n    endpoints:\n");
            for e in &s.endpoints {
                let [a, b, c, d] = e.ip;
                let _ = writeln!(
                    out,
                    "      - {{ address: \"{a}.{b}.{c}.{d}:{}\", weight: {} }}",
                    e.port, e.weight
                );
            }
        }
        out
    }

    /// Replaces `path` the way editors and config management do: writes a temporary file
    /// beside it, then renames it over. Returns the time taken just before the rename, when
    /// the new content is about to become visible.
    pub fn replace_file(&self, path: &Path) -> anyhow::Result<Instant> {
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, self.to_yaml())
            .with_context(|| format!("writing {}", tmp.display()))?;
        let at = Instant::now();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} over {}", tmp.display(), path.display()))?;
        Ok(at)
    }
}

fn service_name(index: usize) -> String {
    format!("svc-{:04}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_mesh_is_valid_for_the_proxy_config() {
        let mesh = Mesh::generate(30, 10, 3, 4);
        let config = tern_proxy::config::parse_yaml(&mesh.to_yaml()).expect("valid mesh");
        assert_eq!(config.services.len(), 30);
        assert_eq!(config.listeners.len(), 3);
    }

    #[test]
    fn edits_touch_one_endpoint_with_a_marker_port() {
        let mut mesh = Mesh::generate(1000, 10, 1, 1);
        let before = mesh.to_yaml();
        let edit = mesh.edit(1);
        let after = mesh.to_yaml();
        assert_eq!(edit.service, "svc-0398");
        assert_eq!(edit.port, MARKER_BASE + 1);
        let changed: Vec<_> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(changed[0].1.contains(":20001\""), "{changed:?}");
        let second = mesh.edit(2);
        assert_ne!(second.service, edit.service);
        tern_proxy::config::parse_yaml(&after).expect("edited mesh stays valid");
    }
}
