//! Proves the `redis-server` harness (`support::redis`) that the Redis tests rely on.

use std::{net::TcpStream, time::Duration};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use support::redis::RedisServer;
use tokio::time::timeout;

async fn set(con: &mut MultiplexedConnection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async::<()>(con)
        .await
        .expect("SET");
}

async fn get(con: &mut MultiplexedConnection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query_async(con).await
}

#[tokio::test]
async fn a_started_server_answers_set_and_get_on_its_own_port() {
    let server = RedisServer::start();
    assert_ne!(server.port(), 6379);
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );

    let mut con = server.connection().await;
    set(&mut con, "greeting", "hello").await;

    assert_eq!(
        get(&mut con, "greeting").await.unwrap().as_deref(),
        Some("hello")
    );
}

#[tokio::test]
async fn two_servers_do_not_share_ports_or_data() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());

    set(&mut first.connection().await, "only-here", "1").await;

    assert_eq!(
        get(&mut second.connection().await, "only-here")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_paused_server_leaves_requests_unanswered_until_resumed() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    set(&mut con, "k", "v").await;

    server.pause();
    let unanswered = timeout(Duration::from_millis(200), get(&mut con, "k")).await;
    assert!(
        unanswered.is_err(),
        "a paused server answered: {unanswered:?}"
    );

    server.resume();
    // The open connection carries on, and new ones are accepted.
    assert_eq!(get(&mut con, "k").await.unwrap().as_deref(), Some("v"));
    let mut fresh = server.connection().await;
    assert_eq!(get(&mut fresh, "k").await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn a_killed_server_refuses_connections_and_fails_open_ones() {
    let mut server = RedisServer::start();
    let mut open = server.connection().await;

    server.kill();

    assert_eq!(server.pid(), None);
    assert!(get(&mut open, "k").await.is_err());
    let refused = server.client().get_multiplexed_async_connection().await;
    assert!(refused.is_err(), "connected to a killed server");
}

#[tokio::test]
async fn a_restarted_server_listens_on_the_same_port_with_an_empty_dataset() {
    let mut server = RedisServer::start();
    let port = server.port();
    let url = server.url();
    set(&mut server.connection().await, "k", "v").await;

    server.kill();
    server.restart();

    assert_eq!(server.port(), port);
    assert_eq!(server.url(), url);
    let mut con = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the restarted server accepts connections on the old URL");
    assert_eq!(get(&mut con, "k").await.unwrap(), None);
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert_eq!(keys, 0);
}

#[tokio::test]
async fn a_paused_server_can_be_restarted_and_answers_again() {
    let mut server = RedisServer::start();
    server.pause();

    server.restart();

    let mut con = server.connection().await;
    set(&mut con, "k", "v").await;
    assert_eq!(get(&mut con, "k").await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn killing_pubsub_clients_ends_every_subscription_and_spares_other_connections() {
    let server = RedisServer::start();
    let mut plain = server.connection().await;
    let mut subscribers = Vec::new();
    for channel in ["flights", "replays"] {
        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        pubsub.subscribe(channel).await.unwrap();
        subscribers.push(pubsub);
    }

    assert_eq!(server.kill_pubsub_clients().await, 2);

    for pubsub in &mut subscribers {
        let next = timeout(Duration::from_secs(5), pubsub.on_message().next())
            .await
            .expect("the message stream ends when the connection is killed");
        assert!(next.is_none(), "a killed subscriber got {next:?}");
    }
    set(&mut plain, "still", "here").await;
    assert_eq!(server.kill_pubsub_clients().await, 0);
}

#[tokio::test]
async fn dump_lists_every_key_with_its_ttl_and_value() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    redis::pipe()
        .cmd("SET")
        .arg("flight:a")
        .arg("leader-1")
        .arg("PX")
        .arg(60_000)
        .cmd("SET")
        .arg("plain")
        .arg(&b"\x00bytes"[..])
        .cmd("SADD")
        .arg("members")
        .arg("b")
        .arg("a")
        .cmd("HSET")
        .arg("hash")
        .arg("f")
        .arg("v")
        .cmd("RPUSH")
        .arg("list")
        .arg("2")
        .arg("1")
        .cmd("XADD")
        .arg("stream")
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async::<()>(&mut con)
        .await
        .unwrap();

    let dump = server.dump().await;

    let keys: Vec<&[u8]> = dump.iter().map(|(key, _, _)| &key[..]).collect();
    assert_eq!(
        keys,
        [
            &b"flight:a"[..],
            b"hash",
            b"list",
            b"members",
            b"plain",
            b"stream"
        ]
    );
    let (_, ttl, value) = &dump[0];
    assert!((1..=60_000).contains(ttl), "PTTL {ttl}");
    assert_eq!(value, b"leader-1");
    let rest: Vec<(i64, &[u8])> = dump[1..]
        .iter()
        .map(|(_, ttl, value)| (*ttl, &value[..]))
        .collect();
    assert_eq!(
        rest,
        [
            (-1, &b"f=v"[..]),
            (-1, b"2,1"),
            (-1, b"a,b"),
            (-1, b"\x00bytes"),
            (-1, b"<stream>"),
        ]
    );
}

#[tokio::test]
async fn command_stats_count_each_command() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    for n in 0..3 {
        set(&mut con, &format!("k{n}"), "v").await;
    }
    get(&mut con, "k0").await.unwrap();

    let stats = server.command_stats().await;

    assert_eq!(stats.get("set"), Some(&3), "{stats:?}");
    assert_eq!(stats.get("get"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("del"), None, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn the_harness_connections_work_under_tokios_paused_clock() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    set(&mut con, "k", "v").await;

    assert_eq!(get(&mut con, "k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(server.dump().await.len(), 1);
    assert_eq!(server.command_stats().await.get("set"), Some(&1));
}

#[test]
fn dropping_the_server_kills_it_and_removes_its_directory() {
    let server = RedisServer::start();
    let (port, dir) = (server.port(), server.dir().to_owned());
    assert!(dir.join("redis.log").exists());

    drop(server);

    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_paused_server_is_still_killed_on_drop() {
    let server = RedisServer::start();
    let port = server.port();
    server.pause();

    drop(server);

    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
#[should_panic(expected = "apt-get install redis-server")]
fn a_missing_binary_fails_with_install_instructions() {
    RedisServer::start_with("/nonexistent/redis-server");
}
