//! Redis faults: a lost wake-up, Redis killed or paused mid-storm, a leader that disappears
//! while holding the lock.

use super::*;

// 3. Lost wake-up
// ---------------------------------------------------------------------------------------

/// Allows or denies (P)SUBSCRIBE to every client of `server` (all use the default user).
async fn subscriptions(server: &RedisServer, allowed: bool) {
    let rule = if allowed {
        ["+subscribe", "+psubscribe"]
    } else {
        ["-subscribe", "-psubscribe"]
    };
    let mut con = server.connection().await;
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(&rule[..])
        .query_async::<()>(&mut con)
        .await
        .expect("ACL SETUSER");
}

#[tokio::test]
async fn followers_whose_wake_up_is_lost_still_resolve_by_polling_with_one_inner_call() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");
    let storm = fleet.storm(&token, 30, 0);
    fleet
        .within("one election won, two lost", || {
            fleet.sum(|s| s.leader + s.joined) == 30
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;

    // Between election and completion: every subscriber connection is killed, and none can
    // come back (subscribing is denied), so the completion message reaches nobody.
    subscriptions(&server, false).await;
    assert_eq!(
        server.kill_pubsub_clients().await,
        3,
        "one pub/sub connection per instance, none per request"
    );
    fleet
        .within("every subscriber gone", || {
            fleet
                .instances
                .iter()
                .all(|i| !i.redis.as_ref().unwrap().is_subscribed())
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.total(), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(fleet.sum(|s| s.store_replayed), 2, "{:#?}", fleet.stats());
    assert_eq!(fleet.sum(|s| s.timed_out), 0);
    let slowest = answers.iter().map(|a| a.took).max().unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    subscriptions(&server, true).await;
}

// ---------------------------------------------------------------------------------------
// 4 and 5. Redis killed or paused mid-storm
// ---------------------------------------------------------------------------------------

/// The settings of the fault tests: short waits, a short cool-down.
fn fault_config() -> Config {
    Config {
        wait_timeout: Duration::from_secs(1),
        breaker: (3, Duration::from_millis(500)),
        ..Config::default()
    }
}

enum Fault {
    Kill,
    Pause,
}

/// A storm on one token is elected through Redis; then Redis fails (`fault`), the leader's
/// gate opens, and more storms (the same token, fresh tokens) hit every instance while Redis
/// is away. Then Redis comes back.
async fn storm_through_a_fault(fault: Fault) {
    let mut server = RedisServer::start();
    let config = fault_config();
    let mut fleet = Fleet::new(&on(&server));
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");
    let first = fleet.storm(&token, 300, 0);
    fleet
        .within("one election won, two lost", || {
            fleet.sum(|s| s.leader + s.joined) == 300
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;
    let leader = (0..3)
        .find(|&i| fleet.instances[i].stats().store_won == 1)
        .unwrap();

    match fault {
        Fault::Kill => server.kill(),
        Fault::Pause => server.pause(),
    }
    fleet.gates.open();
    let fresh: Vec<String> = (0..3)
        .map(|n| tokens::refresh(&format!("fresh-{n}")))
        .collect();
    let mut during = fleet.storm(&token, 30, 0);
    for (n, fresh) in fresh.iter().enumerate() {
        during.extend(fleet.storm(fresh, 30, n));
    }
    let mut all = answers(first).await;
    all.extend(answers(during).await);

    let limit = config.wait_timeout + Duration::from_secs(1);
    for answer in &all {
        assert!(
            answer.took <= limit,
            "a request on instance {} waited {:?}",
            answer.instance,
            answer.took
        );
    }
    assert_eq!(
        fleet.ledger.of(&token),
        1,
        "followers never refresh themselves"
    );
    for fresh in &fresh {
        let per_instance = fleet.ledger.per_instance(fresh, 3);
        assert!(
            per_instance.iter().all(|&calls| calls <= 1),
            "more than one call on an instance: {per_instance:?}"
        );
    }
    for answer in all.iter().filter(|a| a.instance == leader) {
        assert_eq!(
            answer.seen.status,
            StatusCode::OK,
            "the leader's instance answers"
        );
    }
    for answer in &all {
        let status = answer.seen.status;
        if status == StatusCode::OK {
            let json = answer.seen.json();
            let fresh_token = fresh.iter().find(|t| json["for"] == digest(t));
            assert!(json["for"] == digest(&token) || fresh_token.is_some());
        } else {
            assert!(
                [
                    StatusCode::TOO_MANY_REQUESTS,
                    StatusCode::SERVICE_UNAVAILABLE
                ]
                .contains(&status),
                "{status}"
            );
        }
    }
    assert!(
        fleet.stats().iter().any(|s| s.breaker_opened >= 1),
        "{:#?}",
        fleet.stats()
    );

    // Redis comes back.
    match fault {
        Fault::Kill => server.restart(),
        Fault::Pause => server.resume(),
    }
    fleet.subscribed().await;
    // A real wait: the breakers' cool-down has to pass.
    tokio::time::sleep(config.breaker.1 + Duration::from_millis(100)).await;
    let before = fleet.stats();
    let (won, lost) = (fleet.sum(|s| s.store_won), fleet.sum(|s| s.store_lost));
    fleet.gates.close();
    let again = tokens::refresh("after the fault");
    let storm = fleet.storm(&again, 300, 0);
    fleet
        .within("one election won, two lost, after the fault", || {
            let now = fleet.stats();
            let joined: u64 = now
                .iter()
                .zip(&before)
                .map(|(n, b)| n.leader + n.joined - b.leader - b.joined)
                .sum();
            joined == 300
                && fleet.sum(|s| s.store_won) == won + 1
                && fleet.sum(|s| s.store_lost) == lost + 2
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.of(&again), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
}

#[tokio::test]
async fn redis_killed_mid_storm_bounds_every_wait_and_the_layer_uses_redis_again_after_a_restart() {
    storm_through_a_fault(Fault::Kill).await;
}

#[tokio::test]
async fn redis_paused_mid_storm_bounds_every_wait_and_the_layer_uses_redis_again_once_resumed() {
    storm_through_a_fault(Fault::Pause).await;
}

#[tokio::test]
async fn a_follower_timing_out_while_redis_is_down_leaves_the_breaker_open() {
    let mut server = RedisServer::start();
    let config = Config {
        wait_timeout: Duration::from_millis(500),
        breaker: (3, Duration::from_secs(30)),
        ..Config::default()
    };
    let mut fleet = Fleet::new(&on(&server));
    let open = Gates::closed();
    open.open();
    fleet.add(config).add_with(config, &open);
    fleet.subscribed().await;
    let (leader, follower) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");
    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || {
            leader.stats().in_flight == 1 && fleet.ledger.total() == 1
        })
        .await;
    let followed = fleet.storm(&token, 1, 1);
    fleet
        .within("B follows", || follower.stats().store_lost == 1)
        .await;

    server.kill();
    // A fresh token on B: load, election and completion fail, and the breaker opens.
    let fresh = fleet.send(1, &tokens::refresh("bob")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(follower.stats().breaker_opened, 1);
    assert_eq!(follower.stats().breaker_open, 1);
    // B's follower flight gives up (its caller gets 429) while Redis is still down.
    let followed = answers(followed).await;
    assert_eq!(followed[0].seen.status, StatusCode::TOO_MANY_REQUESTS);
    fleet
        .within("B's follower flight ended", || {
            follower.stats().in_flight == 0 && follower.stats().entries == 1
        })
        .await;

    let errors = follower.stats().store_errors;
    assert_eq!(
        follower.stats().breaker_open,
        1,
        "a wait that never reached Redis is no sign that Redis is back: {:?}",
        follower.stats()
    );
    let later = fleet.send(1, &tokens::refresh("carol")).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(
        follower.stats().store_errors,
        errors,
        "an open breaker skips Redis: {:?}",
        follower.stats()
    );
    fleet.gates.open();
    drop(answers(led).await);
}

#[tokio::test]
async fn a_request_that_joins_a_follower_flight_late_also_gets_429() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    // A leads and never answers; B follows.
    let stuck = Gates::closed();
    fleet.add_with(fault_config(), &stuck).add(fault_config());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");
    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || {
            a.stats().in_flight == 1 && fleet.ledger.total() == 1
        })
        .await;
    let early = fleet.storm(&token, 1, 1);
    fleet
        .within("B follows", || b.stats().store_lost == 1)
        .await;

    // A real wait: the second request must join B's flight when part of its wait is over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = fleet.storm(&token, 1, 1);
    let early = answers(early).await;
    let late = answers(late).await;

    let wait_timeout = fault_config().wait_timeout;
    assert_eq!(early[0].seen.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b.stats().joined, 1, "the late request joined B's flight");
    assert_eq!(
        late[0].seen.status,
        StatusCode::TOO_MANY_REQUESTS,
        "after {:?} (its wait timeout is {wait_timeout:?}): {}",
        late[0].took,
        String::from_utf8_lossy(&late[0].seen.body)
    );
    assert_eq!(
        fleet.ledger.of(&token),
        1,
        "B never refreshes A's token itself"
    );
    stuck.open();
    drop(answers(led).await);
}

// ---------------------------------------------------------------------------------------
// 6. The leader disappears while holding the lock
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn followers_of_a_leader_that_disappeared_get_429_and_a_retry_after_the_lease_gets_200() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    // A's inner call never returns, and A gives up on it at its hard cap without storing or
    // releasing anything: to the other instances, A is gone while it holds the lock.
    let stuck = Gates::closed();
    let leader_config = Config {
        hard_cap: Duration::from_millis(300),
        ..fault_config()
    };
    fleet.add_with(leader_config, &stuck);
    fleet.gates.open();
    fleet.add(fault_config()).add(fault_config());
    fleet.subscribed().await;
    let (token, other) = (tokens::refresh("alice"), tokens::refresh("bob"));

    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || fleet.instances[0].stats().store_won == 1)
        .await;
    let won_before = fleet.sum(|s| s.store_won);
    let mut followed = fleet.storm_over(&token, 20, &[1, 2]);
    followed.extend(fleet.storm_over(&other, 20, &[1, 2]));
    let led = answers(led).await;
    let followed = answers(followed).await;

    assert_eq!(
        led[0].seen.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "A hit its hard cap"
    );
    let wait_timeout = fault_config().wait_timeout;
    for answer in &followed {
        let json = answer.seen.json();
        if json.get("for") == Some(&Value::from(digest(&other))) {
            assert_eq!(answer.seen.status, StatusCode::OK);
            continue;
        }
        assert_eq!(
            answer.seen.status,
            StatusCode::TOO_MANY_REQUESTS,
            "a follower of A's token got {json}"
        );
        assert!(
            answer.took >= wait_timeout && answer.took < wait_timeout + Duration::from_millis(500),
            "answered after {:?}",
            answer.took
        );
    }
    let others = followed
        .iter()
        .filter(|a| a.seen.status == StatusCode::OK)
        .count();
    assert_eq!(
        others, 20,
        "every request with the other token got its own result"
    );
    assert_eq!(fleet.ledger.of(&token), 1, "only A called for the token");
    assert_eq!(fleet.ledger.of(&other), 1);

    let dump = server.dump().await;
    let locks: Vec<_> = dump
        .iter()
        .filter(|(name, _, _)| name.ends_with(b":lock"))
        .collect();
    assert_eq!(locks.len(), 1, "A's lock is still held: {dump:?}");
    let lease_left = Duration::from_millis(u64::try_from(locks[0].1).expect("a live lease"));
    // A real wait: A's lease has to pass.
    tokio::time::sleep(lease_left + Duration::from_millis(100)).await;

    let retry = fleet.send(1, &token).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.json()["for"], digest(&token));
    assert_eq!(fleet.ledger.per_instance(&token, 3), vec![1, 1, 0]);
    assert_eq!(
        fleet.sum(|s| s.store_won),
        won_before + 2,
        "the other token's leader and the retry's were elected"
    );
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn with_the_store_required_an_unreachable_store_gets_503_and_no_refresh_until_it_is_back() {
    let mut server = RedisServer::start();
    let config = Config {
        require_store: true,
        ..fault_config()
    };
    let mut fleet = Fleet::new(&on(&server));
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.gates.open();
    fleet.subscribed().await;
    let kept = tokens::refresh("alice");
    let before = answers(fleet.storm(&kept, 30, 0)).await;
    assert!(before.iter().all(|a| a.seen.status == StatusCode::OK));
    assert_eq!(fleet.ledger.of(&kept), 1);

    server.kill();
    let fresh = tokens::refresh("bob");
    let during = answers(fleet.storm(&fresh, 30, 0)).await;
    assert_eq!(
        fleet.ledger.of(&fresh),
        0,
        "no instance refreshes on its own"
    );
    for answer in &during {
        assert_eq!(
            answer.seen.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{answer:?}"
        );
        assert_eq!(answer.seen.json()["error"], "temporarily_unavailable");
        assert!(
            answer
                .seen
                .headers
                .iter()
                .any(|(name, _)| name == "retry-after"),
            "{answer:?}"
        );
    }
    // A replay each instance holds needs no store.
    for instance in 0..3 {
        let replayed = fleet.send(instance, &kept).await;
        assert_eq!(replayed.status, StatusCode::OK, "instance {instance}");
        assert_eq!(replayed, before[0].seen, "the same pair");
    }

    // Redis back: once the breaker lets the store be tried again, the token is refreshed,
    // once.
    server.restart();
    let deadline = Instant::now() + SETTLE;
    loop {
        let seen = fleet.send(0, &fresh).await;
        if seen.status == StatusCode::OK {
            break;
        }
        assert_eq!(seen.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "still refused after {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fleet.ledger.of(&fresh), 1);
}
