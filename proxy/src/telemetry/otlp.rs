//! OTLP/gRPC export of finished spans: the `ExportTraceServiceRequest` protobuf written
//! straight from the proxy's span records, one unary `TraceService/Export` call per batch.
//!
//! Why not opentelemetry-otlp's exporter: counted with callgrind at 100 % sampling, it spent
//! ~20,600 instructions per request before any byte existed (every batch deep-cloned for its
//! retry path, then converted into the opentelemetry-proto structs), and prost's encoding of
//! that tree and the send ~20,000 more, against ~50,000 for the whole proxied request. This
//! encoder writes the same message in one pass over the records into one reused buffer. The
//! schema is opentelemetry-proto's; the tests decode what is written with its types.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt as _;
use opentelemetry::trace::SpanKind;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::{Service as _, ServiceExt as _};

use super::traces::SpanRecord;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A client of one OTLP/gRPC receiver.
pub struct Exporter {
    channel: Channel,
    /// `grpc-timeout` of every call: the receiver gives up when the exporter does.
    grpc_timeout: HeaderValue,
    /// The last batch's buffer, for the next one.
    spare: Vec<u8>,
    /// The last batch's span lengths, for the next one.
    span_lengths: Vec<usize>,
    /// `Resource.attributes`, encoded once: the `service.name`.
    resource: Attributes,
    scope: &'static str,
}

/// Why an export did not deliver every span.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Grpc(#[from] tonic::Status),
    #[error("receiver not ready: {0}")]
    Transport(String),
    #[error("receiver rejected {rejected} spans: {message}")]
    Partial { rejected: u64, message: String },
}

impl Exporter {
    /// A lazily connecting client (a receiver that is down is only an export error later).
    pub fn new(
        endpoint: &str,
        timeout: Duration,
        service_name: &str,
        scope: &'static str,
    ) -> Result<Exporter, String> {
        let mut channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if endpoint.starts_with("https://") {
            // A collector outside the mesh: its certificate is checked against the system's
            // trust store (or the bundle `SSL_CERT_FILE` names).
            channel = channel
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| format!("OTLP endpoint {endpoint}: TLS: {e}"))?;
        }
        let channel = channel.connect_lazy();
        // Milliseconds ("m"), the unit that keeps sub-second timeouts exact.
        let millis = timeout.as_millis().clamp(1, 99_999_999);
        let grpc_timeout = HeaderValue::from_str(&format!("{millis}m"))
            .map_err(|e| format!("OTLP timeout {timeout:?}: {e}"))?;
        Ok(Exporter {
            channel,
            grpc_timeout,
            spare: Vec::new(),
            span_lengths: Vec::new(),
            resource: Attributes::resource(service_name),
            scope,
        })
    }

    /// Sends one batch; `Ok` means the receiver took every span.
    ///
    /// The unary call is written here over tonic's channel rather than through
    /// `tonic::client::Grpc` and a codec: a codec gets the message to copy into tonic's own
    /// buffer, which at 100 % sampling was a 200 KiB reallocation and copy per batch (about
    /// 900 instructions per request). Here the batch is encoded behind room for gRPC's
    /// five-byte message header and that one buffer becomes the request body.
    pub async fn export(&mut self, spans: &[Box<SpanRecord>]) -> Result<(), ExportError> {
        // Sized for the whole batch from the start: growing it would copy it again.
        let lengths = Lengths::of(
            &self.resource,
            self.scope,
            spans,
            std::mem::take(&mut self.span_lengths),
        );
        let bound = FRAME_HEADER + framed(lengths.resource_spans);
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.reserve(bound);
        buf.extend_from_slice(&[0; FRAME_HEADER]);
        write_request(&mut buf, &lengths, &self.resource, self.scope, spans);
        self.span_lengths = lengths.spans;
        let len = u32::try_from(buf.len() - FRAME_HEADER)
            .map_err(|_| ExportError::Transport("batch over 4 GiB".into()))?;
        // Not compressed (0), then the length, big endian.
        buf[1..FRAME_HEADER].copy_from_slice(&len.to_be_bytes());
        let body = Bytes::from(buf);
        let kept = body.clone();
        let result = self.call(body).await;
        // The buffer comes back when the call has let go of it (it has once the receiver
        // answered, having read the request) and the next batch is written into it: a
        // fresh 200 KiB allocation per batch cost page faults and malloc consolidation.
        if let Ok(buf) = kept.try_into_mut().map(Vec::from)
            && buf.capacity() <= SPARE_BUFFER
        {
            self.spare = buf;
        }
        result
    }

    /// One `Export` call with `body` (a framed message).
    async fn call(&mut self, body: Bytes) -> Result<(), ExportError> {
        let request = http::Request::builder()
            .method(http::Method::POST)
            // The channel fills in the scheme and authority of the endpoint.
            .uri(EXPORT_PATH)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header("grpc-timeout", self.grpc_timeout.clone())
            .body(tonic::body::Body::new(http_body_util::Full::new(body)))
            .map_err(|e| ExportError::Transport(e.to_string()))?;
        let mut channel = self.channel.clone();
        let response = channel
            .ready()
            .await
            .map_err(|e| ExportError::Transport(e.to_string()))?
            .call(request)
            .await
            .map_err(|e| ExportError::Transport(e.to_string()))?;
        let (head, body) = response.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(ExportError::Transport(format!(
                "HTTP status {}",
                head.status
            )));
        }
        // A call that fails before any message answers "trailers-only": the status is in
        // the headers and there is no body.
        if let Some(status) = tonic::Status::from_header_map(&head.headers) {
            grpc_ok(status)?;
        }
        let body = body
            .collect()
            .await
            .map_err(|e| ExportError::Transport(e.to_string()))?;
        match body.trailers().and_then(tonic::Status::from_header_map) {
            Some(status) => grpc_ok(status)?,
            None if head.headers.contains_key("grpc-status") => {}
            None => {
                return Err(ExportError::Transport(
                    "response without grpc-status".into(),
                ));
            }
        }
        let response = decode_response(&body.to_bytes())?;
        match response.partial_success {
            Some(p) if p.rejected_spans > 0 => Err(ExportError::Partial {
                rejected: p.rejected_spans.max(0) as u64,
                message: p.error_message,
            }),
            _ => Ok(()),
        }
    }
}

