//! [`Core`]: the state every service of one layer shares, and every request reads.
//!
//! The layer builds it once and hands it to each service in an `Arc`; the response future
//! and the flight task read it. Nothing here does I/O.

use std::{fmt, sync::Arc, time::Duration};

use crate::{flight::Table, handle::Handle, key::Fingerprinter, leader::Remote, metrics::Counters};

/// Everything the services of one layer share.
pub(crate) struct Core<X, P> {
    pub(crate) extract: X,
    pub(crate) share: P,
    pub(crate) table: Arc<Table>,
    /// Every outcome and store event of this layer, counted once.
    pub(crate) counters: Arc<Counters>,
    pub(crate) wait_timeout: Duration,
    pub(crate) hard_cap: Duration,
    /// The fingerprint keys of the HTTP front, for invalidation by token or subject.
    pub(crate) keys: Option<Fingerprinter>,
    /// The store shared with other instances, if any.
    pub(crate) remote: Option<Arc<Remote>>,
}

impl<X, P> Core<X, P> {
    pub(crate) fn handle(&self) -> Handle {
        Handle::new(
            self.table.clone(),
            self.counters.clone(),
            self.keys.clone(),
            self.remote.clone(),
        )
    }
}

impl<X, P> fmt::Debug for Core<X, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("table", &self.table)
            .field("wait_timeout", &self.wait_timeout)
            .field("hard_cap", &self.hard_cap)
            .finish_non_exhaustive()
    }
}
