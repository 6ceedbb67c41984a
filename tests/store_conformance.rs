//! One conformance suite for every [`Store`] backend: the in-process `MemoryStore` and, with
//! the `redis` feature, `RedisStore` on a `redis-server` of the test's own.
//!
//! Each case is an `async fn` taking a [`Backend`]: several independent store handles that
//! share one backend (clones of one `MemoryStore`; separate `RedisStore`s, each with its own
//! connections, on one server), as the instances of a deployment would. The `conformance!`
//! macro stamps out one `#[tokio::test]` per case and backend: `in_memory::<case>` and
//! `on_redis::<case>`.
//!
//! Redis does not work under tokio's paused clock, so the suite runs on real time with short
//! leases and TTLs; a real wait appears only where a TTL or lease has to pass.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

#[cfg(feature = "redis")]
use support::redis as redis_server;
use support::until;
use tokio::time::{Instant, timeout};
use tower_refresh_coalesce::{
    Fingerprint,
    store::{
        Completed, Election, Fence, Generations, Invalidation, Keep, Listener, MemoryStore, Store,
        Stored, Waited,
    },
};

/// How many handles each backend gives a case.
const HANDLES: usize = 3;
/// A lease long enough for any case that does not wait for it to pass.
const LEASE: Duration = Duration::from_secs(2);
/// A replay TTL long enough for any case that does not wait for it to pass.
const TTL: Duration = Duration::from_secs(2);
/// How long an invalidation keeps a generation in these cases.
const LIFE: Duration = Duration::from_secs(10);
/// The generations of a key never invalidated, without a group.
const FRESH: Generations = Generations {
    key: 0,
    group: None,
};
/// The token seal of most cases, and another token's.
const SEAL: [u8; 32] = [1; 32];
const OTHER_SEAL: [u8; 32] = [2; 32];
/// The Redis stores' poll interval: long, so that a quick wake-up can only come from
/// pub/sub.
#[cfg(feature = "redis")]
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A bound on anything the suite waits for with `until`, so that a broken backend fails
/// the case instead of hanging it.
const SETTLE: Duration = Duration::from_secs(5);

/// Several handles on one backend, and what each handle's listener received.
struct Backend {
    name: &'static str,
    stores: Vec<Arc<dyn Store>>,
    heard: Vec<Arc<Mutex<Vec<Invalidation>>>>,
    #[cfg(feature = "redis")]
    redis: Option<OnRedis>,
}

#[cfg(feature = "redis")]
struct OnRedis {
    server: redis_server::RedisServer,
    stores: Vec<tower_refresh_coalesce::store::RedisStore>,
}

impl Backend {
    fn new(name: &'static str, stores: Vec<Arc<dyn Store>>) -> Self {
        let heard: Vec<Arc<Mutex<Vec<Invalidation>>>> = stores
            .iter()
            .map(|store| {
                let heard = Arc::new(Mutex::new(Vec::new()));
                let sink = heard.clone();
                let listener: Listener = Arc::new(move |invalidation: &Invalidation| {
                    sink.lock().unwrap().push(invalidation.clone());
                });
                store.listen(listener);
                heard
            })
            .collect();
        Self {
            name,
            stores,
            heard,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    fn store(&self, i: usize) -> &dyn Store {
        &*self.stores[i]
    }

    /// What each handle's listener has received so far.
    fn heard(&self) -> Vec<Vec<Invalidation>> {
        self.heard
            .iter()
            .map(|heard| heard.lock().unwrap().clone())
            .collect()
    }

    /// Waits until every handle can receive what the others announce (Redis: its pub/sub
    /// connection is subscribed).
    async fn settle(&self) {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            let subscribed = until(|| redis.stores.iter().all(|store| store.is_subscribed()));
            timeout(SETTLE, subscribed)
                .await
                .expect("every RedisStore subscribes within 5 s");
        }
    }

    /// How many times the backend has been read so far (Redis: script calls), so that a case
    /// can tell when a spawned `wait` has made its first read.
    async fn reads(&self) -> u64 {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            let stats = redis.server.command_stats().await;
            return ["evalsha", "eval"]
                .iter()
                .filter_map(|name| stats.get(*name))
                .sum();
        }
        0
    }

