//! Access logs: one line per HTTP request and per TCP connection, as JSON (ELK- and
//! Loki-friendly field names) or a text template. The data path only fills a [`Record`] and
//! hands it to a bounded channel; a background writer renders and writes it. A full channel
//! drops the record and counts it: logging never blocks or slows a request. A log file is
//! reopened on SIGUSR1 (for logrotate's `create` mode).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Records waiting for the writer; past this, new ones are dropped (and counted).
pub const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogPath {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    /// `%FIELD%` placeholders, e.g. `%START_TIME% %METHOD% %PATH% %STATUS%`.
    Text(Template),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub path: LogPath,
    pub format: LogFormat,
}

/// Why the proxy answered itself or a connection failed; empty when the upstream answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    #[default]
    None,
    NoRoute,
    NoHealthyUpstream,
    UpstreamConnectFailure,
    UpstreamReset,
    UpstreamTimeout,
    Overloaded,
    RateLimited,
    Denied,
    FaultAbort,
    BadRequest,
    ListenerDrained,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "no_route",
            Flag::NoHealthyUpstream => "no_healthy_upstream",
            Flag::UpstreamConnectFailure => "upstream_connect_failure",
            Flag::UpstreamReset => "upstream_reset",
            Flag::UpstreamTimeout => "upstream_timeout",
            Flag::Overloaded => "overloaded",
            Flag::RateLimited => "rate_limited",
            Flag::Denied => "denied",
            Flag::FaultAbort => "fault_abort",
            Flag::BadRequest => "bad_request",
            Flag::ListenerDrained => "listener_drained",
        }
    }
}

/// One request or connection, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// `http` or `tcp`.
    pub kind: &'static str,
    #[serde(serialize_with = "rfc3339")]
    pub start_time: SystemTime,
    pub duration_ms: f64,
    pub listener: String,
    pub client_ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub response_flags: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_endpoint: Option<String>,
    /// Request body bytes (HTTP: as declared or buffered; TCP: client to upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    pub bytes_sent: u64,
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
}

impl Record {
    pub fn new(kind: &'static str, listener: &str, client_ip: &str) -> Self {
        Record {
            kind,
            start_time: SystemTime::now(),
            duration_ms: 0.0,
            listener: listener.to_string(),
            client_ip: client_ip.to_string(),
            method: None,
            authority: None,
            path: None,
            protocol: None,
            status: None,
            response_flags: Flag::None.as_str(),
            upstream_service: None,
            upstream_endpoint: None,
            bytes_received: None,
            bytes_sent: 0,
            retries: 0,
            trace_id: None,
            peer_identity: None,
        }
    }

    pub fn set_duration(&mut self, d: Duration) {
        self.duration_ms = d.as_secs_f64() * 1000.0;
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339(*t))
}

/// `2026-11-24T23:30:05.123Z` (UTC, milliseconds), without a date-time dependency.
pub fn format_rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since.subsec_millis()
    )
}

/// A parsed text template: literal text and `%FIELD%` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    StartTime,
    Duration,
    Kind,
    Listener,
    ClientIp,
    Method,
    Authority,
    Path,
    Protocol,
    Status,
    Flags,
    Service,
    Endpoint,
    BytesReceived,
    BytesSent,
    Retries,
    TraceId,
    PeerIdentity,
}

const FIELDS: [(&str, Field); 18] = [
    ("START_TIME", Field::StartTime),
    ("DURATION", Field::Duration),
    ("KIND", Field::Kind),
    ("LISTENER", Field::Listener),
    ("CLIENT_IP", Field::ClientIp),
    ("METHOD", Field::Method),
    ("AUTHORITY", Field::Authority),
    ("PATH", Field::Path),
    ("PROTOCOL", Field::Protocol),
    ("STATUS", Field::Status),
    ("RESPONSE_FLAGS", Field::Flags),
    ("UPSTREAM_SERVICE", Field::Service),
    ("UPSTREAM_ENDPOINT", Field::Endpoint),
    ("BYTES_RECEIVED", Field::BytesReceived),
    ("BYTES_SENT", Field::BytesSent),
    ("RETRIES", Field::Retries),
    ("TRACE_ID", Field::TraceId),
    ("PEER_IDENTITY", Field::PeerIdentity),
];

