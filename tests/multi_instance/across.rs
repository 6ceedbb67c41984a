//! The cases run over every backend (see `every_backend!`): one storm over three instances,
//! replays and invalidation across instances, and invalidation while another instance's
//! flight runs.

use super::*;

// ---------------------------------------------------------------------------------------
// 1. One storm, three instances
// ---------------------------------------------------------------------------------------

pub(super) async fn a_storm_of_3000_requests_over_three_instances_makes_exactly_one_inner_call(
    shared: Shared,
    _redis: Option<&Deployment>,
) {
    let mut fleet = Fleet::new(&shared);
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");

    let storm = fleet.storm(&token, 3000, 0);
    fleet
        .within(
            "every request led or joined; one election won, two lost; the winner called",
            || {
                fleet.sum(|s| s.leader + s.joined) == 3000
                    && fleet.sum(|s| s.store_won) == 1
                    && fleet.sum(|s| s.store_lost) == 2
                    && fleet.ledger.total() >= 1
            },
        )
        .await;
    assert_eq!(fleet.ledger.total(), 1, "only the elected leader calls");
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.total(), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.json()["for"], digest(&token));
    for stats in fleet.stats() {
        assert_eq!((stats.leader, stats.joined), (1, 999), "{stats:?}");
        assert_eq!(stats.store_won + stats.store_lost, 1, "{stats:?}");
        assert_eq!(stats.store_replayed, stats.store_lost, "{stats:?}");
        assert_eq!((stats.store_errors, stats.timed_out), (0, 0), "{stats:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Replays and invalidation across instances
// ---------------------------------------------------------------------------------------

pub(super) async fn a_result_made_on_one_instance_is_replayed_on_another_until_the_token_is_invalidated(
    shared: Shared,
    server: Option<&Deployment>,
) {
    let mut fleet = Fleet::new(&shared);
    fleet.add(Config::default()).add(Config::default());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");

    let made = fleet.send(0, &token).await;
    let replayed = fleet.send(1, &token).await;

    assert_eq!(made.status, StatusCode::OK);
    assert_eq!(replayed, made, "B answers with A's result");
    assert_eq!(fleet.ledger.total(), 1, "B made no inner call");
    assert_eq!(b.stats().store_replayed, 1);
    assert_eq!(b.stats().entries, 1, "B keeps the replay locally");

    assert_eq!(a.handle.invalidate_token(&token), 1);

    // The propagation is spawned: B's table is cleaned by its listener.
    fleet
        .within("B's replay invalidated", || b.stats().entries == 0)
        .await;
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(keys_ending(&dump, ":res"), Vec::<String>::new(), "{dump:?}");
    }
    let after = fleet.send(1, &token).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        fleet.ledger.total(),
        2,
        "the next request reaches the inner service"
    );
    assert_eq!(fleet.ledger.per_instance(&token, 2), vec![1, 1]);
    assert_ne!(after, made, "a new pair, not the invalidated one");
}

pub(super) async fn invalidating_a_subject_on_one_instance_clears_its_replays_on_every_instance(
    shared: Shared,
    server: Option<&Deployment>,
) {
    let mut fleet = Fleet::new(&shared);
    fleet.add(Config::default()).add(Config::default());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    // Two devices of bob, and carol.
    let bobs = [tokens::refresh("bob"), tokens::refresh("bob")];
    let carols = tokens::refresh("carol");
    for token in bobs.iter().chain([&carols]) {
        let made = fleet.send(0, token).await;
        assert_eq!(made.status, StatusCode::OK);
        assert_eq!(fleet.send(1, token).await, made, "replayed on B");
    }
    assert_eq!(fleet.ledger.total(), 3);
    assert_eq!(b.stats().store_replayed, 3);
    assert_eq!(b.stats().entries, 3);

    assert_eq!(a.handle.invalidate_subject("bob"), 2);

    fleet
        .within("bob's replays invalidated on B", || b.stats().entries == 1)
        .await;
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(
            keys_ending(&dump, ":res").len(),
            1,
            "carol's only: {dump:?}"
        );
        assert_eq!(
            keys_ending(&dump, ":members").len(),
            1 + 3,
            "carol's group, and each token's tag (remembered before the election): {dump:?}"
        );
    }
    fleet.send(1, &bobs[0]).await;
    fleet.send(1, &carols).await;
    assert_eq!(
        fleet.ledger.per_instance(&bobs[0], 2),
        vec![1, 1],
        "bob's reaches the inner service"
    );
    assert_eq!(
        fleet.ledger.per_instance(&carols, 2),
        vec![1, 0],
        "carol's is still replayed"
    );
}

