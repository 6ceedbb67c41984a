//! Counters, gauges and durations.
//!
//! [`Stats`] snapshots are always available from a [`Handle`](crate::Handle). With the
//! `metrics` feature the same events also go to the `metrics` facade, and with the
//! `opentelemetry` feature to an OpenTelemetry meter (`otel.rs`), under the names of
//! [`names`]; the crate documentation lists them (section Observability).

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::outcome::Outcome;

/// The names of the instruments, shared by the `metrics` and `opentelemetry` features.
#[cfg_attr(
    not(any(feature = "metrics", feature = "opentelemetry")),
    allow(dead_code)
)]
pub(crate) mod names {
    /// Requests by `outcome`.
    pub(crate) const REQUESTS: &str = "refresh_coalesce.requests";
    /// Leaders whose subject had a live entry for another token.
    pub(crate) const REUSE_SUSPECTED: &str = "refresh_coalesce.reuse_suspected";
    /// What flights did with the store, by `event`.
    pub(crate) const STORE_EVENTS: &str = "refresh_coalesce.store.events";
    /// How long callers waited for their flight, in seconds.
    pub(crate) const WAIT: &str = "refresh_coalesce.wait.duration";
    /// How long the inner call took (with buffering its response), in seconds.
    pub(crate) const INNER: &str = "refresh_coalesce.inner.duration";
    /// How long each store command took, by `command`, in seconds.
    pub(crate) const STORE: &str = "refresh_coalesce.store.duration";
    /// Inner calls running now.
    pub(crate) const FLIGHTS: &str = "refresh_coalesce.flights.active";
    /// Live flights and replays.
    pub(crate) const ENTRIES: &str = "refresh_coalesce.entries";
    /// 1 while the store's breaker is open.
    pub(crate) const BREAKER: &str = "refresh_coalesce.breaker.open";
}

/// A snapshot of the layer's counters and gauges, from [`Handle::stats`](crate::Handle::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests that started a flight (one inner call each).
    pub leader: u64,
    /// Requests that joined a running flight.
    pub joined: u64,
    /// Requests answered from a replay.
    pub replayed: u64,
    /// Requests refused before any coalescing.
    pub rejected: u64,
    /// Requests that waited `wait_timeout` and gave up.
    pub timed_out: u64,
    /// Requests a limit turned away.
    pub overloaded: u64,
    /// Requests whose flight failed (panic, hard cap, cancellation).
    pub leader_failed: u64,
    /// Requests that bypassed the table.
    pub bypassed: u64,
    /// Leaders whose group (subject) already had a live entry for another key: a second
    /// token of the same subject, which can be an old, already rotated token replayed by
    /// someone else.
    pub reuse_suspected: u64,
    /// Inner calls running now.
    pub in_flight: u64,
    /// Live entries (flights and replays) in the table now.
    pub entries: u64,
    /// Flights that won the store's election (and called the inner service).
    pub store_won: u64,
    /// Flights that lost the election and waited for another instance's result.
    pub store_lost: u64,
    /// Flights answered by a result another instance stored (a replay or a flight outcome).
    pub store_replayed: u64,
    /// Store commands that failed or exceeded their budget.
    pub store_errors: u64,
    /// Times the breaker opened (the store was skipped for a while).
    pub breaker_opened: u64,
    /// `1` while the breaker is open, else `0`.
    pub breaker_open: u64,
    /// Elections won whose lock the store's replicas did not acknowledge within the budget
    /// ([`RedisStoreBuilder::min_replicas`](crate::store::RedisStoreBuilder::min_replicas)):
    /// a failover right then could have elected a second leader.
    pub store_unreplicated: u64,
}

