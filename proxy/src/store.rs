//! The one place the active [`Snapshot`] lives: readers `load()`, a config change `store()`s.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::snapshot::Snapshot;

/// Shared handle to the active snapshot. Readers must not hold a guard across `.await`.
pub type Store = Arc<ArcSwap<Snapshot>>;

pub fn new_store() -> Store {
    Arc::new(ArcSwap::from_pointee(Snapshot::empty()))
}
