//! [`Credentials`]: the shared cell of one login (its [`Session`] at a generation).
//!
//! The generation counts the changes of the cell: every refresh, `set` and `clear` makes a
//! new one. A request remembers the generation it was sent with; a rejection of generation
//! `g` refreshes only while the cell still holds `g`, and only once (the refresh of `g` is a
//! flight in the cell's table, keyed by `g`).

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    backoff::BackoffPolicy,
    error::{Reason, RefreshFailed},
    metrics::{ClientCounters, ClientStats},
    session::{Session, Snapshot, Tokens},
    store::{CredentialStore, Swapped},
};
use crate::{
    flight::{Limits, Table},
    store::{StoreError, StoreErrorKind},
};

/// A failed refresh's back-off: no attempt before `until`; requests that need one get
/// `failure`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    pub(crate) failures: u32,
    pub(crate) until: Instant,
    pub(crate) failure: RefreshFailed,
}

/// The cell's state under its lock.
#[derive(Debug)]
struct State {
    snapshot: Snapshot,
    backoff: Option<Backoff>,
}

/// The shared cell of one login: the access token with its expiry, the refresh token, and a
/// generation that every change increments.
///
/// Cheap to clone; clones share the cell. Every [`BearerAuthLayer`](super::BearerAuthLayer)
/// built with clones of one `Credentials`, and every service they make, refreshes it at most
/// once per generation: the refresh is a flight in the cell's own table, which the waiting
/// requests join. With a [`CredentialStore`] ([`Credentials::shared`]), processes that share
/// the store refresh once between them.
///
/// ```
/// use tower_refresh_coalesce::client::{Credentials, Tokens};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_refresh_coalesce::BoxError> {
/// let credentials = Credentials::new();
/// assert_eq!(credentials.generation(), 0);
/// credentials.set(Tokens::new("access-1")?.with_refresh_token("refresh-1")).await?; // login
/// assert_eq!(credentials.generation(), 1);
/// assert_eq!(credentials.tokens().unwrap().access_token(), "access-1");
/// credentials.clear().await?; // logout
/// assert!(credentials.tokens().is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Credentials {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// One flight per generation being refreshed.
    pub(crate) table: Arc<Table>,
    pub(crate) counters: ClientCounters,
    pub(crate) store: Option<Arc<dyn CredentialStore>>,
}

impl Default for Credentials {
    fn default() -> Self {
        Self::new()
    }
}

impl Credentials {
    /// An empty cell in this process; [`set`](Self::set) fills it.
    pub fn new() -> Self {
        Self::with(None)
    }

    /// A cell in this process holding `tokens` (generation 1).
    pub fn from_tokens(tokens: Tokens) -> Self {
        let credentials = Self::new();
        credentials.lock().snapshot = Snapshot::new(1, Session::Active(tokens));
        credentials
    }

    /// A cell backed by `store`, which other processes may share: a refresh takes the
    /// store's lock, and the result is stored with a compare-and-swap on the generation, so
    /// that the processes refresh once between them and never present a rotated refresh
    /// token twice. The cell loads what the store holds on first use.
    pub fn shared(store: impl CredentialStore) -> Self {
        Self::with(Some(Arc::new(store)))
    }