impl Stats {
    /// The store counters by the `event` label they have in the `metrics` and OpenTelemetry
    /// backends: `won`, `lost`, `replayed`, `error`, `breaker_opened`, `unreplicated`.
    pub fn store_events(&self) -> [(&'static str, u64); 6] {
        [
            ("won", self.store_won),
            ("lost", self.store_lost),
            ("replayed", self.store_replayed),
            ("error", self.store_errors),
            ("breaker_opened", self.breaker_opened),
            ("unreplicated", self.store_unreplicated),
        ]
    }

    /// The counter of `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Leader => self.leader,
            Outcome::Joined => self.joined,
            Outcome::Replayed => self.replayed,
            Outcome::Rejected => self.rejected,
            Outcome::TimedOut => self.timed_out,
            Outcome::Overloaded => self.overloaded,
            Outcome::LeaderFailed => self.leader_failed,
            Outcome::Bypassed => self.bypassed,
        }
    }
}

/// The live counters, shared by every service of a layer.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    reuse_suspected: AtomicU64,
    pub(crate) store: StoreCounters,
}

/// What happened between the flights and the store.
#[derive(Debug, Default)]
pub(crate) struct StoreCounters {
    pub(crate) won: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) breaker_opened: AtomicU64,
    pub(crate) unreplicated: AtomicU64,
}

impl StoreCounters {
    pub(crate) fn add(counter: &AtomicU64, name: &'static str) {
        counter.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::STORE_EVENTS, "event" => name).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = name;
    }
}

impl Counters {
    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Release);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::REQUESTS, "outcome" => outcome.as_str()).increment(1);
    }

    pub(crate) fn reuse_suspected(&self) {
        self.reuse_suspected.fetch_add(1, Release);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::REUSE_SUSPECTED).increment(1);
    }

    /// The counters with the table's `gauges` and the breaker's state.
    pub(crate) fn snapshot(&self, gauges: TableGauges, breaker_open: bool) -> Stats {
        let get = |o: Outcome| self.outcomes[o as usize].load(Acquire);
        let TableGauges {
            in_flight,
            entries,
            replayed,
        } = gauges;
        Stats {
            leader: get(Outcome::Leader),
            joined: get(Outcome::Joined),
            replayed: get(Outcome::Replayed) + replayed,
            rejected: get(Outcome::Rejected),
            timed_out: get(Outcome::TimedOut),
            overloaded: get(Outcome::Overloaded),
            leader_failed: get(Outcome::LeaderFailed),
            bypassed: get(Outcome::Bypassed),
            reuse_suspected: self.reuse_suspected.load(Acquire),
            in_flight,
            entries,
            store_won: self.store.won.load(Relaxed),
            store_lost: self.store.lost.load(Relaxed),
            store_replayed: self.store.replayed.load(Relaxed),
            store_errors: self.store.errors.load(Relaxed),
            breaker_opened: self.store.breaker_opened.load(Relaxed),
            breaker_open: u64::from(breaker_open),
            store_unreplicated: self.store.unreplicated.load(Relaxed),
        }
    }
}

/// What the table reports of itself for a [`Stats`] snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TableGauges {
    /// Inner calls running now.
    pub(crate) in_flight: u64,
    /// Live entries now.
    pub(crate) entries: u64,
    /// Replays answered on the table's fast path ([`ReplayCount`]).
    pub(crate) replayed: u64,
}

/// The count of replays the table answers under a shard lock, one per shard: the hot path
/// counts in the cache line that the lock already brought in, rather than in one counter
/// every core contends for. [`Counters::snapshot`] adds them to the outcome `replayed`.
#[derive(Debug, Default)]
pub(crate) struct ReplayCount(AtomicU64);

impl ReplayCount {
    /// Counts one replay, and reports it as the outcome `replayed`.
    pub(crate) fn count(&self) {
        self.0.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::REQUESTS, "outcome" => Outcome::Replayed.as_str()).increment(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Sets the `metrics` gauges from a snapshot (the flight task does, as each flight starts
/// and ends; OpenTelemetry observes them at each collection instead).
#[cfg(feature = "metrics")]
pub(crate) fn set_gauges(gauges: TableGauges, breaker_open: bool) {
    metrics::gauge!(names::FLIGHTS).set(gauges.in_flight as f64);
    metrics::gauge!(names::ENTRIES).set(gauges.entries as f64);
    metrics::gauge!(names::BREAKER).set(u64::from(breaker_open) as f64);
}
