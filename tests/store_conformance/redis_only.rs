//! Redis only: what a dump of the server reveals.

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
            Keep::Flight { ttl: TTL },
            &FRESH,
        )
        .await
        .unwrap();
    // Completing with a flight outcome released the lock; take it again (no replay is
    // stored yet, so the election can be won), then store the replay, which keeps it.
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
    (k, group, leader)
}

fn dump_of(b: &Backend) -> &redis_server::RedisServer {
    b.redis.as_ref().expect("a redis backend").server()
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

    b.redis.as_mut().unwrap().server_mut().kill();
    let gone = until(|| !b.redis.as_ref().unwrap().stores[0].is_subscribed());
    timeout(SETTLE, gone).await.expect("the subscriber notices");
    assert!(
        b.store(0).load(&k, &SEAL, None).await.is_err(),
        "Redis is down"
    );
    // A real wait: the outage lasts a second, longer than the connection's own attempts to
    // reconnect after that failure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.redis.as_mut().unwrap().server_mut().restart();
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

#[tokio::test]
async fn an_election_no_replica_acknowledges_is_reported_within_the_budget() {
    use tower_refresh_coalesce::store::RedisStore;
    // A standalone server has no replica: `WAIT 1` can only run out its timeout.
    let server = redis_server::RedisServer::start();
    let budget = Duration::from_millis(400);
    let store = RedisStore::standalone(server.client(), STORE_SECRET)
        .min_replicas(1)
        .command_timeout(budget)
        .build()
        .unwrap();
    let k = key("unreplicated");
    assert_eq!(
        store.elect(&k, &Fence::random(), LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );
    let started = Instant::now();
    let replicated = store.replicate(&k).await.expect("an answer, not an error");
    assert!(!replicated, "no replica acknowledged the lock");
    // It waited (half the budget, on the server) and still answered within the budget.
    let took = started.elapsed();
    assert!(took >= budget / 2, "WAIT returned after {took:?}");
}
