//! [`Core`]: the state every service of one layer shares, and every request reads.
//!
//! The layer builds it once and hands it to each service in an `Arc`; the response future
//! and the flight task read it. Nothing here does I/O.

use std::{fmt, sync::Arc};

use crate::{handle::Handle, key::Fingerprinter, leader::Flights};

/// Everything the services of one layer share.
pub(crate) struct Core<X, P> {
    pub(crate) extract: X,
    /// What the flight tasks read too.
    pub(crate) flights: Arc<Flights<P>>,
    /// The fingerprint keys of the HTTP front, for invalidation by token or subject.
    pub(crate) keys: Option<Fingerprinter>,
}

impl<X, P> Core<X, P> {
    pub(crate) fn handle(&self) -> Handle {
        let flights = &self.flights;
        Handle::new(
            flights.table.clone(),
            flights.counters.clone(),
            self.keys.clone(),
            flights.remote.clone(),
            flights.audit.clone(),
        )
    }
}

impl<X, P> fmt::Debug for Core<X, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("table", &self.flights.table)
            .field("wait_timeout", &self.flights.wait_timeout)
            .field("hard_cap", &self.flights.hard_cap)
            .finish_non_exhaustive()
    }
}
