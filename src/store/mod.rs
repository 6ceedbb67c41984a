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
//! Invalidations are generations. Every key and every group has one (0 until first
//! invalidated); [`Store::invalidate`] and [`Store::invalidate_group`] bump it and delete
//! the replays. A flight starts under the generations it read ([`Store::group_generation`]
//! first, then the key's with the election); [`Store::complete`] stores nothing if either
//! moved meanwhile and reports [`Completed::Revoked`], and every stored value binds the
//! generations it was stored under, so that [`Store::load`] and [`Store::wait`] refuse it
//! once they moved. Nothing revoked is served after the revocation, on any instance.
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
    Won {
        /// The key's generation when the lock was taken: the result is stored only if it is
        /// unchanged when the flight completes.
        generation: u64,
    },
    /// Another flight, fenced `leader`, holds the lock: wait for its result.
    Lost {
        /// The leader's fence.
        leader: Fence,
        /// The key's generation at this election: once it moves, the flight followed was
        /// revoked.
        generation: u64,
    },
}

/// How long [`Store::complete`] keeps a result, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// A replay for every request with the key, for `ttl`.
    Replay {
        /// How long it is replayed.
        ttl: Duration,
    },
    /// The outcome of this flight only (an error, a non-2xx answer), for its waiters, for
    /// `ttl`.
    Flight {
        /// How long the waiters have to pick it up.
        ttl: Duration,
    },
}

/// The generations a flight started under: its key's, as its election read it, and its
/// group's (with the group, so that [`Store::invalidate_group`] reaches its replay), as
/// [`Store::group_generation`] read it before the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// The key's generation.
    pub key: u64,
    /// The group (subject) of the key and its generation, if the key has a group.
    pub group: Option<(Fingerprint, u64)>,
}

impl Generations {
    /// The generations of a flight with `key` generation `key` and no group.
    pub fn key(key: u64) -> Self {
        Self { key, group: None }
    }

    /// These generations, in `group` at generation `generation`.
    #[must_use]
    pub fn in_group(self, group: Fingerprint, generation: u64) -> Self {
        Self {
            group: Some((group, generation)),
            ..self
        }
    }

    fn group_key(&self) -> Option<&Fingerprint> {
        self.group.as_ref().map(|(group, _)| group)
    }
}

/// The outcome of [`Store::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completed {
    /// The result is stored, and the waiters are woken.
    Stored,
    /// A replay was stored first (a late leader): every caller uses it instead.
    Existing(Stored),
    /// The key or its group was invalidated since the flight started: nothing is stored
    /// (or what was stored is deleted again), the lock is released and the waiters are woken
    /// to learn that the flight was revoked.
    Revoked,
}

/// The outcome of [`Store::wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Waited {
    /// The leader's result (or a replay of the key).
    Arrived(Stored),
    /// The key's generation moved past the one the follower elected under, or the leader's
    /// result was revoked: the flight followed was invalidated while it ran.
    Revoked,
    /// Nothing arrived before the deadline.
    Elapsed,
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
    /// The replay stored for `key`, if any, and only if it is still live, opens with `seal`
    /// and was stored under the key's current generation and, when `group` is given, the
    /// group's current one.
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
        group: Option<&'a Fingerprint>,
    ) -> StoreFuture<'a, Option<Stored>>;

    /// The current generation of `group` (0 if it was never invalidated, or not within its
    /// life). A generation that exists is kept at least `life` from now, so that it cannot
    /// expire under a flight that read it.
    fn group_generation<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, u64>;

    /// Takes the lock of `key` for `lease` with `fence`, unless another flight holds it, and
    /// reads the key's generation in the same step (keeping an existing one at least `lease`
    /// from now). Must be idempotent for one fence: electing again with the fence that holds
    /// the lock reports [`Election::Won`] (a retry after a lost answer).
    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election>;

    /// Stores the leader's result and wakes the waiters, in one step, if the key's generation
    /// is still `started.key`; a stored replay is also added to its group, and withdrawn
    /// again ([`Completed::Revoked`]) if the group's generation moved meanwhile. A replay is
    /// stored only if none exists; if one does (a late leader), it is returned instead and
    /// every caller uses it, so all callers see the same tokens. A flight's outcome
    /// ([`Keep::Flight`]) and a revoked result also release the lock if `fence` holds it, in
    /// the same step: no request may follow a flight after it ended without a replay.
    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
        started: &'a Generations,
    ) -> StoreFuture<'a, Completed>;

    /// Releases the lock of `key` if `fence` still holds it.
    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()>;

    /// Waits until `deadline` for the result of the flight fenced `leader` (or any replay of
    /// `key`), elected under `started`. Register for the wake-up *before* reading, so none is
    /// lost; poll as well, as wake-ups can be lost when a connection drops. Failures of
    /// single reads are retried until the deadline. A result stored under generations that
    /// are no longer current, a revoked result, or a key generation past `started.key` end
    /// the wait with [`Waited::Revoked`].
    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        started: &'a Generations,
        deadline: Instant,
    ) -> StoreFuture<'a, Waited>;

    /// Bumps the generation of `key` (kept at least `life`: longer than any flight plus its
    /// replay) and removes its replay, in one step, then tells every instance: no flight
    /// running now stores its result.
    fn invalidate<'a>(&'a self, key: &'a Fingerprint, life: Duration) -> StoreFuture<'a, ()>;

    /// Bumps the generation of `group` (kept at least `life`), then removes every replay of
    /// the group, and tells every instance.
    fn invalidate_group<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()>;

    /// Adds `key` to the members of `group` for at least `life`, before the key's flight is
    /// elected. An invalidation of the group while that flight runs then reaches the
    /// flight's own key, since [`invalidate_group`](Store::invalidate_group) invalidates
    /// each member as [`invalidate`](Store::invalidate) does. The HTTP front remembers
    /// every key under its token's tag, so that
    /// [`Handle::invalidate_token`](crate::Handle::invalidate_token) stops the flights of
    /// every client that presented the token.
    fn remember<'a>(
        &'a self,
        group: &'a Fingerprint,
        key: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()>;

    /// Registers the listener that applies other instances' invalidations to this instance's
    /// table. Called once, when the layer is built.
    fn listen(&self, listener: Listener);
}

