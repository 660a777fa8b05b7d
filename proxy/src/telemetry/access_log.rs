//! Access logs: one line per HTTP request and per TCP connection, as JSON (ELK- and
//! Loki-friendly field names) or a text template. The data path only fills a [`Record`] and
//! hands it to a bounded channel; a background writer renders and writes it. A full channel
//! drops the record and counts it: logging never blocks or slows a request. A log file is
//! reopened on SIGUSR1 (for logrotate's `create` mode).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::identity::SpiffeId;
use crate::text;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// One request or connection, as logged. The data path fills it with cheap clones of what
/// it already holds (shared strings, the request's own `Bytes`-backed URI parts, addresses):
/// nothing is formatted until the writer renders it.
#[derive(Debug, Clone)]
pub struct Record {
    /// `http` or `tcp`.
    pub kind: &'static str,
    pub start_time: SystemTime,
    pub duration: Duration,
    pub listener: Arc<str>,
    pub client_ip: IpAddr,
    pub method: Option<http::Method>,
    pub authority: Option<Authority>,
    pub path: Option<http::uri::PathAndQuery>,
    pub protocol: Option<&'static str>,
    pub status: Option<u16>,
    pub response_flags: &'static str,
    pub upstream_service: Option<Arc<str>>,
    pub upstream_endpoint: Option<SocketAddr>,
    /// Request body bytes (HTTP: as declared or buffered; TCP: client to upstream).
    pub bytes_received: Option<u64>,
    pub bytes_sent: u64,
    pub retries: u32,
    pub trace_id: Option<u128>,
    pub peer_identity: Option<SpiffeId>,
}

/// Where a request's authority came from: the URI (HTTP/2, absolute form) or `Host`.
#[derive(Debug, Clone)]
pub enum Authority {
    Uri(http::uri::Authority),
    Host(http::HeaderValue),
}

impl Authority {
    fn as_str(&self) -> &str {
        match self {
            Authority::Uri(a) => a.as_str(),
            // A non-UTF-8 Host is logged empty rather than converted on every request.
            Authority::Host(h) => h.to_str().unwrap_or(""),
        }
    }
}

