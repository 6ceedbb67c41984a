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

use std::{
    any::Any,
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, Hash, Hasher},
    pin::Pin,
    // The table itself and its values stay in std's `Arc`: other modules hold the table,
    // and a value is a `dyn Any`. Waiter counts are in `sync::Arc`, modelled under loom.
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::Shared;
use tokio::time::Instant;

use crate::{
    error::{BoxError, Failure, LeaderFailed, Limit, Overloaded, Rejected, Rejection},
    key::{Admission, Fingerprint},
    metrics::{Counters, Stats},
    sync::{self, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering},
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
/// The least time between two sweeps of every shard by refused leaders.
const FULL_SWEEP_GAP: Duration = Duration::from_millis(10);

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
    replayed: AtomicU64,
}

/// Hashes fingerprints (which feed the hasher one `u64`) with a folded multiply under a
/// per-table random key: one multiplication instead of SipHash, and still unpredictable to
/// a client that chooses tokens to collide (unkeyed `Fingerprint::of` digests).
#[derive(Clone, Copy)]
struct KeyedFold {
    k0: u64,
    k1: u64,
}

impl KeyedFold {
    fn random() -> Self {
        // A model check must be deterministic: the same keys, so the same iteration orders.
        #[cfg(all(test, refresh_coalesce_loom))]
        let bytes = [7u8; 16];
        #[cfg(not(all(test, refresh_coalesce_loom)))]
        let bytes = crate::key::random_bytes::<16>();
        let (a, b) = bytes.split_at(8);
        Self {
            k0: u64::from_le_bytes(a.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(b.try_into().expect("8 bytes")) | 1,
        }
    }
}

impl BuildHasher for KeyedFold {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            keys: *self,
            state: 0,
        }
    }
}

struct FoldHasher {
    keys: KeyedFold,
    state: u64,
}

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(value ^ self.state ^ self.keys.k0) * u128::from(self.keys.k1);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// The key of a table slot: the first 16 bytes of the fingerprint.
///
/// 128 bits of a keyed hash (or of SHA-256) keep the table's keys apart as well as the whole
/// digest would (a second key with the same half is a 2^-128 chance, and a keyed hash gives
/// no way to aim for one), and save 16 bytes in every slot.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Slot(u128);

impl Slot {
    fn of(key: &Fingerprint) -> Self {
        let mut half = [0u8; 16];
        half.copy_from_slice(&key.as_bytes()[..16]);
        Self(u128::from_le_bytes(half))
    }

    /// The shard of this slot: its last byte, independent of the bits the hash uses.
    fn shard(self) -> usize {
        (self.0 >> 120) as usize % SHARDS
    }
}

impl std::hash::Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Digest bytes are uniformly distributed: 64 of them are hash enough.
        state.write_u64(self.0 as u64);
    }
}

/// How many entries each group has, by the group's first 64 bits (a keyed hash: collisions
/// are as unlikely as they are harmless, since they only blur the reuse count). Entries keep
/// their whole group, which `invalidate_group` matches exactly.
type GroupCounts = Mutex<HashMap<u64, u32, KeyedFold>>;

struct Entry {
    id: u64,
    state: State,
    /// What only the HTTP front sets, out of line so that a table slot stays small.
    cold: Option<Box<Cold>>,
}

struct Cold {
    group: Option<Fingerprint>,
    /// A second name of the entry that `invalidate_group` matches (the HTTP front's token
    /// tag, shared by every party presenting one token); not counted.
    tag: Option<Fingerprint>,
    /// Whole seconds since the Unix epoch, rounded down (refusing up to a second early,
    /// never late); 0 for none.
    not_after: u64,
}

impl Cold {
    fn new(admission: &Admission) -> Option<Box<Self>> {
        let not_after = admission.expires().map_or(0, |at| {
            let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            since.as_secs().max(1)
        });
        let group = admission.group_key().copied();
        let tag = admission.tag_key().copied();
        (group.is_some() || tag.is_some() || not_after != 0).then(|| {
            Box::new(Self {
                group,
                tag,
                not_after,
            })
        })
    }
}

