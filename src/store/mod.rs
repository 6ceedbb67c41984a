//! Coordination of flights and replays across instances.
//!
//! Within one process the table already makes one inner call per key. With several
//! instances behind a load balancer, a [`Store`] carries the same protocol between them:
//!
//! 1. The flight's task looks for a stored result ([`Store::load`]): a replay another
//!    instance made is answered without an inner call.
//! 2. Otherwise it runs an election ([`Store::elect`]) with a random fence. The winner calls
//!    the inner service, stores the result ([`Store::complete`], which also wakes the other
//!    instances) and releases the lock ([`Store::release`]).
//! 3. A loser waits for the winner's result ([`Store::wait`]) and never calls the inner
//!    service itself, even when the store fails meanwhile: a second refresh of one token
//!    would look like token reuse to the identity server.
//!
//! The store is an efficiency lock; the inner service's atomic rotation is the real guard.
//! Every command has a budget, and after repeated failures a breaker skips the store for a
//! while: flights then coalesce per instance (at most one inner call per instance per key).
//!
//! Only the flight task talks to the store, never the per-request path, so a store costs
//! nothing on replays that the local table answers.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{error::BoxError, key::Fingerprint, metrics::StoreCounters};

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod seal;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};

/// The future of every [`Store`] method.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store command failed or exceeded its budget. The source chain is kept.
///
/// ```
/// # use tower_refresh_coalesce::store::StoreError;
/// let err = StoreError::new(std::io::Error::other("connection refused"));
/// assert_eq!(err.to_string(), "coordination store failed");
/// assert!(std::error::Error::source(&err).is_some());
/// ```
#[derive(Debug)]
pub struct StoreError {
    source: BoxError,
}

impl StoreError {
    /// Wraps a backend error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// A command that did not answer within its budget.
    pub fn timeout(budget: Duration) -> Self {
        Self::new(format!("no answer within {budget:?}"))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("coordination store failed")
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The fence of one election: random, unique per flight.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fence(String);

impl Fence {
    /// A fresh random fence.
    pub fn random() -> Self {
        Self(hex(&crate::key::random_bytes::<16>()))
    }

    /// A fence read back from the store.
    pub fn from_string(fence: String) -> Self {
        Self(fence)
    }

    /// The fence as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fence({})", self.0)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// A result found in the store: its (sealed) bytes and how much longer it lives there.
#[derive(Clone, PartialEq, Eq)]
pub struct Stored {
    /// The value as [`Store::complete`] received it.
    pub value: Vec<u8>,
    /// The rest of its life in the store.
    pub ttl: Duration,
    /// Whether it is a replay (answer any request with this key) or the outcome of one
    /// flight only (answer that flight's waiters).
    pub replay: bool,
}

impl fmt::Debug for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stored")
            .field("len", &self.value.len())
            .field("ttl", &self.ttl)
            .field("replay", &self.replay)
            .finish()
    }
}

/// The outcome of [`Store::elect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// This flight leads: it calls the inner service.
    Won,
    /// Another flight, fenced `leader`, holds the lock: wait for its result.
    Lost {
        /// The leader's fence.
        leader: Fence,
    },
}

/// How long [`Store::complete`] keeps a result, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// A replay for every request with the key, for `ttl`; `group` lets
    /// [`Store::invalidate_group`] reach it.
    Replay {
        /// How long it is replayed.
        ttl: Duration,
        /// The group (subject) of the key, if any.
        group: Option<Fingerprint>,
    },
    /// The outcome of this flight only (an error, a non-2xx answer), for its waiters, for
    /// `ttl`.
    Flight {
        /// How long the waiters have to pick it up.
        ttl: Duration,
    },
}

/// A remote invalidation, delivered to every instance's [`Listener`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// One key.
    Key(Fingerprint),
    /// Every key of a group.
    Group(Fingerprint),
}

/// Receives invalidations made by other instances.
pub type Listener = Arc<dyn Fn(&Invalidation) + Send + Sync>;

