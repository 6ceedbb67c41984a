//! The demo, run as the README runs it but smaller: the layer keeps its promise.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_completion_and_the_layer_rotates_once() {
    let report = demo::run(demo::Options {
        requests: 100,
        concurrency: 100,
        refresh_delay_ms: 50,
    })
    .await
    .expect("the demo runs");
    let (with, without) = (&report.with, &report.without);
    assert_eq!(with.requests, 100);
    assert_eq!(with.rotations, 1);
    assert_eq!(with.ok, 100);
    assert_eq!(with.distinct_refresh_tokens, 1);
    assert_eq!(with.reuse_detected, 0);
    assert!(with.session_survives);
    let layer = with.layer.expect("layer counters");
    assert_eq!(layer.leader, 1);
    assert_eq!(layer.joined + layer.replayed, 99);

    assert_eq!(without.ok, 1);
    assert_eq!(without.invalid_grant, 99);
    assert!(without.reuse_detected > 0);
    assert!(!without.session_survives);
    assert!(without.layer.is_none());

    assert!(report.layer_kept_its_promise());
    let table = report.to_string();
    assert!(
        table.contains("with it: one rotation, every request got the same new pair"),
        "{table}"
    );
}
