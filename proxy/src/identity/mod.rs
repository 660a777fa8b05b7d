//! Workload identity: SPIFFE IDs; (to come) the in-memory key, the certificate fetched from
//! the mesh CA and its renewal.

pub mod spiffe;

pub use spiffe::{InvalidSpiffeId, SpiffeId};
