//! Beyond one Redis: a storm over every slot of a cluster, and the failover of the master
//! that holds a running flight's lock (a cluster with replicas, and a Sentinel set).

use std::collections::BTreeSet;

use super::*;

// ---------------------------------------------------------------------------------------
// 8. A storm over every slot
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100000_request_storm_over_10000_tokens_spread_over_the_slots_makes_exactly_10000_inner_calls()
 {
    const TOKENS: usize = 10_000;
    const REQUESTS_PER_TOKEN: usize = 10;
    const TOKENS_AT_ONCE: usize = 100;
    let redis = Deployment::Cluster(RedisCluster::three_masters());
    let mut fleet = Fleet::new(&redis.shared());
    // A generous command budget: thousands of flights at once on a debug build and two
    // cores can keep a command waiting for the runtime longer than 100 ms.
    let config = Config {
        command_timeout: Duration::from_secs(2),
        wait_timeout: Duration::from_secs(10),
        // Every replay still there for the scan at the end.
        ttl: Duration::from_secs(600),
        hard_cap: Duration::from_secs(20),
        ..Config::default()
    };
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.gates.open();
    fleet.subscribed().await;
    let tokens: Vec<String> = (0..TOKENS)
        .map(|n| tokens::refresh(&format!("user-{n:05}")))
        .collect();

    // Batches of 100 tokens, each token's ten requests at once over the three instances.
    let mut bodies: HashMap<&str, BTreeSet<Bytes>> = HashMap::new();
    let mut answered = 0;
    for (batch, chunk) in tokens.chunks(TOKENS_AT_ONCE).enumerate() {
        let storm: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(n, token)| fleet.storm(token, REQUESTS_PER_TOKEN, batch + n))
            .collect();
        for (token, answers) in chunk
            .iter()
            .zip(join_all(storm.into_iter().map(answers)).await)
        {
            for answer in answers {
                assert_eq!(answer.seen.status, StatusCode::OK, "{answer:?}");
                bodies
                    .entry(token.as_str())
                    .or_default()
                    .insert(answer.seen.body);
                answered += 1;
            }
        }
    }

    assert_eq!(answered, TOKENS * REQUESTS_PER_TOKEN);
    assert_eq!(
        fleet.ledger.total(),
        TOKENS,
        "one inner call per token; {:#?}",
        fleet.stats()
    );
    let per_token = fleet.ledger.per_token();
    assert_eq!(per_token.len(), TOKENS);
    assert!(
        per_token.values().all(|calls| *calls == 1),
        "a token called twice"
    );
    assert!(
        bodies.values().all(|bodies| bodies.len() == 1),
        "every caller of a token got the same bytes"
    );
    assert_eq!(fleet.sum(|s| s.store_won), TOKENS as u64);

    // The tokens' keys spread over the slots, and so over the masters.
    let dump = redis.dump().await;
    let replays = keys_ending(&dump, ":res");
    assert_eq!(replays.len(), TOKENS);
    let slots: BTreeSet<u16> = replays.iter().map(|k| key_slot(k.as_bytes())).collect();
    assert!(
        slots.len() > 6_000,
        "{} slots for {TOKENS} tokens (about 7,400 expected of 16,384)",
        slots.len()
    );
    for (master, keys) in redis.keys_per_master().await {
        assert!(
            keys > dump.len() / 4,
            "master {master} holds {keys} of {} keys",
            dump.len()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 9. The master of a running flight's slot fails over
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_survives_the_failover_of_its_slots_master_in_a_cluster_with_replicas() {
    let redis = Deployment::Cluster(RedisCluster::three_masters_three_replicas());
    flight_through_a_failover(redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_survives_the_failover_of_the_sentinels_master() {
    let redis = Deployment::Sentinel(RedisSentinel::start());
    flight_through_a_failover(redis).await;
}

/// A storm of one token over three instances; once its leader is inside the inner call,
/// the master that holds the flight's lock is killed, and the leader finishes while the
/// store fails over. The token server sees the token once; every caller gets the pair or
/// `429`, within its wait timeout and a second; the tables empty afterwards.
async fn flight_through_a_failover(mut redis: Deployment) {
    const CALLERS: usize = 300;
    let config = Config {
        wait_timeout: Duration::from_secs(10),
        ttl: Duration::from_secs(2),
        hard_cap: Duration::from_secs(20),
        command_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let mut fleet = Fleet::new(&redis.shared());
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");

    let storm = fleet.storm(&token, CALLERS, 0);
    fleet
        .within(
            "every request led or joined; one election won (and replicated), two lost",
            || {
                fleet.sum(|s| s.leader + s.joined) == CALLERS as u64
                    && fleet.sum(|s| s.store_won) == 1
                    && fleet.sum(|s| s.store_lost) == 2
                    && fleet.ledger.total() == 1
            },
        )
        .await;
    assert_eq!(
        fleet.sum(|s| s.store_unreplicated),
        0,
        "the replica acknowledged the lock before the leader called"
    );

    // Kill the master that holds the lock, then let the leader's inner call finish: its
    // result meets a store without a master.
    let lock = keys_ending(&redis.dump().await, ":lock");
    assert_eq!(lock.len(), 1, "{lock:?}");
    let failover = redis.kill_master_of(&lock[0]);
    fleet.gates.open();
    let took = tokio::task::spawn_blocking(failover)
        .await
        .expect("the failover wait")
        .unwrap_or_else(|missing| panic!("no failover: {missing}"));
    eprintln!("failover took {took:?}");

    let answers = answers(storm).await;
    assert_eq!(
        fleet.ledger.of(&token),
        1,
        "the token server saw the token once"
    );
    let pairs: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.seen.status == StatusCode::OK)
        .collect();
    let refused = answers
        .iter()
        .filter(|a| a.seen.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        pairs.len() + refused,
        CALLERS,
        "the pair or 429, nothing else"
    );
    assert!(!pairs.is_empty());
    assert!(
        pairs.iter().all(|a| a.seen == pairs[0].seen),
        "every pair the same"
    );
    let limit = config.wait_timeout + Duration::from_secs(1);
    let slowest = answers.iter().map(|a| a.took).max().expect("answers");
    assert!(slowest <= limit, "a caller waited {slowest:?}");
    eprintln!(
        "{} pairs, {refused} × 429, slowest {slowest:?}; stats {:#?}",
        pairs.len(),
        fleet.stats()
    );

    fleet
        .within("every table empty once the replay's TTL passed", || {
            fleet
                .stats()
                .iter()
                .all(|s| s.entries == 0 && s.in_flight == 0)
        })
        .await;
}
