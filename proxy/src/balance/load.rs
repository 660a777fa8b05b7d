//! Per-endpoint load that balancers read: requests in flight, latency EWMA, recent failure.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::peak_ewma::Ewma;

/// An endpoint that refused a connection is avoided for this long (unless all are failing).
pub const RECENT_FAILURE_WINDOW: Duration = Duration::from_secs(2);

/// Live load of one endpoint, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    ewma: Mutex<Ewma>,
    /// Milliseconds since [`epoch`] of the last connect failure, plus one; 0 when none.
    failed_at: AtomicU64,
}

impl Load {
    pub fn new(now: Instant) -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(Ewma::new(now)),
            failed_at: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        InFlight::start(Arc::clone(self) as Arc<dyn LoadOwner>)
    }

    /// Records a response latency (time to response headers) into the EWMA.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        if let Ok(mut ewma) = self.ewma.lock() {
            ewma.observe(rtt, now);
        }
        self.failed_at.store(0, Ordering::Relaxed);
    }

    /// The latency estimate as of `now`, decayed toward the default while idle.
    pub fn ewma(&self, now: Instant) -> Duration {
        match self.ewma.lock() {
            Ok(ewma) => ewma.estimate(now),
            Err(_) => super::DEFAULT_RTT,
        }
    }

    /// Marks a connection failure, so the next picks avoid this endpoint for a while.
    pub fn record_failure(&self, now: Instant) {
        let ms = now.saturating_duration_since(epoch()).as_millis() as u64;
        self.failed_at.store(ms + 1, Ordering::Relaxed);
    }

    /// Clears the failure mark (a connection succeeded).
    pub fn record_success(&self) {
        if self.failed_at.load(Ordering::Relaxed) != 0 {
            self.failed_at.store(0, Ordering::Relaxed);
        }
    }

    pub fn is_available(&self, now: Instant) -> bool {
        let failed = self.failed_at.load(Ordering::Relaxed);
        if failed == 0 {
            return true;
        }
        let now_ms = now.saturating_duration_since(epoch()).as_millis() as u64;
        now_ms.saturating_sub(failed - 1) >= RECENT_FAILURE_WINDOW.as_millis() as u64
    }
}

/// What holds a [`Load`]: the endpoint's state, which keeps its load inline (one allocation
/// per endpoint) and is kept alive by the requests in flight to it.
pub trait LoadOwner: Send + Sync + 'static {
    fn owned_load(&self) -> &Load;
}

impl LoadOwner for Load {
    fn owned_load(&self) -> &Load {
        self
    }
}

/// Decrements the in-flight count of an endpoint when dropped.
pub struct InFlight {
    owner: Arc<dyn LoadOwner>,
}

impl InFlight {
    /// Counts a request to `owner` as in flight until the guard drops.
    pub fn start(owner: Arc<dyn LoadOwner>) -> Self {
        owner.owned_load().in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { owner }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.owner
            .owned_load()
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A fixed origin for storing instants in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1))
}