// ---------------------------------------------------------------------------------------
// In-process store
// ---------------------------------------------------------------------------------------

/// A [`Store`] in process memory: several layers in one process that share it behave like
/// instances sharing Redis. It is the protocol's reference, and what the conformance suite
/// checks Redis against: every method runs under one lock, so each is one atomic step.
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

/// A stored value, the seal and generations it was stored under, and when it expires.
struct Entry {
    stored: Stored,
    seal: [u8; 32],
    key_generation: u64,
    group_generation: u64,
    expires: Instant,
}

/// What a flight left for its followers: its outcome, or word that it was revoked.
enum Outcome {
    Value(Entry),
    Revoked { expires: Instant },
}

impl Outcome {
    fn expires(&self) -> Instant {
        match self {
            Outcome::Value(entry) => entry.expires,
            Outcome::Revoked { expires } => *expires,
        }
    }
}

/// A generation and when it expires.
type Generation = (u64, Instant);

#[derive(Default)]
struct MemoryState {
    locks: HashMap<Fingerprint, (Fence, Instant)>,
    results: HashMap<Fingerprint, Entry>,
    outcomes: HashMap<(Fingerprint, Fence), Outcome>,
    groups: HashMap<Fingerprint, Vec<Fingerprint>>,
    /// Keys remembered in a group before their election, and until when.
    remembered: HashMap<Fingerprint, Vec<(Fingerprint, Instant)>>,
    key_generations: HashMap<Fingerprint, Generation>,
    group_generations: HashMap<Fingerprint, Generation>,
}

/// What a read finds, as Redis's scripts return it.
enum Read {
    Live(Stored),
    Revoked,
    Nothing,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.expire(Instant::now());
        state
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

/// The generation in `generations` of `of`, 0 if none; an existing one is kept at least
/// `life` from `now`.
fn generation(
    generations: &mut HashMap<Fingerprint, Generation>,
    of: &Fingerprint,
    life: Duration,
    now: Instant,
) -> u64 {
    match generations.get_mut(of) {
        Some((generation, expires)) => {
            *expires = (*expires).max(now + life);
            *generation
        }
        None => 0,
    }
}

/// Bumps the generation of `of`, kept at least `life` from `now`.
fn bump(
    generations: &mut HashMap<Fingerprint, Generation>,
    of: &Fingerprint,
    life: Duration,
    now: Instant,
) {
    let (generation, expires) = generations.entry(*of).or_insert((0, now));
    *generation += 1;
    *expires = (*expires).max(now + life);
}

impl MemoryState {
    /// Removes what has expired.
    fn expire(&mut self, now: Instant) {
        self.locks.retain(|_, (_, expires)| *expires > now);
        self.results.retain(|_, entry| entry.expires > now);
        self.outcomes.retain(|_, outcome| outcome.expires() > now);
        self.key_generations
            .retain(|_, (_, expires)| *expires > now);
        self.group_generations
            .retain(|_, (_, expires)| *expires > now);
        let results = &self.results;
        self.groups.retain(|_, members| {
            members.retain(|key| results.contains_key(key));
            !members.is_empty()
        });
        self.remembered.retain(|_, members| {
            members.retain(|(_, expires)| *expires > now);
            !members.is_empty()
        });
    }

