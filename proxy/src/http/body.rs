//! Response bodies: upstream bodies streamed through untouched (trailers included) and
//! tracked until their end; short bodies for responses the proxy makes itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use super::pool::Lease;
use crate::balance::InFlight;
use crate::resilience::breaker::Permit;
use crate::telemetry::access_log::{AccessLog, Record};
use crate::telemetry::traces::ServerSpan;

/// What the proxy answers with: a forwarded upstream body or its own short body.
pub type ProxyBody = Either<Tracked, Full<Bytes>>;

pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(text.into()))
}

pin_project_lite::pin_project! {
    /// An upstream body that keeps its endpoint's request in flight until the body ends (or
    /// the client goes away), then records the request's total duration.
    pub struct Tracked {
        #[pin]
        inner: Incoming,
        done: Option<Done>,
        // The HTTP/1.1 connection goes back to the pool only once its response was read whole.
        lease: Option<Lease>,
    }
}

struct Done {
    _in_flight: InFlight,
    /// The service's `max_requests` slot, held until the response ends.
    _permit: Option<Permit>,
    duration: Histogram,
    start: Instant,
    /// The access log record, written when the response ends (only when logging is on).
    log: Option<Box<(Arc<AccessLog>, Record)>>,
    bytes: u64,
    /// The request's server span and the response status, ended with the response.
    span: Option<(ServerSpan, u16)>,
}

impl Drop for Done {
    fn drop(&mut self) {
        // One clock read for the histogram, the log line and the span.
        let now = Instant::now();
        let elapsed = now - self.start;
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(log) = self.log.take() {
            let (log, mut record) = *log;
            record.set_duration(elapsed);
            record.bytes_sent = self.bytes;
            log.emit(record);
        }
        if let Some((span, status)) = self.span.take() {
            span.end(now, status, "-");
        }
    }
}

impl Tracked {
    pub fn new(
        inner: Incoming,
        lease: Option<Lease>,
        in_flight: InFlight,
        permit: Option<Permit>,
        duration: Histogram,
        start: Instant,
    ) -> Self {
        let done = Some(Done {
            _in_flight: in_flight,
            _permit: permit,
            duration,
            start,
            log: None,
            bytes: 0,
            span: None,
        });
        let mut tracked = Tracked { inner, done, lease };
        // An empty body (HEAD, 204, `content-length: 0`) may never be polled.
        if tracked.inner.is_end_stream() {
            give_back(&mut tracked.lease);
        }
        tracked
    }

    /// Ends `span` when the response ends.
    pub fn traced(mut self, span: Option<(ServerSpan, u16)>) -> Self {
        if let Some(done) = self.done.as_mut() {
            done.span = span;
        }
        self
    }

    /// Writes `log`'s record when the response ends, with its duration and bytes sent.
    pub fn logged(mut self, log: Option<(Arc<AccessLog>, Record)>) -> Self {
        if let (Some(done), Some(log)) = (self.done.as_mut(), log) {
            done.log = Some(Box::new(log));
        }
        self
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                give_back(this.lease);
                this.done.take();
            }
            Poll::Ready(Some(Err(_))) => {
                // A broken body means a broken connection: never reuse it.
                this.lease.take();
                this.done.take();
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(done), Some(data)) = (this.done.as_mut(), frame.data_ref())
                    && done.log.is_some()
                {
                    done.bytes += data.len() as u64;
                }
                // hyper stops polling once `is_end_stream()` turns true after the last frame.
                if this.inner.is_end_stream() {
                    give_back(this.lease);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Returns the upstream connection to its pool (once): its response was read to the end.
fn give_back(lease: &mut Option<Lease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}
