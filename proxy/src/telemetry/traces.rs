//! Distributed tracing: a server span per request and a client span per upstream attempt (so
//! retries show), W3C Trace Context read and propagated (B3 accepted on the way in),
//! parent-based ratio sampling, export over OTLP/gRPC.
//!
//! A span is a plain record ([`SpanRecord`]): the ids and flags from `opentelemetry`'s
//! types, a name, two timestamps and attributes already in protobuf form, built only for a
//! sampled request. Export never touches the request path: a finished record goes into a bounded
//! queue; a full queue drops it and counts it. One task batches the queue and sends it to
//! the receiver ([`super::otlp`]); a collector that is down costs failed exports (counted),
//! not latency.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::otlp::Exporter;
pub use super::otlp::{Attributes, Key};
use super::semconv;

/// Finished spans waiting for export; past this, new ones are dropped (and counted).
pub const QUEUE: usize = 8192;
/// Spans per export at most (a few hundred KB of OTLP: well under receivers' 4 MiB default).
const BATCH: usize = 512;
/// How long the exporter lets spans gather after the first of a quiet spell. Short: encoding
/// a batch runs on a runtime thread, and at 100 ms a batch of a few hundred spans showed in
/// the requests' p99 (2.6-3.4 ms at 2000 req/s, against 1.2-1.7 ms at 10 ms).
const GATHER: Duration = Duration::from_millis(10);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The instrumentation scope of every span.
const SCOPE: &str = "tern-proxy";

#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// `http://host:port` of an OTLP/gRPC receiver.
    pub otlp_endpoint: String,
    /// Fraction of new traces sampled; an incoming sampled flag is honoured either way.
    pub sample_ratio: f64,
    pub service_name: String,
}

#[derive(Debug, Clone, Default)]
pub struct TraceCounters {
    pub exported: Counter,
    pub dropped: Counter,
    pub export_failures: Counter,
}

/// A finished (or, until `end`, open) span as it is exported.
#[derive(Debug)]
pub struct SpanRecord {
    /// This span's trace id, span id, flags and trace state.
    pub context: SpanContext,
    /// `None` for the root of a trace.
    pub parent: Option<Parent>,
    pub kind: SpanKind,
    /// Kept (with its capacity) when the record is reused.
    pub name: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attributes,
    /// Set when the span failed: the status message (status code ERROR).
    pub error: Option<Cow<'static, str>>,
    /// A server span's ended attempts, queued with it: one queue send per request instead
    /// of one per span (each send and receive takes the queue's atomics and its lock).
    // Boxed: the records move between this list, the queue and the pool as pointers.
    pub children: Vec<Box<SpanRecord>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Parent {
    pub span_id: SpanId,
    /// The parent is another process's span (it came in a request header).
    pub remote: bool,
}

/// The tracer of a running config.
#[derive(Debug)]
pub struct Tracing {
    config: TracingConfig,
    /// To the export task, which ends once this (the config's last reference) is dropped and
    /// the queue is drained.
    tx: mpsc::Sender<Box<SpanRecord>>,
    dropped: Counter,
    spare: Arc<Spare>,
    /// A new root is sampled when its trace id's low 63 bits fall under this.
    root_threshold: u64,
}

/// Records the export task is done with, handed back for new spans: a record keeps its
/// attribute buffer and name, so once the pool is warm a sampled request allocates nothing
/// for its two spans (two boxes, two buffers and a name had been a tenth of its added
/// cost, much of it freeing on another thread than the one that allocated).
// Boxed on purpose: records travel through the export channel as boxes, and a box moves
// in and out of the pool as a pointer.
#[expect(clippy::vec_box)]
#[derive(Debug, Default)]
struct Spare(Mutex<Vec<Box<SpanRecord>>>);

/// Records kept at most: about one batch at a few tens of thousands of requests a second.
const SPARE: usize = 512;
/// A record whose buffers grew past this (a long path) is freed, not kept: the pool stays
/// under a megabyte.
const SPARE_BYTES: usize = 1024;

impl Spare {
    fn take(&self) -> Option<Box<SpanRecord>> {
        self.0.lock().ok()?.pop()
    }