    /// Returns once a `wait` spawned after `reads()` returned `before` has read the store once
    /// and is waiting for a wake-up.
    async fn wait_started(&self, before: u64) {
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            let deadline = std::time::Instant::now() + SETTLE;
            while self.reads().await <= before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the spawned wait never read the store"
                );
            }
            return;
        }
        let _ = before;
        // The in-memory wait registers and reads on its first poll, which the spawned task
        // gets as soon as this (current-thread) test task yields.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }
}

fn memory() -> Backend {
    let store = MemoryStore::new();
    let stores = (0..HANDLES)
        .map(|_| Arc::new(store.clone()) as Arc<dyn Store>)
        .collect();
    Backend::new("memory", stores)
}

#[cfg(feature = "redis")]
fn redis() -> Backend {
    use tower_refresh_coalesce::store::RedisStore;
    let server = redis_server::RedisServer::start();
    let redis_stores: Vec<RedisStore> = (0..HANDLES)
        .map(|_| {
            RedisStore::builder(server.client(), b"conformance deployment secret, 32")
                .poll_interval(POLL_INTERVAL)
                .build()
                .expect("a RedisStore builds without waiting for Redis")
        })
        .collect();
    let stores = redis_stores
        .iter()
        .map(|store| Arc::new(store.clone()) as Arc<dyn Store>)
        .collect();
    let mut backend = Backend::new("redis", stores);
    backend.redis = Some(OnRedis {
        server,
        stores: redis_stores,
    });
    backend
}

fn key(name: &str) -> Fingerprint {
    Fingerprint::from(name)
}

fn replay(ttl: Duration) -> Keep {
    Keep::Replay { ttl }
}

/// The generations of a flight of a key never invalidated, in `group` never invalidated.
fn in_group(group: &Fingerprint) -> Generations {
    Generations::key(0).in_group(*group, 0)
}

/// What a wait received, `None` if nothing arrived.
#[track_caller]
fn arrived(waited: Waited) -> Option<Stored> {
    match waited {
        Waited::Arrived(stored) => Some(stored),
        Waited::Elapsed => None,
        other => panic!("expected a result or nothing, got {other:?}"),
    }
}

/// What a completion stored under another's replay, `None` if its own was stored.
#[track_caller]
fn existing(completed: Completed) -> Option<Stored> {
    match completed {
        Completed::Stored => None,
        Completed::Existing(stored) => Some(stored),
        other => panic!("expected a stored result, got {other:?}"),
    }
}

/// Asserts that `stored` is `value`, a replay or not, living at most `ttl` (and still alive).
#[track_caller]
fn assert_stored(stored: Option<Stored>, value: &[u8], replay: bool, ttl: Duration) {
    let stored = stored.expect("a stored value");
    assert_eq!(stored.value, value);
    assert_eq!(stored.replay, replay);
    assert!(
        !stored.ttl.is_zero() && stored.ttl <= ttl,
        "ttl {:?} should be in (0, {ttl:?}]",
        stored.ttl
    );
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

async fn loading_a_key_nothing_was_stored_for_finds_nothing(b: Backend) {
    let found = b.store(0).load(&key("empty"), &SEAL, None).await.unwrap();
    assert_eq!(found, None, "{}", b.name);
}

async fn the_first_election_wins_and_the_second_loses_naming_the_first_fence(b: Backend) {
    let k = key("elect");
    let (first, second) = (Fence::random(), Fence::random());

    let won = b.store(0).elect(&k, &first, LEASE).await.unwrap();
    let lost = b.store(1).elect(&k, &second, LEASE).await.unwrap();
    let lost_again = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();

    assert_eq!(won, Election::Won { generation: 0 }, "{}", b.name);
    assert_eq!(
        lost,
        Election::Lost {
            leader: first.clone(),
            generation: 0
        },
        "{}",
        b.name
    );
    assert_eq!(
        lost_again,
        Election::Lost {
            leader: first,
            generation: 0
        },
        "{}",
        b.name
    );
}

async fn electing_again_with_the_winning_fence_reports_a_win(b: Backend) {
    // A retry after an answer was lost on the way back must not turn the winner into a
    // follower of itself.
    let k = key("elect-again");
    let fence = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &fence, LEASE).await.unwrap(),
        Election::Won { generation: 0 },
        "{}",
        b.name
    );
    assert_eq!(
        b.store(1).elect(&k, &fence, LEASE).await.unwrap(),
        Election::Won { generation: 0 },
        "{}",
        b.name
    );
    let other = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(
        other,
        Election::Lost {
            leader: fence,
            generation: 0
        },
        "{}",
        b.name
    );
}