impl Record {
    pub fn new(kind: &'static str, listener: Arc<str>, client_ip: IpAddr) -> Self {
        Record {
            kind,
            start_time: SystemTime::now(),
            duration: Duration::ZERO,
            listener,
            client_ip,
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
        self.duration = d;
    }

    /// One JSON object, written field by field into `out` (no intermediate value); optional
    /// fields that are absent are left out. Each field's `,"name":` is one literal, and
    /// values the proxy itself chose (method tokens, protocol, flags) are not scanned for
    /// escapes: a line is a few dozen short copies.
    pub fn write_json(&self, memo: &mut Memo, out: &mut String) {
        out.push_str("{\"kind\":\"");
        out.push_str(self.kind);
        out.push_str("\",\"start_time\":\"");
        memo.clock.write(self.start_time, out);
        out.push_str("\",\"duration_ms\":");
        text::push_millis(out, self.duration);
        json_str(out, ",\"listener\":\"", &self.listener);
        out.push_str(",\"client_ip\":\"");
        memo.ips.push(self.client_ip, out);
        out.push('"');
        if let Some(m) = &self.method {
            // A method is an HTTP token: no character a JSON string must escape.
            json_raw(out, ",\"method\":\"", m.as_str());
        }
        if let Some(a) = &self.authority {
            json_str(out, ",\"authority\":\"", a.as_str());
        }
        if let Some(p) = &self.path {
            json_str(out, ",\"path\":\"", p.as_str());
        }
        if let Some(p) = self.protocol {
            json_raw(out, ",\"protocol\":\"", p);
        }
        if let Some(s) = self.status {
            out.push_str(",\"status\":");
            text::push_u64(out, u64::from(s));
        }
        json_raw(out, ",\"response_flags\":\"", self.response_flags);
        if let Some(s) = &self.upstream_service {
            json_str(out, ",\"upstream_service\":\"", s);
        }
        if let Some(e) = self.upstream_endpoint {
            out.push_str(",\"upstream_endpoint\":\"");
            memo.endpoints.push(e, out);
            out.push('"');
        }
        if let Some(b) = self.bytes_received {
            out.push_str(",\"bytes_received\":");
            text::push_u64(out, b);
        }
        out.push_str(",\"bytes_sent\":");
        text::push_u64(out, self.bytes_sent);
        out.push_str(",\"retries\":");
        text::push_u64(out, u64::from(self.retries));
        if let Some(t) = self.trace_id {
            out.push_str(",\"trace_id\":\"");
            text::push_hex_u128(out, t);
            out.push('"');
        }
        if let Some(p) = &self.peer_identity {
            json_str(out, ",\"peer_identity\":\"", p.as_str());
        }
        out.push('}');
    }
}

/// `,"name":"` then `value` escaped as a JSON string, then the closing quote.
fn json_str(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    json_escape(value, out);
    out.push('"');
}

/// As [`json_str`] for a value known to need no escaping (chosen by the proxy or a token).
fn json_raw(out: &mut String, name: &str, value: &str) {
    debug_assert!(!value.bytes().any(needs_escape), "{value:?}");
    out.push_str(name);
    out.push_str(value);
    out.push('"');
}

fn needs_escape(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < b' '
}

/// JSON string escaping: quotes, backslashes and control characters (paths and hosts are
/// client-controlled; a line must stay one valid JSON object whatever they hold).
fn json_escape(value: &str, out: &mut String) {
    let mut rest = value;
    // A byte scan: every byte to escape is ASCII, and ASCII bytes never occur inside a
    // multi-byte UTF-8 sequence, so slicing at them stays on character boundaries.
    while let Some(i) = rest.bytes().position(needs_escape) {
        out.push_str(&rest[..i]);
        match rest.as_bytes()[i] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c => {
                let _ = write!(out, "\\u{c:04x}");
            }
        }
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// What the writer remembers between lines: the text of the current second and of recent
/// addresses. A log's lines mostly share their second and repeat a few clients and
/// endpoints, and formatting those was half of a line's cost.
#[derive(Debug, Default)]
pub struct Memo {
    clock: Clock,
    ips: AddrMemo<IpAddr>,
    endpoints: AddrMemo<SocketAddr>,
}

/// Addresses whose text was written lately, in a small direct-mapped table (a miss formats
/// and replaces; the table never grows).
#[derive(Debug)]
struct AddrMemo<A> {
    slots: Vec<(Option<A>, String)>,
}

/// Slots per table: a sidecar's recent peers or a service's endpoints.
const ADDR_SLOTS: usize = 64;

impl<A> Default for AddrMemo<A> {
    fn default() -> Self {
        AddrMemo {
            slots: (0..ADDR_SLOTS).map(|_| (None, String::new())).collect(),
        }
    }
}

/// An address the memo can key on: a cheap slot index and its text.
trait Addr: Copy + Eq {
    fn slot(&self) -> usize;
    fn write(&self, out: &mut String);
}

/// A multiplicative hash of the address's integer form, top bits as the slot.
fn mix(n: u64) -> usize {
    let top = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - ADDR_SLOTS.trailing_zeros());
    usize::try_from(top).unwrap_or(0)
}

fn ip_bits(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            (n >> 64) as u64 ^ n as u64
        }
    }
}

impl Addr for IpAddr {
    fn slot(&self) -> usize {
        mix(ip_bits(*self))
    }
    fn write(&self, out: &mut String) {
        text::push_ip(out, *self);
    }
}

impl Addr for SocketAddr {
    fn slot(&self) -> usize {
        mix(ip_bits(self.ip()) ^ u64::from(self.port()) << 40)
    }
    fn write(&self, out: &mut String) {
        text::push_socket_addr(out, *self);
    }
}

impl<A: Addr> AddrMemo<A> {
    fn push(&mut self, addr: A, out: &mut String) {
        let Some((key, text)) = self.slots.get_mut(addr.slot()) else {
            addr.write(out);
            return;
        };
        if *key != Some(addr) {
            text.clear();
            addr.write(text);
            *key = Some(addr);
        }
        out.push_str(text);
    }
}

/// Start times as RFC 3339 text, the date and time of day computed once per second: the
/// lines of a batch mostly share their second, and only the milliseconds differ.
#[derive(Debug, Default)]
pub struct Clock {
    second: Option<u64>,
    /// `2026-11-24T23:30:05.` of `second`.
    prefix: String,
}

impl Clock {
    fn write(&mut self, t: SystemTime, out: &mut String) {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            self.prefix.clear();
            write_date_time(secs, &mut self.prefix);
            self.second = Some(secs);
        }
        out.push_str(&self.prefix);
        text::push_padded(out, u64::from(since.subsec_millis()), 3);
        out.push('Z');
    }
}

/// `2026-11-24T23:30:05.123Z` (UTC, milliseconds), without a date-time dependency.
pub fn format_rfc3339(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    Clock::default().write(t, &mut out);
    out
}

