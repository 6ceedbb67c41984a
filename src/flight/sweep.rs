//! Removal of expired replays: the background sweeper, which stops once the table is
//! empty, and the sweeps of refused leaders.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    SHARDS, Table,
    entry::{Entry, State},
    lock,
    slot::{KeyedFold, Slot},
};
use crate::sync::Ordering;

/// The least time between two sweeps of every shard by refused leaders.
const FULL_SWEEP_GAP: Duration = Duration::from_millis(10);

impl Table {
    /// Whether this caller may sweep every shard now: at most once per `FULL_SWEEP_GAP`.
    pub(super) fn claim_full_sweep(&self, now: Instant) -> bool {
        let now = self.nanos(now).max(1);
        let last = self.last_full_sweep.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= FULL_SWEEP_GAP.as_nanos() as u64)
            && self
                .last_full_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Removes the expired replays of one shard; returns them, to be dropped unlocked.
    pub(super) fn sweep_locked(
        &self,
        shard: &mut HashMap<Slot, Entry, KeyedFold>,
        now: Instant,
    ) -> Vec<Entry> {
        let now = self.nanos(now);
        let expired: Vec<(Slot, u64)> = shard
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Replay { expires, .. } if expires <= now))
            .map(|(k, e)| (*k, e.id))
            .collect();
        expired
            .into_iter()
            .filter_map(|(key, id)| self.remove_locked(shard, key, id))
            .collect()
    }

    /// Removes the expired replays of shard `index`.
    pub(super) fn sweep_shard(&self, index: usize, now: Instant) {
        let removed = self.sweep_locked(&mut lock(&self.shards[index].map), now);
        drop(removed);
    }

    /// Starts the background sweep unless it runs already. It stops by itself once the
    /// table is empty, so an idle table leaves no task behind.
    pub(super) fn ensure_sweeper(self: &Arc<Self>) {
        // Under loom, as without a runtime: the sweeper (a tokio task) is outside the model.
        if cfg!(all(test, refresh_coalesce_loom)) {
            return;
        }
        if self.sweeping.load(Ordering::SeqCst) || self.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to sweep on: expired replays are still removed when looked up.
            self.sweeping.store(false, Ordering::SeqCst);
            return;
        };
        let period = (self.limits.ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        runtime.spawn(sweep_loop(Arc::downgrade(self), period));
    }
}

async fn sweep_loop(table: Weak<Table>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(table) = table.upgrade() else {
            return;
        };
        // One shard at a time, yielding in between: a sweep of many expired entries never
        // holds this worker thread for long.
        for index in 0..SHARDS {
            table.sweep_shard(index, Instant::now());
            tokio::task::yield_now().await;
        }
        if table.len() == 0 {
            table.sweeping.store(false, Ordering::SeqCst);
            // An insert between the sweep and the store saw the flag still set and started
            // no sweeper: if the table filled again, carry on (unless one started since).
            if table.len() == 0 || table.sweeping.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }
}
