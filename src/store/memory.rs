//! [`MemoryStore`]: the coordination protocol in process memory, its reference.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    Completed, Election, Fence, Generations, Invalidation, Keep, Listener, Store, StoreFuture,
    Stored, Waited,
};
use crate::key::Fingerprint;

/// A [`Store`] in process memory: several layers in one process that share it behave like
/// instances sharing Redis. It is the protocol's reference, and what the conformance suite
/// checks Redis against: every method runs under one lock, so each is one atomic step.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    state: Mutex<MemoryState>,
    changed: Notify,
    listeners: Mutex<Vec<Listener>>,
}

/// A stored value, the seal and generations it was stored under, and when it expires.
struct Entry {
    stored: Stored,
    seal: [u8; 32],
    key_generation: u64,
    group_generation: u64,
    expires: Instant,
}

/// What a flight left for its followers: its outcome, or word that it was revoked.
enum Outcome {
    Value(Entry),
    Revoked { expires: Instant },
}

impl Outcome {
    fn expires(&self) -> Instant {
        match self {
            Outcome::Value(entry) => entry.expires,
            Outcome::Revoked { expires } => *expires,
        }
    }
}

/// A generation and when it expires.
type Generation = (u64, Instant);

#[derive(Default)]
struct MemoryState {
    locks: HashMap<Fingerprint, (Fence, Instant)>,
    results: HashMap<Fingerprint, Entry>,
    outcomes: HashMap<(Fingerprint, Fence), Outcome>,
    groups: HashMap<Fingerprint, Vec<Fingerprint>>,
    /// Keys remembered in a group before their election, and until when.
    remembered: HashMap<Fingerprint, Vec<(Fingerprint, Instant)>>,
    key_generations: HashMap<Fingerprint, Generation>,
    group_generations: HashMap<Fingerprint, Generation>,
}

/// What a read finds, as Redis's scripts return it.
enum Read {
    Live(Stored),
    Revoked,
    Nothing,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.expire(Instant::now());
        state
    }

    fn announce(&self, invalidation: Invalidation) {
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for listener in listeners {
            listener(&invalidation);
        }
    }
}

/// The generation in `generations` of `of`, 0 if none; an existing one is kept at least
/// `life` from `now`.
fn generation(
    generations: &mut HashMap<Fingerprint, Generation>,
    of: &Fingerprint,
    life: Duration,
    now: Instant,
) -> u64 {
    match generations.get_mut(of) {
        Some((generation, expires)) => {
            *expires = (*expires).max(now + life);
            *generation
        }
        None => 0,
    }
}

/// Bumps the generation of `of`, kept at least `life` from `now`.
fn bump(
    generations: &mut HashMap<Fingerprint, Generation>,
    of: &Fingerprint,
    life: Duration,
    now: Instant,
) {
    let (generation, expires) = generations.entry(*of).or_insert((0, now));
    *generation += 1;
    *expires = (*expires).max(now + life);
}

impl MemoryState {
    /// Removes what has expired.
    fn expire(&mut self, now: Instant) {
        self.locks.retain(|_, (_, expires)| *expires > now);
        self.results.retain(|_, entry| entry.expires > now);
        self.outcomes.retain(|_, outcome| outcome.expires() > now);
        self.key_generations
            .retain(|_, (_, expires)| *expires > now);
        self.group_generations
            .retain(|_, (_, expires)| *expires > now);
        let results = &self.results;
        self.groups.retain(|_, members| {
            members.retain(|key| results.contains_key(key));
            !members.is_empty()
        });
        self.remembered.retain(|_, members| {
            members.retain(|(_, expires)| *expires > now);
            !members.is_empty()
        });
    }

    fn key_generation(&self, key: &Fingerprint) -> u64 {
        self.key_generations.get(key).map_or(0, |(g, _)| *g)
    }

    fn group_generation(&self, group: &Fingerprint) -> u64 {
        self.group_generations.get(group).map_or(0, |(g, _)| *g)
    }

    /// An entry's value, if `seal` opens it (as a sealed value in Redis only opens with the
    /// same token's seal) and it was stored under the current generations of its key and,
    /// if given, of `group`.
    fn open(
        &self,
        key: &Fingerprint,
        entry: &Entry,
        seal: &[u8; 32],
        group: Option<&Fingerprint>,
        now: Instant,
    ) -> Read {
        if entry.expires <= now || entry.seal != *seal {
            return Read::Nothing;
        }
        let current = entry.key_generation == self.key_generation(key)
            && group.is_none_or(|group| entry.group_generation == self.group_generation(group));
        if !current {
            return Read::Revoked;
        }
        Read::Live(Stored {
            ttl: entry.expires - now,
            ..entry.stored.clone()
        })
    }

