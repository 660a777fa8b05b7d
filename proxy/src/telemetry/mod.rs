//! What the proxy tells about the traffic besides metrics: access logs and traces.

pub mod access_log;
pub mod otlp;
pub mod semconv;
pub mod traces;
