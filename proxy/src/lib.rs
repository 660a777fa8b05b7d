//! Tern's proxy: a sidecar and gateway data plane.
//!
//! Layout (see ARCHITECTURE.md for the path of a request):
//! - [`config`]: the YAML model, validation with field paths, loading.
//! - [`snapshot`] and [`store`]: the runtime view of one config, swapped atomically.
//! - [`balance`]: round robin, least request and peak-EWMA endpoint selection.
//! - [`http`]: downstream serving, route matching, header rules, upstream pools.
//! - [`identity`]: SPIFFE IDs, the workload certificate and its renewal.
//! - [`tcp`]: opaque forwarding.
//! - [`tls`]: mesh mTLS (SPIFFE checks, configs) and the plaintext-or-TLS stream type.
//! - [`authz`]: who may call a listener.
//! - [`listener`]: binding and accept loops.
//! - [`overload`]: per-listener connection caps and the memory guard.
//! - [`app`]: wiring, reload and drain; [`admin`]: the admin server; [`metrics`].
//! - [`demo`]: the self-contained demo behind `tern-proxy demo`.
//! - [`wait_ready`]: `tern-proxy wait-ready`, polling `/ready` for entrypoints and probes.

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod authz;
pub mod balance;
pub mod config;
pub mod demo;
pub mod detect;
pub mod explain;
pub mod exposition;
pub mod health;
pub mod http;
pub mod identity;
pub mod intercept;
pub mod listener;
pub mod metrics;
pub mod overload;
pub mod resilience;
pub mod snapshot;
pub mod store;
pub mod tcp;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod top;
pub mod traffic;
pub mod wait_ready;
pub mod xds;
