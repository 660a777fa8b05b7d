//! What the proxy tells about the traffic besides metrics: access logs.

pub mod access_log;
