//! `tern-proxy wait-ready`: polls the admin server's `/ready` until it answers 200, so an
//! entrypoint or a Kubernetes startup probe can hold the app back until the sidecar serves.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One try gets at most this long: a wedged admin server must not eat the whole budget.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The status line fits well within this; anything longer is not an admin server.
const HEAD_LIMIT: usize = 1024;

/// The proxy did not turn ready in time.
#[derive(Debug, thiserror::Error)]
#[error("http://{admin}/ready did not answer 200 within {timeout:?} (last try: {last})")]
pub struct NotReady {
    pub admin: String,
    pub timeout: Duration,
    pub last: Probe,
}

/// What one try saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Ready,
    Status(u16),
    Unreachable(String),
    NotHttp,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Ready => f.write_str("200"),
            Probe::Status(code) => write!(f, "status {code}"),
            Probe::Unreachable(reason) => f.write_str(reason),
            Probe::NotHttp => f.write_str("the answer was not HTTP"),
        }
    }
}

/// Polls `http://ADMIN/ready` every `interval` until it answers 200 or `timeout` passes.
/// `admin` is `host:port`; names are resolved on every try (the proxy may not exist yet).
pub async fn wait_ready(
    admin: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(left.min(PROBE_TIMEOUT), probe(admin)).await {
            Ok(p) => p,
            Err(_) => Probe::Unreachable("no answer in time".into()),
        };
        if last == Probe::Ready {
            return Ok(());
        }
        if Instant::now() + interval >= deadline {
            return Err(NotReady {
                admin: admin.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// One `GET /ready` over a fresh connection; a raw request keeps this free of client stacks.
async fn probe(admin: &str) -> Probe {
    let mut stream = match TcpStream::connect(admin).await {
        Ok(s) => s,
        Err(e) => return Probe::Unreachable(format!("connect: {e}")),
    };
    let request = format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Probe::Unreachable(format!("send: {e}"));
    }
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < HEAD_LIMIT {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Probe::Unreachable(format!("read: {e}")),
        }
    }
    match status_of(&head) {
        Some(200) => Probe::Ready,
        Some(code) => Probe::Status(code),
        None => Probe::NotHttp,
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK\r\n...`).
pub fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_of_a_status_line() {
        assert_eq!(
            status_of(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n"),
            Some(200)
        );
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 200"), Some(200));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_against_a_closed_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let start = Instant::now();
        let err = wait_ready(
            &format!("127.0.0.1:{port}"),
            Duration::from_millis(300),
            Duration::from_millis(50),
        )
        .await;
        assert!(matches!(
            err,
            Err(NotReady {
                last: Probe::Unreachable(_),
                ..
            })
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
