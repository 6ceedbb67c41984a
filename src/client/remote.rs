//! The flight of a generation when the credentials live in a [`CredentialStore`] that other
//! processes share: one refresh between all of them.
//!
//! 1. Read the store. Credentials newer than the flight's generation were stored by another
//!    process: take them, call nothing.
//! 2. Take the store's refresh lock (a random fence, a lease longer than the refresh
//!    timeout). The holder reads the store again (the previous holder may have just
//!    finished), presents the stored refresh token, and stores the result with a
//!    compare-and-swap on the generation it read, before it releases the lock. An
//!    `invalid_grant` is stored too, so that every process learns the session ended.
//! 3. A process that does not get the lock waits for the store's generation to move (woken
//!    by the store, or polling), and takes what was stored. If the holder dies, its lease
//!    runs out and the lock is taken again. A waiting process never refreshes on its own:
//!    if the store cannot be reached, the refresh fails (transient) rather than risk
//!    presenting a refresh token another process is rotating.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    attempt::{self, Failure, Outcome},
    core::Core,
    error::{NoCredentials, Reason, RefreshError},
    metrics::Trigger,
    session::{Session, Snapshot, Tokens},
    store::{CredentialStore, Swapped},
};
use crate::{error::BoxError, store::Fence};

/// How much longer the lock's lease is than the refresh timeout: time to store the result.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How many times a process that does not hold the lock tries to take it again (after a
/// holder's lease ran out) before the refresh fails.
const LOCK_ATTEMPTS: u32 = 3;
/// How many times the holder tries to store a refresh's result while the store fails.
const STORE_ATTEMPTS: u32 = 5;
/// How many times any other command is sent while the store fails (each within the
/// store's own budget), before the refresh fails as transient.
const COMMAND_ATTEMPTS: u32 = 3;

