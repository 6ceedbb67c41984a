//! [`Remote`]: a flight's side of the protocol with other instances, through the layer's
//! store and its breaker.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::Breaker;
use crate::{
    audit::{Audit, AuditEvent},
    durations::Durations,
    key::Fingerprint,
    metrics::StoreCounters,
    store::{
        Completed, Election, Fence, Generations, Invalidation, Keep, Store, StoreError,
        StoreErrorKind, Stored, Waited,
    },
};

/// What a flight does after asking the store.
pub(crate) enum Plan {
    /// Call the inner service and keep the result in this process: the breaker is open, so
    /// the store is skipped for a while.
    Local,
    /// The election failed: the lock (under this fence) may or may not have been taken.
    /// Call the inner service and keep the result in this process, releasing the lock, or
    /// refuse when the layer requires the store.
    Unreachable(Fence),
    /// Call the inner service and store the result under this fence, if the generations
    /// it started under are still current. `None`: the read of the group's generation (or
    /// remembering the key under its tag) failed, so the generations are unknown and
    /// nothing is stored (the lock is released).
    Lead(Fence, Option<Generations>),
    /// A replay was stored after the flight looked (step 1) and before its election: answer
    /// with it; never call the inner service.
    Replay(Stored),
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

/// How many elections a flight runs at most when each finds a replay it cannot load.
const ELECTIONS: usize = 3;

/// A layer's store, with its breaker and settings.
pub(crate) struct Remote {
    store: Arc<dyn Store>,
    breaker: Breaker,
    /// How long the election lock lives: longer than the hard cap.
    lease: Duration,
    /// How long a leader keeps trying to store its result: as long as followers wait.
    write_budget: Duration,
    /// Refuse, rather than call the inner service on this instance alone, while the store
    /// cannot be reached.
    pub(crate) required: bool,
    /// Hears the breaker open and close.
    audit: Audit,
    /// Times each store command.
    durations: Durations,
}

impl Remote {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        breaker: Breaker,
        lease: Duration,
        write_budget: Duration,
        required: bool,
        audit: Audit,
        durations: Durations,
    ) -> Self {
        Self {
            store,
            breaker,
            lease,
            write_budget,
            required,
            audit,
            durations,
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

    /// Sends an invalidation to the store, and again, backing off, while the store cannot be
    /// reached or its replicas did not acknowledge it, for as long as a leader would try to
    /// store a result: a lost invalidation would let another instance replay a revoked
    /// result.
    pub(crate) async fn invalidate(&self, invalidation: &Invalidation, life: Duration) {
        let deadline = Instant::now() + self.write_budget;
        let mut delay = Duration::from_millis(50);
        for attempt in 1.. {
            let result = match invalidation {
                Invalidation::Key(key) => {
                    self.timed("invalidate", self.store.invalidate(key, life))
                        .await
                }
                Invalidation::Group(group) => {
                    self.timed("invalidate_group", self.store.invalidate_group(group, life))
                        .await
                }
            };
            match result {
                Ok(()) => return,
                Err(error) if retryable(&error) && Instant::now() + delay < deadline => {
                    tracing::info!(%error, attempt, "invalidation failed in the coordination store: retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(error) => {
                    tracing::warn!(
                        %error,
                        source = ?std::error::Error::source(&error),
                        attempt,
                        "invalidation did not reach the coordination store: other instances may \
                         replay until their TTL"
                    );
                    return;
                }
            }
        }
    }

    /// Runs one store command, timing it.
    async fn timed<T>(&self, command: &'static str, command_future: impl Future<Output = T>) -> T {
        let started = self.durations.start();
        let output = command_future.await;
        self.durations.store(command, started);
        output
    }

    /// Records the outcome of one store command on the breaker and the counters.
    fn record<T>(&self, result: Result<T, StoreError>, counters: &StoreCounters) -> Option<T> {
        match result {
            Ok(value) => {
                if self.breaker.succeeded() {
                    tracing::info!("coordination store reachable again: breaker closed");
                    self.audit.emit(AuditEvent::BreakerClosed);
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
                    self.audit.emit(AuditEvent::BreakerOpened);
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
        let loaded = self.timed("load", self.store.load(key, seal, group)).await;
        self.record(loaded, counters).flatten()
    }

    /// Step 2: the group's generation (before the key's: an invalidation of the group after
    /// this read is seen when the result is stored), then the election, which reads the
    /// key's. A replay stored since step 1 answers the flight instead (`Plan::Replay`):
    /// opened with `seal`, like step 1.
    pub(crate) async fn elect(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
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
                    let read = self
                        .timed("group_generation", self.store.group_generation(group, life))
                        .await;
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
                    let remembered = self
                        .timed("remember", self.store.remember(tag, key, life))
                        .await;
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
        // A replay stored between step 1 and the election: load it. A replay that cannot be
        // loaded (it expired meanwhile, or an invalidation is deleting it) leads to another
        // election; a few of them at most.
        for _ in 0..ELECTIONS {
            match self.elect_once(key, &fence, counters).await {
                Some(Election::Won { generation }) => {
                    StoreCounters::add(&counters.won, "won");
                    self.replicate(key, counters).await;
                    return Plan::Lead(fence, known.then(|| generations(generation)));
                }
                Some(Election::Lost { leader, generation }) => {
                    StoreCounters::add(&counters.lost, "lost");
                    return Plan::Follow(leader, generations(generation));
                }
                Some(Election::Replay) => {
                    let group = group.map(|(group, _)| group);
                    if let Some(stored) = self.load(key, seal, group.as_ref(), counters).await {
                        return Plan::Replay(stored);
                    }
                }
                // No answer: the lock may or may not be ours (a command can time out after
                // Redis ran it), and without the key's generation no result can be stored
                // safely.
                None => return Plan::Unreachable(fence),
            }
        }
        Plan::Unreachable(fence)
    }

    /// One election, sent once more if the first attempt fails: an election is idempotent
    /// for its fence, so a first attempt that timed out after Redis took the lock for us
    /// reports a win the second time.
    async fn elect_once(
        &self,
        key: &Fingerprint,
        fence: &Fence,
        counters: &StoreCounters,
    ) -> Option<Election> {
        let election = match self
            .timed("elect", self.store.elect(key, fence, self.lease))
            .await
        {
            Err(error) => {
                self.record::<()>(Err(error), counters);
                self.timed("elect", self.store.elect(key, fence, self.lease))
                    .await
            }
            done => done,
        };
        self.record(election, counters)
    }

    /// Step 2 of a leader: waits until the store's replicas hold its lock, so that a
    /// failover of the store does not hand the key to a second leader. A lock the replicas
    /// did not acknowledge in time is counted and logged, and the leader goes on.
    async fn replicate(&self, key: &Fingerprint, counters: &StoreCounters) {
        let replicated = self.timed("replicate", self.store.replicate(key)).await;
        if self.record(replicated, counters) == Some(false) {
            StoreCounters::add(&counters.unreplicated, "unreplicated");
            tracing::warn!(
                "the store's replicas did not acknowledge the election in time: a failover \
                 now could elect a second leader"
            );
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
    ///
    /// When the store cannot be reached (a failover, say), the leader's own callers are
    /// answered at once, and the write is retried in the background until the followers'
    /// wait is over, so that the followers on other instances still receive the result.
    pub(crate) async fn finish(
        &self,
        key: &Fingerprint,
        fence: &Fence,
        seal: &[u8; 32],
        value: Option<(Vec<u8>, Keep)>,
        started: Option<&Generations>,
        counters: &StoreCounters,
    ) -> Finished {
        let (Some((value, keep)), Some(started)) = (value, started) else {
            self.release_later(key, fence);
            return Finished::Own;
        };
        let retry = Completion {
            key: *key,
            fence: fence.clone(),
            seal: *seal,
            value: value.clone(),
            keep: keep.clone(),
            started: *started,
        };
        let completed = self
            .timed(
                "complete",
                self.store.complete(key, fence, seal, value, keep, started),
            )
            .await;
        match completed {
            Err(error) if retryable(&error) => {
                self.record::<()>(Err(error), counters);
                let deadline = Instant::now() + self.write_budget;
                tokio::spawn(retry.retry(self.store.clone(), deadline));
                Finished::Own
            }
            completed => {
                // Storing a flight's outcome or a revoked result released the lock in the
                // same step.
                let released = match &completed {
                    Ok(Completed::Revoked) => true,
                    Ok(_) => matches!(retry.keep, Keep::Flight { .. }),
                    Err(_) => false,
                };
                let finished = match self.record(completed, counters) {
                    Some(Completed::Existing(stored)) => Finished::Existing(stored),
                    Some(Completed::Revoked) => Finished::Revoked,
                    Some(_) | None => Finished::Own,
                };
                if !released {
                    self.release_later(key, fence);
                }
                finished
            }
        }
    }

    /// Releases the lock of `key` in the background, if `fence` still holds it.
    pub(crate) fn release_later(&self, key: &Fingerprint, fence: &Fence) {
        let (store, key, fence) = (self.store.clone(), *key, fence.clone());
        tokio::spawn(async move {
            if let Err(error) = store.release(&key, &fence).await {
                // The lease ends it anyway; a retry then elects a new leader.
                tracing::debug!(%error, "the election lock was not released");
            }
        });
    }
}

/// Whether a failed command may succeed when sent again soon: the store was unreachable or
/// late (a failover), not refusing the command.
fn retryable(error: &StoreError) -> bool {
    matches!(
        error.kind(),
        StoreErrorKind::Unreachable | StoreErrorKind::Timeout
    )
}

/// A leader's result that the store did not take yet.
struct Completion {
    key: Fingerprint,
    fence: Fence,
    seal: [u8; 32],
    value: Vec<u8>,
    keep: Keep,
    started: Generations,
}

impl Completion {
    /// Sends the result again, backing off, until the store takes it or `deadline` (after
    /// which no follower waits for it); then releases the lock if the completion did not.
    /// Storing is idempotent: a first attempt that ran after all finds its own replay.
    async fn retry(self, store: Arc<dyn Store>, deadline: Instant) {
        let mut delay = Duration::from_millis(50);
        let mut attempts = 1;
        let released = loop {
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            if Instant::now() >= deadline {
                tracing::warn!(
                    attempts,
                    "the result was not stored before the followers' wait ended"
                );
                break false;
            }
            delay = (delay * 2).min(Duration::from_millis(500));
            attempts += 1;
            let completed = store
                .complete(
                    &self.key,
                    &self.fence,
                    &self.seal,
                    self.value.clone(),
                    self.keep.clone(),
                    &self.started,
                )
                .await;
            match completed {
                Ok(completed) => {
                    tracing::info!(attempts, "the result was stored after the store came back");
                    break matches!(completed, Completed::Revoked)
                        || matches!(self.keep, Keep::Flight { .. });
                }
                Err(error) if retryable(&error) => {
                    tracing::debug!(%error, attempts, "storing the result failed: retrying");
                }
                Err(error) => {
                    tracing::warn!(%error, "storing the result failed");
                    break false;
                }
            }
        };
        if !released && let Err(error) = store.release(&self.key, &self.fence).await {
            tracing::debug!(%error, "the election lock was not released");
        }
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