/// `2026-11-24T23:30:05.` for `secs` since the Unix epoch.
fn write_date_time(secs: u64, out: &mut String) {
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
    for (n, width, after) in [
        (year.max(0) as u64, 4, '-'),
        (month as u64, 2, '-'),
        (day as u64, 2, 'T'),
        (hour, 2, ':'),
        (minute, 2, ':'),
        (second, 2, '.'),
    ] {
        text::push_padded(out, n, width);
        out.push(after);
    }
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

    pub fn render(&self, r: &Record, memo: &mut Memo, out: &mut String) {
        fn opt(out: &mut String, v: Option<&str>) {
            out.push_str(v.unwrap_or("-"));
        }
        fn opt_u64(out: &mut String, v: Option<u64>) {
            match v {
                Some(v) => text::push_u64(out, v),
                None => out.push('-'),
            }
        }
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match f {
                    Field::StartTime => memo.clock.write(r.start_time, out),
                    Field::Duration => text::push_millis(out, r.duration),
                    Field::Kind => out.push_str(r.kind),
                    Field::Listener => out.push_str(&r.listener),
                    Field::ClientIp => memo.ips.push(r.client_ip, out),
                    Field::Method => opt(out, r.method.as_ref().map(|m| m.as_str())),
                    Field::Authority => opt(out, r.authority.as_ref().map(|a| a.as_str())),
                    Field::Path => opt(out, r.path.as_ref().map(|p| p.as_str())),
                    Field::Protocol => opt(out, r.protocol),
                    Field::Status => opt_u64(out, r.status.map(u64::from)),
                    Field::Flags => out.push_str(r.response_flags),
                    Field::Service => opt(out, r.upstream_service.as_deref()),
                    Field::Endpoint => match r.upstream_endpoint {
                        Some(e) => memo.endpoints.push(e, out),
                        None => out.push('-'),
                    },
                    Field::BytesReceived => opt_u64(out, r.bytes_received),
                    Field::BytesSent => text::push_u64(out, r.bytes_sent),
                    Field::Retries => text::push_u64(out, u64::from(r.retries)),
                    Field::TraceId => match r.trace_id {
                        Some(t) => text::push_hex_u128(out, t),
                        None => out.push('-'),
                    },
                    Field::PeerIdentity => opt(out, r.peer_identity.as_ref().map(|p| p.as_str())),
                },
            }
        }
    }
}

impl LogFormat {
    /// Appends one line, newline included.
    pub fn render_into(&self, r: &Record, memo: &mut Memo, out: &mut String) {
        match self {
            LogFormat::Json => r.write_json(memo, out),
            LogFormat::Text(t) => t.render(r, memo, out),
        }
        out.push('\n');
    }

