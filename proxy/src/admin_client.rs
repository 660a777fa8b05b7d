//! A minimal client for the admin port, for the CLI subcommands that read it (`explain`,
//! `top`): one `GET` over a fresh loopback connection, `Connection: close`, read to the end.
//! The admin server answers with a known length, so no chunked decoding is needed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers larger than this are refused (the admin's biggest, `/config_dump` of a large
/// mesh, stays well under it).
const LIMIT: usize = 64 * 1024 * 1024;

/// `GET path` on `admin` (`host:port`): the status and the body.
pub async fn get(admin: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    tokio::time::timeout(timeout, fetch(admin, path))
        .await
        .map_err(|_| format!("http://{admin}{path}: no answer within {timeout:?}"))?
}

async fn fetch(admin: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(admin)
        .await
        .map_err(|e| format!("connect to {admin}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {admin}: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(LIMIT as u64)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read from {admin}: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    let status = crate::wait_ready::status_of(&raw[..split + 2])
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok((status, body))
}

/// Percent-encodes a query parameter value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