    fn release(&mut self, key: &Fingerprint, fence: &Fence) {
        if self
            .locks
            .get(key)
            .is_some_and(|(holder, _)| holder == fence)
        {
            self.locks.remove(key);
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryStore")
            .field("locks", &state.locks.len())
            .field("results", &state.results.len())
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
        group: Option<&'a Fingerprint>,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let now = Instant::now();
            let state = self.state();
            Ok(match state.results.get(key) {
                Some(entry) => match state.open(key, entry, seal, group, now) {
                    Read::Live(stored) => Some(stored),
                    Read::Revoked | Read::Nothing => None,
                },
                None => None,
            })
        })
    }

    fn group_generation<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.state();
            Ok(generation(&mut state.group_generations, group, life, now))
        })
    }

    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.state();
            let generation = generation(&mut state.key_generations, key, lease, now);
            let replay = state
                .results
                .get(key)
                .is_some_and(|entry| entry.expires > now);
            match state.locks.get(key) {
                Some((leader, _)) if leader == fence => Ok(Election::Won { generation }),
                _ if replay => Ok(Election::Replay),
                Some((leader, _)) => Ok(Election::Lost {
                    leader: leader.clone(),
                    generation,
                }),
                None => {
                    state.locks.insert(*key, (fence.clone(), now + lease));
                    Ok(Election::Won { generation })
                }
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
        started: &'a Generations,
    ) -> StoreFuture<'a, Completed> {
        Box::pin(async move {
            let now = Instant::now();
            let completed = {
                let mut state = self.state();
                let group = started.group_key();
                let revoked = state.key_generation(key) != started.key
                    || started
                        .group
                        .is_some_and(|(group, g)| state.group_generation(&group) != g);
                let (ttl, replay) = match keep {
                    Keep::Replay { ttl } => (ttl, true),
                    Keep::Flight { ttl } => (ttl, false),
                };
                let entry = Entry {
                    stored: Stored { value, ttl, replay },
                    seal: *seal,
                    key_generation: started.key,
                    group_generation: started.group.map_or(0, |(_, g)| g),
                    expires: now + ttl,
                };
                if revoked {
                    state.outcomes.insert(
                        (*key, fence.clone()),
                        Outcome::Revoked { expires: now + ttl },
                    );
                    state.release(key, fence);
                    Completed::Revoked
                } else if replay {
                    match state.results.get(key) {
                        Some(existing) => match state.open(key, existing, seal, group, now) {
                            Read::Live(stored) => Completed::Existing(stored),
                            Read::Revoked => Completed::Revoked,
                            // Another token's replay (a key collision): this flight's
                            // callers keep their own result, as nothing opens it.
                            Read::Nothing => Completed::Stored,
                        },
                        None => {
                            state.results.insert(*key, entry);
                            // The replay outlives neither generation it is bound to.
                            generation(&mut state.key_generations, key, ttl, now);
                            if let Some(group) = group {
                                generation(&mut state.group_generations, group, ttl, now);
                                state.groups.entry(*group).or_default().push(*key);
                            }
                            Completed::Stored
                        }
                    }
                } else {
                    state
                        .outcomes
                        .insert((*key, fence.clone()), Outcome::Value(entry));
                    state.release(key, fence);
                    Completed::Stored
                }
            };
            self.inner.changed.notify_waiters();
            Ok(completed)
        })
    }

    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.state().release(key, fence);
            Ok(())
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        started: &'a Generations,
        deadline: Instant,
    ) -> StoreFuture<'a, Waited> {
        Box::pin(async move {
            loop {
                // Register for the wake-up before reading, so a completion between the read
                // and the wait is not lost.
                let changed = self.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let now = Instant::now();
                    let state = self.state();
                    if state.key_generation(key) != started.key {
                        return Ok(Waited::Revoked);
                    }
                    let group = started.group_key();
                    let read = match state.results.get(key) {
                        Some(entry) => state.open(key, entry, seal, group, now),
                        None => Read::Nothing,
                    };
                    let read = match read {
                        Read::Nothing => match state.outcomes.get(&(*key, leader.clone())) {
                            Some(Outcome::Value(entry)) => state.open(key, entry, seal, group, now),
                            Some(Outcome::Revoked { .. }) => Read::Revoked,
                            None => Read::Nothing,
                        },
                        read => read,
                    };
                    match read {
                        Read::Live(stored) => return Ok(Waited::Arrived(stored)),
                        Read::Revoked => return Ok(Waited::Revoked),
                        Read::Nothing => {}
                    }
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return Ok(Waited::Elapsed);
                }
            }
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Fingerprint, life: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut state = self.state();
                bump(&mut state.key_generations, key, life, Instant::now());
                state.results.remove(key);
            }
            // Followers of a flight of this key learn at once that it was revoked.
            self.inner.changed.notify_waiters();
            self.announce(Invalidation::Key(*key));
            Ok(())
        })
    }

    fn invalidate_group<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            {
                let now = Instant::now();
                let mut state = self.state();
                bump(&mut state.group_generations, group, life, now);
                let remembered = state.remembered.remove(group).unwrap_or_default();
                let members = state.groups.remove(group).unwrap_or_default();
                // Each member as `invalidate` does: a flight of a remembered key that runs
                // now can no longer store its result.
                for key in members
                    .into_iter()
                    .chain(remembered.into_iter().map(|(key, _)| key))
                {
                    bump(&mut state.key_generations, &key, life, now);
                    state.results.remove(&key);
                }
            }
            self.inner.changed.notify_waiters();
            self.announce(Invalidation::Group(*group));
            Ok(())
        })
    }

    fn remember<'a>(
        &'a self,
        group: &'a Fingerprint,
        key: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let expires = Instant::now() + life;
            let mut state = self.state();
            let members = state.remembered.entry(*group).or_default();
            match members.iter_mut().find(|(member, _)| member == key) {
                Some((_, until)) => *until = (*until).max(expires),
                None => members.push((*key, expires)),
            }
            Ok(())
        })
    }

    fn listen(&self, listener: Listener) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }
}
