//! The HTTP storm over real sockets against the reference server: 1,000 concurrent
//! `GET /api/me` with an expired access token.

use api_client::storm::{self, ClientKind, Options};

const REQUESTS: usize = 1_000;

fn options(client: ClientKind, server_layer: bool) -> Options {
    Options {
        requests: REQUESTS,
        refresh_delay_ms: 50,
        server_layer,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_client_layer_a_storm_makes_one_refresh_and_every_request_succeeds() {
    // The server's own layer is off: the client alone keeps the storm to one refresh.
    let report = storm::run(options(ClientKind::Layer, false))
        .await
        .expect("the storm runs");
    assert_eq!(report.ok, REQUESTS, "{:?}", report.other);
    assert_eq!(
        report.refreshes, 1,
        "one POST /auth/refresh reached the server"
    );
    assert_eq!(report.rotations, 1, "refresh_rotations_total +1");
    assert_eq!(report.reuse_detected, 0);
    assert!(report.logged_in);
    let stats = report.client_stats.expect("the layer's counters");
    assert_eq!(stats.refreshes(), 1);
    // Each rejected request was sent again once: the one that refreshed, and those that
    // waited for it or found its result. (A request that left after the refresh went with
    // the new token at once.)
    assert!(stats.retried >= 1 && stats.retried <= REQUESTS as u64);
    assert_eq!(stats.joined + stats.stale, stats.retried - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_layers_a_storm_still_sends_one_refresh() {
    let report = storm::run(options(ClientKind::Layer, true))
        .await
        .expect("the storm runs");
    assert_eq!(report.ok, REQUESTS);
    assert_eq!(
        (report.refreshes, report.rotations, report.reuse_detected),
        (1, 1, 0)
    );
    assert!(report.logged_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_refreshes_on_every_401_sends_a_refresh_per_request_and_is_logged_out() {
    let report = storm::run(options(ClientKind::Naive, false))
        .await
        .expect("the storm runs");
    assert_eq!(report.rotations, 1, "the first refresh wins");
    assert!(report.reuse_detected >= 1, "the others are reuse");
    assert!(!report.logged_in, "the family was revoked");
    // Every rejected request refreshed once; only the winner's was then answered. (A
    // request that left after the winner stored its pair went with the new access token,
    // which stays valid until it expires.)
    let late = report.ok - 1;
    assert_eq!(
        report.refreshes,
        (REQUESTS - late) as u64,
        "one refresh per rejection"
    );
    assert!(report.refreshes > 1);
    assert_eq!(report.unauthorized, REQUESTS - 1 - late);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_layer_saves_the_naive_client_from_itself() {
    let report = storm::run(options(ClientKind::Naive, true))
        .await
        .expect("the storm runs");
    assert!(
        report.refreshes > 1,
        "every rejection still sends a refresh to the server"
    );
    assert_eq!((report.rotations, report.reuse_detected), (1, 0));
    assert_eq!(report.ok, REQUESTS);
    assert!(report.logged_in);
}