    /// Keeps what fits of `batch` and drops the rest; `batch` is left empty.
    #[expect(clippy::vec_box)]
    fn give_back(&self, batch: &mut Vec<Box<SpanRecord>>) {
        if let Ok(mut free) = self.0.lock() {
            for mut r in batch.drain(..) {
                if free.len() == SPARE {
                    break;
                }
                if r.attributes.capacity() + r.name.capacity() <= SPARE_BYTES {
                    r.attributes.clear();
                    r.name.clear();
                    r.error = None;
                    // Empty already (moved into the batch); cleared so it stays so.
                    r.children.clear();
                    free.push(r);
                }
            }
        }
        batch.clear();
    }
}

impl Tracing {
    /// Builds the exporter and starts the export task (needs a tokio runtime).
    pub fn start(config: TracingConfig, counters: TraceCounters) -> Result<Tracing, String> {
        let exporter = Exporter::new(
            &config.otlp_endpoint,
            EXPORT_TIMEOUT,
            &config.service_name,
            SCOPE,
        )?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let spare = Arc::new(Spare::default());
        tokio::spawn(tracing::Instrument::instrument(
            export_loop(rx, exporter, counters.clone(), Arc::clone(&spare)),
            tracing::info_span!("otlp_export"),
        ));
        Ok(Tracing {
            root_threshold: root_threshold(config.sample_ratio),
            config,
            tx,
            dropped: counters.dropped,
            spare,
        })
    }

    pub fn config(&self) -> &TracingConfig {
        &self.config
    }

    /// A record to fill: a spare one, or a new one with room for a typical request's
    /// attributes. Every field is set by the caller; attributes, name and error are empty.
    fn record(&self) -> Box<SpanRecord> {
        self.spare.take().unwrap_or_else(|| blank_record(384))
    }

    /// Queues a finished span (with its children) without waiting.
    fn submit(&self, span: Box<SpanRecord>) {
        if let Err(e) = self.tx.try_send(span) {
            let lost = 1 + e.into_inner().children.len();
            self.dropped.inc_by(lost as u64);
        }
    }

    /// Starts the server span of a request that arrived at `start`, as a child of the
    /// incoming trace context.
    ///
    /// Sampling is decided first: the parent's flag when the request carries a context,
    /// else the new trace id against the ratio. An unsampled request gets no record and no
    /// attributes (`describe` is not called), only a context that travels upstream with the
    /// sampled flag off, so the trace id still joins the hops.
    pub fn server_span(
        self: &Arc<Self>,
        headers: &HeaderMap,
        start: Instant,
        describe: impl FnOnce(&mut Attributes, &mut String),
    ) -> ServerSpan {
        let found = TraceHeaders::scan(headers);
        let strip_b3 = found.any_b3;
        let parent = found.context();
        let (trace_id, state, sampled) = match &parent {
            Some(p) => (p.trace_id(), p.trace_state().clone(), p.is_sampled()),
            None => {
                let id = new_trace_id();
                let sampled = sample_root(self.root_threshold, id);
                (TraceId::from(id), TraceState::default(), sampled)
            }
        };
        if !sampled {
            let sc = SpanContext::new(trace_id, new_span_id(), TraceFlags::default(), false, state);
            return ServerSpan {
                kind: Sampling::Unsampled(sc),
                strip_b3,
            };
        }
        let mut record = self.record();
        describe(&mut record.attributes, &mut record.name);
        let anchor = Anchor::new(start);
        record.context =
            SpanContext::new(trace_id, new_span_id(), TraceFlags::SAMPLED, false, state);
        record.parent = parent.map(|p| Parent {
            span_id: p.span_id(),
            remote: true,
        });
        record.kind = SpanKind::Server;
        record.start_unix_nano = anchor.unix_nanos;
        record.end_unix_nano = anchor.unix_nanos;
        ServerSpan {
            kind: Sampling::Recording(record, Arc::clone(self), anchor),
            strip_b3,
        }
    }
}

/// The wall-clock time of a request's span events, from the monotonic instants the data
/// path reads anyway (request start, attempt start and end, response end): the wall clock
/// is read once, when the server span starts, and every later time is that plus the
/// monotonic time since, as OpenTelemetry's SDKs anchor a trace's spans to its root. Three
/// clock reads fewer per sampled request, and an attempt can never seem to start before
/// its parent when the wall clock steps.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    unix_nanos: u64,
    at: Instant,
}

