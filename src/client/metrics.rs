//! The client side's counters: [`ClientStats`] from
//! [`Credentials::stats`](super::Credentials::stats), and with the `metrics` feature the
//! same events through the `metrics` facade: `refresh_client_refreshes_total{trigger}`
//! (`ahead`, `rejected`), `refresh_client_requests_total{outcome}` (`joined`, `adopted`,
//! `stale`, `retried`, `not_retried`) and `refresh_client_failures_total{kind}`
//! (`invalid_grant`, `transient`, `rejected`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::error::RefreshErrorKind;

/// Why a refresh was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The access token expires within the configured margin.
    Ahead,
    /// A request sent with the current generation was rejected (`401`, `UNAUTHENTICATED`).
    Rejected,
    /// The cell is empty and backed by a store: load it.
    Load,
}

impl Trigger {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Ahead => "ahead",
            Trigger::Rejected => "rejected",
            Trigger::Load => "load",
        }
    }
}

/// A snapshot of the counters of one [`Credentials`](super::Credentials) cell, shared by
/// every layer that uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Calls of the refresh service made ahead of the access token's expiry.
    pub refreshes_ahead: u64,
    /// Calls of the refresh service made after a rejection (`401`, `UNAUTHENTICATED`).
    pub refreshes_after_rejection: u64,
    /// Requests that waited for a refresh another request started.
    pub joined: u64,
    /// Refreshes answered by newer credentials another process stored, without a call of
    /// the refresh service.
    pub adopted: u64,
    /// Rejected requests sent with an older generation, retried with the current tokens
    /// without a refresh.
    pub stale: u64,
    /// Rejected requests sent again with new tokens (each at most once).
    pub retried: u64,
    /// Rejected requests not sent again: their body was too large or streaming to keep.
    pub not_retried: u64,
    /// Refreshes that ended the credentials: the token server answered `invalid_grant`.
    pub invalid_grant: u64,
    /// Refreshes that failed otherwise (transient or rejected), each starting a back-off.
    pub failed: u64,
}

impl ClientStats {
    /// Calls of the refresh service, for any reason.
    pub fn refreshes(&self) -> u64 {
        self.refreshes_ahead + self.refreshes_after_rejection
    }
}

/// The live counters of one credentials cell.
#[derive(Debug, Default)]
pub(crate) struct ClientCounters {
    ahead: AtomicU64,
    after_rejection: AtomicU64,
    joined: AtomicU64,
    adopted: AtomicU64,
    stale: AtomicU64,
    retried: AtomicU64,
    not_retried: AtomicU64,
    invalid_grant: AtomicU64,
    failed: AtomicU64,
}

impl ClientCounters {
    /// A call of the refresh service, started by `trigger`.
    pub(crate) fn refresh(&self, trigger: Trigger) {
        match trigger {
            Trigger::Ahead => self.ahead.fetch_add(1, Relaxed),
            // A refresh made while loading an empty store-backed cell counts as one after a
            // rejection: the request could not be sent at all.
            Trigger::Rejected | Trigger::Load => self.after_rejection.fetch_add(1, Relaxed),
        };
        #[cfg(feature = "metrics")]
        metrics::counter!("refresh_client_refreshes_total", "trigger" => trigger.as_str())
            .increment(1);
    }

    pub(crate) fn joined(&self) {
        Self::add(&self.joined, "joined");
    }

    pub(crate) fn adopted(&self) {
        Self::add(&self.adopted, "adopted");
    }

    pub(crate) fn stale(&self) {
        Self::add(&self.stale, "stale");
    }

    pub(crate) fn retried(&self) {
        Self::add(&self.retried, "retried");
    }

    pub(crate) fn not_retried(&self) {
        Self::add(&self.not_retried, "not_retried");
    }

    pub(crate) fn failure(&self, kind: RefreshErrorKind) {
        let (counter, name) = match kind {
            RefreshErrorKind::InvalidGrant => (&self.invalid_grant, "invalid_grant"),
            RefreshErrorKind::Rejected => (&self.failed, "rejected"),
            RefreshErrorKind::Transient => (&self.failed, "transient"),
        };
        counter.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("refresh_client_failures_total", "kind" => name).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = name;
    }

    fn add(counter: &AtomicU64, outcome: &'static str) {
        counter.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("refresh_client_requests_total", "outcome" => outcome).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }

    pub(crate) fn snapshot(&self) -> ClientStats {
        ClientStats {
            refreshes_ahead: self.ahead.load(Relaxed),
            refreshes_after_rejection: self.after_rejection.load(Relaxed),
            joined: self.joined.load(Relaxed),
            adopted: self.adopted.load(Relaxed),
            stale: self.stale.load(Relaxed),
            retried: self.retried.load(Relaxed),
            not_retried: self.not_retried.load(Relaxed),
            invalid_grant: self.invalid_grant.load(Relaxed),
            failed: self.failed.load(Relaxed),
        }
    }
}
