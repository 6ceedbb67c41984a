//! Elections and locks: who leads, fences, releases, leases.

use super::*;

// The cases
// ---------------------------------------------------------------------------------------

pub(super) async fn loading_a_key_nothing_was_stored_for_finds_nothing(b: Backend) {
    let found = b.store(0).load(&key("empty"), &SEAL, None).await.unwrap();
    assert_eq!(found, None, "{}", b.name);
}

pub(super) async fn the_first_election_wins_and_the_second_loses_naming_the_first_fence(
    b: Backend,
) {
    let k = key("elect");
    let (first, second) = (Fence::random(), Fence::random());

    let won = b.store(0).elect(&k, &first, LEASE).await.unwrap();
    let lost = b.store(1).elect(&k, &second, LEASE).await.unwrap();
    let lost_again = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();

    assert_eq!(won, Election::Won { generation: 0 }, "{}", b.name);
    assert_eq!(
        lost,
        Election::Lost {
            leader: first.clone(),
            generation: 0
        },
        "{}",
        b.name
    );
    assert_eq!(
        lost_again,
        Election::Lost {
            leader: first,
            generation: 0
        },
        "{}",
        b.name
    );
}

pub(super) async fn electing_again_with_the_winning_fence_reports_a_win(b: Backend) {
    // A retry after an answer was lost on the way back must not turn the winner into a
    // follower of itself.
    let k = key("elect-again");
    let fence = Fence::random();
    assert_eq!(
        b.store(0).elect(&k, &fence, LEASE).await.unwrap(),
        Election::Won { generation: 0 },
        "{}",
        b.name
    );
    assert_eq!(
        b.store(1).elect(&k, &fence, LEASE).await.unwrap(),
        Election::Won { generation: 0 },
        "{}",
        b.name
    );
    let other = b.store(2).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(
        other,
        Election::Lost {
            leader: fence,
            generation: 0
        },
        "{}",
        b.name
    );
}

pub(super) async fn a_release_by_a_foreign_fence_keeps_the_lock_and_the_owners_frees_it(
    b: Backend,
) {
    let k = key("release");
    let (owner, foreign) = (Fence::random(), Fence::random());
    assert_eq!(
        b.store(0).elect(&k, &owner, LEASE).await.unwrap(),
        Election::Won { generation: 0 }
    );

    b.store(1).release(&k, &foreign).await.unwrap();
    let after_foreign = b.store(1).elect(&k, &foreign, LEASE).await.unwrap();
    b.store(2).release(&k, &owner).await.unwrap();
    let after_owner = b.store(1).elect(&k, &foreign, LEASE).await.unwrap();

    assert_eq!(
        after_foreign,
        Election::Lost {
            leader: owner,
            generation: 0
        },
        "{}",
        b.name
    );
    assert_eq!(after_owner, Election::Won { generation: 0 }, "{}", b.name);
}

pub(super) async fn an_expired_lease_lets_another_fence_win(b: Backend) {
    let k = key("lease");
    let lease = Duration::from_millis(300);
    assert_eq!(
        b.store(0).elect(&k, &Fence::random(), lease).await.unwrap(),
        Election::Won { generation: 0 }
    );

    // A real wait: the lease has to pass.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;

    let next = b.store(1).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(next, Election::Won { generation: 0 }, "{}", b.name);
}

pub(super) async fn a_won_election_is_acknowledged_by_as_many_replicas_as_the_store_requires(
    b: Backend,
) {
    let k = key("replicated");
    let won = b.store(0).elect(&k, &Fence::random(), LEASE).await.unwrap();
    assert_eq!(won, Election::Won { generation: 0 }, "{}", b.name);
    // Memory and standalone Redis require none; the Sentinel set's master has its one
    // replica acknowledge the lock (`WAIT 1`); the cluster here has no replicas and
    // requires none.
    let replicated = b.store(0).replicate(&k).await.unwrap();
    assert!(replicated, "{}", b.name);
}

pub(super) async fn an_election_after_a_replay_was_stored_takes_no_lock_and_reports_the_replay(
    b: Backend,
) {
    let k = key("stored before the election");
    let (leader, late) = (Fence::random(), Fence::random());
    assert_eq!(
        b.store(0).elect(&k, &leader, LEASE).await.unwrap(),
        Election::Won { generation: 0 },
        "{}",
        b.name
    );
    b.store(0)
        .complete(&k, &leader, &SEAL, b"pair".to_vec(), replay(TTL), &FRESH)
        .await
        .unwrap();
    b.store(0).release(&k, &leader).await.unwrap();

    // A flight that looked before the replay was stored elects after the lock is free: it
    // must not lead a second call.
    let election = b.store(1).elect(&k, &late, LEASE).await.unwrap();
    assert_eq!(election, Election::Replay, "{}", b.name);
    let loaded = b.store(1).load(&k, &SEAL, None).await.unwrap();
    assert_stored(loaded, b"pair", true, TTL);
    // No lock was taken: once the replay is gone, the next election is won.
    b.store(2).invalidate(&k, LIFE).await.unwrap();
    assert_eq!(
        b.store(2).elect(&k, &late, LEASE).await.unwrap(),
        Election::Won { generation: 1 },
        "{}",
        b.name
    );
}