/// A coordination backend shared by the instances of a deployment.
///
/// Values are opaque bytes, already sealed where the backend is not trusted: `seal` is a
/// per-token secret the backend mixes into its encryption key ([`RedisStore`] does; the
/// in-process [`MemoryStore`] ignores it). Key names must be derived from the fingerprint
/// only. One conformance suite (`tests/store_conformance.rs`) runs against every backend.
pub trait Store: Send + Sync + 'static {
    /// The replay stored for `key`, if any.
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
    ) -> StoreFuture<'a, Option<Stored>>;

    /// Takes the lock of `key` for `lease` with `fence`, unless another flight holds it.
    /// Must be idempotent for one fence: electing again with the fence that holds the lock
    /// reports [`Election::Won`] (a retry after a lost answer).
    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election>;

    /// Stores the leader's result and wakes the waiters, in one step. A replay is stored only
    /// if none exists; if one does (a late leader), it is returned instead and every caller
    /// uses it, so all callers see the same tokens. A flight's outcome ([`Keep::Flight`])
    /// also releases the lock if `fence` holds it, in the same step: no request may follow a
    /// flight after its outcome is stored, as that outcome is not a replay.
    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
    ) -> StoreFuture<'a, Option<Stored>>;

    /// Releases the lock of `key` if `fence` still holds it.
    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()>;

    /// Waits until `deadline` for the result of the flight fenced `leader` (or any replay of
    /// `key`). Register for the wake-up *before* reading, so none is lost; poll as well, as
    /// wake-ups can be lost when a connection drops. Failures of single reads are retried
    /// until the deadline; `None` at the deadline.
    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        deadline: Instant,
    ) -> StoreFuture<'a, Option<Stored>>;

    /// Removes the replay of `key` everywhere, and tells every instance.
    fn invalidate<'a>(&'a self, key: &'a Fingerprint) -> StoreFuture<'a, ()>;

    /// Removes every replay of `group` everywhere, and tells every instance.
    fn invalidate_group<'a>(&'a self, group: &'a Fingerprint) -> StoreFuture<'a, ()>;

    /// Registers the listener that applies other instances' invalidations to this instance's
    /// table. Called once, when the layer is built.
    fn listen(&self, listener: Listener);
}

// ---------------------------------------------------------------------------------------
// In-process store
// ---------------------------------------------------------------------------------------

/// A [`Store`] in process memory: several layers in one process that share it behave like
/// instances sharing Redis. It is the protocol's reference, and what the conformance suite
/// checks Redis against.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    state: Mutex<MemoryState>,
    changed: Notify,
    listeners: Mutex<Vec<Listener>>,
}

/// A stored value, the seal it was stored under, and when it expires.
type Entry = (Stored, [u8; 32], Instant);

#[derive(Default)]
struct MemoryState {
    locks: HashMap<Fingerprint, (Fence, Instant)>,
    results: HashMap<Fingerprint, Entry>,
    outcomes: HashMap<(Fingerprint, Fence), Entry>,
    groups: HashMap<Fingerprint, Vec<Fingerprint>>,
}