pub(super) async fn a_refusal_reaches_every_instances_callers_once_and_is_not_replayed(
    shared: Shared,
    _redis: Option<&Deployment>,
) {
    let mut fleet = Fleet::new(&shared);
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("revoked");

    let storm = fleet.storm(&token, 30, 0);
    fleet
        .within("every request led or joined; one election won", || {
            fleet.sum(|s| s.leader + s.joined) == 30
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fleet.ledger.total(), 1);
    for index in 0..3 {
        fleet
            .within("the flight's entry is gone", || {
                fleet.instances[index].stats().entries == 0
            })
            .await;
    }
    let retry = fleet.send(1, &token).await;
    assert_eq!(retry.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fleet.ledger.total(), 2, "a refusal is never replayed");
}

// ---------------------------------------------------------------------------------------
// 2b. Invalidation while another instance's flight runs
// ---------------------------------------------------------------------------------------

/// How a test revokes alice's token on instance A.
#[derive(Clone, Copy)]
enum Revoke {
    Token,
    Subject,
}

/// B leads a refresh of alice's token (its inner service gated); A revokes it meanwhile.
/// B's caller gets the revoked refusal, and no later request on A or B gets that flight's
/// pair: the first leads a new inner call, the second answers with that new pair.
async fn revoked_while_another_instance_leads(
    shared: Shared,
    server: Option<&Deployment>,
    revoke: Revoke,
) {
    let mut fleet = Fleet::new(&shared);
    let (open, gated) = (Gates::closed(), Gates::closed());
    open.open();
    fleet
        .add_with(Config::default(), &open)
        .add_with(Config::default(), &gated);
    fleet.subscribed().await;
    let token = tokens::refresh("alice");

    let on_b = fleet.storm_over(&token, 1, &[1]);
    fleet
        .within("B leads and calls its inner service", || {
            fleet.instances[1].stats().store_won == 1 && fleet.ledger.total() == 1
        })
        .await;
    let a = &fleet.instances[0];
    match revoke {
        Revoke::Token => {
            a.handle.invalidate_token(&token);
        }
        Revoke::Subject => {
            a.handle.invalidate_subject("alice");
        }
    }
    // The store propagates the invalidation: B's listener removes its running flight.
    fleet
        .within("B heard the invalidation", || {
            fleet.instances[1].stats().entries == 0
        })
        .await;
    gated.open();
    let refused = answers(on_b).await.remove(0).seen;

    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(refused.json()["error"], "invalid_grant");
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(keys_ending(&dump, ":res"), Vec::<String>::new(), "{dump:?}");
    }
    let first = match revoke {
        Revoke::Token => 0,
        Revoke::Subject => 1,
    };
    let led = fleet.send(first, &token).await;
    assert_eq!(led.status, StatusCode::OK);
    assert_eq!(fleet.ledger.total(), 2, "the next request leads a new call");
    assert_eq!(
        led.json()["refresh_token"],
        "refresh-2",
        "not the revoked pair"
    );
    let other = fleet.send(1 - first, &token).await;
    assert_eq!(other, led, "the other instance answers with the new pair");
    assert_eq!(fleet.ledger.total(), 2);
}

pub(super) async fn a_token_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed(
    shared: Shared,
    server: Option<&Deployment>,
) {
    revoked_while_another_instance_leads(shared, server, Revoke::Token).await;
}

pub(super) async fn a_subject_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed(
    shared: Shared,
    server: Option<&Deployment>,
) {
    revoked_while_another_instance_leads(shared, server, Revoke::Subject).await;
}

#[tokio::test(start_paused = true)]
async fn a_replay_from_the_store_is_not_served_after_the_tokens_exp() {
    let mut fleet = Fleet::new(&memory());
    let config = Config {
        ttl: Duration::from_secs(30),
        ..Config::default()
    };
    fleet.add(config).add(config);
    fleet.gates.open();
    // Expires within the second after next, plus the verifier's 5 s leeway: at most 7 s.
    let mut claims = tokens::claims("alice");
    claims["exp"] = json!(tokens::now() + 1);
    let token = tokens::hs256(&claims);

    let made = fleet.send(0, &token).await;
    assert_eq!(fleet.send(1, &token).await, made, "B replays A's pair");
    assert_eq!(fleet.ledger.total(), 1);

    // The paused clock moves past the token's exp (the wall clock, which verifies, does not).
    tokio::time::advance(Duration::from_secs(8)).await;

    let after = fleet.send(1, &token).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        fleet.ledger.total(),
        2,
        "neither B's table nor the store replays"
    );
    assert_ne!(after, made);
    let on_a = fleet.send(0, &token).await;
    assert_ne!(on_a, made, "nor A's table");
}

// ---------------------------------------------------------------------------------------
