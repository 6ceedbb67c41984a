//! Three reference-server processes, started the way an operator starts them, sharing one
//! SQLite file and one Redis (standalone, a Sentinel set or a Redis Cluster): a storm spread
//! over them rotates the token once.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{Value, json};
use server::harness::{Client, ServerProcess};
use support::redis::{RedisCluster, RedisSentinel, RedisServer};

/// The `server` binary of this crate, started with the shared database, the Redis flags
/// `redis`, and a slow upstream so that the storm overlaps the refresh on every instance.
fn spawn(db: &std::path::Path, redis: &[String]) -> ServerProcess {
    let mut args: Vec<std::ffi::OsString> = vec!["--db".into(), db.into()];
    args.extend(redis.iter().map(Into::into));
    args.extend(["--refresh-delay-ms".into(), "300".into()]);
    ServerProcess::spawn(env!("CARGO_BIN_EXE_server"), args).expect("the server starts")
}

async fn post_json(client: &Client, base: &str, path: &str, body: &Value) -> (StatusCode, Bytes) {
    let reply = client
        .post_json(&format!("{base}{path}"), body)
        .await
        .expect("the server answers");
    (reply.status, reply.body)
}

/// `refresh_rotations_total` of one server.
async fn rotations(client: &Client, base: &str) -> u64 {
    client.counters(base).await.expect("metrics").rotations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_sharing_a_database_and_redis_rotate_a_storm_once() {
    let redis = RedisServer::start();
    let db = redis.dir().join("tokens.db");
    storm_over_three_processes(&db, &["--redis".into(), redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_sharing_a_database_and_a_redis_cluster_rotate_a_storm_once() {
    let cluster = RedisCluster::three_masters();
    let db = cluster.node(0).dir().join("tokens.db");
    let mut flags = Vec::new();
    for seed in cluster.seed_urls() {
        flags.extend(["--redis-cluster".to_owned(), seed]);
    }
    // The cluster has no replicas to wait for.
    flags.extend(["--redis-min-replicas".to_owned(), "0".to_owned()]);
    storm_over_three_processes(&db, &flags).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_sharing_a_database_and_a_sentinel_set_rotate_a_storm_once() {
    let sentinel = RedisSentinel::start();
    let db = sentinel.node(0).dir().join("tokens.db");
    let mut flags = Vec::new();
    for url in sentinel.sentinel_urls() {
        flags.extend(["--redis-sentinel".to_owned(), url]);
    }
    flags.extend([
        "--redis-master".to_owned(),
        sentinel.master_name().to_owned(),
    ]);
    storm_over_three_processes(&db, &flags).await;
}

/// Three processes on one database file and the Redis `flags` name; a storm of 1,500
/// refreshes of one token spread over them.
async fn storm_over_three_processes(db: &std::path::Path, flags: &[String]) {
    let client = Client::new();
    let ready = Duration::from_secs(30);

    // The first process creates the schema and the shared secret; the others find them.
    let first = spawn(db, flags);
    first.ready(&client, ready).await.expect("ready");
    let others = [spawn(db, flags), spawn(db, flags)];
    for process in &others {
        process.ready(&client, ready).await.expect("ready");
    }
    let bases = [first.base(), others[0].base(), others[1].base()];

    let (status, body) = post_json(
        &client,
        &bases[0],
        "/auth/login",
        &json!({"username": "demo", "password": "demo"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let login: Value = serde_json::from_slice(&body).expect("json");
    let token = login["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();

    let mut before = 0;
    for base in &bases {
        before += rotations(&client, base).await;
    }
    let body = json!({ "refresh_token": token });
    let storm =
        (0..1_500).map(|i| post_json(&client, &bases[i % bases.len()], "/auth/refresh", &body));
    let replies = join_all(storm).await;
    let mut after = 0;
    for base in &bases {
        after += rotations(&client, base).await;
    }

    assert!(replies.iter().all(|(status, _)| *status == StatusCode::OK));
    let bodies: HashSet<&Bytes> = replies.iter().map(|(_, body)| body).collect();
    assert_eq!(
        bodies.len(),
        1,
        "every instance answered with the same pair"
    );
    assert_eq!(after - before, 1, "one rotation over the three processes");

    // The new token works on any instance: the processes share the signing secret.
    let pair: Value = serde_json::from_slice(replies[0].1.as_ref()).expect("json");
    let next = pair["refresh_token"].as_str().expect("refresh token");
    let (status, _) = post_json(
        &client,
        &bases[2],
        "/auth/refresh",
        &json!({ "refresh_token": next }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}
