//! HTTP: serving downstream connections (HTTP/1.1 and h2c), routing, and forwarding upstream.

pub mod body;
pub mod client;
pub mod forward;
pub mod headers;
pub mod pool;
pub mod route;
pub mod server;
pub mod upgrade;