async fn a_release_by_a_foreign_fence_keeps_the_lock_and_the_owners_frees_it(b: Backend) {
    let k = key("release");
    let (owner, foreign) = (Fence::random(), Fence::random());
    assert_eq!(
        b.store(0).elect(&k, &owner, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );

    b.store(1).release(&k, &foreign).await.unwrap();
    let after_foreign = b.store(1).elect(&k, &foreign, LEASE).await.unwrap();
    b.store(2).release(&k, &owner).await.unwrap();
    let after_owner = b.store(1).elect(&k, &foreign, LEASE).await.unwrap();

    assert_eq!(
        after_foreign,
        Election::Lost {
            leader: owner,
            generation: 0
        },
        "{}",
        b.name
    );
    assert_eq!(after_owner, Election::Won { generation: 0 }, "{}", b.name);
}

async fn an_expired_lease_lets_another_fence_win(b: Backend) {
    let k = key("lease");
    let lease = Duration::from_millis(300);
    assert_eq!(
        b.store(0).elect(&k, &Fence::random(), lease).await.unwrap(),
        Election::Won { generation: 0 }
    );

    // A real wait: the lease has to pass.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;

    let next = b.store(1).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(next, Election::Won { generation: 0 }, "{}", b.name);
}

async fn a_stored_replay_is_loaded_with_its_ttl_only_under_the_same_seal(b: Backend) {
    let k = key("replay");
    let fence = Fence::random();

    let stored = b
        .store(0)
        .complete(&k, &fence, &SEAL, b"pair-1".to_vec(), replay(TTL), &FRESH)
        .await
        .unwrap();
    let loaded = b.store(1).load(&k, &SEAL, None).await.unwrap();
    let other_seal = b.store(2).load(&k, &OTHER_SEAL, None).await.unwrap();
    let other_key = b
        .store(2)
        .load(&key("not-stored"), &SEAL, None)
        .await
        .unwrap();

    assert_eq!(
        stored,
        Completed::Stored,
        "{}: the first result is stored",
        b.name
    );
    assert_stored(loaded, b"pair-1", true, TTL);
    assert_eq!(other_seal, None, "{}: another token's seal", b.name);
    assert_eq!(other_key, None, "{}: another key", b.name);
}

async fn a_late_leader_completing_a_second_replay_gets_the_first_value(b: Backend) {
    let k = key("late");

    let first = b
        .store(0)
        .complete(
            &k,
            &Fence::random(),
            &SEAL,
            b"first".to_vec(),
            replay(TTL),
            &FRESH,
        )
        .await
        .unwrap();
    let second = b
        .store(1)
        .complete(
            &k,
            &Fence::random(),
            &SEAL,
            b"second".to_vec(),
            replay(TTL),
            &FRESH,
        )
        .await
        .unwrap();
    let loaded = b.store(2).load(&k, &SEAL, None).await.unwrap();

    assert_eq!(first, Completed::Stored, "{}", b.name);
    assert_stored(existing(second), b"first", true, TTL);
    assert_stored(loaded, b"first", true, TTL);
}

async fn a_wait_returns_the_replay_as_soon_as_the_leader_completes_later(b: Backend) {
    b.settle().await;
    let k = key("wait-replay");
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );

    let before = b.reads().await;
    let waiter = {
        let store = b.stores[1].clone();
        let leader = leader.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            let stored = store.wait(&k, &leader, &SEAL, &FRESH, deadline).await;
            (stored, Instant::now())
        })
    };
    b.wait_started(before).await;
    let completed_at = Instant::now();
    let late = b
        .store(0)
        .complete(&k, &leader, &SEAL, b"pair".to_vec(), replay(TTL), &FRESH)
        .await
        .unwrap();
    let (stored, woken_at) = waiter.await.unwrap();

    assert_eq!(late, Completed::Stored, "{}", b.name);
    assert_stored(arrived(stored.unwrap()), b"pair", true, TTL);
    let after = woken_at - completed_at;
    assert!(
        after < Duration::from_millis(200),
        "{}: the waiter took {after:?} after the completion: it should be woken, not poll",
        b.name
    );
}

