//! The memory guard: the process's resident set size, read a few times a second by one task,
//! against `memory_limit`; the request path only reads a flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often the guard re-reads RSS: fast enough to stop a flood within a fraction of a
/// second, rare enough to cost nothing (one small procfs read).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// Shedding starts above this share of the limit, leaving headroom for work in flight...
const ENTER_PERCENT: u64 = 90;
/// ...and stops below this one, so that RSS hovering at the threshold does not flap.
const LEAVE_PERCENT: u64 = 85;

/// Whether new work is shed for lack of memory, and the RSS last seen.
#[derive(Debug, Default)]
pub struct MemoryGuard {
    overloaded: AtomicBool,
    rss: AtomicU64,
}

/// A change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureChange {
    Entered,
    Left,
}

impl MemoryGuard {
    /// True while new connections are refused and new requests answered 503.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// Resident memory at the last refresh, in bytes (0 before the first or off Linux).
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// Re-reads RSS and decides against `limit`. Without a limit nothing is ever shed.
    pub fn refresh(&self, limit: Option<u64>) -> Option<PressureChange> {
        let Some(rss) = read_rss() else {
            self.overloaded.store(false, Ordering::Relaxed);
            return None;
        };
        self.rss.store(rss, Ordering::Relaxed);
        let was = self.is_overloaded();
        let now = next_overloaded(was, rss, limit);
        self.overloaded.store(now, Ordering::Relaxed);
        match (was, now) {
            (false, true) => Some(PressureChange::Entered),
            (true, false) => Some(PressureChange::Left),
            _ => None,
        }
    }
}

/// Whether to shed next, given whether we shed now: enter above 90% of the limit, leave below
/// 85%.
pub fn next_overloaded(was: bool, rss: u64, limit: Option<u64>) -> bool {
    let Some(limit) = limit else {
        return false;
    };
    let share = |percent: u64| limit / 100 * percent;
    if was {
        rss >= share(LEAVE_PERCENT)
    } else {
        rss > share(ENTER_PERCENT)
    }
}

/// `VmRSS` from `/proc/self/status`, in bytes. That file rather than `statm` because it is
/// already in bytes (kB), so no page size has to be asked of libc (this crate has no `unsafe`).
fn read_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// The `VmRSS:   12345 kB` line of a `/proc/PID/status` file, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sheds_above_90_percent_and_recovers_below_85() {
        let limit = Some(100 * MIB);
        assert!(!next_overloaded(false, 89 * MIB, limit));
        assert!(next_overloaded(false, 91 * MIB, limit));
        // Hysteresis: still shedding between 85% and 90%.
        assert!(next_overloaded(true, 88 * MIB, limit));
        assert!(!next_overloaded(true, 84 * MIB, limit));
        // No limit: never.
        assert!(!next_overloaded(true, u64::MAX, None));
    }

    #[test]
    fn reads_vm_rss_from_a_status_file() {
        let status = "Name:\ttern-proxy\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 pages\n"), None);
    }

    #[test]
    fn a_real_process_has_a_resident_set() {
        let guard = MemoryGuard::default();
        assert_eq!(guard.refresh(Some(1 << 40)), None);
        assert!(guard.rss() > MIB, "rss {}", guard.rss());
        assert_eq!(guard.refresh(Some(MIB)), Some(PressureChange::Entered));
        assert!(guard.is_overloaded());
        assert_eq!(guard.refresh(None), Some(PressureChange::Left));
    }
}
