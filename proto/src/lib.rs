//! Tern's own protobuf APIs, generated at build time from `proto/`.

/// The mesh certificate authority's API.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("tern.identity.v1");
    }
}

/// A small echo service used by tests and benchmarks to exercise gRPC through the proxy.
pub mod testing {
    pub mod v1 {
        tonic::include_proto!("tern.testing.v1");
    }
}