/// A live entry's value, if `seal` opens it (as a sealed value in Redis would only open with
/// the same token's seal).
fn live(entry: Option<&Entry>, seal: &[u8; 32], now: Instant) -> Option<Stored> {
    match entry {
        Some((stored, sealed, expires)) if *expires > now && sealed == seal => Some(Stored {
            ttl: *expires - now,
            ..stored.clone()
        }),
        _ => None,
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn announce(&self, invalidation: Invalidation) {
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for listener in listeners {
            listener(&invalidation);
        }
    }
}

impl MemoryState {
    /// Removes what has expired.
    fn expire(&mut self, now: Instant) {
        self.locks.retain(|_, (_, expires)| *expires > now);
        self.results.retain(|_, (_, _, expires)| *expires > now);
        self.outcomes.retain(|_, (_, _, expires)| *expires > now);
        let results = &self.results;
        self.groups.retain(|_, members| {
            members.retain(|key| results.contains_key(key));
            !members.is_empty()
        });
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryStore")
            .field("locks", &state.locks.len())
            .field("results", &state.results.len())
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.state();
            state.expire(now);
            Ok(live(state.results.get(key), seal, now))
        })
    }

    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.state();
            state.expire(now);
            match state.locks.get(key) {
                Some((leader, _)) if leader == fence => Ok(Election::Won),
                Some((leader, _)) => Ok(Election::Lost {
                    leader: leader.clone(),
                }),
                None => {
                    state.locks.insert(*key, (fence.clone(), now + lease));
                    Ok(Election::Won)
                }
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let now = Instant::now();
            let winner = {
                let mut state = self.state();
                state.expire(now);
                match keep {
                    Keep::Replay { ttl, group } => match state.results.get(key) {
                        Some(existing) => live(Some(existing), seal, now),
                        None => {
                            let stored = Stored {
                                value,
                                ttl,
                                replay: true,
                            };
                            state.results.insert(*key, (stored, *seal, now + ttl));
                            if let Some(group) = group {
                                state.groups.entry(group).or_default().push(*key);
                            }
                            None
                        }
                    },
                    Keep::Flight { ttl } => {
                        let stored = Stored {
                            value,
                            ttl,
                            replay: false,
                        };
                        state
                            .outcomes
                            .insert((*key, fence.clone()), (stored, *seal, now + ttl));
                        if state
                            .locks
                            .get(key)
                            .is_some_and(|(holder, _)| holder == fence)
                        {
                            state.locks.remove(key);
                        }
                        None
                    }
                }
            };
            self.inner.changed.notify_waiters();
            Ok(winner)
        })
    }

    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut state = self.state();
            if state
                .locks
                .get(key)
                .is_some_and(|(holder, _)| holder == fence)
            {
                state.locks.remove(key);
            }
            Ok(())
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        deadline: Instant,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            loop {
                // Register for the wake-up before reading, so a completion between the read
                // and the wait is not lost.
                let changed = self.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let now = Instant::now();
                    let state = self.state();
                    let outcome = (*key, leader.clone());
                    let found = live(state.results.get(key), seal, now)
                        .or_else(|| live(state.outcomes.get(&outcome), seal, now));
                    if found.is_some() {
                        return Ok(found);
                    }
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return Ok(None);
                }
            }
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Fingerprint) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.state().results.remove(key);
            self.announce(Invalidation::Key(*key));
            Ok(())
        })
    }

    fn invalidate_group<'a>(&'a self, group: &'a Fingerprint) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut state = self.state();
                for key in state.groups.remove(group).unwrap_or_default() {
                    state.results.remove(&key);
                }
            }
            self.announce(Invalidation::Group(*group));
            Ok(())
        })
    }

    fn listen(&self, listener: Listener) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }
}

// ---------------------------------------------------------------------------------------
// Breaker
// ---------------------------------------------------------------------------------------

/// Skips the store for `cool_down` after `threshold` consecutive failures, then lets the
/// next flight try again.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cool_down: Duration,
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

// ---------------------------------------------------------------------------------------
// The flight task's side of the protocol
// ---------------------------------------------------------------------------------------

/// What a flight does after asking the store.
pub(crate) enum Plan {
    /// Call the inner service and keep the result in this process (no store, or the
    /// breaker is open).
    Local,
    /// Call the inner service and store the result under this fence.
    Lead(Fence),
    /// Wait for the result of the flight fenced so; never call the inner service.
    Follow(Fence),
}

/// A layer's store, with its breaker and settings.
pub(crate) struct Remote {
    store: Arc<dyn Store>,
    breaker: Breaker,
    /// How long the election lock lives: longer than the hard cap.
    lease: Duration,
}