    fn key_generation(&self, key: &Fingerprint) -> u64 {
        self.key_generations.get(key).map_or(0, |(g, _)| *g)
    }

    fn group_generation(&self, group: &Fingerprint) -> u64 {
        self.group_generations.get(group).map_or(0, |(g, _)| *g)
    }

    /// An entry's value, if `seal` opens it (as a sealed value in Redis only opens with the
    /// same token's seal) and it was stored under the current generations of its key and,
    /// if given, of `group`.
    fn open(
        &self,
        key: &Fingerprint,
        entry: &Entry,
        seal: &[u8; 32],
        group: Option<&Fingerprint>,
        now: Instant,
    ) -> Read {
        if entry.expires <= now || entry.seal != *seal {
            return Read::Nothing;
        }
        let current = entry.key_generation == self.key_generation(key)
            && group.is_none_or(|group| entry.group_generation == self.group_generation(group));
        if !current {
            return Read::Revoked;
        }
        Read::Live(Stored {
            ttl: entry.expires - now,
            ..entry.stored.clone()
        })
    }

    fn release(&mut self, key: &Fingerprint, fence: &Fence) {
        if self
            .locks
            .get(key)
            .is_some_and(|(holder, _)| holder == fence)
        {
            self.locks.remove(key);
        }
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
        group: Option<&'a Fingerprint>,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let now = Instant::now();
            let state = self.state();
            Ok(match state.results.get(key) {
                Some(entry) => match state.open(key, entry, seal, group, now) {
                    Read::Live(stored) => Some(stored),
                    Read::Revoked | Read::Nothing => None,
                },
                None => None,
            })
        })
    }

    fn group_generation<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.state();
            Ok(generation(&mut state.group_generations, group, life, now))
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
            let generation = generation(&mut state.key_generations, key, lease, now);
            match state.locks.get(key) {
                Some((leader, _)) if leader == fence => Ok(Election::Won { generation }),
                Some((leader, _)) => Ok(Election::Lost {
                    leader: leader.clone(),
                    generation,
                }),
                None => {
                    state.locks.insert(*key, (fence.clone(), now + lease));
                    Ok(Election::Won { generation })
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
        started: &'a Generations,
    ) -> StoreFuture<'a, Completed> {
        Box::pin(async move {
            let now = Instant::now();
            let completed = {
                let mut state = self.state();
                let group = started.group_key();
                let revoked = state.key_generation(key) != started.key
                    || started
                        .group
                        .is_some_and(|(group, g)| state.group_generation(&group) != g);
                let (ttl, replay) = match keep {
                    Keep::Replay { ttl } => (ttl, true),
                    Keep::Flight { ttl } => (ttl, false),
                };
                let entry = Entry {
                    stored: Stored { value, ttl, replay },
                    seal: *seal,
                    key_generation: started.key,
                    group_generation: started.group.map_or(0, |(_, g)| g),
                    expires: now + ttl,
                };
                if revoked {
                    state.outcomes.insert(
                        (*key, fence.clone()),
                        Outcome::Revoked { expires: now + ttl },
                    );
                    state.release(key, fence);
                    Completed::Revoked
                } else if replay {
                    match state.results.get(key) {
                        Some(existing) => match state.open(key, existing, seal, group, now) {
                            Read::Live(stored) => Completed::Existing(stored),
                            Read::Revoked => Completed::Revoked,
                            // Another token's replay (a key collision): this flight's
                            // callers keep their own result, as nothing opens it.
                            Read::Nothing => Completed::Stored,
                        },
                        None => {
                            state.results.insert(*key, entry);
                            // The replay outlives neither generation it is bound to.
                            generation(&mut state.key_generations, key, ttl, now);
                            if let Some(group) = group {
                                generation(&mut state.group_generations, group, ttl, now);
                                state.groups.entry(*group).or_default().push(*key);
                            }
                            Completed::Stored
                        }
                    }
                } else {
                    state
                        .outcomes
                        .insert((*key, fence.clone()), Outcome::Value(entry));
                    state.release(key, fence);
                    Completed::Stored
                }
            };
            self.inner.changed.notify_waiters();
            Ok(completed)
        })
    }

    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.state().release(key, fence);
            Ok(())
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        started: &'a Generations,
        deadline: Instant,
    ) -> StoreFuture<'a, Waited> {
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
                    if state.key_generation(key) != started.key {
                        return Ok(Waited::Revoked);
                    }
                    let group = started.group_key();
                    let read = match state.results.get(key) {
                        Some(entry) => state.open(key, entry, seal, group, now),
                        None => Read::Nothing,
                    };
                    let read = match read {
                        Read::Nothing => match state.outcomes.get(&(*key, leader.clone())) {
                            Some(Outcome::Value(entry)) => state.open(key, entry, seal, group, now),
                            Some(Outcome::Revoked { .. }) => Read::Revoked,
                            None => Read::Nothing,
                        },
                        read => read,
                    };
                    match read {
                        Read::Live(stored) => return Ok(Waited::Arrived(stored)),
                        Read::Revoked => return Ok(Waited::Revoked),
                        Read::Nothing => {}
                    }
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return Ok(Waited::Elapsed);
                }
            }
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Fingerprint, life: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut state = self.state();
                bump(&mut state.key_generations, key, life, Instant::now());
                state.results.remove(key);
            }
            // Followers of a flight of this key learn at once that it was revoked.
            self.inner.changed.notify_waiters();
            self.announce(Invalidation::Key(*key));
            Ok(())
        })
    }

    fn invalidate_group<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let now = Instant::now();
                let mut state = self.state();
                bump(&mut state.group_generations, group, life, now);
                let remembered = state.remembered.remove(group).unwrap_or_default();
                let members = state.groups.remove(group).unwrap_or_default();
                // Each member as `invalidate` does: a flight of a remembered key that runs
                // now can no longer store its result.
                for key in members
                    .into_iter()
                    .chain(remembered.into_iter().map(|(key, _)| key))
                {
                    bump(&mut state.key_generations, &key, life, now);
                    state.results.remove(&key);
                }
            }
            self.inner.changed.notify_waiters();
            self.announce(Invalidation::Group(*group));
            Ok(())
        })
    }

    fn remember<'a>(
        &'a self,
        group: &'a Fingerprint,
        key: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let expires = Instant::now() + life;
            let mut state = self.state();
            let members = state.remembered.entry(*group).or_default();
            match members.iter_mut().find(|(member, _)| member == key) {
                Some((_, until)) => *until = (*until).max(expires),
                None => members.push((*key, expires)),
            }
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
    /// Call the inner service and store the result under this fence, if the generations
    /// it started under are still current. `None`: the election or the read of the group's
    /// generation failed, so the generations are unknown and nothing is stored (the lock, if
    /// it was taken, is released).
    Lead(Fence, Option<Generations>),
    /// Wait for the result of the flight fenced so, elected under these generations; never
    /// call the inner service.
    Follow(Fence, Generations),
}