impl Anchor {
    /// Pairs `at` with the wall clock now (microseconds later: `at` was read when the
    /// request arrived, before its span could be started).
    fn new(at: Instant) -> Anchor {
        let unix_nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Anchor { unix_nanos, at }
    }

    /// The wall-clock time of `t` in nanoseconds since the Unix epoch; an instant before
    /// the anchor counts as the anchor.
    fn unix_nanos(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.at);
        self.unix_nanos
            .saturating_add(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }
}

fn blank_record(attribute_bytes: usize) -> Box<SpanRecord> {
    Box::new(SpanRecord {
        context: SpanContext::empty_context(),
        parent: None,
        kind: SpanKind::Internal,
        name: String::with_capacity(32),
        start_unix_nano: 0,
        end_unix_nano: 0,
        attributes: Attributes::with_capacity(attribute_bytes),
        error: None,
        children: Vec::new(),
    })
}

/// The threshold of [`sample_root`] for a ratio in [0, 1]: the ratio of 2^63.
fn root_threshold(ratio: f64) -> u64 {
    // 1.0 gives 2^63, above every 63-bit value: all sampled; 0.0 none.
    (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
}

/// Whether a new root is sampled, decided by its trace id as OpenTelemetry's
/// `TraceIdRatioBased` sampler does (the low 64 bits, shifted to 63): the id is random
/// already, so this costs no draw, and another process deciding on the same id with the
/// same ratio agrees.
fn sample_root(threshold: u64, trace_id: u128) -> bool {
    ((trace_id as u64) >> 1) < threshold
}

fn new_trace_id() -> u128 {
    // Zero is the invalid id. A full-range draw: a range (`1..`) costs a 128-bit modulo.
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn new_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

/// A request's server span; attempts are its children. Dropped without `end` (the client
/// went away), it is still exported, with what it had and `tern.outcome`
/// `downstream_disconnect`.
#[derive(Debug)]
pub struct ServerSpan {
    kind: Sampling,
    /// The request came with B3 headers, which attempts remove (they carry `traceparent`).
    strip_b3: bool,
}

#[derive(Debug)]
enum Sampling {
    /// Sampled: a record that is exported (through the tracer) when the span ends, and the
    /// clock anchor of its times.
    Recording(Box<SpanRecord>, Arc<Tracing>, Anchor),
    /// Not sampled: only the context that is propagated.
    Unsampled(SpanContext),
    /// Ended and queued.
    Ended,
}

impl ServerSpan {
    pub fn trace_id(&self) -> TraceId {
        match &self.kind {
            Sampling::Recording(r, ..) => r.context.trace_id(),
            Sampling::Unsampled(sc) => sc.trace_id(),
            Sampling::Ended => TraceId::INVALID,
        }
    }

    pub fn is_recording(&self) -> bool {
        matches!(self.kind, Sampling::Recording(..))
    }

    /// A client span for one upstream attempt started at `start`; its context goes upstream
    /// in `traceparent`. `describe` (name and attributes) is only called for a recording span.
    pub fn attempt(
        &self,
        headers: &mut HeaderMap,
        start: Instant,
        describe: impl FnOnce(&mut Attributes, &mut String),
    ) -> AttemptSpan {
        match &self.kind {
            Sampling::Unsampled(sc) => {
                inject(sc, headers, self.strip_b3);
                AttemptSpan { span: None }
            }
            Sampling::Ended => AttemptSpan { span: None },
            Sampling::Recording(server, tracing, anchor) => {
                let mut record = tracing.record();
                describe(&mut record.attributes, &mut record.name);
                let cx = &server.context;
                let now = anchor.unix_nanos(start);
                record.context = SpanContext::new(
                    cx.trace_id(),
                    new_span_id(),
                    cx.trace_flags(),
                    false,
                    cx.trace_state().clone(),
                );
                record.parent = Some(Parent {
                    span_id: cx.span_id(),
                    remote: false,
                });
                record.kind = SpanKind::Client;
                record.start_unix_nano = now;
                record.end_unix_nano = now;
                inject(&record.context, headers, self.strip_b3);
                AttemptSpan {
                    span: Some((record, Arc::clone(tracing), *anchor)),
                }
            }
        }
    }

    /// Adds an integer attribute (after the start, e.g. the retry count).
    pub fn set_int(&mut self, key: &Key, value: i64) {
        if let Sampling::Recording(r, ..) = &mut self.kind {
            r.attributes.int_key(key, value);
        }
    }

    /// Ends the span at `at` with the response status (5xx and the proxy's own failures are
    /// errors).
    pub fn end(mut self, at: Instant, status: u16, outcome: &str) {
        let Sampling::Recording(mut r, tracing, anchor) =
            std::mem::replace(&mut self.kind, Sampling::Ended)
        else {
            return;
        };
        r.end_unix_nano = anchor.unix_nanos(at);
        r.attributes
            .int_key(&semconv::STATUS_CODE, i64::from(status));
        if outcome != "-" {
            r.attributes.str_key(&semconv::OUTCOME, outcome);
        }
        if status >= 500 {
            error_status(&mut r.attributes, status);
            r.error = Some(Cow::Owned(outcome.to_string()));
        }
        tracing.submit(r);
    }
}

impl Drop for ServerSpan {
    /// Dropped without `end`: the request was cancelled before its response began (the
    /// client reset the stream or closed the connection). Exported so the wait shows.
    fn drop(&mut self) {
        if let Sampling::Recording(mut r, tracing, anchor) =
            std::mem::replace(&mut self.kind, Sampling::Ended)
        {
            r.end_unix_nano = anchor.unix_nanos(Instant::now());
            r.attributes
                .str_key(&semconv::OUTCOME, DOWNSTREAM_DISCONNECT);
            tracing.submit(r);
        }
    }
}

/// `error.type` of a 5xx response: its status code, as the HTTP conventions ask.
fn error_status(attributes: &mut Attributes, status: u16) {
    let mut code = String::with_capacity(3);
    crate::text::push_u64(&mut code, u64::from(status));
    attributes.str("error.type", &code);
}

/// `tern.outcome` of a request whose client went away before the response.
const DOWNSTREAM_DISCONNECT: &str = "downstream_disconnect";

/// One upstream attempt's client span (`None` when the request is not sampled).
#[derive(Debug)]
pub struct AttemptSpan {
    span: Option<(Box<SpanRecord>, Arc<Tracing>, Anchor)>,
}

impl AttemptSpan {
    /// Ends the attempt at `at`. While its server span is open the record waits in it, to
    /// be queued together with it; otherwise it is queued now.
    pub fn end(
        mut self,
        server: Option<&mut ServerSpan>,
        at: Instant,
        status: Option<u16>,
        error: Option<&str>,
    ) {
        let Some((mut r, tracing, anchor)) = self.span.take() else {
            return;
        };
        r.end_unix_nano = anchor.unix_nanos(at);
        if let Some(s) = status {
            r.attributes.int_key(&semconv::STATUS_CODE, i64::from(s));
            if s >= 500 {
                error_status(&mut r.attributes, s);
            }
        }
        if let Some(e) = error {
            r.attributes.str("error.type", e);
            r.error = Some(Cow::Owned(e.to_string()));
        }
        match server.map(|s| &mut s.kind) {
            Some(Sampling::Recording(parent, ..)) => parent.children.push(r),
            _ => tracing.submit(r),
        }
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if let Some((mut r, tracing, anchor)) = self.span.take() {
            r.end_unix_nano = anchor.unix_nanos(Instant::now());
            tracing.submit(r);
        }
    }
}

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace headers of a request, found in one pass over its names. This runs for every
/// request when tracing is on: one scan of a handful of names costs less than the three
/// hashed lookups (`traceparent`, `b3`, `x-b3-traceid`) a request without context needs, and
/// it also tells [`inject`] whether there is any B3 header to strip.
#[derive(Debug, Default)]
pub struct TraceHeaders<'a> {
    traceparent: Option<&'a HeaderValue>,
    tracestate: Option<&'a HeaderValue>,
    b3: Option<&'a HeaderValue>,
    b3_trace_id: Option<&'a HeaderValue>,
    b3_span_id: Option<&'a HeaderValue>,
    b3_sampled: Option<&'a HeaderValue>,
    b3_flags: Option<&'a HeaderValue>,
    /// Any B3 header, `x-b3-parentspanid` included.
    pub any_b3: bool,
}

impl<'a> TraceHeaders<'a> {
    pub fn scan(headers: &'a HeaderMap) -> Self {
        let mut found = TraceHeaders::default();
        for (name, value) in headers {
            // The first value of a repeated header wins, as with `HeaderMap::get`.
            let slot = match name.as_str() {
                "traceparent" => &mut found.traceparent,
                "tracestate" => &mut found.tracestate,
                "b3" => &mut found.b3,
                "x-b3-traceid" => &mut found.b3_trace_id,
                "x-b3-spanid" => &mut found.b3_span_id,
                "x-b3-sampled" => &mut found.b3_sampled,
                "x-b3-flags" => &mut found.b3_flags,
                "x-b3-parentspanid" => {
                    found.any_b3 = true;
                    continue;
                }
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        found.any_b3 |= found.b3.is_some()
            || found.b3_trace_id.is_some()
            || found.b3_span_id.is_some()
            || found.b3_sampled.is_some()
            || found.b3_flags.is_some();
        found
    }

    /// The trace context the request arrived with: W3C `traceparent` (+ `tracestate`)
    /// first, then B3 (single `b3` header or `x-b3-*` headers).
    pub fn context(&self) -> Option<SpanContext> {
        fn text(v: Option<&HeaderValue>) -> Option<&str> {
            v.and_then(|v| v.to_str().ok())
        }
        if let Some(tp) = text(self.traceparent) {
            let state = text(self.tracestate)
                .and_then(|s| TraceState::from_str(s).ok())
                .unwrap_or_default();
            return parse_traceparent(tp, state);
        }
        if let Some(b3) = text(self.b3) {
            return parse_b3_single(b3);
        }
        let trace_id = text(self.b3_trace_id)?;
        let span_id = text(self.b3_span_id)?;
        let sampled = matches!(text(self.b3_sampled), Some("1") | Some("true"))
            || text(self.b3_flags) == Some("1");
        b3_context(trace_id, span_id, sampled)
    }
}

/// The trace context a request arrived with (see [`TraceHeaders::context`]).
pub fn incoming_context(headers: &HeaderMap) -> Option<SpanContext> {
    TraceHeaders::scan(headers).context()
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` (W3C Trace Context, version 00;
/// higher versions are read by the same prefix, as the spec asks).
pub fn parse_traceparent(value: &str, state: TraceState) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, state);
    sc.is_valid().then_some(sc)
}

/// `b3: {trace id}-{span id}[-{sampling}[-{parent span id}]]`; `b3: 0` alone means "do not
/// sample" without a context.
pub fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = matches!(parts.next(), Some("1") | Some("d"));
    b3_context(trace, span, sampled)
}

fn b3_context(trace: &str, span: &str, sampled: bool) -> Option<SpanContext> {
    // 64-bit B3 trace ids are left-padded to 128 bits.
    let trace = match trace.len() {
        16 => format!("{:0>32}", trace),
        32 => trace.to_string(),
        _ => return None,
    };
    if span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(&trace.to_ascii_lowercase()).ok()?;
    let span_id = SpanId::from_hex(&span.to_ascii_lowercase()).ok()?;
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Writes `sc` as the W3C headers of the upstream request, first removing the B3 headers
/// when the request had any (`strip_b3`, from [`TraceHeaders`]): the proxy speaks W3C
/// onward. The value is written into a stack buffer, not through `format!`.
pub fn inject(sc: &SpanContext, headers: &mut HeaderMap, strip_b3: bool) {
    if strip_b3 {
        let b3: Vec<HeaderName> = headers.keys().filter(|n| is_b3(n)).cloned().collect();
        for name in b3 {
            headers.remove(name);
        }
    }
    if !sc.is_valid() {
        return;
    }
    if let Ok(v) = HeaderValue::from_bytes(&traceparent_bytes(sc)) {
        headers.insert(TRACEPARENT, v);
    }
    let state = sc.trace_state().header();
    if !state.is_empty()
        && let Ok(v) = HeaderValue::from_str(&state)
    {
        headers.insert(TRACESTATE, v);
    }
}

/// The B3 headers (and only those: other `x-b3-` names are the app's and pass through).
fn is_b3(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "b3" | "x-b3-traceid" | "x-b3-spanid" | "x-b3-parentspanid" | "x-b3-sampled" | "x-b3-flags"
    )
}

/// `00-{trace id}-{span id}-{flags}` in lowercase hex: 55 bytes.
fn traceparent_bytes(sc: &SpanContext) -> [u8; 55] {
    use crate::text::hex_into as hex;
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    hex(&mut out[3..35], &sc.trace_id().to_bytes());
    hex(&mut out[36..52], &sc.span_id().to_bytes());
    hex(&mut out[53..55], &[sc.trace_flags().to_u8()]);
    out
}

/// A record and the attempts queued with it, each on its own in the batch.
#[expect(clippy::vec_box)]
fn push_family(batch: &mut Vec<Box<SpanRecord>>, mut record: Box<SpanRecord>) {
    // Moves the boxes and leaves the record's list empty with its capacity.
    batch.append(&mut record.children);
    batch.push(record);
}

/// Exports in batches: after the first span of a quiet spell, waits `GATHER` for more, then
/// sends up to `BATCH` at once; a fuller queue is sent batch after batch without waiting.
/// One export per interval instead of one per wake-up: each export is a gRPC call with the
/// resource and scope encoded again, which at thousands of spans a second cost more than
/// the spans themselves.
async fn export_loop(
    mut rx: mpsc::Receiver<Box<SpanRecord>>,
    mut exporter: Exporter,
    counters: TraceCounters,
    spare: Arc<Spare>,
) {
    let mut backlog = false;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else { break };
        if !backlog {
            tokio::time::sleep(GATHER).await;
        }
        push_family(&mut batch, first);
        while batch.len() < BATCH
            && let Ok(span) = rx.try_recv()
        {
            push_family(&mut batch, span);
        }
        backlog = batch.len() == BATCH;
        let n = batch.len() as u64;
        match exporter.export(&batch).await {
            Ok(()) => {
                counters.exported.inc_by(n);
            }
            Err(super::otlp::ExportError::Partial { rejected, message }) => {
                let rejected = rejected.min(n);
                counters.exported.inc_by(n - rejected);
                counters.dropped.inc_by(rejected);
                tracing::debug!(rejected, %message, "OTLP receiver rejected spans");
            }
            Err(e) => {
                counters.export_failures.inc();
                counters.dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "OTLP export failed");
            }
        }
        spare.give_back(&mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_sampled_at_the_ratio_by_their_trace_id() {
        let mut rng = fastrand::Rng::with_seed(7);
        let ids: Vec<u128> = (0..100_000).map(|_| rng.u128(..)).collect();
        let sampled = |ratio| {
            let t = root_threshold(ratio);
            ids.iter().filter(|&&id| sample_root(t, id)).count()
        };
        assert_eq!(sampled(0.0), 0);
        assert_eq!(sampled(1.0), ids.len());
        // 1 % of 100,000: 1,000 with a standard deviation of about 31.
        let one = sampled(0.01);
        assert!((850..=1150).contains(&one), "{one}");
        let half = sampled(0.5);
        assert!((49_250..=50_750).contains(&half), "{half}");
        // Decided by the low 64 bits alone, as TraceIdRatioBased: other high bits, the
        // same answer.
        let t = root_threshold(0.25);
        let high = u128::from(u64::MAX) << 64;
        assert!(
            ids.iter()
                .all(|&id| sample_root(t, id) == sample_root(t, id ^ high))
        );
        // The extremes of the 63 bits compared.
        assert!(sample_root(root_threshold(1.0), u128::MAX));
        assert!(!sample_root(root_threshold(0.5), u128::from(u64::MAX)));
        assert!(sample_root(root_threshold(0.5), 1 << 1));
    }

    #[tokio::test(start_paused = true)]
    async fn span_times_are_one_wall_clock_read_plus_monotonic_time() {
        let start = Instant::now();
        let anchor = Anchor::new(start);
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(anchor.unix_nanos <= wall && wall - anchor.unix_nanos < 1_000_000_000);
        assert_eq!(anchor.unix_nanos(start), anchor.unix_nanos);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            anchor.unix_nanos(Instant::now()) - anchor.unix_nanos,
            250_000_000
        );
        // An instant before the anchor (read before the span started) is the anchor.
        let earlier = Anchor::new(Instant::now());
        assert_eq!(earlier.unix_nanos(start), earlier.unix_nanos);
    }

    #[test]
    fn traceparent_round_trips() {
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            TraceState::default(),
        )
        .unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let mut h = HeaderMap::new();
        inject(&sc, &mut h, false);
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn inject_writes_the_w3c_form_and_drops_b3() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let flags = if rng.bool() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let sc = SpanContext::new(
                TraceId::from(rng.u128(1..)),
                SpanId::from(rng.u64(1..)),
                flags,
                false,
                TraceState::default(),
            );
            let mut h = HeaderMap::new();
            h.insert("b3", HeaderValue::from_static("0"));
            h.insert("x-b3-traceid", HeaderValue::from_static("1"));
            h.insert("x-b3-sampled", HeaderValue::from_static("1"));
            h.insert("x-b3-parentspanid", HeaderValue::from_static("2"));
            h.insert("x-keep", HeaderValue::from_static("yes"));
            h.insert("x-b3-custom", HeaderValue::from_static("app's own"));
            assert!(TraceHeaders::scan(&h).any_b3);
            inject(&sc, &mut h, true);
            let want = format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            );
            assert_eq!(h["traceparent"], want.as_str());
            assert_eq!(h.len(), 3, "{h:?}");
            assert_eq!(h["x-keep"], "yes");
            assert_eq!(h["x-b3-custom"], "app's own");
            let back = parse_traceparent(&want, TraceState::default()).unwrap();
            assert_eq!(back.trace_id(), sc.trace_id());
            assert_eq!(back.span_id(), sc.span_id());
        }
    }

    #[test]
    fn the_spare_pool_is_bounded_in_count_and_size() {
        let spare = Spare::default();
        let mut big = blank_record(SPARE_BYTES * 4);
        big.attributes.str("url.path", "/long");
        let mut batch = vec![big];
        batch.extend((0..SPARE + 10).map(|_| {
            let mut r = blank_record(100);
            r.attributes.int("http.response.status_code", 503);
            r.name.push_str("GET api");
            r.error = Some("upstream reset".into());
            r
        }));
        spare.give_back(&mut batch);
        assert!(batch.is_empty());
        let kept: Vec<_> = std::iter::from_fn(|| spare.take()).collect();
        assert_eq!(kept.len(), SPARE);
        for r in kept {
            assert!(
                r.attributes.capacity() <= SPARE_BYTES,
                "the oversized one was kept"
            );
            assert!(r.attributes.as_bytes().is_empty() && r.name.is_empty() && r.error.is_none());
        }
    }

    #[test]
    fn one_scan_finds_the_trace_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("api"));
        h.insert("x-b3-traceidx", HeaderValue::from_static("not b3"));
        let found = TraceHeaders::scan(&h);
        assert!(found.context().is_none() && !found.any_b3);

        // Only a parent span id: nothing to join, but still B3 to strip.
        h.insert(
            "x-b3-parentspanid",
            HeaderValue::from_static("e457b5a2e4d86bd1"),
        );
        let found = TraceHeaders::scan(&h);
        assert!(found.context().is_none() && found.any_b3);

        // A repeated traceparent: the first one counts, as with `HeaderMap::get`.
        let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.append("traceparent", HeaderValue::from_static(first));
        h.append(
            "traceparent",
            HeaderValue::from_static("00-11111111111111111111111111111111-2222222222222222-00"),
        );
        h.insert("tracestate", HeaderValue::from_static("tern=1,other=x"));
        let sc = TraceHeaders::scan(&h).context().unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled());
        assert_eq!(sc.trace_state().header(), "tern=1,other=x");
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(
                parse_traceparent(bad, TraceState::default()).is_none(),
                "{bad}"
            );
        }
        // A future version with more fields is read by its prefix.
        assert!(
            parse_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what",
                TraceState::default()
            )
            .is_some()
        );
    }

    #[test]
    fn b3_single_and_multi_headers_are_accepted() {
        let sc = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert!(sc.is_sampled());
        let short = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-0").unwrap();
        assert_eq!(
            short.trace_id().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert!(!short.is_sampled());
        assert!(parse_b3_single("0").is_none());

        let mut h = HeaderMap::new();
        h.insert(
            "x-b3-traceid",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"),
        );
        h.insert("x-b3-spanid", HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let found = TraceHeaders::scan(&h);
        let (sc, any_b3) = (found.context().unwrap(), found.any_b3);
        assert!(sc.is_sampled());
        // Onward the proxy speaks W3C only.
        inject(&sc, &mut h, any_b3);
        assert!(h.contains_key("traceparent") && !h.contains_key("x-b3-traceid"));
    }
}