impl Remote {
    pub(crate) fn new(store: Arc<dyn Store>, breaker: Breaker, lease: Duration) -> Self {
        Self {
            store,
            breaker,
            lease,
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Records the outcome of one store command on the breaker and the counters.
    fn record<T>(&self, result: Result<T, StoreError>, counters: &StoreCounters) -> Option<T> {
        match result {
            Ok(value) => {
                if self.breaker.succeeded() {
                    tracing::info!("coordination store reachable again: breaker closed");
                }
                Some(value)
            }
            Err(error) => {
                StoreCounters::add(&counters.errors, "error");
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "coordination store command failed");
                if self.breaker.failed() {
                    StoreCounters::add(&counters.breaker_opened, "breaker_opened");
                    tracing::warn!(
                        cool_down = ?self.breaker.cool_down,
                        "coordination store failing: breaker open, flights coalesce per instance"
                    );
                }
                None
            }
        }
    }

    /// Step 1: a result another instance stored, if the breaker lets us ask.
    pub(crate) async fn load(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        counters: &StoreCounters,
    ) -> Option<Stored> {
        if !self.breaker.allows() {
            return None;
        }
        self.record(self.store.load(key, seal).await, counters)
            .flatten()
    }

    /// Step 2: the election.
    pub(crate) async fn elect(&self, key: &Fingerprint, counters: &StoreCounters) -> Plan {
        if !self.breaker.allows() {
            return Plan::Local;
        }
        let fence = Fence::random();
        // One retry: an election is idempotent for its fence, so a first attempt that timed
        // out after Redis took the lock for us reports a win the second time.
        let election = match self.store.elect(key, &fence, self.lease).await {
            Err(error) => {
                self.record::<()>(Err(error), counters);
                self.store.elect(key, &fence, self.lease).await
            }
            done => done,
        };
        match election {
            Ok(Election::Won) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.won, "won");
                Plan::Lead(fence)
            }
            Ok(Election::Lost { leader }) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.lost, "lost");
                Plan::Follow(leader)
            }
            Err(error) => {
                // The lock may or may not be ours (a command can time out after Redis ran
                // it). Lead locally, at most one call per instance, and still try to store
                // the result under this fence for anyone who followed it.
                self.record::<()>(Err(error), counters);
                Plan::Lead(fence)
            }
        }
    }

    /// Step 3 of a follower: the leader's result, or `None` at the deadline. Store failures
    /// on the way are retried, never answered by calling the inner service.
    pub(crate) async fn follow(
        &self,
        key: &Fingerprint,
        leader: &Fence,
        seal: &[u8; 32],
        deadline: Instant,
        counters: &StoreCounters,
    ) -> Option<Stored> {
        match self.store.wait(key, leader, seal, deadline).await {
            Ok(Some(stored)) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.replayed, "replayed");
                Some(stored)
            }
            // Nothing arrived: that says nothing about the store's health (the reads may all
            // have failed), so the breaker is left as it is.
            Ok(None) => None,
            Err(error) => {
                self.record::<()>(Err(error), counters);
                None
            }
        }
    }

    /// Step 3 of a leader: stores its result (returning another leader's if one was stored
    /// first), then releases the lock in the background: the leader's own callers need the
    /// stored result, not the release, and followers were woken by the completion. A
    /// stored flight outcome has released the lock already.
    pub(crate) async fn finish(
        &self,
        key: &Fingerprint,
        fence: &Fence,
        seal: &[u8; 32],
        value: Option<(Vec<u8>, Keep)>,
        counters: &StoreCounters,
    ) -> Option<Stored> {
        let mut winner = None;
        if let Some((value, keep)) = value {
            // Storing a flight's outcome released the lock in the same step.
            let releases = matches!(keep, Keep::Flight { .. });
            let completed = self.store.complete(key, fence, seal, value, keep).await;
            let released = releases && completed.is_ok();
            winner = self.record(completed, counters).flatten();
            if released {
                return winner;
            }
        }
        let (store, key, fence) = (self.store.clone(), *key, fence.clone());
        tokio::spawn(async move {
            if let Err(error) = store.release(&key, &fence).await {
                // The lease ends it anyway; a retry then elects a new leader.
                tracing::debug!(%error, "the election lock was not released");
            }
        });
        winner
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("breaker", &self.breaker)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}
