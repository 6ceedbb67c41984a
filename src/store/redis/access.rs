//! What other parts of the crate may use of a [`RedisStore`]'s machinery: its connection
//! (with the command budget), key names, sealing, how it announces completions, and the
//! wake-ups of its pub/sub. The client side's credential store is built on these.

use std::{sync::Arc, time::Duration};

use redis::{RedisResult, aio::ConnectionLike};
use tokio::sync::Notify;

use super::{RedisStore, scripts::Announce};
use crate::{
    key::Fingerprint,
    store::{StoreError, seal::Bound},
};

impl RedisStore {
    /// The store's command connection (cheap to clone; clones share it).
    pub(crate) fn commands(&self) -> impl ConnectionLike + Clone + Send + Sync + 'static {
        self.inner.connection.clone()
    }

    /// Runs one command under the store's command budget.
    pub(crate) async fn run_command<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.inner.run(command).await
    }

    /// The name `{prefix}:{key}:{suffix}`: every name of one key shares its hash tag, so a
    /// script over them touches one cluster slot. Publishing on `suffix` `done` wakes the
    /// key's local waiters ([`wake_up`](Self::wake_up)) on every instance.
    pub(crate) fn key_name(&self, key: &Fingerprint, suffix: &str) -> String {
        self.inner.names.key(key, suffix)
    }

    /// `value` sealed under the store's secret for `key` and `kind`, binding `generation`
    /// and an absolute expiry (`expires_ms`, since the Unix epoch) as the protocol's own
    /// values do.
    pub(crate) fn seal_value(
        &self,
        key: &Fingerprint,
        kind: u8,
        generation: u64,
        expires_ms: u64,
        value: &[u8],
    ) -> Vec<u8> {
        let bound = Bound {
            expires_ms,
            key_generation: generation,
            group_generation: 0,
        };
        self.inner
            .sealer
            .seal(key, key.as_bytes(), kind, bound, value)
    }

    /// The value, generation and expiry sealed by [`seal_value`](Self::seal_value) for `key`
    /// and `kind`; `None` if `sealed` was not, or was tampered with.
    pub(crate) fn open_value(
        &self,
        key: &Fingerprint,
        kind: u8,
        sealed: &[u8],
    ) -> Option<(u64, u64, Vec<u8>)> {
        let (bound, value) = self.inner.sealer.open(key, key.as_bytes(), kind, sealed)?;
        Some((bound.key_generation, bound.expires_ms, value))
    }

    /// The wake-up of `key`'s local waiters (in a cluster, subscribed to the key's
    /// channel before it returns); give it back with [`forget_wake_up`](Self::forget_wake_up).
    pub(crate) async fn wake_up(&self, key: &Fingerprint) -> Arc<Notify> {
        self.inner.waiter(key).await
    }

    /// The command that announces on a key's `done` channel, as the protocol's scripts send
    /// it: `PUBLISH`, or `SPUBLISH` in a cluster (sharded pub/sub).
    pub(crate) fn announce_command(&self) -> &'static str {
        match self.inner.announce {
            Announce::Classic => "PUBLISH",
            Announce::Sharded => "SPUBLISH",
        }
    }

    /// Gives back a wake-up from [`wake_up`](Self::wake_up).
    pub(crate) fn forget_wake_up(&self, key: &Fingerprint, notify: Arc<Notify>) {
        self.inner.forget_waiter(key, notify);
    }

    /// How often waiters poll, besides being woken.
    pub(crate) fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }
}
