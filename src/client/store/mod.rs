//! Credentials shared by several processes: a [`CredentialStore`] holds one credential
//! (its tokens and generation), with a compare-and-swap on the generation and a lock that
//! only the refreshing process holds.
//!
//! Many pods may share one service account, or a CLI and a daemon one login. Each process
//! builds its [`Credentials`](super::Credentials) with [`Credentials::shared`](super::Credentials::shared)
//! over the same store; a refresh then happens once between all of them (see the protocol
//! in [`Credentials::shared`](super::Credentials::shared)), and a rotated refresh token is
//! never presented twice.
//!
//! - [`MemoryCredentialStore`]: in this process (several cells, or tests, sharing one).
//! - [`RedisCredentialStore`] (features `client` and `redis`): on the Redis of a
//!   [`RedisStore`](crate::store::RedisStore), sealed with its secret, locked with its
//!   election.

use std::time::Duration;

use tokio::time::Instant;

use super::session::Snapshot;
use crate::store::{Fence, StoreFuture};

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use self::memory::MemoryCredentialStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisCredentialStore;

/// The outcome of [`CredentialStore::swap`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Swapped {
    /// The store held the expected generation and now holds the new snapshot.
    Done,
    /// The store held something else, returned here (`None`: nothing).
    Conflict(Option<Snapshot>),
}

/// Where the credentials of several processes live.
///
/// Every method is one atomic step of the store. Tokens at rest must be protected: the Redis
/// implementation seals them.
pub trait CredentialStore: Send + Sync + 'static {
    /// What the store holds, if anything.
    fn load(&self) -> StoreFuture<'_, Option<Snapshot>>;

    /// Stores `next` if the store holds generation `expected` now (0: nothing), in one
    /// step. `next.generation` is greater than `expected`.
    fn swap<'a>(&'a self, expected: u64, next: &'a Snapshot) -> StoreFuture<'a, Swapped>;

    /// Takes the refresh lock with `fence` for `lease`, unless another fence holds it.
    /// Taking it again with the fence that holds it succeeds.
    fn lock<'a>(&'a self, fence: &'a Fence, lease: Duration) -> StoreFuture<'a, bool>;

    /// Releases the refresh lock if `fence` still holds it.
    fn unlock<'a>(&'a self, fence: &'a Fence) -> StoreFuture<'a, ()>;

    /// Waits until the store holds a generation greater than `after` and returns it, or
    /// returns `None` at `deadline`.
    fn wait(&self, after: u64, deadline: Instant) -> StoreFuture<'_, Option<Snapshot>>;
}

impl<S: CredentialStore + ?Sized> CredentialStore for std::sync::Arc<S> {
    fn load(&self) -> StoreFuture<'_, Option<Snapshot>> {
        (**self).load()
    }

    fn swap<'a>(&'a self, expected: u64, next: &'a Snapshot) -> StoreFuture<'a, Swapped> {
        (**self).swap(expected, next)
    }

    fn lock<'a>(&'a self, fence: &'a Fence, lease: Duration) -> StoreFuture<'a, bool> {
        (**self).lock(fence, lease)
    }

    fn unlock<'a>(&'a self, fence: &'a Fence) -> StoreFuture<'a, ()> {
        (**self).unlock(fence)
    }

    fn wait(&self, after: u64, deadline: Instant) -> StoreFuture<'_, Option<Snapshot>> {
        (**self).wait(after, deadline)
    }
}