async fn a_wait_returns_the_flight_outcome_of_its_fence_which_is_no_replay(b: Backend) {
    let k = key("wait-flight");
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    let keep = Keep::Flight { ttl: TTL };

    let stored = b
        .store(0)
        .complete(
            &k,
            &leader,
            &SEAL,
            b"503 for this flight".to_vec(),
            keep,
            &FRESH,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let waited = b
        .store(1)
        .wait(&k, &leader, &SEAL, &FRESH, deadline)
        .await
        .unwrap();
    let loaded = b.store(2).load(&k, &SEAL, None).await.unwrap();

    assert_eq!(stored, Completed::Stored, "{}", b.name);
    assert_stored(arrived(waited), b"503 for this flight", false, TTL);
    assert_eq!(
        loaded, None,
        "{}: a flight outcome is never a replay",
        b.name
    );
}

async fn a_flight_outcome_releases_the_lock_so_the_next_request_leads(b: Backend) {
    // A flight's outcome (an error, a refusal) is for that flight's waiters only: a request
    // after it must lead anew, not follow the ended flight and receive its outcome.
    let k = key("flight-release");
    let (leader, foreign) = (Fence::random(), Fence::random());
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    // A foreign fence's outcome does not release the leader's lock.
    b.store(1)
        .complete(
            &k,
            &foreign,
            &SEAL,
            b"x".to_vec(),
            Keep::Flight { ttl: TTL },
            &FRESH,
        )
        .await
        .unwrap();
    let during = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();
    b.store(0)
        .complete(
            &k,
            &leader,
            &SEAL,
            b"401".to_vec(),
            Keep::Flight { ttl: TTL },
            &FRESH,
        )
        .await
        .unwrap();
    let after = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();

    assert_eq!(
        during,
        Election::Lost {
            leader,
            generation: 0
        },
        "{}",
        b.name
    );
    assert_eq!(after, Election::Won { generation: 0 }, "{}", b.name);
}

async fn a_wait_for_an_unknown_fence_returns_nothing_at_its_deadline(b: Backend) {
    let k = key("wait-unknown");
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    b.store(0)
        .complete(
            &k,
            &leader,
            &SEAL,
            b"outcome".to_vec(),
            Keep::Flight { ttl: TTL },
            &FRESH,
        )
        .await
        .unwrap();

    let started = Instant::now();
    let deadline = started + Duration::from_millis(400);
    let waited = b
        .store(1)
        .wait(&k, &Fence::random(), &SEAL, &FRESH, deadline)
        .await
        .unwrap();
    let took = started.elapsed();

    assert_eq!(
        waited,
        Waited::Elapsed,
        "{}: another flight's outcome is not ours",
        b.name
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(600),
        "{}: returned after {took:?}, not at the 400 ms deadline",
        b.name
    );
}

async fn invalidating_a_key_removes_its_replay_and_tells_every_handle(b: Backend) {
    b.settle().await;
    let (k, kept) = (key("invalidated"), key("kept"));
    for k in [k, kept] {
        b.store(0)
            .complete(
                &k,
                &Fence::random(),
                &SEAL,
                b"pair".to_vec(),
                replay(TTL),
                &FRESH,
            )
            .await
            .unwrap();
    }

    b.store(1).invalidate(&k, LIFE).await.unwrap();

    let heard_by_all = until(|| b.heard().iter().all(|heard| !heard.is_empty()));
    timeout(SETTLE, heard_by_all)
        .await
        .unwrap_or_else(|_| panic!("{}: listeners heard {:?}", b.name, b.heard()));
    assert_eq!(
        b.heard(),
        vec![vec![Invalidation::Key(k)]; HANDLES],
        "{}",
        b.name
    );
    for i in 0..HANDLES {
        assert_eq!(
            b.store(i).load(&k, &SEAL, None).await.unwrap(),
            None,
            "{}",
            b.name
        );
        assert_stored(
            b.store(i).load(&kept, &SEAL, None).await.unwrap(),
            b"pair",
            true,
            TTL,
        );
    }
}

async fn invalidating_a_group_removes_that_groups_replays_only_and_tells_every_handle(b: Backend) {
    b.settle().await;
    let (alice, bob) = (key("group alice"), key("group bob"));
    let alices = [key("alice 1"), key("alice 2")];
    let bobs = key("bob 1");
    let loner = key("no group");
    for k in alices {
        b.store(0)
            .complete(
                &k,
                &Fence::random(),
                &SEAL,
                b"alice".to_vec(),
                replay(TTL),
                &in_group(&alice),
            )
            .await
            .unwrap();
    }
    b.store(1)
        .complete(
            &bobs,
            &Fence::random(),
            &SEAL,
            b"bob".to_vec(),
            replay(TTL),
            &in_group(&bob),
        )
        .await
        .unwrap();
    b.store(2)
        .complete(
            &loner,
            &Fence::random(),
            &SEAL,
            b"loner".to_vec(),
            replay(TTL),
            &FRESH,
        )
        .await
        .unwrap();

    b.store(2).invalidate_group(&alice, LIFE).await.unwrap();

    let heard_by_all = until(|| b.heard().iter().all(|heard| !heard.is_empty()));
    timeout(SETTLE, heard_by_all)
        .await
        .unwrap_or_else(|_| panic!("{}: listeners heard {:?}", b.name, b.heard()));
    assert_eq!(
        b.heard(),
        vec![vec![Invalidation::Group(alice)]; HANDLES],
        "{}",
        b.name
    );
    for i in 0..HANDLES {
        for k in alices {
            assert_eq!(
                b.store(i).load(&k, &SEAL, None).await.unwrap(),
                None,
                "{}",
                b.name
            );
        }
        assert_stored(
            b.store(i).load(&bobs, &SEAL, None).await.unwrap(),
            b"bob",
            true,
            TTL,
        );
        assert_stored(
            b.store(i).load(&loner, &SEAL, None).await.unwrap(),
            b"loner",
            true,
            TTL,
        );
    }
}

async fn a_replay_expires_after_its_ttl(b: Backend) {
    let k = key("expires");
    let ttl = Duration::from_millis(300);
    b.store(0)
        .complete(
            &k,
            &Fence::random(),
            &SEAL,
            b"pair".to_vec(),
            replay(ttl),
            &FRESH,
        )
        .await
        .unwrap();
    assert_stored(
        b.store(1).load(&k, &SEAL, None).await.unwrap(),
        b"pair",
        true,
        ttl,
    );

    // A real wait: the TTL has to pass.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    assert_eq!(
        b.store(1).load(&k, &SEAL, None).await.unwrap(),
        None,
        "{}",
        b.name
    );
    let deadline = Instant::now() + Duration::from_millis(100);
    let waited = b
        .store(2)
        .wait(&k, &Fence::random(), &SEAL, &FRESH, deadline)
        .await;
    assert_eq!(waited.unwrap(), Waited::Elapsed, "{}", b.name);
}

