//! Protocol detection for `protocol: auto` listeners: the first bytes a client sends say
//! HTTP/1, HTTP/2 (the connection preface), TLS (a ClientHello record) or something else.
//! A client that sends nothing is talking to a server-speaks-first protocol (MySQL, SMTP,
//! Redis replication): after a short wait the connection is forwarded as opaque TCP, and
//! the destination is remembered as server-first for a while so that its next connections
//! are not delayed at all. Linkerd waits 10 s on such connections; a MySQL client waits
//! for its greeting, so every millisecond here is a millisecond of its connect time.
//!
//! `classify` and the memory's rules are pure; `sniff` is the thin IO around them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Ports of protocols that either speak first or are never HTTP, as Linkerd and Istio list
/// them: SMTP, submission, MySQL (and X protocol 33060), Galera, PostgreSQL, Redis,
/// Elasticsearch transport, memcached.
pub const DEFAULT_OPAQUE_PORTS: [u16; 10] =
    [25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211];

/// What an auto listener waits for a client's first bytes by default.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a destination stays known as server-first.
pub const SERVER_FIRST_TTL: Duration = Duration::from_secs(600);
/// Destinations remembered at most (each is a few dozen bytes); past it the oldest goes.
const MEMORY_CAPACITY: usize = 4096;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP/1 method we wait for (the registry's longest is 17 characters).
const MAX_METHOD: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Http1,
    Http2,
    Tls,
    /// Bytes that are none of the above.
    Opaque,
    /// Nothing arrived within the detection timeout.
    ServerFirst,
    /// A destination known to be server-first: forwarded without waiting.
    ServerFirstRemembered,
    /// The client closed before sending anything.
    Closed,
    /// The destination port is an opaque port: not sniffed at all.
    OpaquePort,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Http1,
        Outcome::Http2,
        Outcome::Tls,
        Outcome::Opaque,
        Outcome::ServerFirst,
        Outcome::ServerFirstRemembered,
        Outcome::Closed,
        Outcome::OpaquePort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Http1 => "http1",
            Outcome::Http2 => "http2",
            Outcome::Tls => "tls",
            Outcome::Opaque => "opaque",
            Outcome::ServerFirst => "server_first",
            Outcome::ServerFirstRemembered => "server_first_remembered",
            Outcome::Closed => "closed",
            Outcome::OpaquePort => "opaque_port",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the connection is served as HTTP (the rest go to opaque TCP).
    pub fn is_http(self) -> bool {
        matches!(self, Outcome::Http1 | Outcome::Http2)
    }
}

/// Classifies a connection from the bytes the client has sent so far; `None` while they
/// are a prefix of more than one answer (a client that sent `GE` so far).
pub fn classify(prefix: &[u8]) -> Option<Outcome> {
    let first = *prefix.first()?;
    if first == b'P' && prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(prefix) {
        // `PRI * HTTP/2.0` or a `POST`/`PUT`/`PATCH` still undecided.
        return None;
    }
    if prefix.starts_with(H2_PREFACE) {
        return Some(Outcome::Http2);
    }
    if first == 0x16 {
        // A TLS handshake record: content type 22, then version 3.x.
        return match prefix.get(1) {
            None => None,
            Some(0x03) => Some(Outcome::Tls),
            Some(_) => Some(Outcome::Opaque),
        };
    }
    let method_len = prefix
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    match prefix.get(method_len) {
        Some(b' ') if method_len > 0 => Some(Outcome::Http1),
        Some(_) => Some(Outcome::Opaque),
        None if method_len <= MAX_METHOD => None,
        None => Some(Outcome::Opaque),
    }
}

/// Destinations that spoke first, each until its entry expires.
#[derive(Debug, Default)]
pub struct ServerFirstMemory {
    until: Mutex<HashMap<SocketAddr, Instant>>,
}

impl ServerFirstMemory {
    pub fn remembers(&self, destination: SocketAddr, now: Instant) -> bool {
        let Ok(mut until) = self.until.lock() else {
            return false;
        };
        match until.get(&destination) {
            Some(t) if *t > now => true,
            Some(_) => {
                until.remove(&destination);
                false
            }
            None => false,
        }
    }

    pub fn remember(&self, destination: SocketAddr, now: Instant) {
        let Ok(mut until) = self.until.lock() else {
            return;
        };
        if until.len() >= MEMORY_CAPACITY && !until.contains_key(&destination) {
            until.retain(|_, t| *t > now);
            if until.len() >= MEMORY_CAPACITY
                && let Some(oldest) = until.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k)
            {
                until.remove(&oldest);
            }
        }
        until.insert(destination, now + SERVER_FIRST_TTL);
    }
}

/// Decides how to serve a new connection by peeking at (not reading) its first bytes, so
/// the stream goes on untouched to HTTP or TCP serving. Waits at most `timeout`.
pub async fn sniff(
    stream: &TcpStream,
    destination: SocketAddr,
    opaque_ports: &[u16],
    memory: &ServerFirstMemory,
    timeout: Duration,
) -> Outcome {
    if opaque_ports.binary_search(&destination.port()).is_ok() {
        return Outcome::OpaquePort;
    }
    let start = Instant::now();
    if memory.remembers(destination, start) {
        return Outcome::ServerFirstRemembered;
    }
    let deadline = start + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => {
                memory.remember(destination, Instant::now());
                return Outcome::ServerFirst;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return Outcome::Closed,
            Ok(Ok(n)) => {
                if let Some(outcome) = classify(&buf[..n]) {
                    return outcome;
                }
                if n == buf.len() {
                    return Outcome::Opaque;
                }
                // A first segment too short to tell (rare): peek returns at once while the
                // bytes sit unread, so wait a moment for more rather than spin.
                if Instant::now() >= deadline {
                    return Outcome::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Outcome::Http1));
        assert_eq!(classify(b"POST /x HTTP/1.1\r\n"), Some(Outcome::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Outcome::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Outcome::Http2));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Outcome::Tls)
        );
        assert_eq!(classify(&[0x16, 0x20]), Some(Outcome::Opaque));
        // Redis, PostgreSQL startup, binary.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Outcome::Opaque));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Outcome::Opaque)
        );
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Outcome::Opaque));
        assert_eq!(classify(b" GET"), Some(Outcome::Opaque));
    }

    #[test]
    fn undecided_prefixes_wait_for_more() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(&[0x16]), None);
        // `PO` is not the preface: it is an HTTP/1 method still being typed.
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"POST "), Some(Outcome::Http1));
        assert_eq!(classify(&[b'A'; MAX_METHOD + 1]), Some(Outcome::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn server_first_destinations_are_remembered_until_the_ttl() {
        let memory = ServerFirstMemory::default();
        let a: SocketAddr = "10.0.0.1:3306".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:3306".parse().unwrap();
        let now = Instant::now();
        assert!(!memory.remembers(a, now));
        memory.remember(a, now);
        assert!(memory.remembers(a, now + SERVER_FIRST_TTL - Duration::from_secs(1)));
        assert!(!memory.remembers(b, now));
        assert!(!memory.remembers(a, now + SERVER_FIRST_TTL));
        // Expired entries are dropped when seen.
        assert!(memory.until.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded() {
        let memory = ServerFirstMemory::default();
        let now = Instant::now();
        for i in 0..(MEMORY_CAPACITY as u32 + 100) {
            let addr = SocketAddr::from((std::net::Ipv4Addr::from(i), 5432));
            memory.remember(addr, now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(memory.until.lock().unwrap().len(), MEMORY_CAPACITY);
    }
}
