//! A handle on a layer's table, for invalidation and statistics.

use std::{fmt, sync::Arc};

use crate::{
    audit::{Audit, AuditEvent, InvalidationScope},
    flight::Table,
    key::{Fingerprint, Fingerprinter},
    leader::Remote,
    metrics::{Counters, Stats},
    store::Invalidation,
};

/// A cheap-to-clone handle on the table of a [`RefreshCoalesceLayer`](crate::RefreshCoalesceLayer).
///
/// Get one with [`RefreshCoalesceLayer::handle`](crate::RefreshCoalesceLayer::handle). It sees
/// the same table as every service the layer makes. Call it on logout and password change,
/// so that a revoked token family is never replayed.
#[derive(Clone)]
pub struct Handle {
    table: Arc<Table>,
    counters: Arc<Counters>,
    keys: Option<Fingerprinter>,
    remote: Option<Arc<Remote>>,
    audit: Audit,
}

impl Handle {
    pub(crate) fn new(
        table: Arc<Table>,
        counters: Arc<Counters>,
        keys: Option<Fingerprinter>,
        remote: Option<Arc<Remote>>,
        audit: Audit,
    ) -> Self {
        Self {
            table,
            counters,
            keys,
            remote,
            audit,
        }
    }

    /// Sends an invalidation to the store, so that every instance applies it and no flight
    /// running now anywhere stores or replays its result. Spawned: the local table is clean
    /// when the caller continues (and this instance's running flight of the key refuses its
    /// callers); the store command is sent again while the store cannot be reached (for up
    /// to `wait_timeout`), and a failure is logged.
    fn propagate(&self, invalidation: Invalidation) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no Tokio runtime: the invalidation stays local to this instance");
            return;
        };
        let life = remote.generation_life(self.table.ttl());
        runtime.spawn(async move { remote.invalidate(&invalidation, life).await });
    }

    /// Removes the entry of `key`, whether a replay or a running flight; returns whether
    /// there was one.
    ///
    /// A running flight goes on, but its result is revoked: its callers get
    /// [`LeaderFailed`](crate::error::LeaderFailed) with
    /// [`Failure::Revoked`](crate::error::Failure::Revoked) (the HTTP front answers
    /// `invalid_grant`), it is never replayed, and the next request for `key` reaches the
    /// inner service. With a store, the same holds on every instance.
    pub fn invalidate(&self, key: &Fingerprint) -> bool {
        self.propagate(Invalidation::Key(*key));
        let found = self.table.invalidate(key);
        self.audited(InvalidationScope::Key, None, usize::from(found));
        found
    }

    /// Removes every entry in `group` (the HTTP front groups entries by token subject);
    /// returns how many.
    pub fn invalidate_group(&self, group: &Fingerprint) -> usize {
        let entries = self.remove_group(group);
        self.audited(InvalidationScope::Group, None, entries);
        entries
    }

    fn remove_group(&self, group: &Fingerprint) -> usize {
        self.propagate(Invalidation::Group(*group));
        self.table.invalidate_group(group)
    }

    fn audited(&self, scope: InvalidationScope, subject: Option<&str>, entries: usize) {
        self.audit.emit(AuditEvent::Invalidated {
            scope,
            subject,
            entries,
        });
    }

    /// Removes every entry of refresh token `token`, whichever client, credential or sender
    /// presented it; returns how many.
    ///
    /// Only layers built with [`RefreshCoalesceLayer::http`](crate::RefreshCoalesceLayer::http)
    /// tag entries by token; on other layers this finds nothing and returns `0`.
    pub fn invalidate_token(&self, token: &str) -> usize {
        let Some(keys) = &self.keys else { return 0 };
        let entries = self.remove_group(&keys.token_tag(token));
        self.audited(InvalidationScope::Token, None, entries);
        entries
    }

    /// Removes every entry of tokens whose subject is `subject`, for every client; returns
    /// how many. Call it on logout and password change.
    ///
    /// Only layers built with [`RefreshCoalesceLayer::http`](crate::RefreshCoalesceLayer::http)
    /// group entries by subject; on other layers this returns `0`.
    pub fn invalidate_subject(&self, subject: &str) -> usize {
        let Some(keys) = &self.keys else { return 0 };
        let entries = self.remove_group(&keys.subject_group(subject));
        self.audited(InvalidationScope::Subject, Some(subject), entries);
        entries
    }

    /// Reads a snapshot for as long as the layer lives, without keeping it alive.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn stats_source(&self) -> crate::otel::Source {
        use std::sync::Weak;
        let table = Arc::downgrade(&self.table);
        let counters = Arc::downgrade(&self.counters);
        let remote = self.remote.as_ref().map(Arc::downgrade);
        Arc::new(move || {
            let table = table.upgrade()?;
            let counters = counters.upgrade()?;
            let breaker_open = remote
                .as_ref()
                .and_then(Weak::upgrade)
                .is_some_and(|remote| remote.breaker_open());
            Some(counters.snapshot(table.gauges(), breaker_open))
        })
    }

    /// A snapshot of the counters and gauges.
    pub fn stats(&self) -> Stats {
        let breaker_open = self.remote.as_ref().is_some_and(|r| r.breaker_open());
        self.counters.snapshot(self.table.gauges(), breaker_open)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("table", &self.table)
            .finish()
    }
}