async fn a_completion_after_its_key_was_invalidated_stores_nothing_and_its_follower_is_told(
    b: Backend,
) {
    b.settle().await;
    let k = key("revoked flight");
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    let lost = b.store(1).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(
        lost,
        Election::Lost {
            leader: leader.clone(),
            generation: 0
        },
        "{}",
        b.name
    );

    let before = b.reads().await;
    let follower = {
        let store = b.stores[1].clone();
        let leader = leader.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            store
                .wait(&k, &leader, &SEAL, &Generations::key(0), deadline)
                .await
        })
    };
    b.wait_started(before).await;
    b.store(2).invalidate(&k, LIFE).await.unwrap();
    let waited = timeout(SETTLE, follower)
        .await
        .expect("the follower is told");
    let completed = b
        .store(0)
        .complete(
            &k,
            &leader,
            &SEAL,
            b"pair".to_vec(),
            replay(TTL),
            &Generations::key(0),
        )
        .await
        .unwrap();

    assert_eq!(waited.unwrap().unwrap(), Waited::Revoked, "{}", b.name);
    assert_eq!(completed, Completed::Revoked, "{}", b.name);
    assert_eq!(
        b.store(1).load(&k, &SEAL, None).await.unwrap(),
        None,
        "{}",
        b.name
    );
    // The revoked completion released the lock: the next request leads, under the new
    // generation.
    let next = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(next, Election::Won { generation: 1 }, "{}", b.name);
}