impl Entry {
    /// Whether `invalidate_group(group)` reaches this entry: by its group or its tag.
    fn named(&self, group: &Fingerprint) -> bool {
        self.cold.as_ref().is_some_and(|cold| {
            cold.group.as_ref() == Some(group) || cold.tag.as_ref() == Some(group)
        })
    }

    fn not_after(&self) -> Option<SystemTime> {
        let secs = self.cold.as_ref().map_or(0, |cold| cold.not_after);
        (secs != 0).then(|| UNIX_EPOCH + Duration::from_secs(secs))
    }
}

enum State {
    /// Boxed: a flight lasts one inner call, a replay the whole TTL.
    Flight(Box<Running>),
    Replay {
        value: Value,
        /// Nanoseconds since the table's epoch.
        expires: u64,
        replays: u32,
    },
}

struct Running {
    future: FlightFuture,
    waiters: sync::Arc<AtomicUsize>,
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
    _slot: WaiterSlot,
}

struct WaiterSlot(sync::Arc<AtomicUsize>);

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
    pub(crate) counters: Counters,
}

impl Table {
    pub(crate) fn new(limits: Limits) -> Self {
        let hash = KeyedFold::random();
        Self {
            epoch: Instant::now(),
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::with_hasher(hash)),
                    replayed: AtomicU64::new(0),
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
            counters: Counters::default(),
        }
    }

    fn shard(&self, key: Slot) -> MutexGuard<'_, HashMap<Slot, Entry, KeyedFold>> {
        lock(&self.shards[key.shard()].map)
    }

    /// The entry count of `group`, locked.
    fn group_counts(
        &self,
        group: &Fingerprint,
    ) -> (MutexGuard<'_, HashMap<u64, u32, KeyedFold>>, u64) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&group.as_bytes()[..8]);
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
    pub(crate) fn find(&self, key: &Fingerprint) -> Result<Found, BoxError> {
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
    ) -> Result<Lookup<T>, BoxError> {
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
                return Err(Rejected::new(Rejection::Expired).into());
            }
            shard.replayed.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!("refresh_coalesce_requests_total", "outcome" => "replayed")
                .increment(1);
            return Ok(Lookup::Answered(answer(value)));
        }
        self.find_locked(&mut map, key, now).map(Lookup::Found)
    }

    fn find_locked(
        &self,
        shard: &mut HashMap<Slot, Entry, KeyedFold>,
        key: Slot,
        now: Instant,
    ) -> Result<Found, BoxError> {
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
                let Running { future, waiters } = &**running;
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
                let _ = self.remove_locked(shard, key, id);
                Ok(Found::Vacant)
            }
            Some(found) => {
                // The entry matched the exact key, so the bytes were verified when it was
                // created; only the token's own expiry can have changed since.
                if entry.not_after().is_some_and(|t| t <= SystemTime::now()) {
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
                    return Err(Overloaded::new(Limit::Entries).into());
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
                    return Err(Overloaded::new(Limit::Entries).into());
                }
            }
        }
        // Given back if `start` panics (spawning does without a runtime), or if the group is
        // full.
        let place = Place(&self.len);
        let group = admission.group_key().copied();
        // The group's count is checked and taken under its lock, around the spawn, so that
        // leaders of one group in several shards cannot pass the cap together.
        let mut counts = group.map(|group| self.group_counts(&group));
        if let Some((counts, tag)) = &counts
            && counts
                .get(tag)
                .is_some_and(|n| *n >= self.limits.max_per_group)
        {
            return Err(Overloaded::new(Limit::Group).into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let future = start(id);
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
            let (mut counts, tag) = self.group_counts(tag);
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
            _slot: WaiterSlot(waiters),
        };
        Ok((Lead::Started(waiter), reuse))
    }

    /// Whether this caller may sweep every shard now: at most once per `FULL_SWEEP_GAP`.
    fn claim_full_sweep(&self, now: Instant) -> bool {
        let now = self.nanos(now).max(1);
        let last = self.last_full_sweep.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= FULL_SWEEP_GAP.as_nanos() as u64)
            && self
                .last_full_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
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
    /// entry's whole group; a group with no entries costs one lookup.
    pub(crate) fn invalidate_group(&self, group: &Fingerprint) -> usize {
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

    /// Removes the expired replays of one shard; returns them, to be dropped unlocked.
    fn sweep_locked(
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
    fn sweep_shard(&self, index: usize, now: Instant) {
        let removed = self.sweep_locked(&mut lock(&self.shards[index].map), now);
        drop(removed);
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// Asserts the table's invariants at quiescence: `len` counts the entries, no more
    /// entries are flights than flights run, and the group counts count exactly the grouped
    /// entries.
    #[cfg(all(test, refresh_coalesce_loom))]
    pub(crate) fn check_consistency(&self) {
        let (mut entries, mut flights) = (0, 0);
        let mut grouped: HashMap<u64, u32> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = lock(&shard.map);
            entries += shard.len();
            for entry in shard.values() {
                flights += usize::from(matches!(entry.state, State::Flight(_)));
                let names = entry
                    .cold
                    .as_ref()
                    .map_or([None, None], |c| [c.group, c.tag]);
                for name in names.iter().flatten() {
                    *grouped.entry(self.group_counts(name).1).or_default() += 1;
                }
            }
        }
        assert_eq!(self.len(), entries, "len counts the entries");
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        assert!(
            in_flight >= flights,
            "{flights} flight entries, {in_flight} in flight"
        );
        let mut counted: HashMap<u64, u32> = HashMap::new();
        for counts in self.groups.iter() {
            for (tag, count) in lock(counts).iter() {
                assert!(*count > 0, "a group without entries is removed");
                counted.insert(*tag, *count);
            }
        }
        assert_eq!(
            grouped, counted,
            "the group counts count exactly the grouped entries"
        );
    }

    pub(crate) fn stats(&self, breaker_open: bool) -> Stats {
        let mut stats = self.counters.snapshot(
            self.in_flight.load(Ordering::Relaxed) as u64,
            self.len() as u64,
            breaker_open,
        );
        stats.replayed += self
            .shards
            .iter()
            .map(|shard| shard.replayed.load(Ordering::Relaxed))
            .sum::<u64>();
        stats
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.limits.ttl
    }

    /// Starts the background sweep unless it runs already. It stops by itself once the
    /// table is empty, so an idle table leaves no task behind.
    fn ensure_sweeper(self: &Arc<Self>) {
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

/// Prepares `map` for one more insert. When it has no room left, the standard map grows to
/// twice its buckets unless at most half of its capacity is live, even when the rest is
/// tombstones of removed entries: a table refilled after its entries expired (a flood at
/// the limit, every TTL) would double each time. Rebuilt here at the size its live entries
/// need, it keeps its size when the room was tombstones and doubles only when it is full.
fn make_room<K: Hash + Eq, V, S: BuildHasher + Clone>(map: &mut HashMap<K, V, S>) {
    if map.len() < map.capacity() || map.is_empty() {
        return;
    }
    let mut rebuilt = HashMap::with_capacity_and_hasher(map.len() + 1, map.hasher().clone());
    rebuilt.extend(map.drain());
    *map = rebuilt;
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

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// An entry's place in the table's `len`, reserved by [`Table::lead`]; given back when
/// dropped before the entry is inserted.
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
    /// Returns whether the entry was still the flight's own: `false` if an invalidation
    /// removed it while the flight ran, and then the value must reach no caller.
    pub(crate) fn complete(mut self, value: &Value, replay: Option<Duration>) -> bool {
        self.armed = false;
        self.table
            .finish(&self.key, self.id, replay.map(|ttl| (value.clone(), ttl)))
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.table.finish(&self.key, self.id, None);
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

/// Model checks of the table with loom: every interleaving (up to `LOOM_MAX_PREEMPTIONS`
/// preemptions) of a few threads calling it. A flight's task is a thread that completes or
/// drops its [`FlightGuard`]; nothing is polled, so no runtime is needed.
///
/// `RUSTFLAGS="--cfg refresh_coalesce_loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_ -- --nocapture`
#[cfg(all(test, refresh_coalesce_loom))]
mod loom_tests {
    use super::*;
    use crate::{error::Limit, key::Admission};
    use futures_util::FutureExt;
    use loom::thread;

    const TTL: Duration = Duration::from_secs(60);

    /// Runs `body` under loom and reports how many interleavings it explored.
    fn model(name: &str, body: impl Fn() + Send + Sync + 'static) {
        let iterations = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = iterations.clone();
        let start = std::time::Instant::now();
        loom::model(move || {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            body();
        });
        eprintln!(
            "{name}: {} iterations in {:.2?}",
            iterations.load(std::sync::atomic::Ordering::Relaxed),
            start.elapsed()
        );
    }

    fn table(max_waiters: usize) -> Arc<Table> {
        Arc::new(Table::new(Limits {
            ttl: TTL,
            max_entries: 64,
            max_waiters,
            max_replays: None,
            max_per_group: u32::MAX,
        }))
    }

    /// Key `n` in shard `shard` (the last byte picks the shard).
    fn key(n: u8, shard: u8) -> Fingerprint {
        // Byte 15 is the last byte of the slot key, which picks the shard.
        let mut bytes = [n; 32];
        bytes[15] = shard;
        Fingerprint::from_bytes(bytes)
    }

    fn value(n: u64) -> Value {
        Arc::new(n)
    }

    fn read(value: &Value) -> u64 {
        *value.downcast_ref::<u64>().expect("a u64 value")
    }

    /// A flight future that is already resolved (never polled under loom).
    fn resolved(n: u64) -> FlightFuture {
        let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
            Box::pin(async move { Ok(value(n)) });
        future.shared()
    }

    /// What one request got.
    enum Got {
        Led(Waiter, FlightGuard),
        Joined(Waiter),
        Replayed(Value),
        Refused(BoxError),
    }

    /// One request as `future::begin` makes it: find, then lead if the key was vacant. The
    /// leader gets the guard its task would hold.
    fn request(table: &Arc<Table>, key: Fingerprint, admission: Admission) -> Got {
        let found = match table.find(&key) {
            Ok(Found::Vacant) => match table.lead(key, admission, resolved) {
                Ok((Lead::Started(waiter), _)) => {
                    let guard = FlightGuard::new(table.clone(), key, waiter.id);
                    return Got::Led(waiter, guard);
                }
                Ok((Lead::Found(found), _)) => Ok(found),
                Err(error) => Err(error),
            },
            other => other,
        };
        match found {
            Ok(Found::Replay(value)) => Got::Replayed(value),
            Ok(Found::Join(waiter)) => Got::Joined(waiter),
            Ok(Found::Vacant) => unreachable!("lead never reports a vacant key"),
            Err(error) => Got::Refused(error),
        }
    }

    /// What any thread may see at any time: at most `flights` running, `entries` stored.
    fn observe(table: &Table, flights: u64, entries: u64) {
        let stats = table.stats(false);
        assert!(stats.in_flight <= flights, "{} in flight", stats.in_flight);
        assert!(stats.entries <= entries, "{} entries", stats.entries);
    }

    fn in_flight(table: &Table) -> u64 {
        table.stats(false).in_flight
    }

    /// No entry, no flight, and the counts agree.
    fn assert_empty(table: &Table) {
        assert_eq!(table.len(), 0);
        assert_eq!(in_flight(table), 0);
        table.check_consistency();
    }

    /// 1. Two requests lead one key: one starts the flight, the other joins it; a late
    ///    arrival finds nothing, the flight or its replay, and the replay stays.
    #[test]
    fn loom_leader_joiner_late_arrival() {
        model("loom_leader_joiner_late_arrival", || {
            let table = table(8);
            let k = key(1, 5);
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let table = table.clone();
                    thread::spawn(move || {
                        let got = request(&table, k, Admission::new());
                        observe(&table, 1, 1);
                        got
                    })
                })
                .collect();
            let late = {
                let table = table.clone();
                thread::spawn(move || {
                    let seen = match table.find(&k) {
                        Ok(Found::Vacant) => None,
                        Ok(Found::Join(waiter)) => Some(Err(waiter.id)),
                        Ok(Found::Replay(value)) => Some(Ok(read(&value))),
                        Err(error) => panic!("late arrival refused: {error}"),
                    };
                    observe(&table, 1, 1);
                    seen
                })
            };
            let (mut leader, mut joiner) = (None, None);
            for racer in racers {
                match racer.join().unwrap() {
                    Got::Led(waiter, guard) => {
                        assert!(leader.replace((waiter, guard)).is_none(), "two leaders")
                    }
                    Got::Joined(waiter) => joiner = Some(waiter),
                    Got::Replayed(v) => {
                        panic!("replay of {} before the flight completed", read(&v))
                    }
                    Got::Refused(error) => panic!("refused: {error}"),
                }
            }
            let (waiter, guard) = leader.expect("one leader");
            let joiner = joiner.expect("one joiner");
            assert_eq!(
                joiner.id, waiter.id,
                "the joiner joined the leader's flight"
            );
            // The task completes while the late arrival may still be looking.
            guard.complete(&value(42), Some(TTL));
            match late.join().unwrap() {
                None => {}
                Some(Err(id)) => assert_eq!(id, waiter.id),
                Some(Ok(replayed)) => assert_eq!(replayed, 42),
            }
            assert_eq!(table.len(), 1);
            assert_eq!(in_flight(&table), 0);
            assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == 42));
            table.check_consistency();
        });
    }

    /// 1b. The flight's task is spawned under the shard lock and may finish before `lead`
    ///     returns: nobody ever sees more flights than run (the count never wraps below 0).
    #[test]
    fn loom_task_finishes_while_leader_holds_the_lock() {
        model("loom_task_finishes_while_leader_holds_the_lock", || {
            let table = table(8);
            let k = key(1, 5);
            let observer = {
                let table = table.clone();
                thread::spawn(move || observe(&table, 1, 1))
            };
            let mut task = None;
            let (lead, _) = table
                .lead(k, Admission::new(), |id| {
                    let guard = FlightGuard::new(table.clone(), k, id);
                    task = Some(thread::spawn(move || {
                        guard.complete(&value(id), Some(TTL));
                    }));
                    resolved(id)
                })
                .unwrap();
            let Lead::Started(waiter) = lead else {
                panic!("the key was vacant")
            };
            observe(&table, 1, 1);
            task.unwrap().join().unwrap();
            observer.join().unwrap();
            assert_eq!(in_flight(&table), 0);
            assert_eq!(table.len(), 1);
            assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == waiter.id));
            table.check_consistency();
        });
    }

    /// 2. A flight completes while its key is invalidated: once invalidated, the key never
    ///    holds the flight's replay; nothing is counted twice.
    #[test]
    fn loom_completion_races_invalidation() {
        for (name, replay) in [
            ("loom_completion_races_invalidation (replay)", Some(TTL)),
            ("loom_completion_races_invalidation (no replay)", None),
        ] {
            model(name, move || {
                let table = table(8);
                let (k, group) = (key(1, 5), key(0xEE, 3));
                let Got::Led(waiter, guard) = request(&table, k, Admission::new().group(group))
                else {
                    panic!("the key was vacant")
                };
                let task = thread::spawn(move || guard.complete(&value(7), replay));
                let invalidator = {
                    let table = table.clone();
                    thread::spawn(move || {
                        // Without a replay, the completion may remove the entry first.
                        let removed = table.invalidate(&k);
                        assert!(removed || replay.is_none());
                        assert!(matches!(table.find(&k), Ok(Found::Vacant)));
                        observe(&table, 1, 1);
                        removed
                    })
                };
                let own = task.join().unwrap();
                let removed = invalidator.join().unwrap();
                // A flight that found its entry gone was removed by the invalidation (and
                // refuses its callers); one that completed first kept its entry.
                assert!(
                    own || removed,
                    "only an invalidation takes a flight's entry"
                );
                assert!(matches!(table.find(&k), Ok(Found::Vacant)));
                assert_empty(&table);
                drop(waiter);
            });
        }
    }

    /// 3. The task of an invalidated flight ends without completing (panic, hard cap) while
    ///    a new request leads the key: the old guard never removes the new flight.
    #[test]
    fn loom_dropped_guard_races_new_lead() {
        for (name, invalidate) in [
            ("loom_dropped_guard_races_new_lead (invalidated)", true),
            ("loom_dropped_guard_races_new_lead (not invalidated)", false),
        ] {
            model(name, move || {
                let table = table(8);
                let (k, group) = (key(1, 5), key(0xEE, 3));
                let admission = Admission::new().group(group);
                let Got::Led(old, old_guard) = request(&table, k, admission.clone()) else {
                    panic!("the key was vacant")
                };
                if invalidate {
                    assert!(table.invalidate(&k));
                }
                let task = thread::spawn(move || drop(old_guard));
                let newcomer = {
                    let table = table.clone();
                    thread::spawn(move || {
                        let got = request(&table, k, admission);
                        observe(&table, 2, 1);
                        got
                    })
                };
                task.join().unwrap();
                let new = match newcomer.join().unwrap() {
                    Got::Led(new, guard) => Some((new, guard)),
                    Got::Joined(waiter) if !invalidate => {
                        assert_eq!(waiter.id, old.id);
                        None
                    }
                    _ => panic!("the newcomer neither led nor joined the old flight"),
                };
                assert_eq!(in_flight(&table), u64::from(new.is_some()));
                table.check_consistency();
                match new {
                    Some((new, guard)) => {
                        assert_ne!(new.id, old.id);
                        // The old guard left the new flight alone.
                        assert!(matches!(table.find(&k), Ok(Found::Join(w)) if w.id == new.id));
                        assert_eq!(table.len(), 1);
                        guard.complete(&value(2), Some(TTL));
                        assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == 2));
                    }
                    None => assert!(matches!(table.find(&k), Ok(Found::Vacant))),
                }
                assert_eq!(in_flight(&table), 0);
                table.check_consistency();
            });
        }
    }

    /// 4. A group is invalidated while a request leads a new key into it and a member's
    ///    flight completes: no deadlock, and at quiescence the group counts count exactly
    ///    the grouped entries.
    #[test]
    fn loom_invalidate_group_races_lead_and_completion() {
        for (name, replay, same_shard) in [
            (
                "loom_invalidate_group_races_lead_and_completion (replay, one shard)",
                Some(TTL),
                true,
            ),
            (
                "loom_invalidate_group_races_lead_and_completion (no replay, one shard)",
                None,
                true,
            ),
            (
                "loom_invalidate_group_races_lead_and_completion (replay, two shards)",
                Some(TTL),
                false,
            ),
        ] {
            model(name, move || {
                let table = table(8);
                let group = key(0xEE, 3);
                let (a, b) = (key(1, 5), key(2, if same_shard { 5 } else { 6 }));
                let Got::Led(a_waiter, a_guard) = request(&table, a, Admission::new().group(group))
                else {
                    panic!("a was vacant")
                };
                let invalidator = {
                    let table = table.clone();
                    thread::spawn(move || table.invalidate_group(&group))
                };
                let newcomer = {
                    let table = table.clone();
                    thread::spawn(move || {
                        let got = request(&table, b, Admission::new().group(group));
                        observe(&table, 2, 2);
                        got
                    })
                };
                let task = thread::spawn(move || a_guard.complete(&value(1), replay));
                let removed = invalidator.join().unwrap();
                let Got::Led(_b_waiter, b_guard) = newcomer.join().unwrap() else {
                    panic!("b was vacant")
                };
                task.join().unwrap();
                // a was a member before the invalidation started: it is gone either way.
                assert!(matches!(table.find(&a), Ok(Found::Vacant)));
                let b_alive = matches!(table.find(&b), Ok(Found::Join(_)));
                let a_removed = removed
                    .checked_sub(usize::from(!b_alive))
                    .expect("b was removed by the invalidation, and counted");
                match replay {
                    Some(_) => assert_eq!(a_removed, 1, "a's replay was invalidated"),
                    None => assert!(a_removed <= 1),
                }
                assert_eq!(table.len(), usize::from(b_alive));
                assert_eq!(in_flight(&table), 1);
                table.check_consistency();
                drop(b_guard);
                assert_empty(&table);
                drop(a_waiter);
            });
        }
    }

    /// 4b. Leaders of keys in two shards race for the table's last place: exactly one
    ///     leads, the other is turned away, and `len` never exceeds `max_entries`.
    #[test]
    fn loom_leaders_race_for_the_last_place() {
        model("loom_leaders_race_for_the_last_place", || {
            let table = Arc::new(Table::new(Limits {
                ttl: TTL,
                max_entries: 1,
                max_waiters: 8,
                max_replays: None,
                max_per_group: u32::MAX,
            }));
            let leaders: Vec<_> = [key(1, 5), key(2, 6)]
                .into_iter()
                .map(|k| {
                    let table = table.clone();
                    thread::spawn(move || {
                        let got = request(&table, k, Admission::new());
                        observe(&table, 1, 1);
                        got
                    })
                })
                .collect();
            let mut got: Vec<_> = leaders.into_iter().map(|l| l.join().unwrap()).collect();
            got.sort_by_key(|got| matches!(got, Got::Refused(_)));
            let [Got::Led(..), Got::Refused(error)] = &got[..] else {
                panic!("not exactly one leader")
            };
            let limit = error.downcast_ref::<Overloaded>().map(Overloaded::limit);
            assert_eq!(limit, Some(Limit::Entries));
            assert_eq!(table.len(), 1);
            table.check_consistency();
        });
    }

    /// A joiner of `k`'s running flight: its place, or the limit that turned it away.
    fn join(table: &Table, k: &Fingerprint) -> Result<Waiter, Limit> {
        match table.find(k) {
            Ok(Found::Join(waiter)) => Ok(waiter),
            Err(error) => Err(error.downcast::<Overloaded>().unwrap().limit()),
            Ok(_) => panic!("the flight is running"),
        }
    }

    /// How many more callers `k`'s flight admits (counted by joining until turned away).
    fn places_left(table: &Table, k: &Fingerprint) -> usize {
        let mut held = Vec::new();
        loop {
            match join(table, k) {
                Ok(waiter) => held.push(waiter),
                Err(limit) => {
                    assert_eq!(limit, Limit::Waiters);
                    return held.len();
                }
            }
        }
    }

    /// 5. Two joiners race for the last waiter slot (the leader holds one of two): exactly
    ///    one is admitted; its slot is freed when it goes.
    #[test]
    fn loom_joiners_race_for_the_last_waiter_slot() {
        model("loom_joiners_race_for_the_last_waiter_slot", || {
            let table = table(2);
            let k = key(1, 5);
            let Got::Led(leader, guard) = request(&table, k, Admission::new()) else {
                panic!("the key was vacant")
            };
            let joiners: Vec<_> = (0..2)
                .map(|_| {
                    let table = table.clone();
                    thread::spawn(move || join(&table, &k))
                })
                .collect();
            let mut results: Vec<_> = joiners.into_iter().map(|j| j.join().unwrap()).collect();
            results.sort_by_key(|result| result.is_err());
            let [Ok(admitted), Err(Limit::Waiters)] = &results[..] else {
                panic!("not exactly one joiner admitted")
            };
            assert_eq!(admitted.id, leader.id);
            assert_eq!(places_left(&table, &k), 0);
            drop(results);
            // The admitted joiner's place is back.
            assert_eq!(places_left(&table, &k), 1);
            guard.complete(&value(5), Some(TTL));
            table.check_consistency();
        });
    }

    /// 5b. A joiner gives up (its wait timed out) while another arrives at the full flight:
    ///     the newcomer gets the freed place or is turned away, and no place is lost.
    #[test]
    fn loom_joiner_times_out_while_another_arrives() {
        model("loom_joiner_times_out_while_another_arrives", || {
            let table = table(2);
            let k = key(1, 5);
            let Got::Led(_leader, guard) = request(&table, k, Admission::new()) else {
                panic!("the key was vacant")
            };
            let first = join(&table, &k).expect("the second place is free");
            let timed_out = thread::spawn(move || drop(first));
            let newcomer = {
                let table = table.clone();
                thread::spawn(move || join(&table, &k))
            };
            timed_out.join().unwrap();
            let newcomer = newcomer.join().unwrap();
            let expected = usize::from(newcomer.is_err());
            assert_eq!(places_left(&table, &k), expected);
            drop(newcomer);
            assert_eq!(places_left(&table, &k), 1);
            drop(guard);
            table.check_consistency();
        });
    }
}

