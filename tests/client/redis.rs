//! Cells over a real `redis-server` of the test's own, through two separate connections
//! (as two processes have): one refresh between them, and nothing readable in Redis.

use http::StatusCode;
use support::{
    redis::{RedisCluster, RedisServer},
    until,
};
use tower_refresh_coalesce::{
    client::{Credentials, error::RefreshFailed, store::RedisCredentialStore},
    store::RedisStore,
};

use super::{Auth, client, get, send, storm};

const SECRET: &[u8] = b"a deployment secret of 32 bytes!";

fn cell(redis: &RedisServer, secret: &[u8]) -> Credentials {
    let store = RedisStore::standalone(redis.client(), secret)
        .build()
        .expect("a store");
    Credentials::shared(RedisCredentialStore::new(&store, "billing-service"))
}

/// `a` and `b` (logged in through `a`, loaded by `b`) storm with an expired access token:
/// one refresh between them.
async fn storm_two_cells(auth: &Auth, a: &Credentials, b: &Credentials) {
    const N: usize = 100;
    assert_eq!(a.set(auth.login()).await.unwrap(), 1);
    assert_eq!(
        send(client(auth, b), get("/api")).await.unwrap().status(),
        StatusCode::OK
    );
    auth.expire_access();

    let mut calls = storm(&client(auth, a), N, "/api");
    calls.extend(storm(&client(auth, b), N, "/api"));
    until(|| {
        auth.rejections.get() == 2 * N
            && a.stats().joined == N as u64 - 1
            && b.stats().joined == N as u64 - 1
    })
    .await;
    auth.gate.open();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(auth.refreshes.get(), 1, "one refresh between the two");
    assert_eq!(auth.reuse_detected(), 0);
    assert_eq!((a.generation(), b.generation()), (2, 2));
    // `b` took the login from Redis, then one of the two took the other's refresh.
    assert_eq!(a.stats().adopted + b.stats().adopted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cells_on_their_own_redis_connections_refresh_once_between_them() {
    let redis = RedisServer::start();
    let auth = Auth::new().gated();
    let (a, b) = (cell(&redis, SECRET), cell(&redis, SECRET));
    storm_two_cells(&auth, &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cells_on_a_redis_cluster_refresh_once_between_them() {
    let cluster = RedisCluster::three_masters();
    let on_cluster = || {
        let store = RedisStore::cluster(cluster.seed_urls(), SECRET)
            .min_replicas(0)
            .build()
            .expect("a store");
        Credentials::shared(RedisCredentialStore::new(&store, "billing-service"))
    };
    let auth = Auth::new().gated();
    let (a, b) = (on_cluster(), on_cluster());
    storm_two_cells(&auth, &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_in_redis_is_sealed_and_another_secret_cannot_open_it() {
    let redis = RedisServer::start();
    let auth = Auth::new();
    let a = cell(&redis, SECRET);
    a.set(auth.login()).await.unwrap();
    auth.expire_access();
    assert_eq!(
        send(client(&auth, &a), get("/api")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(a.generation(), 2);

    let dump = redis.dump().await;
    assert!(!dump.is_empty());
    for (key, _, value) in &dump {
        for secret in [&b"access-"[..], b"refresh-", b"billing-service"] {
            assert!(!key.windows(secret.len()).any(|w| w == secret), "{key:?}");
            assert!(
                !value.windows(secret.len()).any(|w| w == secret),
                "a token in the clear"
            );
        }
    }

    let stranger = cell(&redis, b"another deployment secret, 32 B.");
    let error = send(client(&auth, &stranger), get("/api"))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<RefreshFailed>().is_some(), "{error}");
    assert!(stranger.tokens().is_none());
    assert_eq!(auth.refreshes.get(), 1);
}
