//! Drop guards: [`FlightGuard`] (a flight task finishes its entry exactly once), [`Place`]
//! (a leader's reserved place in `len`) and [`WaiterSlot`] (a caller's place in a flight).

use std::{sync::Arc, time::Duration};

use super::{Table, Value};
use crate::{
    key::Fingerprint,
    sync::{self, AtomicUsize, Ordering},
};

/// A caller's place among a flight's waiters, given back when the caller is done.
pub(super) struct WaiterSlot(pub(super) sync::Arc<AtomicUsize>);

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An entry's place in the table's `len`, reserved by [`Table::lead`]; given back when
/// dropped before the entry is inserted.
pub(super) struct Place<'a>(pub(super) &'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Held by a flight's task: finishes the flight's entry exactly once, also when the task
/// panics, hits the hard cap or is cancelled (the guard is then dropped unfinished).
pub(crate) struct FlightGuard {
    table: Arc<Table>,
    key: Fingerprint,
    id: u64,
    armed: bool,
}

impl FlightGuard {
    pub(crate) fn new(table: Arc<Table>, key: Fingerprint, id: u64) -> Self {
        Self {
            table,
            key,
            id,
            armed: true,
        }
    }

    /// Ends the flight with its value, replayed for `replay` if given.
    ///
    /// The entry becomes a replay before the flight's future resolves, so a request that
    /// arrives after any caller has its answer finds the replay, never a finished flight.
    /// Returns whether the entry was still the flight's own: `false` if an invalidation
    /// removed it while the flight ran, and then the value must reach no caller.
    pub(crate) fn complete(mut self, value: &Value, replay: Option<Duration>) -> bool {
        self.armed = false;
        self.table
            .finish(&self.key, self.id, replay.map(|ttl| (value.clone(), ttl)))
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.table.finish(&self.key, self.id, None);
        }
    }
}