async fn a_follower_elected_after_the_invalidation_learns_that_its_leader_was_revoked(b: Backend) {
    let k = key("revoked leader");
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    b.store(2).invalidate(&k, LIFE).await.unwrap();
    let lost = b.store(1).elect(&k, &Fence::random(), LEASE).await.unwrap();
    let completed = b
        .store(0)
        .complete(
            &k,
            &leader,
            &SEAL,
            b"401".to_vec(),
            Keep::Flight { ttl: TTL },
            &Generations::key(0),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let waited = b
        .store(1)
        .wait(&k, &leader, &SEAL, &Generations::key(1), deadline)
        .await
        .unwrap();

    assert_eq!(
        lost,
        Election::Lost {
            leader: leader.clone(),
            generation: 1
        },
        "{}",
        b.name
    );
    assert_eq!(completed, Completed::Revoked, "{}", b.name);
    assert_eq!(waited, Waited::Revoked, "{}", b.name);
}

async fn a_group_invalidated_during_a_flight_makes_its_completion_revoked(b: Backend) {
    let (k, group) = (key("alice's device"), key("group alice, revoked"));
    let generation = b.store(0).group_generation(&group, LIFE).await.unwrap();
    let leader = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    let started = Generations::key(0).in_group(group, generation);

    b.store(1).invalidate_group(&group, LIFE).await.unwrap();
    let completed = b
        .store(0)
        .complete(&k, &leader, &SEAL, b"pair".to_vec(), replay(TTL), &started)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let waited = b
        .store(2)
        .wait(&k, &leader, &SEAL, &started, deadline)
        .await
        .unwrap();

    assert_eq!(generation, 0, "{}", b.name);
    assert_eq!(completed, Completed::Revoked, "{}", b.name);
    assert_eq!(waited, Waited::Revoked, "{}", b.name);
    for i in 0..HANDLES {
        let loaded = b.store(i).load(&k, &SEAL, Some(&group)).await.unwrap();
        assert_eq!(loaded, None, "{}", b.name);
    }
    assert_eq!(
        b.store(1).group_generation(&group, LIFE).await.unwrap(),
        1,
        "{}",
        b.name
    );
    let next = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(
        next,
        Election::Won { generation: 0 },
        "{}: the lock is free",
        b.name
    );
}

async fn a_value_stored_under_an_old_group_generation_neither_loads_nor_arrives(b: Backend) {
    // Stored while its group was at generation 0 (without being its member, so that the
    // group's invalidation cannot delete it): once the group moves on, the value is refused.
    let (k, group) = (key("old generation"), key("group moved on"));
    let leader = Fence::random();
    b.store(0).elect(&k, &leader, LEASE).await.unwrap();
    b.store(0)
        .complete(&k, &leader, &SEAL, b"pair".to_vec(), replay(TTL), &FRESH)
        .await
        .unwrap();
    assert_stored(
        b.store(1).load(&k, &SEAL, Some(&group)).await.unwrap(),
        b"pair",
        true,
        TTL,
    );

    b.store(2).invalidate_group(&group, LIFE).await.unwrap();

    let loaded = b.store(1).load(&k, &SEAL, Some(&group)).await.unwrap();
    let started = Generations::key(0).in_group(group, 1);
    let deadline = Instant::now() + Duration::from_secs(2);
    let waited = b
        .store(2)
        .wait(&k, &leader, &SEAL, &started, deadline)
        .await
        .unwrap();
    assert_eq!(loaded, None, "{}", b.name);
    assert_eq!(waited, Waited::Revoked, "{}", b.name);
    assert_stored(
        b.store(1).load(&k, &SEAL, None).await.unwrap(),
        b"pair",
        true,
        TTL,
    );
}

/// Stamps out one `#[tokio::test]` per case for each backend.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::memory()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod on_redis {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::redis()).await;
                }
            )*
        }
    };
}

