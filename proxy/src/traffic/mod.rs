//! Traffic policy per route: local rate limiting (`rate_limit.rs`) and fault injection
//! (`fault.rs`). Both decide before a backend is picked, so refused and aborted requests cost
//! the upstream nothing.

pub mod fault;
pub mod rate_limit;