pub const DEFAULT_TEMPLATE: &str = "[%START_TIME%] \"%METHOD% %PATH% %PROTOCOL%\" %STATUS% \
     %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RETRIES% \"%AUTHORITY%\" \
     \"%UPSTREAM_SERVICE%\" \"%UPSTREAM_ENDPOINT%\" %TRACE_ID%";

impl Template {
    /// Parses `%FIELD%` placeholders; an unknown one is an error naming it.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 1..];
            let Some(end) = after.find('%') else {
                return Err(format!("unclosed placeholder at {:?}", &rest[start..]));
            };
            let name = &after[..end];
            let field = FIELDS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
                    format!("unknown field %{name}%; known: {}", known.join(", "))
                })?;
            parts.push(Part::Field(field));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    pub fn render(&self, r: &Record, out: &mut String) {
        fn opt<T: std::fmt::Display>(out: &mut String, v: Option<T>) {
            match v {
                Some(v) => {
                    let _ = write!(out, "{v}");
                }
                None => out.push('-'),
            }
        }
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match f {
                    Field::StartTime => out.push_str(&format_rfc3339(r.start_time)),
                    Field::Duration => {
                        let _ = write!(out, "{:.3}", r.duration_ms);
                    }
                    Field::Kind => out.push_str(r.kind),
                    Field::Listener => out.push_str(&r.listener),
                    Field::ClientIp => out.push_str(&r.client_ip),
                    Field::Method => opt(out, r.method.as_deref()),
                    Field::Authority => opt(out, r.authority.as_deref()),
                    Field::Path => opt(out, r.path.as_deref()),
                    Field::Protocol => opt(out, r.protocol),
                    Field::Status => opt(out, r.status),
                    Field::Flags => out.push_str(r.response_flags),
                    Field::Service => opt(out, r.upstream_service.as_deref()),
                    Field::Endpoint => opt(out, r.upstream_endpoint.as_deref()),
                    Field::BytesReceived => opt(out, r.bytes_received),
                    Field::BytesSent => {
                        let _ = write!(out, "{}", r.bytes_sent);
                    }
                    Field::Retries => {
                        let _ = write!(out, "{}", r.retries);
                    }
                    Field::TraceId => opt(out, r.trace_id.as_deref()),
                    Field::PeerIdentity => opt(out, r.peer_identity.as_deref()),
                },
            }
        }
    }
}

impl LogFormat {
    /// One line, newline included.
    pub fn render(&self, r: &Record) -> String {
        let mut out = String::with_capacity(256);
        match self {
            LogFormat::Json => {
                // Serializing plain fields cannot fail; an empty object marks it if it did.
                out = serde_json::to_string(r).unwrap_or_else(|_| "{}".to_string());
            }
            LogFormat::Text(t) => t.render(r, &mut out),
        }
        out.push('\n');
        out
    }
}

/// Counters of the access log.
#[derive(Debug, Clone, Default)]
pub struct LogCounters {
    pub written: Counter,
    pub dropped: Counter,
}

/// The data path's handle: `emit` never waits.
#[derive(Debug)]
pub struct AccessLog {
    config: AccessLogConfig,
    tx: mpsc::Sender<Record>,
    counters: LogCounters,
}

impl AccessLog {
    /// Starts the writer task. It ends once every handle is dropped and the queue is written.
    pub fn start(config: AccessLogConfig, counters: LogCounters) -> AccessLog {
        let (tx, rx) = mpsc::channel(QUEUE);
        let span = tracing::info_span!("access_log");
        tokio::spawn(tracing::Instrument::instrument(
            writer(config.clone(), rx, counters.clone()),
            span,
        ));
        AccessLog {
            config,
            tx,
            counters,
        }
    }

    pub fn config(&self) -> &AccessLogConfig {
        &self.config
    }

    pub fn emit(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.counters.dropped.inc();
        }
    }
}

