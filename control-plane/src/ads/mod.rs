//! The Aggregated Discovery Service: State of the World and incremental, over one snapshot.

mod server;
mod stream;
mod subscription;

pub use server::AdsServer;
pub use stream::{Protocol, Shared};