#[cfg(all(test, not(refresh_coalesce_loom)))]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    /// A table slot stays one cache line: memory per entry is a benchmark target
    /// (BENCHMARKS.md §6).
    #[test]
    fn a_table_slot_is_64_bytes() {
        assert_eq!(std::mem::size_of::<(Slot, Entry)>(), 64);
    }

    /// A shard refilled as its entries expire keeps its size: without `make_room` the
    /// tombstones of removed entries make the map double (1,792 -> 3,584 here).
    #[test]
    fn a_refilled_map_keeps_its_size() {
        let mut map: HashMap<u64, u64, KeyedFold> = HashMap::with_hasher(KeyedFold::random());
        for key in 0..1_500 {
            make_room(&mut map);
            map.insert(key, key);
        }
        let full = map.capacity();
        assert_eq!(full, 1_792);
        for round in 1..10u64 {
            for key in 0..1_500 {
                map.remove(&((round - 1) * 1_500 + key));
                make_room(&mut map);
                map.insert(round * 1_500 + key, key);
            }
        }
        assert_eq!(map.len(), 1_500);
        assert!(map.capacity() <= full, "{} > {full}", map.capacity());
    }

    /// A leader whose spawn panics (no runtime) leaves no entry and gives its place back.
    #[test]
    fn a_panicking_start_gives_its_place_back() {
        let table = Arc::new(Table::new(Limits {
            ttl: Duration::from_secs(60),
            max_entries: 1,
            max_waiters: 8,
            max_replays: None,
            max_per_group: u32::MAX,
        }));
        let key = Fingerprint::from("k");
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            table.lead(key, Admission::new(), |_| panic!("no runtime to spawn on"))
        }));
        assert!(panicked.is_err());
        assert_eq!(table.len(), 0);
        let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
            Box::pin(async { Ok(Arc::new(()) as Value) });
        let (lead, _) = table
            .lead(key, Admission::new(), |_| future.shared())
            .expect("the place was given back");
        assert!(matches!(lead, Lead::Started(_)));
        assert_eq!(table.len(), 1);
    }
}
