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

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{error::BoxError, key::Fingerprint};

mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod seal;

pub use self::memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};

/// The future of every [`Store`] method.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store command failed or exceeded its budget. The source chain is kept.
///
/// ```
/// # use tower_refresh_coalesce::store::{StoreError, StoreErrorKind};
/// let err = StoreError::new(std::io::Error::other("connection refused"));
/// assert_eq!(err.to_string(), "coordination store failed");
/// assert_eq!(err.kind(), StoreErrorKind::Backend);
/// assert!(std::error::Error::source(&err).is_some());
///
/// let late = StoreError::timeout(std::time::Duration::from_millis(100));
/// assert_eq!(late.kind(), StoreErrorKind::Timeout);
/// assert_eq!(late.to_string(), "coordination store gave no answer within 100ms");
/// ```
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    budget: Option<Duration>,
    source: Option<BoxError>,
}

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The command got no answer within its budget.
    Timeout,
    /// The store could not be reached: no connection, or none to a node that can answer
    /// (a master during a failover, say).
    Unreachable,
    /// The store answered with an error, or with something the protocol does not expect.
    Backend,
}

impl StoreError {
    /// Wraps a backend error of kind [`StoreErrorKind::Backend`].
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self::with_kind(StoreErrorKind::Backend, source)
    }

    /// Wraps a backend error of the given kind.
    pub fn with_kind(kind: StoreErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            budget: None,
            source: Some(source.into()),
        }
    }

    /// A command that did not answer within its budget.
    pub fn timeout(budget: Duration) -> Self {
        Self {
            kind: StoreErrorKind::Timeout,
            budget: Some(budget),
            source: None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.budget) {
            (StoreErrorKind::Timeout, Some(budget)) => {
                write!(f, "coordination store gave no answer within {budget:?}")
            }
            (StoreErrorKind::Unreachable, _) => f.write_str("coordination store unreachable"),
            _ => f.write_str("coordination store failed"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The fence of one election: random, unique per flight.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fence(String);

impl Fence {
    /// A fresh random fence.
    pub fn random() -> Self {
        Self(hex::encode(crate::key::random_bytes::<16>()))
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
#[non_exhaustive]
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
    /// A replay of the key is stored (a leader completed since this flight last looked):
    /// no lock was taken; [`load`](Store::load) it instead of leading.
    Replay,
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

    pub(crate) fn group_key(&self) -> Option<&Fingerprint> {
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
/// only. One conformance suite (`tests/store_conformance/`) runs against every backend.
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

    /// Takes the lock of `key` for `lease` with `fence`, unless another flight holds it or a
    /// replay of `key` is stored ([`Election::Replay`]: a flight that looked before the
    /// replay was stored must not lead a second call), and reads the key's generation in the
    /// same step (keeping an existing one at least `lease` from now). Must be idempotent for
    /// one fence: electing again with the fence that holds the lock reports
    /// [`Election::Won`] (a retry after a lost answer).
    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election>;

    /// Waits until the election of `key` that this instance just won would survive a
    /// failover of the store, as far as the store can make it: [`RedisStore`] waits until
    /// its configured number of replicas acknowledged the lock (`WAIT`, see
    /// [`RedisStoreBuilder::min_replicas`]). Returns whether they did within the budget; a
    /// store without replicas answers `true` at once, as this default does.
    fn replicate<'a>(&'a self, key: &'a Fingerprint) -> StoreFuture<'a, bool> {
        let _ = key;
        Box::pin(async { Ok(true) })
    }

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
