//! Span attributes of the HTTP semantic conventions whose values come from a small set (the
//! method, the scheme and protocol version), encoded once per process: a traced request
//! copies each as one pre-encoded run of bytes instead of writing its key and value. The
//! keys of the attributes whose values vary are encoded at compile time.

use std::sync::LazyLock;

use http::{Method, Version};

use super::otlp::{Attributes, Key};

/// The keys every traced request writes, encoded at compile time (see [`Key`]).
pub const URL_PATH: Key = Key::string("url.path");
pub const SERVER_ADDRESS: Key = Key::string("server.address");
pub const STATUS_CODE: Key = Key::int("http.response.status_code");
pub const OUTCOME: Key = Key::string("tern.outcome");
pub const RETRIES: Key = Key::int("tern.retries");

/// The methods of RFC 9110 and PATCH; any other is written out per request.
const METHODS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::PATCH,
    Method::CONNECT,
    Method::TRACE,
];

/// `network.protocol.version` by HTTP version.
const VERSIONS: [(Version, &str); 4] = [
    (Version::HTTP_11, "1.1"),
    (Version::HTTP_2, "2"),
    (Version::HTTP_10, "1.0"),
    (Version::HTTP_09, "0.9"),
];

struct Encoded {
    /// `http.request.method`, in the order of `METHODS`.
    methods: Vec<Box<[u8]>>,
    /// `url.scheme` (`http`) and `network.protocol.version`, in the order of `VERSIONS`.
    versions: Vec<Box<[u8]>>,
}

static ENCODED: LazyLock<Encoded> = LazyLock::new(|| Encoded {
    methods: METHODS
        .iter()
        .map(|m| {
            let mut a = Attributes::with_capacity(32);
            a.str("http.request.method", m.as_str());
            a.into_boxed()
        })
        .collect(),
    versions: VERSIONS
        .iter()
        .map(|(_, v)| {
            let mut a = Attributes::with_capacity(48);
            a.str("url.scheme", "http");
            a.str("network.protocol.version", v);
            a.into_boxed()
        })
        .collect(),
});

/// `http.request.method`.
pub fn method(a: &mut Attributes, method: &Method) {
    match METHODS.iter().position(|m| m == method) {
        Some(i) => a.raw(&ENCODED.methods[i]),
        None => a.str("http.request.method", method.as_str()),
    }
}

/// `url.scheme` (plain HTTP: the listener's TLS, when there is any, is the mesh's, not the
/// application's) and `network.protocol.version`.
pub fn scheme_and_version(a: &mut Attributes, version: Version) {
    match VERSIONS.iter().position(|(v, _)| *v == version) {
        Some(i) => a.raw(&ENCODED.versions[i]),
        // Only HTTP/3 is not in `VERSIONS` (the proxy does not serve it today).
        None => {
            a.str("url.scheme", "http");
            a.str("network.protocol.version", "3");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is copied equals what writing the attributes out would give.
    #[test]
    fn pre_encoded_attributes_match_written_ones() {
        for m in METHODS
            .iter()
            .chain([&Method::from_bytes(b"PURGE").unwrap()])
        {
            let (mut copied, mut written) = (Attributes::default(), Attributes::default());
            method(&mut copied, m);
            written.str("http.request.method", m.as_str());
            assert_eq!(copied.as_bytes(), written.as_bytes(), "{m}");
        }
        for (v, text) in VERSIONS {
            let (mut copied, mut written) = (Attributes::default(), Attributes::default());
            scheme_and_version(&mut copied, v);
            written.str("url.scheme", "http");
            written.str("network.protocol.version", text);
            assert_eq!(copied.as_bytes(), written.as_bytes(), "{v:?}");
        }
    }
}
