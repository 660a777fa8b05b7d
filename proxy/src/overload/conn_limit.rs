//! The count of a listener's open connections against its `max_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Connections open on one listener. A counter rather than a `Semaphore`: the cap is read
/// from the config in force at each accept, so a reload changes it without a rebind.
#[derive(Debug, Default)]
pub struct ConnLimit {
    open: Arc<AtomicUsize>,
}

/// One open connection's place under the cap; released when dropped (the connection ended).
#[derive(Debug)]
pub struct ConnSlot {
    open: Arc<AtomicUsize>,
}

impl ConnLimit {
    /// A slot if fewer than `max` connections are open.
    pub fn try_acquire(&self, max: usize) -> Option<ConnSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnSlot {
                open: Arc::clone(&self.open),
            })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_frees_a_slot_when_a_connection_ends() {
        let limit = ConnLimit::default();
        let held: Vec<_> = (0..3).filter_map(|_| limit.try_acquire(3)).collect();
        assert_eq!(held.len(), 3);
        assert!(limit.try_acquire(3).is_none());
        // A reload that raises the cap admits more at once.
        let fourth = limit.try_acquire(4);
        assert!(fourth.is_some());
        drop(fourth);
        drop(held);
        assert_eq!(limit.open(), 0);
        assert!(limit.try_acquire(1).is_some());
    }
}
