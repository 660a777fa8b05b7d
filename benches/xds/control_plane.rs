//! The control plane under test as a child process: started pinned to its core, waited for
//! until ready, measured through /proc, and killed when the benchmark ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub struct ControlPlane {
    child: Child,
    pub pid: u32,
    pub xds: SocketAddr,
    admin: SocketAddr,
    clock_ticks: f64,
}

/// Memory of a process from /proc/PID/status, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    /// The peak resident set since the process started.
    pub hwm_kib: u64,
}

pub struct Launch<'a> {
    pub binary: &'a Path,
    pub config: &'a Path,
    /// `taskset -c CPU` for the child; `None` leaves it unpinned.
    pub cpu: Option<&'a str>,
    pub debounce: &'a str,
    pub watch_interval: &'a str,
    /// The child's stderr (its log) goes here.
    pub log: PathBuf,
}

impl ControlPlane {
    pub async fn start(launch: Launch<'_>) -> anyhow::Result<ControlPlane> {
        let xds = free_port().await?;
        let admin = free_port().await?;
        let mut command = match launch.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpu]).arg(launch.binary);
                c
            }
            None => Command::new(launch.binary),
        };
        let log = std::fs::File::create(&launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        command
            .arg("--config")
            .arg(launch.config)
            .arg("--xds-address")
            .arg(xds.to_string())
            .arg("--admin-address")
            .arg(admin.to_string())
            .arg("--debounce")
            .arg(launch.debounce)
            .arg("--watch-interval")
            .arg(launch.watch_interval)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        // `taskset` execs the binary, so the pid is the control plane's own.
        let pid = child.id().context("the control plane exited at once")?;
        Ok(ControlPlane {
            child,
            pid,
            xds,
            admin,
            clock_ticks: clock_ticks().await,
        })
    }

    /// Waits until `/ready` answers 200 (the first snapshot is published).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the control plane exited during start-up: {status}");
            }
            if http_get_status(self.admin, "/ready").await.ok() == Some(200) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("the control plane was not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// User + system CPU time of all its threads so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid), self.clock_ticks)
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the control plane's /proc status")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc status"))?;
            let kib = line
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("empty {name}"))?;
            Ok(kib.parse()?)
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    /// The control plane's own histogram of change → ACK, from its `/metrics` (a cross-check).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.admin, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }
}

/// User + system CPU time of this process so far, in seconds (the load generator).
pub async fn own_cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds_of("/proc/self/stat", clock_ticks().await)
}

fn cpu_seconds_of(path: &str, ticks: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of stat(5); `rest` starts at field 3.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / ticks)
}

/// `getconf CLK_TCK`, the unit of /proc stat times (100 on every common Linux).
async fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A loopback port the kernel just handed out (and that is free again when this returns).
async fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

async fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(http_get(addr, path).await?.0)
}

/// A minimal HTTP/1.0 GET (the admin server closes the connection after the answer).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .context("admin request timed out")??;
    let status = text
        .split_whitespace()
        .nth(1)
        .context("empty admin answer")?
        .parse()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
