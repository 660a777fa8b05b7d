//! Which proxies are connected and what each has acknowledged, for `/debug/nodes`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// One ADS stream as `/debug/nodes` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub protocol: &'static str,
    pub peer: String,
    pub connected_at_unix: u64,
    /// Type (`cds`, `eds`, `lds`, `rds`) → last version the proxy ACKed.
    pub acked: BTreeMap<&'static str, String>,
    /// Type → the proxy's reason for its last NACK, if any since connecting.
    pub last_nack: BTreeMap<&'static str, String>,
    pub pushes: u64,
}

/// All open streams, by stream id. Touched once per request and push, never on the data path.
#[derive(Debug, Default)]
pub struct Nodes {
    streams: Mutex<BTreeMap<u64, NodeStatus>>,
}

impl Nodes {
    pub fn connect(&self, id: u64, protocol: &'static str, peer: String) {
        let status = NodeStatus {
            node: String::new(),
            protocol,
            peer,
            connected_at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            acked: BTreeMap::new(),
            last_nack: BTreeMap::new(),
            pushes: 0,
        };
        self.with(|m| {
            m.insert(id, status);
        });
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut NodeStatus)) {
        self.with(|m| {
            if let Some(s) = m.get_mut(&id) {
                f(s);
            }
        });
    }

    pub fn disconnect(&self, id: u64) {
        self.with(|m| {
            m.remove(&id);
        });
    }

    pub fn list(&self) -> Vec<NodeStatus> {
        let mut out = Vec::new();
        self.with(|m| out = m.values().cloned().collect());
        out
    }

    fn with(&self, f: impl FnOnce(&mut BTreeMap<u64, NodeStatus>)) {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
        let mut guard = match self.streams.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard);
    }
}
