//! The demo, run as the README runs it but smaller: each layer keeps its promise.

use api_client::storm::ClientKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_four_storms_and_each_layer_keeps_its_promise() {
    const N: usize = 100;
    let matrix = demo::run(demo::Options {
        requests: N,
        refresh_delay_ms: 50,
    })
    .await
    .expect("the demo runs");

    let alone = matrix.cell(ClientKind::Naive, false);
    assert!(alone.refreshes > 1, "a refresh per rejected request");
    assert!(alone.reuse_detected > 0);
    assert!(!alone.logged_in, "logged out");

    let server_only = matrix.cell(ClientKind::Naive, true);
    assert!(
        server_only.refreshes > 1,
        "the storm still reaches the server"
    );
    assert_eq!((server_only.rotations, server_only.reuse_detected), (1, 0));
    assert_eq!(server_only.ok, N);
    assert!(server_only.logged_in);

    for server_layer in [false, true] {
        let cell = matrix.cell(ClientKind::Layer, server_layer);
        assert_eq!(cell.refreshes, 1, "one refresh leaves the client");
        assert_eq!((cell.ok, cell.reuse_detected), (N, 0));
        assert!(cell.logged_in);
    }
    assert!(matrix.layers_kept_their_promises());
    let table = matrix.to_string();
    assert!(table.contains("server with its layer"), "{table}");
    assert!(
        table.contains("the client layer keeps the storm at the client"),
        "{table}"
    );
}
