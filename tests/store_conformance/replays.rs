//! Replays and waits: stored values, late leaders, followers waiting for a result.

use super::*;

pub(super) async fn a_stored_replay_is_loaded_with_its_ttl_only_under_the_same_seal(b: Backend) {
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

pub(super) async fn a_late_leader_completing_a_second_replay_gets_the_first_value(b: Backend) {
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

pub(super) async fn a_wait_returns_the_replay_as_soon_as_the_leader_completes_later(b: Backend) {
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

pub(super) async fn a_wait_returns_the_flight_outcome_of_its_fence_which_is_no_replay(b: Backend) {
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

pub(super) async fn a_flight_outcome_releases_the_lock_so_the_next_request_leads(b: Backend) {
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

pub(super) async fn a_wait_for_an_unknown_fence_returns_nothing_at_its_deadline(b: Backend) {
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
