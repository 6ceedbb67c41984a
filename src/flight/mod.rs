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
//!   a replay (and its task learns so, to refuse its callers), and a finished flight never
//!   removes a newer entry for the same key.
//! - The task's [`FlightGuard`] removes the entry if the task ends without completing
//!   (panic, hard cap, runtime shutdown), so a key is never stuck behind a dead flight.
//! - `len` counts the entries and the places of entries being inserted. A leader takes its
//!   place with a compare-and-swap against `max_entries` before it spawns, so leaders in
//!   different shards cannot overshoot the limit together; `in_flight` changes only under
//!   the flight's shard lock, so its task cannot decrement it before `lead` counted it.
//! - The group counts hold, per group, the number of entries that carry it. Locks are
//!   taken in one order, shard then group counts, and shard locks are never nested:
//!   sweeps and `invalidate_group` visit the shards one at a time.
//!
//! The parts: `slot` (the key of a map slot and the map's hasher), `entry` (what a slot
//! holds), `sweep` (removal of expired replays), `guard` (the flight task's guard and a
//! leader's reserved place).

use std::{
    any::Any,
    collections::HashMap,
    future::Future,
    pin::Pin,
    // The table itself and its values stay in std's `Arc`: other modules hold the table,
    // and a value is a `dyn Any`. Waiter counts are in `sync::Arc`, modelled under loom.
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::future::Shared;
use tokio::time::Instant;

use self::{
    entry::{Cold, Entry, Name, Running, State, name},
    guard::{Place, WaiterSlot},
    slot::{KeyedFold, Slot, make_room},
};
use crate::{
    error::{LeaderFailed, Limit},
    key::{Admission, Fingerprint},
    metrics::{ReplayCount, TableGauges},
    sync::{self, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering},
};

mod entry;
mod guard;
#[cfg(all(test, refresh_coalesce_loom))]
mod loom_tests;
mod slot;
mod sweep;
#[cfg(all(test, not(refresh_coalesce_loom)))]
mod tests;

pub(crate) use self::guard::FlightGuard;

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
    /// The most live entries of one group (a token subject).
    pub(crate) max_per_group: u32,
}

/// One cache line per shard, so that two cores working on two shards do not contend.
#[repr(align(64))]
struct Shard {
    map: Mutex<HashMap<Slot, Entry, KeyedFold>>,
    /// Replays answered by [`Table::find_answer`], counted in the cache line the lock
    /// already brought in.
    replayed: ReplayCount,
}

/// How many entries each group has, by the group's first 64 bits (a keyed hash: collisions
/// are as unlikely as they are harmless, since they only blur the reuse count). Entries keep
/// their group's first 128 bits ([`Name`]), which `invalidate_group` matches.
type GroupCounts = Mutex<HashMap<u64, u32, KeyedFold>>;

/// What a request finds for its key.
pub(crate) enum Found {
    /// A live replay: answer it.
    Replay(Value),
    /// A running flight: wait for it.
    Join(Waiter),
    /// Nothing: verify the request, then [`Table::lead`].
    Vacant,
}

/// The result of [`Table::find_answer`].
pub(crate) enum Lookup<T> {
    /// A live replay, already answered.
    Answered(T),
    /// Anything else.
    Found(Found),
}

/// A caller's place in a flight. Dropping it frees the place.
pub(crate) struct Waiter {
    pub(crate) id: u64,
    pub(crate) future: FlightFuture,
    /// The flight's span, for a caller who joined (the leader's own request is its parent),
    /// when a subscriber records it: holding it keeps the span open while the caller links to
    /// it.
    pub(crate) span: Option<tracing::Span>,
    _slot: WaiterSlot,
}

/// What [`Table::lead`]'s `start` launched: the future the flight's callers await, and the
/// span its task runs in.
pub(crate) struct Launched {
    pub(crate) future: FlightFuture,
    pub(crate) span: tracing::Span,
}

