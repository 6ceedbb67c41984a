//! [`Remote`]: a flight's side of the protocol with other instances, through the layer's
//! store and its breaker.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::Breaker;
use crate::{
    key::Fingerprint,
    metrics::StoreCounters,
    store::{
        Completed, Election, Fence, Generations, Invalidation, Keep, Store, StoreError, Stored,
        Waited,
    },
};

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