    /// One line, newline included.
    pub fn render(&self, r: &Record) -> String {
        let mut out = String::with_capacity(256);
        self.render_into(r, &mut Memo::default(), &mut out);
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

type Sink = Box<dyn std::io::Write + Send>;

fn open(path: &LogPath) -> std::io::Result<Sink> {
    Ok(match path {
        LogPath::Stdout => Box::new(std::io::stdout()),
        LogPath::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
    })
}

/// How long the writer lets records gather after the first one before it writes: one
/// wake-up and one write per interval instead of one per request, and a line still shows
/// within a few tens of milliseconds.
const GATHER: Duration = Duration::from_millis(20);
/// Lines per write at most; a fuller queue is written in several batches without waiting.
const BATCH_LINES: u64 = 4096;

/// Renders and writes records in batches on the blocking pool (a slow disk or a stdout pipe
/// that is not read must not stall a runtime thread); reopens the file on SIGUSR1.
async fn writer(config: AccessLogConfig, mut rx: mpsc::Receiver<Record>, counters: LogCounters) {
    let mut out = match open(&config.path) {
        Ok(out) => Some(out),
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
    let mut batch = String::with_capacity(64 * 1024);
    let mut memo = Memo::default();
    let mut backlog = false;
    loop {
        let record = tokio::select! {
            record = rx.recv() => record,
            Some(()) = async {
                match reopen.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match open(&config.path) {
                    Ok(new) => {
                        out = Some(new);
                        tracing::info!(path = ?config.path, "access log reopened");
                    }
                    Err(e) => tracing::warn!(path = ?config.path, error = %e, "access log reopen failed; keeping the old file"),
                }
                continue;
            }
        };
        let Some(record) = record else { break };
        if !backlog {
            tokio::time::sleep(GATHER).await;
        }
        batch.clear();
        config.format.render_into(&record, &mut memo, &mut batch);
        let mut lines = 1;
        while lines < BATCH_LINES
            && let Ok(more) = rx.try_recv()
        {
            config.format.render_into(&more, &mut memo, &mut batch);
            lines += 1;
        }
        backlog = lines == BATCH_LINES;
        let Some(sink) = out.take() else { break };
        let (sink, text, written) = write_blocking(sink, batch).await;
        batch = text;
        match written {
            Ok(()) => {
                counters.written.inc_by(lines);
            }
            Err(e) => {
                tracing::warn!(error = %e, "access log write failed");
                counters.dropped.inc_by(lines);
            }
        }
        match sink {
            Some(sink) => out = Some(sink),
            None => {
                tracing::error!("the access log writer thread failed; records are dropped");
                break;
            }
        }
    }
    while rx.recv().await.is_some() {
        counters.dropped.inc();
    }
}

/// Writes and flushes `text` on the blocking pool; hands back the sink (unless the blocking
/// task itself failed) and the buffer for reuse.
async fn write_blocking(
    mut sink: Sink,
    text: String,
) -> (Option<Sink>, String, std::io::Result<()>) {
    let done = tokio::task::spawn_blocking(move || {
        let r = sink.write_all(text.as_bytes()).and_then(|()| sink.flush());
        (sink, text, r)
    })
    .await;
    match done {
        Ok((sink, text, r)) => (Some(sink), text, r),
        Err(e) => (
            None,
            String::new(),
            Err(std::io::Error::other(e.to_string())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut r = Record::new("http", "web".into(), "10.0.0.7".parse().unwrap());
        r.start_time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_027_005_123);
        r.set_duration(Duration::from_micros(1500));
        r.method = Some(http::Method::GET);
        r.authority = Some(Authority::Uri("api.local".parse().unwrap()));
        r.path = Some("/v1/x".parse().unwrap());
        r.protocol = Some("HTTP/1.1");
        r.status = Some(503);
        r.response_flags = Flag::UpstreamConnectFailure.as_str();
        r.upstream_service = Some("api".into());
        r.retries = 2;
        r
    }

    #[test]
    fn json_escapes_what_clients_control() {
        let mut r = record();
        r.authority = Some(Authority::Host(http::HeaderValue::from_static(
            "a\"b\\c\td",
        )));
        r.peer_identity = Some("spiffe://td/ns/a/sa/b".parse().unwrap());
        r.trace_id = Some(0x4bf92f3577b34da6a3ce929d0e0e4736);
        r.upstream_endpoint = Some("127.0.0.1:9".parse().unwrap());
        let mut line = String::new();
        r.write_json(&mut Memo::default(), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["authority"], "a\"b\\c\td");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["peer_identity"], "spiffe://td/ns/a/sa/b");
        assert_eq!(v["upstream_endpoint"], "127.0.0.1:9");
        assert_eq!(v["client_ip"], "10.0.0.7");
        let mut s = String::new();
        json_escape("\u{1}x\ny\u{7f}é", &mut s);
        assert_eq!(
            serde_json::from_str::<String>(&format!("\"{s}\"")).unwrap(),
            "\u{1}x\ny\u{7f}é"
        );
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
        // One clock across seconds, back and forth: the cached second is never stale.
        let mut clock = Clock::default();
        let base = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_027_005_123);
        let mut out = String::new();
        for ms in [0, 5, 877, 878, 60_000, 0, 86_400_000] {
            let t = base + Duration::from_millis(ms);
            out.clear();
            clock.write(t, &mut out);
            assert_eq!(out, format_rfc3339(t), "+{ms} ms");
        }
    }

    #[test]
    fn remembered_addresses_are_never_another_addresses_text() {
        let mut memo = Memo::default();
        let mut rng = fastrand::Rng::with_seed(11);
        // Few enough distinct addresses that slots are hit again, many enough that they collide.
        let addrs: Vec<SocketAddr> = (0..200)
            .map(|i| match i % 4 {
                0 => SocketAddr::from(([10, 0, 0, rng.u8(..4)], 8080)),
                1 => SocketAddr::from(([10, 0, rng.u8(..), rng.u8(..)], rng.u16(..))),
                2 => SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, rng.u16(..8)], 443)),
                _ => SocketAddr::from(([127, 0, 0, 1], rng.u16(..3))),
            })
            .collect();
        for _ in 0..5 {
            for a in &addrs {
                let mut out = String::from("x");
                memo.endpoints.push(*a, &mut out);
                assert_eq!(out, format!("x{a}"));
                let mut out = String::new();
                memo.ips.push(a.ip(), &mut out);
                assert_eq!(out, a.ip().to_string());
            }
        }
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
        t.render(&record(), &mut Memo::default(), &mut out);
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