/// A batch buffer larger than this (long paths) is freed rather than kept.
const SPARE_BUFFER: usize = 1 << 20;

/// gRPC's message header: a compressed flag and a four-byte length.
const FRAME_HEADER: usize = 5;

fn grpc_ok(status: tonic::Status) -> Result<(), ExportError> {
    if status.code() == tonic::Code::Ok {
        Ok(())
    } else {
        Err(ExportError::Grpc(status))
    }
}

/// The one length-prefixed message of a unary response (none is read as an empty one).
fn decode_response(data: &[u8]) -> Result<ExportTraceServiceResponse, ExportError> {
    if data.is_empty() {
        return Ok(ExportTraceServiceResponse::default());
    }
    let bad = |why: &str| ExportError::Transport(format!("OTLP response: {why}"));
    let (head, rest) = data
        .split_at_checked(FRAME_HEADER)
        .ok_or_else(|| bad("shorter than a message header"))?;
    // Nothing was offered in grpc-accept-encoding, so the receiver must not compress.
    if head[0] != 0 {
        return Err(bad("compressed, though no compression was offered"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let message = rest.get(..len).ok_or_else(|| bad("message cut short"))?;
    ExportTraceServiceResponse::decode(message).map_err(|e| bad(&e.to_string()))
}

/// Attributes already in wire form: each one a repeated `attributes` field (9 in a span, 1 in
/// the resource) holding a `KeyValue`. Written once from borrowed text, so a sampled
/// request allocates no `String` per attribute and frees none at export; the batch encoder
/// copies the bytes.
#[derive(Debug, Clone)]
pub struct Attributes {
    /// The repeated `KeyValue` field: `SPAN_ATTRIBUTES` in `Span`, 1 in `Resource`.
    field: u32,
    bytes: Vec<u8>,
}

impl Default for Attributes {
    fn default() -> Attributes {
        Attributes::with_capacity(0)
    }
}

impl Attributes {
    /// A span's attributes, with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Attributes {
        Attributes {
            field: SPAN_ATTRIBUTES,
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// The resource's attributes: the service name.
    fn resource(service_name: &str) -> Attributes {
        let mut resource = Attributes {
            field: 1,
            bytes: Vec::new(),
        };
        resource.str("service.name", service_name);
        resource
    }

    /// A string attribute.
    pub fn str(&mut self, key: &str, value: &str) {
        // The common case, a short key and value: every length fits one varint byte, so
        // the whole attribute is two fixed four-byte headers around the two texts.
        if key.len() + value.len() < SHORT {
            self.short_key(key, 2 + 2 + value.len());
            let out = &mut self.bytes;
            out.extend_from_slice(&[
                (2 << 3) | LEN as u8,
                (2 + value.len()) as u8,
                (1 << 3) | LEN as u8,
                value.len() as u8,
            ]);
            out.extend_from_slice(value.as_bytes());
            return;
        }
        // AnyValue { string_value = 1 }
        let any = 1 + varint_len(value.len() as u64) + value.len();
        self.key_value(key, any);
        let mut head = [0u8; 11];
        head[0] = (1 << 3) | LEN as u8;
        let n = 1 + varint_into_at(&mut head, 1, value.len() as u64);
        self.bytes.extend_from_slice(&head[..n]);
        self.bytes.extend_from_slice(value.as_bytes());
    }

    /// An integer attribute.
    pub fn int(&mut self, key: &str, value: i64) {
        // AnyValue { int_value = 3 }: the two's complement as an unsigned varint.
        let v = value as u64;
        let any = 1 + varint_len(v);
        // The common case, a short key: both lengths are one byte, so the headers are
        // fixed, as in `str` (the general path cost about 2.5 times as much).
        if key.len() + any < SHORT {
            self.short_key(key, 2 + any);
            // KeyValue.value's header, AnyValue's tag and the varint (at most ten bytes).
            let mut tail = [0u8; 13];
            tail[0] = (2 << 3) | LEN as u8;
            tail[1] = any as u8;
            tail[2] = (3 << 3) | VARINT as u8;
            let n = 3 + varint_into_at(&mut tail, 3, v);
            self.bytes.extend_from_slice(&tail[..n]);
            return;
        }
        self.key_value(key, any);
        let mut head = [0u8; 11];
        head[0] = (3 << 3) | VARINT as u8;
        let n = 1 + varint_into_at(&mut head, 1, v);
        self.bytes.extend_from_slice(&head[..n]);
    }

    /// The field and `KeyValue` headers and the key of an attribute whose `KeyValue.value`
    /// field takes `value` bytes (its own header included), when the key and value are
    /// short enough (under `SHORT`) for every length to be one byte; room for the value is
    /// reserved.
    fn short_key(&mut self, key: &str, value: usize) {
        let kv = 2 + key.len() + value;
        let field = (self.field << 3 | LEN) as u8;
        let out = &mut self.bytes;
        out.reserve(2 + kv);
        out.extend_from_slice(&[field, kv as u8, (1 << 3) | LEN as u8, key.len() as u8]);
        out.extend_from_slice(key.as_bytes());
    }

    /// The field and `KeyValue` headers and the key, for a value of `any` bytes: assembled
    /// on the stack and appended in two copies (the header fields are one or two bytes
    /// each; pushing them one by one was most of an attribute's cost).
    fn key_value(&mut self, key: &str, any: usize) {
        let kv = 1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(any as u64) + any;
        // Two tags and two varints of at most ten bytes each.
        let mut head = [0u8; 22];
        let mut n = varint_into_at(&mut head, 0, u64::from((self.field << 3) | LEN));
        n += varint_into_at(&mut head, n, kv as u64);
        head[n] = (1 << 3) | LEN as u8;
        n += 1;
        n += varint_into_at(&mut head, n, key.len() as u64);
        self.bytes.reserve(n + key.len() + 4 + any);
        self.bytes.extend_from_slice(&head[..n]);
        self.bytes.extend_from_slice(key.as_bytes());
        // KeyValue.value: AnyValue, whose header the caller's value follows.
        let mut tail = [0u8; 11];
        tail[0] = (2 << 3) | LEN as u8;
        let m = 1 + varint_into_at(&mut tail, 1, any as u64);
        self.bytes.extend_from_slice(&tail[..m]);
    }

    /// Appends attributes encoded earlier (by [`Attributes::into_boxed`] of the same kind):
    /// a repeated field's entries concatenate.
    pub fn raw(&mut self, encoded: &[u8]) {
        self.bytes.extend_from_slice(encoded);
    }

    /// The encoded attributes, to be appended with [`Attributes::raw`].
    pub fn into_boxed(self) -> Box<[u8]> {
        self.bytes.into_boxed_slice()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A span attribute's key encoded at compile time, with the field and `KeyValue` headers
/// around it, for the attributes every traced request writes (status code, path, outcome):
/// appending it is one copy of a stack array with two length bytes patched, where writing
/// the key out took three copies and the length arithmetic.
#[derive(Debug)]
pub struct Key {
    /// Written as by `Attributes::str` / `int` with an empty value: the span's attributes
    /// field tag, the `KeyValue` length, the key, the `KeyValue.value` tag and length, and
    /// the `AnyValue` tag of the value's type. Both lengths grow by the value's size.
    head: [u8; KEY_HEAD],
    /// The key's length: the head takes `key + 7` bytes, and a string's length byte one more.
    key: u8,
    text: &'static str,
}

/// `Span.attributes`, the field a `Key`'s head is encoded for.
const SPAN_ATTRIBUTES: u32 = 9;

/// Room for a key of up to `KEY_HEAD - 8` bytes (long enough for the conventions' keys).
const KEY_HEAD: usize = 56;

impl Key {
    /// The key of a string attribute.
    pub const fn string(key: &'static str) -> Key {
        // AnyValue { string_value = 1 }: the tag, then the text's length and the text.
        Key::new(key, (1 << 3) | LEN as u8, 1)
    }

    /// The key of an integer attribute.
    pub const fn int(key: &'static str) -> Key {
        // AnyValue { int_value = 3 }: the tag, then the varint.
        Key::new(key, (3 << 3) | VARINT as u8, 0)
    }

    /// `value_tag` is the `AnyValue` field's tag; `length_bytes` how many bytes of the
    /// value's own length follow it (one for a short text, none for a varint).
    const fn new(key: &'static str, value_tag: u8, length_bytes: u8) -> Key {
        let bytes = key.as_bytes();
        // A compile-time error for a key that does not fit (these are constants).
        assert!(
            bytes.len() <= KEY_HEAD - 8,
            "attribute key too long for Key"
        );
        let k = bytes.len();
        let mut head = [0u8; KEY_HEAD];
        head[0] = (SPAN_ATTRIBUTES << 3 | LEN) as u8;
        // KeyValue: key (tag, length, text), value (tag, length), AnyValue's tag, and the
        // value's length byte when it has one.
        head[1] = 2 + k as u8 + 2 + 1 + length_bytes;
        head[2] = (1 << 3) | LEN as u8;
        head[3] = k as u8;
        let mut i = 0;
        while i < k {
            head[4 + i] = bytes[i];
            i += 1;
        }
        head[4 + k] = (2 << 3) | LEN as u8;
        head[5 + k] = 1 + length_bytes;
        head[6 + k] = value_tag;
        Key {
            head,
            key: k as u8,
            text: key,
        }
    }
}

impl Attributes {
    /// A string attribute of a key encoded once (see [`Key::string`]).
    pub fn str_key(&mut self, key: &Key, value: &str) {
        let k = usize::from(key.key);
        if self.field != SPAN_ATTRIBUTES || k + value.len() >= SHORT {
            return self.str(key.text, value);
        }
        let mut head = key.head;
        let v = value.len() as u8;
        head[1] += v;
        head[5 + k] += v;
        head[7 + k] = v;
        self.bytes.reserve(8 + k + value.len());
        self.bytes.extend_from_slice(&head[..8 + k]);
        self.bytes.extend_from_slice(value.as_bytes());
    }

    /// An integer attribute of a key encoded once (see [`Key::int`]).
    pub fn int_key(&mut self, key: &Key, value: i64) {
        let k = usize::from(key.key);
        if self.field != SPAN_ATTRIBUTES {
            return self.int(key.text, value);
        }
        // Room behind the head for the ten bytes of the longest varint.
        let mut head = [0u8; KEY_HEAD + 10];
        head[..KEY_HEAD].copy_from_slice(&key.head);
        let n = varint_into_at(&mut head, 7 + k, value as u64);
        head[1] += n as u8;
        head[5 + k] += n as u8;
        self.bytes.extend_from_slice(&head[..7 + k + n]);
    }
}

/// Below this many bytes of key and value together, every length in a string attribute is
/// one varint byte: the `KeyValue` is 6 bytes of headers plus both texts, under 128.
const SHORT: usize = 128 - 6;

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; zero still takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

// Protobuf wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;

/// `ExportTraceServiceRequest { resource_spans: [ { resource, scope_spans: [ { scope, spans } ] } ] }`.
///
/// Every length is computed before its message is written, so nothing is moved once
/// written: a length known only afterwards would move the message behind it when the
/// length takes more than the one byte set aside, and the outer two messages hold the
/// whole batch.
pub fn encode_request(
    out: &mut Vec<u8>,
    resource: &Attributes,
    scope: &str,
    spans: &[Box<SpanRecord>],
) {
    write_request(
        out,
        &Lengths::of(resource, scope, spans, Vec::new()),
        resource,
        scope,
        spans,
    );
}

/// `encode_request` with the lengths computed already.
fn write_request(
    out: &mut Vec<u8>,
    lengths: &Lengths,
    resource: &Attributes,
    scope: &str,
    spans: &[Box<SpanRecord>],
) {
    let start = out.len();
    out.reserve(framed(lengths.resource_spans));
    // ExportTraceServiceRequest.resource_spans
    head(out, 1, lengths.resource_spans);
    // ResourceSpans.resource: Resource { attributes = 1 }
    head(out, 1, resource.as_bytes().len());
    out.extend_from_slice(resource.as_bytes());
    // ResourceSpans.scope_spans
    head(out, 2, lengths.scope_spans);
    // ScopeSpans.scope: InstrumentationScope { name = 1 }
    head(out, 1, framed(scope.len()));
    string(out, 1, scope);
    for (span, &len) in spans.iter().zip(&lengths.spans) {
        encode_span(out, span, len);
    }
    debug_assert_eq!(out.len() - start, framed(lengths.resource_spans));
}

/// The content lengths of the two messages around the spans, and of each span: every span's
/// length is needed twice (in the sum and in its own header) and computed once.
struct Lengths {
    resource_spans: usize,
    scope_spans: usize,
    spans: Vec<usize>,
}

impl Lengths {
    /// `spans` is a buffer to reuse for the spans' lengths.
    fn of(
        resource: &Attributes,
        scope: &str,
        records: &[Box<SpanRecord>],
        mut spans: Vec<usize>,
    ) -> Lengths {
        spans.clear();
        spans.extend(records.iter().map(|s| span_len(s)));
        let spans_len: usize = spans.iter().map(|&len| framed(len)).sum();
        let scope_spans = framed(framed(scope.len())) + spans_len;
        Lengths {
            resource_spans: framed(resource.as_bytes().len()) + framed(scope_spans),
            scope_spans,
            spans,
        }
    }
}

/// The exact length `encode_request` writes.
#[cfg(test)]
fn encoded_len(resource: &Attributes, scope: &str, spans: &[Box<SpanRecord>]) -> usize {
    framed(Lengths::of(resource, scope, spans, Vec::new()).resource_spans)
}

/// The size of a length-delimited field (numbers 1 to 15) with `len` bytes of content: a
/// one-byte tag, the length's varint and the content.
fn framed(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// The tag and length of a length-delimited field whose content follows.
fn head(out: &mut Vec<u8>, field: u32, len: usize) {
    tag(out, field, LEN);
    varint(out, len as u64);
}

/// The content length of `span`'s `Span` message, as `encode_span` writes it.
fn span_len(span: &SpanRecord) -> usize {
    let state = state_header(&span.context).map_or(0, |h| h.len());
    // trace_id and span_id (tag, length, bytes), kind, start and end, flags (a two-byte tag).
    const FIXED: usize = 18 + 10 + 2 + 9 + 9 + 6;
    FIXED
        + if state > 0 { framed(state) } else { 0 }
        + if span.parent.is_some() { 10 } else { 0 }
        + framed(span.name.len())
        + span.attributes.as_bytes().len()
        + span.error.as_ref().map_or(0, |m| framed(status_len(m)))
}

/// The `tracestate` header of a span's context; `None` without one (nearly always), found
/// without building the header text (asked for four times per span).
fn state_header(cx: &opentelemetry::trace::SpanContext) -> Option<String> {
    let state = cx.trace_state();
    if *state == opentelemetry::trace::TraceState::NONE {
        return None;
    }
    Some(state.header()).filter(|h| !h.is_empty())
}

/// `Status { message = 2, code = 3 }`: the message and a one-byte code.
fn status_len(message: &str) -> usize {
    framed(message.len()) + 2
}

/// One `Span` message (opentelemetry/proto/trace/v1/trace.proto), as field 2 of
/// `ScopeSpans`. The fixed-size fields are assembled on the stack and appended in three
/// copies rather than pushed byte by byte.
fn encode_span(out: &mut Vec<u8>, span: &SpanRecord, len: usize) {
    let cx = &span.context;
    let start = out.len();
    // ScopeSpans.spans (tag, length), Span.trace_id = 1 and span_id = 2.
    let mut ids = [0u8; 1 + 10 + 28];
    ids[0] = (2 << 3) | LEN as u8;
    let mut n = 1 + varint_into_at(&mut ids, 1, len as u64);
    ids[n] = (1 << 3) | LEN as u8;
    ids[n + 1] = 16;
    ids[n + 2..n + 18].copy_from_slice(&cx.trace_id().to_bytes());
    ids[n + 18] = (2 << 3) | LEN as u8;
    ids[n + 19] = 8;
    ids[n + 20..n + 28].copy_from_slice(&cx.span_id().to_bytes());
    n += 28;
    out.extend_from_slice(&ids[..n]);
    if let Some(state) = state_header(cx) {
        string(out, 3, &state);
    }
    if let Some(parent) = span.parent {
        let mut p = [0u8; 10];
        p[0] = (4 << 3) | LEN as u8;
        p[1] = 8;
        p[2..].copy_from_slice(&parent.span_id.to_bytes());
        out.extend_from_slice(&p);
    }
    string(out, 5, &span.name);
    // Span.kind = 6, start_time_unix_nano = 7, end_time_unix_nano = 8.
    let kind: u8 = match span.kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    let mut times = [0u8; 20];
    times[0] = (6 << 3) | VARINT as u8;
    times[1] = kind;
    times[2] = (7 << 3) | I64 as u8;
    times[3..11].copy_from_slice(&span.start_unix_nano.to_le_bytes());
    times[11] = (8 << 3) | I64 as u8;
    times[12..20].copy_from_slice(&span.end_unix_nano.to_le_bytes());
    out.extend_from_slice(&times);
    out.extend_from_slice(span.attributes.as_bytes());
    if let Some(message) = &span.error {
        // Status { message = 2, code = 3 (ERROR = 2) }
        head(out, 15, status_len(message));
        string(out, 2, message);
        out.extend_from_slice(&[(3 << 3) | VARINT as u8, 2]);
    }
    // Span.flags = 16 (fixed32): the W3C trace flags in bits 0-7; bit 8 says bit 9 is
    // known, bit 9 that the parent was remote (a span of another process).
    let mut flags = u32::from(cx.trace_flags().to_u8()) | 0x100;
    if span.parent.is_some_and(|p| p.remote) {
        flags |= 0x200;
    }
    // The tag of field 16, wire type 5 (fixed32), is the two-byte varint 133.
    let f = flags.to_le_bytes();
    out.extend_from_slice(&[0x85, 0x01, f[0], f[1], f[2], f[3]]);
    debug_assert_eq!(out.len() - start, framed(len));
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from((field << 3) | wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `v` as a varint into `buf` from `at` (the callers' buffers leave room for ten bytes);
/// returns its length.
fn varint_into_at(buf: &mut [u8], at: usize, mut v: u64) -> usize {
    let mut n = at;
    while v >= 0x80 {
        if let Some(b) = buf.get_mut(n) {
            *b = (v as u8 & 0x7f) | 0x80;
        }
        v >>= 7;
        n += 1;
    }
    if let Some(b) = buf.get_mut(n) {
        *b = v as u8;
    }
    n + 1 - at
}

fn bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    // Nearly always (span names, the scope): a one-byte tag and a one-byte length.
    if field < 16 && data.len() < 0x80 {
        out.extend_from_slice(&[(field << 3 | LEN) as u8, data.len() as u8]);
        out.extend_from_slice(data);
        return;
    }
    tag(out, field, LEN);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::traces::Parent;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Pv;
    use std::borrow::Cow;
    use std::str::FromStr;

    /// A pre-encoded key writes the bytes that writing the key out does, on both sides of
    /// the short-value limit and of every varint length.
    #[test]
    fn encoded_keys_write_what_written_keys_do() {
        const S: Key = Key::string("url.path");
        const I: Key = Key::int("http.response.status_code");
        for len in [0, 1, 50, SHORT - 9, SHORT - 8, SHORT - 7, 200, 20_000] {
            let value = "p".repeat(len);
            let (mut keyed, mut written) = (Attributes::default(), Attributes::default());
            keyed.str_key(&S, &value);
            written.str("url.path", &value);
            assert_eq!(keyed.as_bytes(), written.as_bytes(), "{len}");
        }
        for v in [
            0,
            1,
            127,
            128,
            200,
            503,
            16_383,
            16_384,
            -1,
            i64::MAX,
            i64::MIN,
        ] {
            let (mut keyed, mut written) = (Attributes::default(), Attributes::default());
            keyed.int_key(&I, v);
            written.int("http.response.status_code", v);
            assert_eq!(keyed.as_bytes(), written.as_bytes(), "{v}");
        }
        // Not span attributes: written out as the resource's.
        let mut resource = Attributes::resource("svc");
        let mut want = resource.clone();
        resource.str_key(&S, "/x");
        want.str("url.path", "/x");
        resource.int_key(&I, 200);
        want.int("http.response.status_code", 200);
        assert_eq!(resource.as_bytes(), want.as_bytes());
    }

    /// A record and the attributes it should decode to.
    fn record(i: u64, long: bool) -> (Box<SpanRecord>, Vec<(String, Pv)>) {
        let state = if i.is_multiple_of(2) {
            TraceState::from_str("vendor=a,other=b").unwrap()
        } else {
            TraceState::default()
        };
        let flags = if i.is_multiple_of(3) {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let mut attributes = Attributes::default();
        let mut want = Vec::new();
        let mut str_attr = |a: &mut Attributes, k: &str, v: &str| {
            a.str(k, v);
            want.push((k.to_string(), Pv::StringValue(v.to_string())));
        };
        str_attr(&mut attributes, "http.request.method", "GET");
        str_attr(&mut attributes, "", "");
        str_attr(&mut attributes, "tern.endpoint", "127.0.0.1:8080");
        if long {
            // Past 127 and 16,383 bytes: two- and three-byte lengths at every level.
            str_attr(&mut attributes, "url.path", &"p".repeat(20_000));
            str_attr(&mut attributes, &"k".repeat(200), &"v".repeat(130));
        }
        // Either side of the one-byte-length fast path (key + value under SHORT bytes).
        for total in [SHORT - 1, SHORT, SHORT + 1, 124, 125, 126, 127, 128] {
            let key = "k".repeat(total / 3);
            str_attr(&mut attributes, &key, &"v".repeat(total - key.len()));
        }
        for (k, v) in [
            ("server.port", 8080_i64),
            ("zero", 0),
            ("tern.negative", -5),
            ("min", i64::MIN),
            ("max", i64::MAX),
        ] {
            attributes.int(k, v);
            want.push((k.to_string(), Pv::IntValue(v)));
        }
        // Either side of the integers' fast path (key + value header under SHORT bytes),
        // with one- and eleven-byte values.
        for key_len in [
            SHORT - 12,
            SHORT - 11,
            SHORT - 3,
            SHORT - 2,
            SHORT - 1,
            SHORT,
            130,
        ] {
            for v in [1_i64, -1] {
                let key = "i".repeat(key_len) + if v < 0 { "-" } else { "+" };
                attributes.int(&key, v);
                want.push((key, Pv::IntValue(v)));
            }
        }
        let record = Box::new(SpanRecord {
            context: SpanContext::new(
                TraceId::from(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10_u128 + u128::from(i)),
                SpanId::from(0x1112_1314_1516_1718 + i),
                flags,
                false,
                state,
            ),
            parent: (i % 2 == 1).then_some(Parent {
                span_id: SpanId::from(0x2122_2324_2526_2728),
                remote: i % 4 == 1,
            }),
            kind: if i.is_multiple_of(2) {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            // Past 127 bytes in the long record: a two-byte length.
            name: if long {
                format!("GET {}", "n".repeat(200))
            } else {
                format!("GET api {i}")
            },
            start_unix_nano: 1_700_000_000_000_000_000 + i,
            end_unix_nano: 1_700_000_000_500_000_000 + i,
            attributes,
            error: i
                .is_multiple_of(5)
                .then(|| Cow::Owned(format!("upstream reset {i}"))),
            children: Vec::new(),
        });
        (record, want)
    }

    #[test]
    fn the_request_decodes_with_opentelemetry_proto() {
        for long in [false, true] {
            let (spans, wants): (Vec<_>, Vec<_>) =
                (0..40).map(|i| record(i, long && i == 7)).unzip();
            let mut out = Vec::new();
            let resource = Attributes::resource("web-sidecar");
            encode_request(&mut out, &resource, "tern-proxy", &spans);
            assert_eq!(out.len(), encoded_len(&resource, "tern-proxy", &spans));
            let req = ExportTraceServiceRequest::decode(out.as_slice()).unwrap();
            assert_eq!(req.resource_spans.len(), 1);
            let rs = &req.resource_spans[0];
            let res: Vec<_> = rs
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
                .collect();
            assert_eq!(
                res,
                vec![("service.name".into(), Pv::StringValue("web-sidecar".into()))]
            );
            assert_eq!(rs.scope_spans.len(), 1);
            let ss = &rs.scope_spans[0];
            assert_eq!(ss.scope.as_ref().unwrap().name, "tern-proxy");
            assert_eq!(ss.spans.len(), spans.len());
            for ((got, want), want_attrs) in ss.spans.iter().zip(&spans).zip(&wants) {
                let cx = &want.context;
                assert_eq!(got.trace_id, cx.trace_id().to_bytes());
                assert_eq!(got.span_id, cx.span_id().to_bytes());
                assert_eq!(got.trace_state, cx.trace_state().header());
                match want.parent {
                    Some(p) => assert_eq!(got.parent_span_id, p.span_id.to_bytes()),
                    None => assert!(got.parent_span_id.is_empty()),
                }
                assert_eq!(got.name, want.name);
                let kind = if want.kind == SpanKind::Server { 2 } else { 3 };
                assert_eq!(got.kind, kind);
                assert_eq!(got.start_time_unix_nano, want.start_unix_nano);
                assert_eq!(got.end_time_unix_nano, want.end_unix_nano);
                let remote = want.parent.is_some_and(|p| p.remote);
                assert_eq!(
                    got.flags,
                    u32::from(cx.trace_flags().to_u8()) | 0x100 | if remote { 0x200 } else { 0 }
                );
                match &want.error {
                    Some(m) => {
                        let status = got.status.as_ref().unwrap();
                        assert_eq!(status.code, 2);
                        assert_eq!(&status.message, m);
                    }
                    None => assert!(got.status.is_none()),
                }
                let got_attrs: Vec<_> = got
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
                    .collect();
                assert_eq!(&got_attrs, want_attrs);
            }
        }
    }

    /// A receiver that takes every batch.
    #[derive(Default)]
    struct Sink;

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Sink {
        async fn export(
            &self,
            _: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// The batch buffer goes back to the exporter once the receiver has answered, and the
    /// next batch is written into the same allocation.
    #[tokio::test]
    async fn the_batch_buffer_is_reused() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Sink))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut exporter = Exporter::new(
            &format!("http://{addr}"),
            Duration::from_secs(5),
            "web-sidecar",
            "tern-proxy",
        )
        .unwrap();
        let spans: Vec<_> = (0..20).map(|i| record(i, false).0).collect();
        exporter.export(&spans).await.unwrap();
        let (at, capacity) = (exporter.spare.as_ptr(), exporter.spare.capacity());
        assert!(capacity >= encoded_len(&exporter.resource, "tern-proxy", &spans));
        exporter.export(&spans[..10]).await.unwrap();
        assert_eq!(exporter.spare.as_ptr(), at, "the same allocation");
        assert_eq!(exporter.spare.capacity(), capacity);
    }

    #[test]
    fn varints_match_prost() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut mine = Vec::new();
            varint(&mut mine, v);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(mine, theirs, "{v}");
            assert_eq!(varint_len(v), mine.len(), "{v}");
        }
    }
}
