//! The proxy's xDS side: resource types, the translation of Envoy resources into Tern's config
//! model (`decode`, then `assemble`), and the ADS client that follows a control plane.

mod assemble;
pub(crate) mod backoff;
mod client;
pub mod decode;
pub mod identity;
mod policy;
mod tracer;
mod traffic;
mod types;

pub use assemble::{Assembly, Warm, XdsState};
pub use backoff::Backoff;
pub use client::{XdsOptions, XdsProtocol, run};
pub use traffic::PolicyFilters;
pub use types::TypeKind;