/// What a leader's store made of its result.
pub(crate) enum Finished {
    /// Its own result stands (stored, or kept in this process).
    Own,
    /// Another leader's replay was stored first: every caller uses it.
    Existing(Stored),
    /// The key or its group was invalidated while the flight ran.
    Revoked,
}

/// What a follower received.
pub(crate) enum Followed {
    Arrived(Stored),
    Revoked,
    Elapsed,
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

    pub(crate) fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// How long a generation must live for a table replaying for `ttl`: longer than any
    /// flight (the lease outlives the hard cap) plus its replay, with a margin.
    pub(crate) fn generation_life(&self, ttl: Duration) -> Duration {
        self.lease + ttl + Duration::from_secs(5)
    }

    /// Sends an invalidation to the store, once more if the first attempt fails: a lost
    /// invalidation would let another instance replay a revoked result.
    pub(crate) async fn invalidate(&self, invalidation: &Invalidation, life: Duration) {
        for attempt in 1..=2 {
            let result = match invalidation {
                Invalidation::Key(key) => self.store.invalidate(key, life).await,
                Invalidation::Group(group) => self.store.invalidate_group(group, life).await,
            };
            match result {
                Ok(()) => return,
                Err(error) if attempt == 1 => {
                    tracing::info!(%error, "invalidation failed in the coordination store: retrying");
                }
                Err(error) => tracing::warn!(
                    %error,
                    source = ?std::error::Error::source(&error),
                    "invalidation did not reach the coordination store: other instances may \
                     replay until their TTL"
                ),
            }
        }
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
        group: Option<&Fingerprint>,
        counters: &StoreCounters,
    ) -> Option<Stored> {
        if !self.breaker.allows() {
            return None;
        }
        self.record(self.store.load(key, seal, group).await, counters)
            .flatten()
    }