conformance!(
    loading_a_key_nothing_was_stored_for_finds_nothing,
    the_first_election_wins_and_the_second_loses_naming_the_first_fence,
    electing_again_with_the_winning_fence_reports_a_win,
    a_release_by_a_foreign_fence_keeps_the_lock_and_the_owners_frees_it,
    an_expired_lease_lets_another_fence_win,
    a_stored_replay_is_loaded_with_its_ttl_only_under_the_same_seal,
    a_late_leader_completing_a_second_replay_gets_the_first_value,
    a_wait_returns_the_replay_as_soon_as_the_leader_completes_later,
    a_wait_returns_the_flight_outcome_of_its_fence_which_is_no_replay,
    a_flight_outcome_releases_the_lock_so_the_next_request_leads,
    a_wait_for_an_unknown_fence_returns_nothing_at_its_deadline,
    invalidating_a_key_removes_its_replay_and_tells_every_handle,
    invalidating_a_group_removes_that_groups_replays_only_and_tells_every_handle,
    a_replay_expires_after_its_ttl,
    a_completion_after_its_key_was_invalidated_stores_nothing_and_its_follower_is_told,
    a_follower_elected_after_the_invalidation_learns_that_its_leader_was_revoked,
    a_group_invalidated_during_a_flight_makes_its_completion_revoked,
    a_value_stored_under_an_old_group_generation_neither_loads_nor_arrives,
);

// ---------------------------------------------------------------------------------------
// Redis only: what a dump of the server reveals
// ---------------------------------------------------------------------------------------

#[cfg(feature = "redis")]
mod redis_only {
    use super::*;

    /// The plaintext of the values the case stores: a recognisable token pair.
    const PLAINTEXT: &[u8] = b"{\"refresh_token\":\"plain-refresh-token-0123456789\"}";

    /// Stores one of everything: a lock, a replay in a group, a flight outcome.
    async fn store_one_of_everything(b: &Backend) -> (Fingerprint, Fingerprint, Fence) {
        let (k, group) = (key("dumped"), key("dumped group"));
        let leader = Fence::random();
        assert_eq!(
            b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
            Election::Won { generation: 0 }
        );
        b.store(0)
            .complete(
                &k,
                &leader,
                &SEAL,
                PLAINTEXT.to_vec(),
                replay(TTL),
                &in_group(&group),
            )
            .await
            .unwrap();
        b.store(0)
            .complete(
                &k,
                &leader,
                &SEAL,
                PLAINTEXT.to_vec(),
                Keep::Flight { ttl: TTL },
                &FRESH,
            )
            .await
            .unwrap();
        // Completing with a flight outcome released the lock; take it again for the dump.
        assert_eq!(
            b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
            Election::Won { generation: 0 }
        );
        (k, group, leader)
    }

    fn dump_of(b: &Backend) -> &redis_server::RedisServer {
        &b.redis.as_ref().expect("a redis backend").server
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    }

    #[tokio::test]
    async fn the_first_command_after_redis_restarts_succeeds() {
        let mut b = redis();
        let k = key("restart");
        assert_eq!(b.store(0).load(&k, &SEAL, None).await.unwrap(), None);

        b.redis.as_mut().unwrap().server.kill();
        let gone = until(|| !b.redis.as_ref().unwrap().stores[0].is_subscribed());
        timeout(SETTLE, gone).await.expect("the subscriber notices");
        assert!(
            b.store(0).load(&k, &SEAL, None).await.is_err(),
            "Redis is down"
        );
        // A real wait: the outage lasts a second, longer than the connection's own attempts to
        // reconnect after that failure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.redis.as_mut().unwrap().server.restart();
        // Redis answers this process again: the store's subscriber is back.
        b.settle().await;

        let after = b.store(0).load(&k, &SEAL, None).await;
        assert!(after.is_ok(), "{after:?}");
    }

    #[tokio::test]
    async fn values_in_redis_never_contain_the_plaintext() {
        let b = redis();
        store_one_of_everything(&b).await;

        let dump = dump_of(&b).dump().await;

        assert_eq!(dump.len(), 4, "lock, replay, members, outcome: {dump:?}");
        for (name, _, value) in &dump {
            let name = String::from_utf8_lossy(name);
            for needle in [PLAINTEXT, &b"plain-refresh-token"[..], b"refresh_token"] {
                assert!(!contains(value, needle), "{name} holds plaintext");
            }
        }
    }

