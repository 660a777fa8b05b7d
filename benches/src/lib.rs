//! Shared helpers for Tern benchmarks (the benches themselves live in `benches/`).
