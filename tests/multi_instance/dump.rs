//! What a dump of Redis reveals after 1,000 tokens.

use super::*;

// 7. What a dump of Redis reveals after 1,000 tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn after_a_storm_over_1000_tokens_redis_holds_no_subject_or_token_bytes_and_every_key_expires()
 {
    after_1000_tokens(Deployment::Standalone(RedisServer::start())).await;
}

#[tokio::test]
async fn after_a_storm_over_1000_tokens_no_cluster_node_holds_subject_or_token_bytes_and_every_key_expires()
 {
    let redis = Deployment::Cluster(RedisCluster::three_masters());
    let masters = after_1000_tokens(redis).await;
    // The keys spread over the masters by their hash tags: each holds about a third.
    for (master, keys) in masters {
        assert!(
            (700..=1300).contains(&keys),
            "master {master} holds {keys} of 3000 keys"
        );
    }
}

#[tokio::test]
async fn after_a_storm_over_1000_tokens_the_sentinels_master_holds_no_subject_or_token_bytes_and_every_key_expires()
 {
    after_1000_tokens(Deployment::Sentinel(RedisSentinel::start())).await;
}

/// Runs 1,000 tokens over three instances on `redis`, then reads every key of every master;
/// returns how many keys each master holds.
async fn after_1000_tokens(redis: Deployment) -> Vec<(usize, usize)> {
    let mut fleet = Fleet::new(&redis.shared());
    // A generous command budget: with a hundred flights at once, all tests of this file in
    // parallel and a debug build on two cores, a command can wait for the runtime longer
    // than the default 100 ms, and a failed command is not what this test is about.
    let config = Config {
        command_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.gates.open();
    fleet.subscribed().await;
    let subjects: Vec<String> = (0..1000)
        .map(|n| format!("user-{n:04}@example.test"))
        .collect();
    let tokens: Vec<String> = subjects.iter().map(|s| tokens::refresh(s)).collect();

    // Waves of 100 tokens, each token once and the first two of a wave twice more on other
    // instances.
    let mut answered = Vec::new();
    for (wave, tokens) in tokens.chunks(100).enumerate() {
        let mut storm = Vec::new();
        for (n, token) in tokens.iter().enumerate() {
            storm.extend(fleet.storm(token, 1, wave + n));
        }
        for (n, token) in tokens.iter().take(2).enumerate() {
            storm.extend(fleet.storm(token, 2, wave + n + 1));
        }
        answered.extend(answers(storm).await);
    }

    assert_eq!(answered.len(), 1040);
    assert!(answered.iter().all(|a| a.seen.status == StatusCode::OK));
    assert_eq!(fleet.sum(|s| s.store_errors), 0, "{:#?}", fleet.stats());
    assert_eq!(
        fleet.ledger.total(),
        1000,
        "one call per token, repeats replayed"
    );
    assert_eq!(fleet.sum(|s| s.store_won), 1000);
    // Leaders release their locks in the background once their callers are answered.
    let released_by = std::time::Instant::now() + Duration::from_secs(5);
    let dump = loop {
        let dump = redis.dump().await;
        if keys_ending(&dump, ":lock").is_empty() || std::time::Instant::now() > released_by {
            break dump;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(keys_ending(&dump, ":res").len(), 1000);
    assert_eq!(
        keys_ending(&dump, ":members").len(),
        2000,
        "each subject's group and each token's tag"
    );
    assert_eq!(keys_ending(&dump, ":lock").len(), 0, "every lock released");
    assert_eq!(dump.len(), 3000, "nothing else");

    // Any 16 bytes of a subject or of a token (its header, payload and signature alike).
    const WINDOW: usize = 16;
    let mut secrets: HashSet<&[u8]> = HashSet::new();
    for text in subjects.iter().chain(&tokens) {
        secrets.extend(text.as_bytes().windows(WINDOW));
    }
    for (name, pttl, value) in &dump {
        let shown = String::from_utf8_lossy(name);
        assert!(*pttl > 0, "{shown} has no TTL ({pttl})");
        for bytes in [name, value] {
            let leak = bytes.windows(WINDOW).find(|w| secrets.contains(w));
            assert!(
                leak.is_none(),
                "{shown} reveals {:?}",
                String::from_utf8_lossy(leak.unwrap())
            );
        }
    }
    redis.keys_per_master().await
}
