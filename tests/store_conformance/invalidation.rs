//! Invalidation: of a key, of a group, of a flight still running; expiry.

use super::*;

pub(super) async fn invalidating_a_key_removes_its_replay_and_tells_every_handle(b: Backend) {
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

pub(super) async fn invalidating_a_group_removes_that_groups_replays_only_and_tells_every_handle(
    b: Backend,
) {
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

pub(super) async fn a_replay_expires_after_its_ttl(b: Backend) {
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

pub(super) async fn a_completion_after_its_key_was_invalidated_stores_nothing_and_its_follower_is_told(
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

pub(super) async fn a_follower_elected_after_the_invalidation_learns_that_its_leader_was_revoked(
    b: Backend,
) {
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

pub(super) async fn a_group_invalidated_during_a_flight_makes_its_completion_revoked(b: Backend) {
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

pub(super) async fn a_value_stored_under_an_old_group_generation_neither_loads_nor_arrives(
    b: Backend,
) {
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