    fn with(store: Option<Arc<dyn CredentialStore>>) -> Self {
        let limits = Limits {
            // A finished refresh is never replayed: by then the cell has moved past its
            // generation (or holds the failure's back-off), which every request reads first.
            ttl: Duration::ZERO,
            // One flight per generation, and generations follow each other.
            max_entries: 64,
            max_waiters: usize::MAX,
            max_replays: None,
            max_per_group: u32::MAX,
        };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    snapshot: Snapshot::new(0, Session::Empty),
                    backoff: None,
                }),
                table: Arc::new(Table::new(limits)),
                counters: ClientCounters::default(),
                store,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.lock().snapshot.generation
    }

    /// The current tokens, if logged in.
    pub fn tokens(&self) -> Option<Tokens> {
        match &self.lock().snapshot.session {
            Session::Active(tokens) => Some(tokens.clone()),
            _ => None,
        }
    }

    /// What the cell holds now, with its generation.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().snapshot.clone()
    }

    /// Counters of the refreshes and retries made for these credentials, by every layer that
    /// uses them.
    pub fn stats(&self) -> ClientStats {
        self.shared.counters.snapshot()
    }

    /// Takes what the store holds, if it is newer than the cell, and returns what the cell
    /// holds then. A store-backed cell also loads on first use and whenever a request needs
    /// a refresh; this is for a process that wants another's login at once. Without a
    /// store it only returns the snapshot.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        match &self.shared.store {
            Some(store) => Ok(match store.load().await? {
                Some(stored) => self.shared.adopt(stored),
                None => self.snapshot(),
            }),
            None => Ok(self.snapshot()),
        }
    }

    /// Replaces the tokens (after a login) with a new generation. Requests sent with an
    /// older generation that come back rejected are retried with these, without a refresh.
    ///
    /// Never fails without a store; with one, the tokens are stored first (a
    /// compare-and-swap, tried again if another process changed the store meanwhile).
    pub async fn set(&self, tokens: Tokens) -> Result<u64, StoreError> {
        self.put(Session::Active(tokens)).await
    }

    /// Clears the tokens (a logout) with a new generation: requests then fail with
    /// [`NoCredentials`](super::error::NoCredentials) until [`set`](Self::set) is called. With a store, every process
    /// sharing it sees the logout.
    pub async fn clear(&self) -> Result<u64, StoreError> {
        self.put(Session::Ended(Reason::Cleared)).await
    }

    async fn put(&self, session: Session) -> Result<u64, StoreError> {
        let Some(store) = &self.shared.store else {
            let mut state = self.lock();
            let generation = state.snapshot.generation + 1;
            state.snapshot = Snapshot::new(generation, session);
            state.backoff = None;
            return Ok(generation);
        };
        // Another process may change the store between the read and the swap: read again.
        for _ in 0..8 {
            let expected = store.load().await?.map_or(0, |stored| stored.generation);
            // Past the store's generation and this cell's (a store that lost its data).
            let next = Snapshot::new(expected.max(self.generation()) + 1, session.clone());
            if let Swapped::Done = store.swap(expected, &next).await? {
                let generation = next.generation;
                self.shared.adopt(next);
                return Ok(generation);
            }
        }
        Err(StoreError::with_kind(
            StoreErrorKind::Backend,
            "the credential store changed at every attempt to write it",
        ))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is one assignment: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current snapshot and back-off.
    pub(crate) fn view(&self) -> (Snapshot, Option<Backoff>) {
        let state = self.lock();
        (state.snapshot.clone(), state.backoff.clone())
    }

    /// Moves from generation `from` to the next with `session`, unless the cell moved
    /// already (a `set` or `clear` during the refresh wins); returns what the cell holds.
    pub(crate) fn advance(&self, from: u64, session: Session) -> Snapshot {
        let mut state = self.lock();
        if state.snapshot.generation == from {
            state.snapshot = Snapshot::new(from + 1, session);
            state.backoff = None;
        }
        state.snapshot.clone()
    }

    /// Takes `snapshot` (read from the store) if it is newer than the cell; returns what
    /// the cell holds.
    pub(crate) fn adopt(&self, snapshot: Snapshot) -> Snapshot {
        let mut state = self.lock();
        if snapshot.generation > state.snapshot.generation {
            state.snapshot = snapshot;
            state.backoff = None;
        }
        state.snapshot.clone()
    }

    /// Records a failed refresh of generation `at`: the next attempt waits as `backoff` says
    /// for this many failures in a row. Returns the failure as requests receive it.
    pub(crate) fn fail(
        &self,
        at: u64,
        kind: super::error::RefreshErrorKind,
        source: Arc<crate::BoxError>,
        backoff: &BackoffPolicy,
    ) -> RefreshFailed {
        let mut state = self.lock();
        let failures = match &state.backoff {
            Some(backoff) if state.snapshot.generation == at => backoff.failures + 1,
            _ => 1,
        };
        let delay = backoff.delay(failures);
        let failure = RefreshFailed::shared(kind, delay, source);
        if state.snapshot.generation == at {
            state.backoff = Some(Backoff {
                failures,
                until: Instant::now() + delay,
                failure: failure.clone(),
            });
        }
        failure
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Credentials")
            .field("generation", &state.snapshot.generation)
            .field("session", &state.snapshot.session)
            .field("shared", &self.shared.store.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}