/// Runs a store command, again after a failure: a command that timed out may have been
/// slow, not lost. Every command of the protocol may run twice: loads read, the lock is
/// idempotent for one fence, a swap that ran already finds its own result.
async fn again<'a, T>(
    mut command: impl FnMut() -> crate::store::StoreFuture<'a, T>,
) -> Result<T, crate::store::StoreError> {
    let mut attempt = 1;
    loop {
        match command().await {
            Err(error) if attempt < COMMAND_ATTEMPTS => {
                tracing::debug!(%error, attempt, "a credential store command failed; sending it again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The flight of `generation` with a store.
pub(crate) async fn run(
    core: &Core,
    store: &dyn CredentialStore,
    generation: u64,
    trigger: Trigger,
) -> Outcome {
    let shared = &core.credentials.shared;
    let (local, backoff) = shared.view();
    if local.generation != generation {
        return Ok(local);
    }
    if let Some(backoff) = backoff
        && backoff.until > Instant::now()
    {
        return Err(Failure::Failed(backoff.failure));
    }
    let stored = again(|| store.load())
        .await
        .map_err(|e| unreachable_store(core, generation, e.into()))?;
    if let Some(newer) = stored.as_ref().filter(|s| s.generation > generation) {
        shared.counters.adopted();
        return Ok(shared.adopt(newer.clone()));
    }
    if trigger == Trigger::Load || (local.tokens().is_err() && stored.is_none()) {
        // Nothing to refresh: an empty cell and an empty store.
        return Err(Failure::NoCredentials(match local.tokens() {
            Err(no) => no,
            Ok(_) => NoCredentials::new(Reason::Empty),
        }));
    }
    let read = stored.as_ref().map_or(0, |s| s.generation);
    let fence = Fence::random();
    let lease = core.refresh_timeout + LEASE_MARGIN;
    for _ in 0..LOCK_ATTEMPTS {
        let locked = match again(|| store.lock(&fence, lease)).await {
            Ok(locked) => locked,
            Err(error) => {
                // A lock taken by an attempt whose answer was lost would hold off every
                // process until its lease ends: give it back.
                let _ = store.unlock(&fence).await;
                return Err(unreachable_store(core, generation, error.into()));
            }
        };
        if locked {
            let outcome = lead(core, store, generation, read, &local, trigger).await;
            if let Err(error) = store.unlock(&fence).await {
                // The lease ends it.
                tracing::debug!(%error, "the credential store's refresh lock was not released");
            }
            return outcome;
        }
        // Another process refreshes: wait for what it stores, at most until its lease ends.
        match again(|| store.wait(read, Instant::now() + lease)).await {
            Ok(Some(newer)) => {
                shared.counters.adopted();
                return Ok(shared.adopt(newer));
            }
            Ok(None) => {}
            Err(error) => return Err(unreachable_store(core, generation, error.into())),
        }
    }
    Err(unreachable_store(
        core,
        generation,
        "the process holding the credential store's refresh lock never stored a result".into(),
    ))
}

/// The lock holder's part: read again, refresh, store with a compare-and-swap.
async fn lead(
    core: &Core,
    store: &dyn CredentialStore,
    generation: u64,
    read: u64,
    local: &Snapshot,
    trigger: Trigger,
) -> Outcome {
    let shared = &core.credentials.shared;
    let stored = again(|| store.load())
        .await
        .map_err(|e| unreachable_store(core, generation, e.into()))?;
    if let Some(newer) = stored.as_ref().filter(|s| s.generation > read) {
        // The previous holder stored its result between our read and our lock.
        shared.counters.adopted();
        return Ok(shared.adopt(newer.clone()));
    }
    // The store's tokens are the ones to present; a store that lost its data (or never had
    // any) leaves the ones this process holds.
    let tokens: Tokens = match stored.as_ref().map(|s| &s.session) {
        Some(Session::Active(tokens)) => tokens.clone(),
        Some(Session::Ended(reason)) => {
            return Err(Failure::NoCredentials(NoCredentials::new(*reason)));
        }
        Some(Session::Empty) | None => local.tokens().map_err(Failure::NoCredentials)?.clone(),
    };
    // The next generation is past both the store's and this process's.
    let next = read.max(generation) + 1;
    let session = match attempt::call(core, generation, &tokens, trigger).await {
        Ok(new) => Session::Active(new.keeping_refresh_token(&tokens)),
        Err(error) => {
            let mut ended = None;
            let failure = attempt::failed(core, generation, error, |session| {
                ended = Some(session);
            });
            if let Some(session) = ended {
                // Every process learns that the session ended.
                let stored = save(store, read, Snapshot::new(next, session)).await;
                shared.adopt(
                    stored.unwrap_or_else(|_| Snapshot::new(next, Session::Ended(Reason::Refused))),
                );
            }
            return Err(failure);
        }
    };
    match save(store, read, Snapshot::new(next, session.clone())).await {
        Ok(current) => Ok(shared.adopt(current)),
        Err(error) => {
            // The refresh token was rotated and the store did not take the new one: keep it
            // here, so that this process goes on; other processes will fail their refresh
            // with the old one and must log in again.
            tracing::error!(
                error = %crate::client::error_chain(&*error),
                "a refreshed credential could not be stored; other processes sharing the store will not see it"
            );
            Ok(shared.adopt(Snapshot::new(next, session)))
        }
    }
}

/// Stores `next` if the store still holds generation `read`; returns what it holds then.
async fn save(
    store: &dyn CredentialStore,
    read: u64,
    next: Snapshot,
) -> Result<Snapshot, BoxError> {
    let mut last = None;
    for _ in 0..STORE_ATTEMPTS {
        match store.swap(read, &next).await {
            Ok(Swapped::Done) => return Ok(next),
            // A login (`set`) does not take the lock, and wins.
            Ok(Swapped::Conflict(Some(current))) => return Ok(current),
            Ok(Swapped::Conflict(None)) => {
                return Err("the credential store lost the credentials".into());
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or_else(|| "the credential store failed".into(), Into::into))
}

/// A failure to reach the store: transient, with a back-off.
fn unreachable_store(core: &Core, generation: u64, error: BoxError) -> Failure {
    attempt::failed(
        core,
        generation,
        RefreshError::transient(error).into(),
        |_| {},
    )
}