    /// Step 2: the group's generation (before the key's: an invalidation of the group after
    /// this read is seen when the result is stored), then the election, which reads the
    /// key's.
    pub(crate) async fn elect(
        &self,
        key: &Fingerprint,
        group: Option<&Fingerprint>,
        tag: Option<&Fingerprint>,
        life: Duration,
        counters: &StoreCounters,
    ) -> Plan {
        if !self.breaker.allows() {
            return Plan::Local;
        }
        // `None` inside: the read failed, the generation is unknown.
        let read_group = async {
            match group {
                None => None,
                Some(group) => {
                    let read = self.store.group_generation(group, life).await;
                    Some((*group, self.record(read, counters)))
                }
            }
        };
        // Remembered before the election: an invalidation of the tag from now on reaches
        // this key's generation, which the election reads.
        let remember = async {
            match tag {
                None => true,
                Some(tag) => {
                    let remembered = self.store.remember(tag, key, life).await;
                    self.record(remembered, counters).is_some()
                }
            }
        };
        let (group, remembered) = futures_util::future::join(read_group, remember).await;
        // A follower compares what it reads with the group's current generation, never
        // with this one; a leader without it, or whose key an invalidation by tag might not
        // reach, must not store (see `Plan::Lead`).
        let known = remembered && group.is_none_or(|(_, generation)| generation.is_some());
        let generations = |key| Generations {
            key,
            group: group.map(|(group, generation)| (group, generation.unwrap_or(0))),
        };
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
            Ok(Election::Won { generation }) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.won, "won");
                Plan::Lead(fence, known.then(|| generations(generation)))
            }
            Ok(Election::Lost { leader, generation }) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.lost, "lost");
                Plan::Follow(leader, generations(generation))
            }
            Err(error) => {
                // The lock may or may not be ours (a command can time out after Redis ran
                // it). Lead locally, at most one call per instance; without the key's
                // generation the result cannot be stored safely, so the lock is released.
                self.record::<()>(Err(error), counters);
                Plan::Lead(fence, None)
            }
        }
    }

    /// Step 3 of a follower: the leader's result, word that it was revoked, or nothing at
    /// the deadline. Store failures on the way are retried, never answered by calling the
    /// inner service.
    pub(crate) async fn follow(
        &self,
        key: &Fingerprint,
        leader: &Fence,
        seal: &[u8; 32],
        started: &Generations,
        deadline: Instant,
        counters: &StoreCounters,
    ) -> Followed {
        match self.store.wait(key, leader, seal, started, deadline).await {
            Ok(Waited::Arrived(stored)) => {
                self.record(Ok(()), counters);
                StoreCounters::add(&counters.replayed, "replayed");
                Followed::Arrived(stored)
            }
            Ok(Waited::Revoked) => {
                self.record(Ok(()), counters);
                Followed::Revoked
            }
            // Nothing arrived: that says nothing about the store's health (the reads may all
            // have failed), so the breaker is left as it is.
            Ok(Waited::Elapsed) => Followed::Elapsed,
            Err(error) => {
                self.record::<()>(Err(error), counters);
                Followed::Elapsed
            }
        }
    }

    /// Step 3 of a leader: stores its result under the generations it started with
    /// (returning another leader's if one was stored first, or word that the flight was
    /// revoked meanwhile), then releases the lock in the background: the leader's own
    /// callers need the stored result, not the release, and followers were woken by the
    /// completion. A stored flight outcome or a revoked result has released the lock
    /// already.
    pub(crate) async fn finish(
        &self,
        key: &Fingerprint,
        fence: &Fence,
        seal: &[u8; 32],
        value: Option<(Vec<u8>, Keep)>,
        started: Option<&Generations>,
        counters: &StoreCounters,
    ) -> Finished {
        let mut finished = Finished::Own;
        if let (Some((value, keep)), Some(started)) = (value, started) {
            // Storing a flight's outcome released the lock in the same step.
            let releases = matches!(keep, Keep::Flight { .. });
            let completed = self
                .store
                .complete(key, fence, seal, value, keep, started)
                .await;
            let released = match &completed {
                Ok(Completed::Revoked) => true,
                Ok(_) => releases,
                Err(_) => false,
            };
            finished = match self.record(completed, counters) {
                Some(Completed::Existing(stored)) => Finished::Existing(stored),
                Some(Completed::Revoked) => Finished::Revoked,
                Some(_) | None => Finished::Own,
            };
            if released {
                return finished;
            }
        }
        let (store, key, fence) = (self.store.clone(), *key, fence.clone());
        tokio::spawn(async move {
            if let Err(error) = store.release(&key, &fence).await {
                // The lease ends it anyway; a retry then elects a new leader.
                tracing::debug!(%error, "the election lock was not released");
            }
        });
        finished
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