impl From<FlightFuture> for Launched {
    fn from(future: FlightFuture) -> Self {
        Self {
            future,
            span: tracing::Span::none(),
        }
    }
}

/// Why the table turned a request away, in its own words: the layer decides what each
/// means to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The entry matched, but the token it was made for has expired since.
    Expired,
    /// A limit is reached: entries, waiters of the flight, or entries of the group.
    Full(Limit),
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
    epoch: Instant,
    shards: Box<[Shard]>,
    groups: Box<[GroupCounts]>,
    len: AtomicUsize,
    in_flight: AtomicUsize,
    /// When a refused leader last swept every shard, in nanoseconds since `epoch`.
    last_full_sweep: AtomicU64,
    next_id: AtomicU64,
    sweeping: AtomicBool,
    limits: Limits,
}

impl Table {
    pub(crate) fn new(limits: Limits) -> Self {
        let hash = KeyedFold::random();
        Self {
            epoch: Instant::now(),
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::with_hasher(hash)),
                    replayed: ReplayCount::default(),
                })
                .collect(),
            groups: (0..GROUP_SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hash)))
                .collect(),
            len: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last_full_sweep: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            sweeping: AtomicBool::new(false),
            limits,
        }
    }

    fn shard(&self, key: Slot) -> MutexGuard<'_, HashMap<Slot, Entry, KeyedFold>> {
        lock(&self.shards[key.shard()].map)
    }

    /// The entry count of the group named `group`, locked.
    fn group_counts(&self, group: &Name) -> (MutexGuard<'_, HashMap<u64, u32, KeyedFold>>, u64) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&group[..8]);
        let tag = u64::from_le_bytes(head);
        (lock(&self.groups[(tag >> 56) as usize % GROUP_SHARDS]), tag)
    }

    fn nanos(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()))
    }

    /// Looks `key` up, cloning a live replay's value.
    #[cfg(all(test, refresh_coalesce_loom))]
    pub(crate) fn find(&self, key: &Fingerprint) -> Result<Found, Refused> {
        Ok(match self.find_answer(key, Value::clone)? {
            Lookup::Answered(value) => Found::Replay(value),
            Lookup::Found(found) => found,
        })
    }

    /// Looks `key` up; a live replay (without a replay limit) is answered with `answer`
    /// under the shard lock, so the value is neither cloned nor written to.
    pub(crate) fn find_answer<T>(
        &self,
        key: &Fingerprint,
        answer: impl FnOnce(&Value) -> T,
    ) -> Result<Lookup<T>, Refused> {
        let now = Instant::now();
        let key = Slot::of(key);
        let shard = &self.shards[key.shard()];
        let mut map = lock(&shard.map);
        if self.limits.max_replays.is_none()
            && let Some(entry) = map.get(&key)
            && let State::Replay { value, expires, .. } = &entry.state
            && *expires > self.nanos(now)
        {
            if entry.not_after().is_some_and(|t| t <= SystemTime::now()) {
                return Err(Refused::Expired);
            }
            shard.replayed.count();
            return Ok(Lookup::Answered(answer(value)));
        }
        self.find_locked(&mut map, key, now).map(Lookup::Found)
    }

    fn find_locked(
        &self,
        shard: &mut HashMap<Slot, Entry, KeyedFold>,
        key: Slot,
        now: Instant,
    ) -> Result<Found, Refused> {
        let Some(entry) = shard.get_mut(&key) else {
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
                if *expires <= self.nanos(now) || spent {
                    None
                } else {
                    *replays += 1;
                    Some(Found::Replay(value.clone()))
                }
            }
            State::Flight(running) => {
                let Running {
                    future,
                    waiters,
                    span,
                } = &**running;
                if waiters.load(Ordering::Relaxed) >= self.limits.max_waiters {
                    return Err(Refused::Full(Limit::Waiters));
                }
                waiters.fetch_add(1, Ordering::Relaxed);
                Some(Found::Join(Waiter {
                    id,
                    future: future.clone(),
                    span: span.as_deref().cloned(),
                    _slot: WaiterSlot(waiters.clone()),
                }))
            }
        };
        match found {
            None => {
                let _ = self.remove_locked(shard, key, id);
                Ok(Found::Vacant)
            }
            Some(found) => {
                // The entry matched the exact key, so the bytes were verified when it was
                // created; only the token's own expiry can have changed since.
                if entry.not_after().is_some_and(|t| t <= SystemTime::now()) {
                    return Err(Refused::Expired);
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
    pub(crate) fn lead<L: Into<Launched>>(
        self: &Arc<Self>,
        key: Fingerprint,
        admission: Admission,
        start: impl FnOnce(u64) -> L,
    ) -> Result<(Lead, bool), Refused> {
        let now = Instant::now();
        let key = Slot::of(&key);
        let mut shard = self.shard(key);
        match self.find_locked(&mut shard, key, now)? {
            Found::Vacant => {}
            found => return Ok((Lead::Found(found), false)),
        }
        // The entry's place in `len` is taken before the entry is made: leaders of keys in
        // other shards check the limit at the same time, and a load followed by an increment
        // would let all of them pass it.
        if !self.reserve() {
            drop(self.sweep_locked(&mut shard, now));
            if !self.reserve() {
                // Expired replays the sweeper has not reached may hold the places, in any
                // shard: sweep them all, unlocked (shard locks are never nested), at most
                // once per `FULL_SWEEP_GAP`, so that a flood at the limit stays cheap.
                if !self.claim_full_sweep(now) {
                    return Err(Refused::Full(Limit::Entries));
                }
                drop(shard);
                for index in 0..SHARDS {
                    self.sweep_shard(index, now);
                }
                shard = self.shard(key);
                match self.find_locked(&mut shard, key, now)? {
                    Found::Vacant => {}
                    found => return Ok((Lead::Found(found), false)),
                }
                if !self.reserve() {
                    return Err(Refused::Full(Limit::Entries));
                }
            }
        }
        // Given back if `start` panics (spawning does without a runtime), or if the group is
        // full.
        let place = Place(&self.len);
        let group = admission.group_key().map(name);
        // The group's count is checked and taken under its lock, around the spawn, so that
        // leaders of one group in several shards cannot pass the cap together.
        let mut counts = group.map(|group| self.group_counts(&group));
        if let Some((counts, tag)) = &counts
            && counts
                .get(tag)
                .is_some_and(|n| *n >= self.limits.max_per_group)
        {
            return Err(Refused::Full(Limit::Group));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Launched { future, span } = start(id).into();
        let span = (!span.is_disabled()).then(|| Box::new(span));
        let waiters = sync::Arc::new(AtomicUsize::new(1));
        let mut reuse = false;
        if let Some((counts, tag)) = &mut counts {
            // The key was vacant, so any entry the group has is another token's.
            make_room(counts);
            let count = counts.entry(*tag).or_insert(0);
            reuse = *count > 0;
            *count += 1;
        }
        drop(counts);
        if let Some(tag) = admission.tag_key() {
            // Counted like a group (never nested in another group's lock), so that
            // `invalidate_group` of a tag with no entries costs one lookup too.
            let (mut counts, tag) = self.group_counts(&name(tag));
            make_room(&mut counts);
            *counts.entry(tag).or_insert(0) += 1;
        }
        make_room(&mut shard);
        shard.insert(
            key,
            Entry {
                id,
                state: State::Flight(Box::new(Running {
                    future: future.clone(),
                    waiters: waiters.clone(),
                    span,
                })),
                cold: Cold::new(&admission),
            },
        );
        // Counted before the lock is released: the flight's task can only finish (and
        // decrement both) once it gets this shard's lock.
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        std::mem::forget(place); // The entry holds its place now.
        drop(shard);
        self.ensure_sweeper();
        let waiter = Waiter {
            id,
            future,
            span: None,
            _slot: WaiterSlot(waiters),
        };
        Ok((Lead::Started(waiter), reuse))
    }

    /// Counts one more entry in `len` unless the table is full.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |len| {
                (len < self.limits.max_entries).then_some(len + 1)
            })
            .is_ok()
    }

    /// Ends flight `id` of `key`: keeps `replay` for its TTL, or removes the entry. Returns
    /// whether the entry was still the flight's: `false` once an invalidation removed it.
    fn finish(&self, key: &Fingerprint, id: u64, replay: Option<(Value, Duration)>) -> bool {
        let key = Slot::of(key);
        let mut shard = self.shard(key);
        // Under the lock, as the increment in `lead`: the task may run before `lead` returns,
        // and decrementing first would show `usize::MAX` flights until the increment.
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(entry) = shard.get_mut(&key).filter(|e| e.id == id) else {
            // Invalidated while running (only an invalidation removes a running flight's
            // entry): the task tells its callers the result was revoked.
            return false;
        };
        match replay {
            Some((value, ttl)) if !ttl.is_zero() => {
                entry.state = State::Replay {
                    value,
                    expires: self.nanos(Instant::now() + ttl),
                    replays: 0,
                }
            }
            _ => {
                let removed = self.remove_locked(&mut shard, key, id);
                drop(shard);
                drop(removed);
            }
        }
        true
    }

    /// Removes the entry of `key` whatever it holds. A running flight goes on, but its
    /// task finds its entry gone when it completes: the result is never replayed, and its
    /// callers are told it was revoked.
    pub(crate) fn invalidate(&self, key: &Fingerprint) -> bool {
        let key = Slot::of(key);
        let mut shard = self.shard(key);
        match shard.get(&key).map(|e| e.id) {
            Some(id) => {
                self.remove_locked(&mut shard, key, id);
                true
            }
            None => false,
        }
    }

    /// Removes every entry of `group`; returns how many.
    ///
    /// Visits the shards one at a time (logout is rare; the table is bounded), matching each
    /// entry's group by its first 128 bits, as keys are matched; a group with no entries
    /// costs one lookup.
    pub(crate) fn invalidate_group(&self, group: &Fingerprint) -> usize {
        let group = &name(group);
        {
            let (counts, tag) = self.group_counts(group);
            if !counts.contains_key(&tag) {
                return 0;
            }
        }
        let mut removed = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(&shard.map);
            let members: Vec<(Slot, u64)> = shard
                .iter()
                .filter(|(_, entry)| entry.named(group))
                .map(|(key, entry)| (*key, entry.id))
                .collect();
            removed.extend(
                members
                    .into_iter()
                    .filter_map(|(key, id)| self.remove_locked(&mut shard, key, id)),
            );
        }
        // Dropped here, unlocked: a replay's value may be large.
        removed.len()
    }

    /// Removes entry `id` of `key`, which the caller checked is present, and returns it, so
    /// that the caller may drop it (and its value) after releasing the lock.
    fn remove_locked(
        &self,
        shard: &mut HashMap<Slot, Entry, KeyedFold>,
        key: Slot,
        id: u64,
    ) -> Option<Entry> {
        let entry = shard.remove(&key)?;
        debug_assert_eq!(entry.id, id);
        self.len.fetch_sub(1, Ordering::SeqCst);
        let names = entry
            .cold
            .as_ref()
            .map_or([None, None], |c| [c.group, c.tag]);
        for name in names.iter().flatten() {
            let (mut counts, tag) = self.group_counts(name);
            if let Some(count) = counts.get_mut(&tag) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&tag);
                }
            }
        }
        Some(entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// What the table reports of itself for a [`Stats`](crate::Stats) snapshot.
    pub(crate) fn gauges(&self) -> TableGauges {
        TableGauges {
            in_flight: self.in_flight.load(Ordering::Relaxed) as u64,
            entries: self.len() as u64,
            replayed: self.shards.iter().map(|shard| shard.replayed.get()).sum(),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.limits.ttl
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock leaves the map consistent (every mutation is a
    // single insert or remove), so a poisoned lock is still safe to use.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
