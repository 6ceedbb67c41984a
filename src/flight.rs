//! The coalescing table: key -> running flight or live replay.
//!
//! This module knows nothing of HTTP, tokens or the inner service. Values are type-erased
//! (`Arc<dyn Any>`) so that one table can be created when the layer is built, before the
//! inner service's types are known, and shared by every service the layer makes.
//!
//! # Invariants
//!
//! - At most one entry per key. A flight is inserted under the shard lock by the request
//!   that found the key vacant; its task is spawned under that same lock, so two requests
//!   can never both lead for one key.
//! - Only the flight's own task turns its entry into a replay or removes it, and only if the
//!   entry still carries the flight's id: an invalidated (removed) flight never comes back as
//!   a replay, and a finished flight never removes a newer entry for the same key.
//! - The task's [`FlightGuard`] removes the entry if the task ends without completing
//!   (panic, hard cap, runtime shutdown), so a key is never stuck behind a dead flight.
//! - The group index holds `(key, id)` for every entry that has a group. Locks are taken in
//!   one order, shard then group; `invalidate_group` releases the group lock before it takes
//!   shard locks.

use std::{
    any::Any,
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::future::Shared;
use tokio::time::Instant;

use crate::{
    error::{BoxError, Failure, LeaderFailed, Limit, Overloaded, Rejected, Rejection},
    key::{Admission, Fingerprint},
    metrics::{Counters, Stats},
};

/// A stored result, type-erased.
pub(crate) type Value = Arc<dyn Any + Send + Sync>;

/// What a flight resolves to: the shared value, or why there is none.
pub(crate) type FlightResult = Result<Value, LeaderFailed>;

/// The future every caller of a flight awaits: a `Shared` of the leader task's join handle,
/// mapped so that a panic is a value (`Shared` would otherwise re-panic in every waiter).
pub(crate) type FlightFuture = Shared<Pin<Box<dyn Future<Output = FlightResult> + Send>>>;

const SHARDS: usize = 64;
const GROUP_SHARDS: usize = 16;

/// The table's limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) ttl: Duration,
    pub(crate) max_entries: usize,
    pub(crate) max_waiters: usize,
    pub(crate) max_replays: Option<u32>,
}

/// One cache line per shard, so that two cores working on two shards do not contend.
#[repr(align(64))]
struct Shard(Mutex<HashMap<Fingerprint, Entry>>);

type GroupIndex = Mutex<HashMap<Fingerprint, Vec<(Fingerprint, u64)>>>;

struct Entry {
    id: u64,
    group: Option<Fingerprint>,
    not_after: Option<SystemTime>,
    state: State,
}

enum State {
    Flight {
        future: FlightFuture,
        waiters: Arc<AtomicUsize>,
    },
    Replay {
        value: Value,
        expires: Instant,
        replays: u32,
    },
}

/// What a request finds for its key.
pub(crate) enum Found {
    /// A live replay: answer it.
    Replay(Value),
    /// A running flight: wait for it.
    Join(Waiter),
    /// Nothing: verify the request, then [`Table::lead`].
    Vacant,
}

/// A caller's place in a flight. Dropping it frees the place.
pub(crate) struct Waiter {
    pub(crate) id: u64,
    pub(crate) future: FlightFuture,
    _slot: WaiterSlot,
}

struct WaiterSlot(Arc<AtomicUsize>);

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The result of [`Table::lead`].
pub(crate) enum Lead {
    /// This request leads the new flight.
    Started(Waiter),
    /// Another request got there first while this one was being verified.
    Found(Found),
}

/// The coalescing table, shared by the layer, its services and its handles.
pub(crate) struct Table {
    shards: Box<[Shard]>,
    groups: Box<[GroupIndex]>,
    len: AtomicUsize,
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    sweeping: AtomicBool,
    limits: Limits,
    pub(crate) counters: Counters,
}