async fn open(path: &LogPath) -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    Ok(match path {
        LogPath::Stdout => Box::new(tokio::io::stdout()),
        LogPath::File(p) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await?,
        ),
    })
}

/// Renders and writes records; batches what is queued into one write, flushes when the
/// queue is momentarily empty, reopens the file on SIGUSR1.
async fn writer(config: AccessLogConfig, mut rx: mpsc::Receiver<Record>, counters: LogCounters) {
    let mut out = match open(&config.path).await {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(path = ?config.path, error = %e, "cannot open the access log; records are dropped");
            while rx.recv().await.is_some() {
                counters.dropped.inc();
            }
            return;
        }
    };
    let mut reopen = match &config.path {
        LogPath::File(_) => {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok()
        }
        LogPath::Stdout => None,
    };
    let mut batch = String::new();
    loop {
        let record = tokio::select! {
            record = rx.recv() => record,
            Some(()) = async {
                match reopen.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let _ = out.flush().await;
                match open(&config.path).await {
                    Ok(new) => {
                        out = new;
                        tracing::info!(path = ?config.path, "access log reopened");
                    }
                    Err(e) => tracing::warn!(path = ?config.path, error = %e, "access log reopen failed; keeping the old file"),
                }
                continue;
            }
        };
        let Some(record) = record else { break };
        batch.clear();
        batch.push_str(&config.format.render(&record));
        let mut lines = 1;
        while lines < 256
            && let Ok(more) = rx.try_recv()
        {
            batch.push_str(&config.format.render(&more));
            lines += 1;
        }
        if let Err(e) = out.write_all(batch.as_bytes()).await {
            tracing::warn!(error = %e, "access log write failed");
            counters.dropped.inc_by(lines);
            continue;
        }
        counters.written.inc_by(lines);
        if rx.is_empty() {
            let _ = out.flush().await;
        }
    }
    let _ = out.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut r = Record::new("http", "web", "10.0.0.7");
        r.start_time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_027_005_123);
        r.set_duration(Duration::from_micros(1500));
        r.method = Some("GET".into());
        r.authority = Some("api.local".into());
        r.path = Some("/v1/x".into());
        r.protocol = Some("HTTP/1.1");
        r.status = Some(503);
        r.response_flags = Flag::UpstreamConnectFailure.as_str();
        r.upstream_service = Some("api".into());
        r.retries = 2;
        r
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            format_rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_027_005_123);
        assert_eq!(format_rfc3339(t), "2025-11-24T23:30:05.123Z");
        // A leap day.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_lines_carry_the_fields() {
        let line = LogFormat::Json.render(&record());
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["start_time"], "2025-11-24T23:30:05.123Z");
        assert_eq!(v["status"], 503);
        assert_eq!(v["response_flags"], "upstream_connect_failure");
        assert_eq!(v["retries"], 2);
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v.get("trace_id").is_none());
    }

    #[test]
    fn templates_render_and_refuse_unknown_fields() {
        let t =
            Template::parse("%METHOD% %PATH% -> %STATUS% (%RESPONSE_FLAGS%) %TRACE_ID%").unwrap();
        let mut out = String::new();
        t.render(&record(), &mut out);
        assert_eq!(out, "GET /v1/x -> 503 (upstream_connect_failure) -");
        assert!(Template::parse(DEFAULT_TEMPLATE).is_ok());
        let e = Template::parse("%METHOD% %NOPE%").unwrap_err();
        assert!(e.contains("%NOPE%"), "{e}");
        assert!(Template::parse("%METHOD").is_err());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let counters = LogCounters::default();
        // A writer that never drains: records pile up in the channel.
        let (tx, _rx) = mpsc::channel(QUEUE);
        let log = AccessLog {
            config: AccessLogConfig {
                path: LogPath::Stdout,
                format: LogFormat::Json,
            },
            tx,
            counters: counters.clone(),
        };
        for _ in 0..QUEUE + 10 {
            log.emit(record());
        }
        assert_eq!(counters.dropped.get(), 10);
    }
}
