//! Counters and gauges.
//!
//! [`Stats`] snapshots are always available from a [`Handle`](crate::Handle). With the
//! `metrics` feature the same events also go to the `metrics` facade:
//! `refresh_coalesce_requests_total{outcome}`, `refresh_coalesce_reuse_suspected_total`,
//! `refresh_coalesce_store_total{event}` and the histogram
//! `refresh_coalesce_wait_seconds` (how long callers waited for their flight).

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

/// The `metrics` name of the requests counter, by outcome.
#[cfg(feature = "metrics")]
const REQUESTS: &str = "refresh_coalesce_requests_total";

/// How a request ended, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// It started a flight.
    Leader,
    /// It joined a running flight.
    Joined,
    /// It was answered from a replay.
    Replayed,
    /// It was refused before any coalescing (no token, invalid token, body too large).
    Rejected,
    /// It waited `wait_timeout` and gave up.
    TimedOut,
    /// A limit turned it away.
    Overloaded,
    /// Its flight's inner call panicked, was aborted or cancelled.
    LeaderFailed,
    /// It was not coalesced and went straight to the inner service.
    Bypassed,
}

impl Outcome {
    /// Every outcome, in a fixed order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Leader,
        Outcome::Joined,
        Outcome::Replayed,
        Outcome::Rejected,
        Outcome::TimedOut,
        Outcome::Overloaded,
        Outcome::LeaderFailed,
        Outcome::Bypassed,
    ];

    /// The outcome's name in snake case, as used for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Leader => "leader",
            Outcome::Joined => "joined",
            Outcome::Replayed => "replayed",
            Outcome::Rejected => "rejected",
            Outcome::TimedOut => "timed_out",
            Outcome::Overloaded => "overloaded",
            Outcome::LeaderFailed => "leader_failed",
            Outcome::Bypassed => "bypassed",
        }
    }
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
        metrics::counter!("refresh_coalesce_store_total", "event" => name).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = name;
    }
}

impl Counters {
    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Release);
        #[cfg(feature = "metrics")]
        metrics::counter!(REQUESTS, "outcome" => outcome.as_str()).increment(1);
    }

    pub(crate) fn reuse_suspected(&self) {
        self.reuse_suspected.fetch_add(1, Release);
        #[cfg(feature = "metrics")]
        metrics::counter!("refresh_coalesce_reuse_suspected_total").increment(1);
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
        metrics::counter!(REQUESTS, "outcome" => Outcome::Replayed.as_str()).increment(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Records how long a caller waited for its flight, from the deadline its wait had.
#[cfg(feature = "metrics")]
pub(crate) fn record_wait(deadline: tokio::time::Instant, wait_timeout: std::time::Duration) {
    let started = deadline - wait_timeout;
    metrics::histogram!("refresh_coalesce_wait_seconds").record(started.elapsed().as_secs_f64());
}