    #[tokio::test]
    async fn every_key_in_redis_has_a_ttl() {
        let b = redis();
        store_one_of_everything(&b).await;

        let dump = dump_of(&b).dump().await;

        assert_eq!(dump.len(), 4, "{dump:?}");
        for (name, pttl, _) in &dump {
            assert!(
                *pttl > 0 && *pttl <= LEASE.max(TTL).as_millis() as i64,
                "{} has PTTL {pttl}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[tokio::test]
    async fn key_names_hold_only_the_prefix_the_braced_hex_fingerprint_and_fixed_suffixes() {
        let b = redis();
        let (k, group, leader) = store_one_of_everything(&b).await;

        let dump = dump_of(&b).dump().await;
        let names: Vec<String> = dump
            .iter()
            .map(|(name, _, _)| String::from_utf8(name.clone()).expect("ascii key names"))
            .collect();

        let (k, group) = (k.to_hex(), group.to_hex());
        let mut expected = vec![
            format!("rc:{{{k}}}:lock"),
            format!("rc:{{{k}}}:res"),
            format!("rc:{{{k}}}:out:{}", leader.as_str()),
            format!("rc:{{{group}}}:members"),
        ];
        expected.sort();
        assert_eq!(names, expected);
        for name in &names {
            let rest = name.strip_prefix("rc:{").expect("the prefix");
            let (hex, suffix) = rest.split_once("}:").expect("a braced hash tag");
            assert_eq!(hex.len(), 64, "{name}");
            assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            let fixed = ["lock", "res", "members", "gen"].contains(&suffix)
                || suffix
                    .strip_prefix("out:")
                    .is_some_and(|fence| fence.bytes().all(|c| c.is_ascii_hexdigit()));
            assert!(fixed, "{name}: unexpected suffix {suffix}");
        }
    }

    #[tokio::test]
    async fn a_value_past_its_sealed_expiry_is_refused_even_if_redis_keeps_it() {
        let b = redis();
        let k = key("sealed expiry");
        let ttl = Duration::from_millis(300);
        b.store(0)
            .complete(
                &k,
                &Fence::random(),
                &SEAL,
                b"pair".to_vec(),
                replay(ttl),
                &FRESH,
            )
            .await
            .unwrap();
        // Someone with access to Redis makes the value live forever.
        let mut con = dump_of(&b).connection().await;
        let name = format!("rc:{{{}}}:res", k.to_hex());
        let persisted: i64 = redis::cmd("PERSIST")
            .arg(&name)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(persisted, 1);

        // A real wait: the sealed expiry has to pass.
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;

        assert_eq!(b.store(1).load(&k, &SEAL, None).await.unwrap(), None);
        let deadline = Instant::now() + Duration::from_millis(100);
        let waited = b
            .store(2)
            .wait(&k, &Fence::random(), &SEAL, &FRESH, deadline)
            .await;
        assert_eq!(waited.unwrap(), Waited::Elapsed);
    }

    #[tokio::test]
    async fn the_generations_invalidations_leave_expire_after_their_life() {
        let b = redis();
        let (k, group) = (key("gen key"), key("gen group"));
        b.store(0).invalidate(&k, LIFE).await.unwrap();
        b.store(0).invalidate_group(&group, LIFE).await.unwrap();

        let dump = dump_of(&b).dump().await;

        let mut names: Vec<String> = dump
            .iter()
            .map(|(name, _, _)| String::from_utf8_lossy(name).into_owned())
            .collect();
        names.sort();
        let mut expected = vec![
            format!("rc:{{{}}}:gen", k.to_hex()),
            format!("rc:{{{}}}:gen", group.to_hex()),
        ];
        expected.sort();
        assert_eq!(names, expected);
        for (name, pttl, value) in &dump {
            assert!(
                *pttl > 0 && *pttl <= LIFE.as_millis() as i64,
                "{} has PTTL {pttl}",
                String::from_utf8_lossy(name)
            );
            assert_eq!(value, b"1");
        }
    }
}
