//! Workload identity: SPIFFE IDs, the key made in memory and the certificate the mesh CA
//! issues for it, fetched at start and renewed before it expires.

pub mod ca_client;
pub mod certificate;
pub mod manager;
pub mod spiffe;

pub use ca_client::{CaClient, FetchError};
pub use manager::{Identity, IdentityCounters};
pub use spiffe::{InvalidSpiffeId, SpiffeId};
