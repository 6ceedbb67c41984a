//! One conformance suite for every [`Store`] backend: the in-process `MemoryStore` and, with
//! the `redis` feature, `RedisStore` on a `redis-server` of the test's own, on a Sentinel
//! set (a master, a replica, three sentinels) and on a 3-master Redis Cluster.
//!
//! Each case is an `async fn` taking a [`Backend`]: several independent store handles that
//! share one backend (clones of one `MemoryStore`; separate `RedisStore`s, each with its own
//! connections, on one server), as the instances of a deployment would. The `conformance!`
//! macro stamps out one `#[tokio::test]` per case and backend: `in_memory::<case>`,
//! `on_redis::<case>`, `on_sentinel::<case>` and `on_cluster::<case>`.
//!
//! Redis does not work under tokio's paused clock, so the suite runs on real time with short
//! leases and TTLs; a real wait appears only where a TTL or lease has to pass.

mod elections;
mod invalidation;
#[cfg(feature = "redis")]
mod redis_only;
mod replays;

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
    deployment: Deployment,
    stores: Vec<tower_refresh_coalesce::store::RedisStore>,
}

/// The Redis processes a backend runs on.
#[cfg(feature = "redis")]
enum Deployment {
    Standalone(redis_server::RedisServer),
    Sentinel(redis_server::RedisSentinel),
    Cluster(redis_server::RedisCluster),
}

#[cfg(feature = "redis")]
impl OnRedis {
    /// The one server of a standalone backend (the cases of `redis_only` kill and dump it).
    fn server(&self) -> &redis_server::RedisServer {
        match &self.deployment {
            Deployment::Standalone(server) => server,
            _ => panic!("a standalone backend"),
        }
    }

    fn server_mut(&mut self) -> &mut redis_server::RedisServer {
        match &mut self.deployment {
            Deployment::Standalone(server) => server,
            _ => panic!("a standalone backend"),
        }
    }

    /// The servers whose masters hold the keys.
    fn masters(&self) -> Vec<&redis_server::RedisServer> {
        match &self.deployment {
            Deployment::Standalone(server) => vec![server],
            Deployment::Sentinel(sentinel) => vec![sentinel.node(sentinel.master())],
            Deployment::Cluster(cluster) => cluster
                .masters()
                .into_iter()
                .map(|n| cluster.node(n))
                .collect(),
        }
    }
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
            let mut reads = 0;
            for master in redis.masters() {
                let stats = master.command_stats().await;
                reads += ["evalsha", "eval"]
                    .iter()
                    .filter_map(|name| stats.get(*name))
                    .sum::<u64>();
            }
            return reads;
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

/// The deployment secret every Redis backend seals with.
#[cfg(feature = "redis")]
const STORE_SECRET: &[u8] = b"conformance deployment secret, 32";

#[cfg(feature = "redis")]
fn redis() -> Backend {
    use tower_refresh_coalesce::store::RedisStore;
    let server = redis_server::RedisServer::start();
    let stores = (0..HANDLES)
        .map(|_| RedisStore::standalone(server.client(), STORE_SECRET))
        .collect();
    on_redis("redis", Deployment::Standalone(server), stores)
}

#[cfg(feature = "redis")]
fn sentinel() -> Backend {
    use tower_refresh_coalesce::store::RedisStore;
    let sentinel = redis_server::RedisSentinel::start();
    let stores = (0..HANDLES)
        .map(|_| {
            RedisStore::sentinel(
                sentinel.sentinel_urls(),
                sentinel.master_name(),
                STORE_SECRET,
            )
        })
        .collect();
    on_redis("sentinel", Deployment::Sentinel(sentinel), stores)
}

#[cfg(feature = "redis")]
fn cluster() -> Backend {
    use tower_refresh_coalesce::store::RedisStore;
    let cluster = redis_server::RedisCluster::three_masters();
    let stores = (0..HANDLES)
        // No replicas to wait for.
        .map(|_| RedisStore::cluster(cluster.seed_urls(), STORE_SECRET).min_replicas(0))
        .collect();
    on_redis("cluster", Deployment::Cluster(cluster), stores)
}

/// A backend of one `RedisStore` per builder, on `deployment`.
#[cfg(feature = "redis")]
fn on_redis(
    name: &'static str,
    deployment: Deployment,
    builders: Vec<tower_refresh_coalesce::store::RedisStoreBuilder>,
) -> Backend {
    let redis_stores: Vec<_> = builders
        .into_iter()
        .map(|builder| {
            builder
                .poll_interval(POLL_INTERVAL)
                .build()
                .expect("a RedisStore builds without waiting for Redis")
        })
        .collect();
    let stores = redis_stores
        .iter()
        .map(|store| Arc::new(store.clone()) as Arc<dyn Store>)
        .collect();
    let mut backend = Backend::new(name, stores);
    backend.redis = Some(OnRedis {
        deployment,
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
use elections::{
    a_release_by_a_foreign_fence_keeps_the_lock_and_the_owners_frees_it,
    a_won_election_is_acknowledged_by_as_many_replicas_as_the_store_requires,
    an_election_after_a_replay_was_stored_takes_no_lock_and_reports_the_replay,
    an_expired_lease_lets_another_fence_win, electing_again_with_the_winning_fence_reports_a_win,
    loading_a_key_nothing_was_stored_for_finds_nothing,
    the_first_election_wins_and_the_second_loses_naming_the_first_fence,
};
use invalidation::{
    a_completion_after_its_key_was_invalidated_stores_nothing_and_its_follower_is_told,
    a_follower_elected_after_the_invalidation_learns_that_its_leader_was_revoked,
    a_group_invalidated_during_a_flight_makes_its_completion_revoked,
    a_replay_expires_after_its_ttl,
    a_value_stored_under_an_old_group_generation_neither_loads_nor_arrives,
    invalidating_a_group_removes_that_groups_replays_only_and_tells_every_handle,
    invalidating_a_key_removes_its_replay_and_tells_every_handle,
};
use replays::{
    a_flight_outcome_releases_the_lock_so_the_next_request_leads,
    a_late_leader_completing_a_second_replay_gets_the_first_value,
    a_stored_replay_is_loaded_with_its_ttl_only_under_the_same_seal,
    a_wait_for_an_unknown_fence_returns_nothing_at_its_deadline,
    a_wait_returns_the_flight_outcome_of_its_fence_which_is_no_replay,
    a_wait_returns_the_replay_as_soon_as_the_leader_completes_later,
};

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

        #[cfg(feature = "redis")]
        mod on_sentinel {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::sentinel()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod on_cluster {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::cluster()).await;
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
    a_won_election_is_acknowledged_by_as_many_replicas_as_the_store_requires,
    an_election_after_a_replay_was_stored_takes_no_lock_and_reports_the_replay,
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
