//! [`MemoryCredentialStore`]: the credential store in this process.

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{CredentialStore, Swapped};
use crate::{
    client::session::Snapshot,
    store::{Fence, StoreFuture},
};

/// A [`CredentialStore`] in this process's memory: cells built over clones of it behave
/// like processes sharing Redis. Every method runs under one lock.
///
/// ```
/// use tower_refresh_coalesce::client::{Credentials, store::MemoryCredentialStore};
///
/// let store = MemoryCredentialStore::new();
/// let (a, b) = (Credentials::shared(store.clone()), Credentials::shared(store));
/// # let _ = (a, b);
/// ```
#[derive(Clone, Default)]
pub struct MemoryCredentialStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    snapshot: Option<Snapshot>,
    lock: Option<(Fence, Instant)>,
}

impl MemoryCredentialStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(state: &State) -> u64 {
        state.snapshot.as_ref().map_or(0, |s| s.generation)
    }
}

impl CredentialStore for MemoryCredentialStore {
    fn load(&self) -> StoreFuture<'_, Option<Snapshot>> {
        let snapshot = self.state().snapshot.clone();
        Box::pin(async move { Ok(snapshot) })
    }

    fn swap<'a>(&'a self, expected: u64, next: &'a Snapshot) -> StoreFuture<'a, Swapped> {
        let swapped = {
            let mut state = self.state();
            if Self::generation(&state) == expected && next.generation > expected {
                state.snapshot = Some(next.clone());
                Swapped::Done
            } else {
                Swapped::Conflict(state.snapshot.clone())
            }
        };
        if let Swapped::Done = swapped {
            self.inner.changed.notify_waiters();
        }
        Box::pin(async move { Ok(swapped) })
    }

    fn lock<'a>(&'a self, fence: &'a Fence, lease: Duration) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let taken = {
            let mut state = self.state();
            match &state.lock {
                Some((holder, until)) if *until > now && holder != fence => false,
                _ => {
                    state.lock = Some((fence.clone(), now + lease));
                    true
                }
            }
        };
        Box::pin(async move { Ok(taken) })
    }

    fn unlock<'a>(&'a self, fence: &'a Fence) -> StoreFuture<'a, ()> {
        {
            let mut state = self.state();
            if state
                .lock
                .as_ref()
                .is_some_and(|(holder, _)| holder == fence)
            {
                state.lock = None;
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn wait(&self, after: u64, deadline: Instant) -> StoreFuture<'_, Option<Snapshot>> {
        Box::pin(async move {
            loop {
                // Registered before the read: a swap between the read and the wait wakes us.
                let changed = self.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(snapshot) = self
                    .state()
                    .snapshot
                    .clone()
                    .filter(|s| s.generation > after)
                {
                    return Ok(Some(snapshot));
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return Ok(None);
                }
            }
        })
    }
}

impl fmt::Debug for MemoryCredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryCredentialStore")
            .field("generation", &Self::generation(&state))
            .field("locked", &state.lock.is_some())
            .finish()
    }
}
