//! [`Breaker`]: skips a failing store for a while.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// Skips the store for `cool_down` after `threshold` consecutive failures, then lets the
/// next flight try again.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    pub(super) cool_down: Duration,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "closed".
        Instant::now().duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Whether the store may be used now.
    pub(crate) fn allows(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until == 0 || self.now_ms() >= until
    }

    /// Records a success: closes the breaker. Returns whether it was open.
    pub(crate) fn succeeded(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failure. Returns whether this failure opened the breaker.
    pub(crate) fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < self.threshold {
            return false;
        }
        let until = self.now_ms() + self.cool_down.as_millis() as u64;
        let previous = self.open_until.swap(until, Ordering::AcqRel);
        previous == 0 || self.now_ms() >= previous
    }

    /// Whether the breaker is open or half-open (opened, and no success since).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}
