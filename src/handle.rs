//! A handle on a layer's table, for invalidation and statistics.

use std::{fmt, sync::Arc};

use crate::{flight::Table, key::Fingerprint, metrics::Stats};

/// A cheap-to-clone handle on the table of a [`RefreshCoalesceLayer`](crate::RefreshCoalesceLayer).
///
/// Get one with [`RefreshCoalesceLayer::handle`](crate::RefreshCoalesceLayer::handle). It sees
/// the same table as every service the layer makes. Call it on logout and password change,
/// so that a revoked token family is never replayed.
#[derive(Clone)]
pub struct Handle {
    table: Arc<Table>,
}

impl Handle {
    pub(crate) fn new(table: Arc<Table>) -> Self {
        Self { table }
    }

    /// Removes the entry of `key`, whether a replay or a running flight; returns whether
    /// there was one.
    ///
    /// A running flight goes on and answers the callers already waiting on it, but its
    /// result is not replayed: the next request for `key` reaches the inner service.
    pub fn invalidate(&self, key: &Fingerprint) -> bool {
        self.table.invalidate(key)
    }

    /// Removes every entry in `group` (the HTTP front groups entries by token subject);
    /// returns how many.
    pub fn invalidate_group(&self, group: &Fingerprint) -> usize {
        self.table.invalidate_group(group)
    }

    /// A snapshot of the counters and gauges.
    pub fn stats(&self) -> Stats {
        self.table.stats()
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("table", &self.table)
            .finish()
    }
}