impl Table {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(HashMap::new())))
                .collect(),
            groups: (0..GROUP_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            len: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            sweeping: AtomicBool::new(false),
            limits,
            counters: Counters::default(),
        }
    }

    fn shard(&self, key: &Fingerprint) -> MutexGuard<'_, HashMap<Fingerprint, Entry>> {
        let index = usize::from(key.as_bytes()[31]) % SHARDS;
        lock(&self.shards[index].0)
    }

    fn group_index(
        &self,
        group: &Fingerprint,
    ) -> MutexGuard<'_, HashMap<Fingerprint, Vec<(Fingerprint, u64)>>> {
        let index = usize::from(group.as_bytes()[31]) % GROUP_SHARDS;
        lock(&self.groups[index])
    }

    /// Looks `key` up. An expired replay is removed and reported vacant.
    pub(crate) fn find(&self, key: &Fingerprint) -> Result<Found, BoxError> {
        let mut shard = self.shard(key);
        self.find_locked(&mut shard, key, Instant::now())
    }

    fn find_locked(
        &self,
        shard: &mut HashMap<Fingerprint, Entry>,
        key: &Fingerprint,
        now: Instant,
    ) -> Result<Found, BoxError> {
        let Some(entry) = shard.get_mut(key) else {
            return Ok(Found::Vacant);
        };
        let id = entry.id;
        let found = match &mut entry.state {
            State::Replay {
                value,
                expires,
                replays,
            } => {
                let spent = self.limits.max_replays.is_some_and(|max| *replays >= max);
                if *expires <= now || spent {
                    None
                } else {
                    *replays += 1;
                    Some(Found::Replay(value.clone()))
                }
            }
            State::Flight { future, waiters } => {
                if waiters.load(Ordering::Relaxed) >= self.limits.max_waiters {
                    return Err(Overloaded::new(Limit::Waiters).into());
                }
                waiters.fetch_add(1, Ordering::Relaxed);
                Some(Found::Join(Waiter {
                    id,
                    future: future.clone(),
                    _slot: WaiterSlot(waiters.clone()),
                }))
            }
        };
        match found {
            None => {
                self.remove_locked(shard, key, id);
                Ok(Found::Vacant)
            }
            Some(found) => {
                // The entry matched the exact key, so the bytes were verified when it was
                // created; only the token's own expiry can have changed since.
                if entry.not_after.is_some_and(|t| t <= SystemTime::now()) {
                    return Err(Rejected::new(Rejection::Expired).into());
                }
                Ok(found)
            }
        }
    }

    /// Starts a flight for `key` unless another request did so since [`find`](Self::find).
    ///
    /// `start` is called with the new flight's id under the shard lock and must spawn the
    /// task (and only spawn it: the inner service is called inside the task). The returned
    /// flag is `true` when the admission's group already had an entry for another key.
    pub(crate) fn lead(
        self: &Arc<Self>,
        key: Fingerprint,
        admission: Admission,
        start: impl FnOnce(u64) -> FlightFuture,
    ) -> Result<(Lead, bool), BoxError> {
        let now = Instant::now();
        let mut shard = self.shard(&key);
        match self.find_locked(&mut shard, &key, now)? {
            Found::Vacant => {}
            found => return Ok((Lead::Found(found), false)),
        }
        if self.len.load(Ordering::Relaxed) >= self.limits.max_entries {
            self.sweep_locked(&mut shard, now);
            if self.len.load(Ordering::Relaxed) >= self.limits.max_entries {
                return Err(Overloaded::new(Limit::Entries).into());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let future = start(id);
        let waiters = Arc::new(AtomicUsize::new(1));
        let group = admission.group_key().copied();
        let mut reuse = false;
        if let Some(group) = group {
            let mut index = self.group_index(&group);
            let members = index.entry(group).or_default();
            reuse = members.iter().any(|(other, _)| *other != key);
            members.push((key, id));
        }
        shard.insert(
            key,
            Entry {
                id,
                group,
                not_after: admission.expires(),
                state: State::Flight {
                    future: future.clone(),
                    waiters: waiters.clone(),
                },
            },
        );
        // Counted before the lock is released: the flight's task can only finish (and
        // decrement both) once it gets this shard's lock.
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.len.fetch_add(1, Ordering::SeqCst);
        drop(shard);
        self.ensure_sweeper();
        let waiter = Waiter {
            id,
            future,
            _slot: WaiterSlot(waiters),
        };
        Ok((Lead::Started(waiter), reuse))
    }

    /// Ends flight `id` of `key`: keeps `replay` for its TTL, or removes the entry.
    fn finish(&self, key: &Fingerprint, id: u64, replay: Option<(Value, Duration)>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut shard = self.shard(key);
        let Some(entry) = shard.get_mut(key).filter(|e| e.id == id) else {
            // Invalidated while running: the result reaches this flight's callers only.
            return;
        };
        match replay {
            Some((value, ttl)) if !ttl.is_zero() => {
                entry.state = State::Replay {
                    value,
                    expires: Instant::now() + ttl,
                    replays: 0,
                }
            }
            _ => self.remove_locked(&mut shard, key, id),
        }
    }

    /// Removes the entry of `key` whatever it holds. A running flight goes on, and its
    /// result reaches its current callers, but it will not be replayed.
    pub(crate) fn invalidate(&self, key: &Fingerprint) -> bool {
        let mut shard = self.shard(key);
        match shard.get(key).map(|e| e.id) {
            Some(id) => {
                self.remove_locked(&mut shard, key, id);
                true
            }
            None => false,
        }
    }

    /// Removes every entry of `group`; returns how many.
    pub(crate) fn invalidate_group(&self, group: &Fingerprint) -> usize {
        // Take the members under the group lock, then release it before touching shards.
        let members = self.group_index(group).remove(group).unwrap_or_default();
        let mut removed = 0;
        for (key, id) in members {
            let mut shard = self.shard(&key);
            if shard.get(&key).is_some_and(|e| e.id == id) {
                self.remove_locked(&mut shard, &key, id);
                removed += 1;
            }
        }
        removed
    }

    /// Removes entry `id` of `key`, which the caller checked is present.
    fn remove_locked(&self, shard: &mut HashMap<Fingerprint, Entry>, key: &Fingerprint, id: u64) {
        let Some(entry) = shard.remove(key) else {
            return;
        };
        debug_assert_eq!(entry.id, id);
        self.len.fetch_sub(1, Ordering::SeqCst);
        if let Some(group) = entry.group {
            let mut index = self.group_index(&group);
            if let Some(members) = index.get_mut(&group) {
                members.retain(|member| *member != (*key, id));
                if members.is_empty() {
                    index.remove(&group);
                }
            }
        }
    }

    fn sweep_locked(&self, shard: &mut HashMap<Fingerprint, Entry>, now: Instant) {
        let expired: Vec<(Fingerprint, u64)> = shard
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Replay { expires, .. } if expires <= now))
            .map(|(k, e)| (*k, e.id))
            .collect();
        for (key, id) in expired {
            self.remove_locked(shard, &key, id);
        }
    }

    /// Removes every expired replay.
    pub(crate) fn sweep(&self, now: Instant) {
        for shard in self.shards.iter() {
            self.sweep_locked(&mut lock(&shard.0), now);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub(crate) fn stats(&self, breaker_open: bool) -> Stats {
        self.counters.snapshot(
            self.in_flight.load(Ordering::Relaxed) as u64,
            self.len() as u64,
            breaker_open,
        )
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.limits.ttl
    }

    /// Starts the background sweep unless it runs already. It stops by itself once the
    /// table is empty, so an idle table leaves no task behind.
    fn ensure_sweeper(self: &Arc<Self>) {
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
        table.sweep(Instant::now());
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

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Held by a flight's task: finishes the flight's entry exactly once, also when the task
/// panics, hits the hard cap or is cancelled (the guard is then dropped unfinished).
pub(crate) struct FlightGuard {
    table: Arc<Table>,
    key: Fingerprint,
    id: u64,
    armed: bool,
}

impl FlightGuard {
    pub(crate) fn new(table: Arc<Table>, key: Fingerprint, id: u64) -> Self {
        Self {
            table,
            key,
            id,
            armed: true,
        }
    }

    /// Ends the flight with its value, replayed for `replay` if given.
    ///
    /// The entry becomes a replay before the flight's future resolves, so a request that
    /// arrives after any caller has its answer finds the replay, never a finished flight.
    pub(crate) fn complete(mut self, value: &Value, replay: Option<Duration>) {
        self.armed = false;
        self.table
            .finish(&self.key, self.id, replay.map(|ttl| (value.clone(), ttl)));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.armed {
            self.table.finish(&self.key, self.id, None);
        }
    }
}

/// Maps the leader task's join result to a flight result.
pub(crate) fn join_result(result: Result<FlightResult, tokio::task::JoinError>) -> FlightResult {
    match result {
        Ok(result) => result,
        Err(error) if error.is_panic() => Err(LeaderFailed::new(Failure::Panicked)),
        Err(_) => Err(LeaderFailed::new(Failure::Cancelled)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock leaves the map consistent (every mutation is a
    // single insert or remove), so a poisoned lock is still safe to use.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
