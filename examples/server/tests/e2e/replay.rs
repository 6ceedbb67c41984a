//! Replays, the TTL and logout.

use std::time::Duration;

use serde_json::json;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_inside_the_ttl_is_replayed_and_after_the_ttl_it_is_reuse() {
    // Inside the TTL (the default 30 s): the retry gets the very same answer, in any form.
    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();
    let first = server.refresh(&tokens.refresh, TokenForm::Json).await;
    let pair = first.assert_tokens();
    for form in TokenForm::ALL {
        let retry = server.refresh(&tokens.refresh, form).await;
        assert_eq!(retry.assert_tokens(), pair, "{form:?}");
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.set_cookies(), first.set_cookies());
    }
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!((metrics.layer("leader"), metrics.layer("replayed")), (1, 4));

    // After the TTL the old token is an already rotated token presented again: reuse.
    //
    // The TTL runs on the layer's tokio clock on this (real) runtime. Pausing the clock
    // would not help over sockets: a paused runtime that waits for socket I/O auto-advances
    // to the next timer, so time would jump by whole timer periods during a request. So the
    // test waits for real, 0.2 s, and without a race: the layer stores the replay (and
    // starts its TTL) before it answers, so the entry has expired once `ttl` has passed
    // since the answer arrived.
    let ttl = Duration::from_millis(200);
    let server = start(Config {
        ttl: ttl.as_secs_f64(),
        ..config()
    })
    .await;
    let tokens = server.login_demo().await.assert_tokens();
    let pair = server
        .refresh(&tokens.refresh, TokenForm::Json)
        .await
        .assert_tokens();
    let answered = tokio::time::Instant::now();
    let quick = server.refresh(&tokens.refresh, TokenForm::Cookie).await;
    if answered.elapsed() < ttl {
        assert_eq!(quick.assert_tokens(), pair, "still inside the short TTL");
    }
    tokio::time::sleep_until(answered + ttl).await;

    server
        .refresh(&tokens.refresh, TokenForm::Json)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 1);
    assert!(server.family_revoked(&tokens.refresh).await);
    server
        .refresh(&pair.refresh, TokenForm::Json)
        .await
        .assert_invalid_grant();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_stops_the_replay_of_the_old_token() {
    let server = start(config()).await;
    let handle = server.state().coalesce().expect("the layer is on");
    let old = server.login_demo().await.assert_tokens();
    let new = server
        .refresh(&old.refresh, TokenForm::Json)
        .await
        .assert_tokens();
    assert_eq!(handle.stats().entries, 1, "the old token's answer is kept");

    let reply = server.logout(&new.refresh).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({ "status": "logged_out" }));
    assert_eq!(handle.stats().entries, 0, "logout dropped the replay");

    // Inside the TTL, yet no pair: the layer lets it through and the store refuses it.
    server
        .refresh(&old.refresh, TokenForm::Json)
        .await
        .assert_invalid_grant();
    server
        .refresh(&new.refresh, TokenForm::Bearer)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.layer("replayed"), 0);
    assert_eq!(
        metrics.reuse_detected(),
        0,
        "a logged-out family is no reuse"
    );
    assert!(server.family_revoked(&old.refresh).await);
}
