//! The storm the layer exists for, with and without it.

use axum::http::StatusCode;
use serde_json::json;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_refreshes_rotates_once_and_every_caller_gets_the_same_pair() {
    // The simulated upstream keeps the leader's refresh running while the storm connects.
    let server = start(Config {
        refresh_delay_ms: 100,
        ..config()
    })
    .await;
    let mut tokens = server.login_demo().await.assert_tokens();

    // Every token form reaches the handler through the layer, and each fresh token rotates.
    for form in TokenForm::ALL {
        let next = server.refresh(&tokens.refresh, form).await.assert_tokens();
        assert_ne!(next.refresh, tokens.refresh, "{form:?} rotated");
        tokens = next;
    }
    let before = server.metrics().await;
    assert_eq!(before.rotations(), 4);
    assert_eq!(before.layer("leader"), 4);

    let replies = server.storm(1000, &tokens.refresh).await;
    let first = replies[0].assert_tokens();
    assert_ne!(first.refresh, tokens.refresh);
    for reply in &replies {
        assert_eq!(reply.assert_tokens(), first);
        assert_eq!(reply.body, replies[0].body, "byte-identical bodies");
        assert_eq!(reply.set_cookies(), replies[0].set_cookies());
    }

    let after = server.metrics().await;
    assert_eq!(after.rotations() - before.rotations(), 1, "one rotation");
    assert_eq!(after.reuse_detected(), before.reuse_detected());
    assert_eq!(after.reuse_detected(), 0);
    assert_eq!(after.layer("leader") - before.layer("leader"), 1);
    assert_eq!(
        after.layer("joined") + after.layer("replayed")
            - before.layer("joined")
            - before.layer("replayed"),
        999
    );

    // The session goes on with the pair everyone got.
    let next = server
        .refresh(&first.refresh, TokenForm::Json)
        .await
        .assert_tokens();
    assert_ne!(next.refresh, first.refresh);
    let me = server.get("/api/me", Some(&next.access)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    assert_eq!(server.metrics().await.rotations(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_layer_the_same_storm_revokes_the_family() {
    let server = start(Config {
        no_coalesce: true,
        refresh_delay_ms: 50,
        ..config()
    })
    .await;
    assert!(server.state().coalesce().is_none());
    let tokens = server.login_demo().await.assert_tokens();

    let replies = server.storm(200, &tokens.refresh).await;
    let mut winners = Vec::new();
    for reply in &replies {
        if reply.status == StatusCode::OK {
            winners.push(reply.assert_tokens());
        } else {
            reply.assert_invalid_grant();
        }
    }
    assert_eq!(winners.len(), 1, "exactly one refresh wins");

    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert!(metrics.reuse_detected() > 0, "the losers looked like theft");
    assert!(
        !metrics
            .samples()
            .keys()
            .any(|k| k.starts_with("refresh_coalesce")),
        "no layer, no layer counters"
    );

    // The user is logged out: the family is revoked, the winner's new token refused.
    assert!(server.family_revoked(&tokens.refresh).await);
    server
        .refresh(&winners[0].refresh, TokenForm::Json)
        .await
        .assert_invalid_grant();
}
