//! `/metrics`.

use super::*;

#[test]
fn the_metrics_parser_refuses_malformed_lines() {
    let good = "# HELP a_total A.\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"\"} 2\n# EOF\n";
    let parsed = Metrics::parse(good).expect("well-formed metrics");
    assert_eq!(parsed.count("a_total{x=\"1\",y=\"q\\\"\"}"), 2);
    for bad in [
        "# TYPE a counter\na_total 1\n",                   // no # EOF
        "# TYPE a counter\na_total  1\n# EOF\n",           // two spaces
        "# TYPE a counter\na_total{x=1} 1\n# EOF\n",       // unquoted label value
        "# TYPE a counter\na_total{x=\"1\" 1\n# EOF\n",    // unclosed label set
        "# TYPE a counter\na_total 1 123\n# EOF\n",        // timestamp
        "# TYPE a counter\na 1\n# EOF\n",                  // counter without _total
        "# TYPE a counter\na_total 1.5\n# EOF\n",          // fractional counter
        "# TYPE a counter\na_total 1\na_total 2\n# EOF\n", // duplicate
        "a_total 1\n# EOF\n",                              // no # TYPE
        "# TYPE a teapot\na_total 1\n# EOF\n",             // unknown type
        "# TYPE a counter\n\n# EOF\n",                     // empty line
        "# TYPE a counter\n1a_total 1\n# EOF\n",           // bad name
    ] {
        let outcome = Metrics::parse(bad);
        assert!(outcome.is_err(), "accepted {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_match_the_requests_made() {
    const STORM: u64 = 300;
    let server = start(Config {
        refresh_delay_ms: 100,
        ..config()
    })
    .await;
    let start = server.metrics().await;
    assert!(start.samples().values().all(|v| *v == 0.0), "{start:#?}");

    let tokens = server.login_demo().await.assert_tokens();
    let replies = server.storm(STORM as usize, &tokens.refresh).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));

    let metrics = server.metrics().await;
    assert_eq!(metrics.count("login_requests_total{outcome=\"ok\"}"), 1);
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!(
        metrics.count("refresh_requests_total{outcome=\"ok\"}"),
        1,
        "the handler answered once"
    );
    assert_eq!(metrics.layer("leader"), 1);
    assert_eq!(
        metrics.layer("joined") + metrics.layer("replayed"),
        STORM - 1
    );
    for outcome in [
        "rejected",
        "timed_out",
        "overloaded",
        "leader_failed",
        "bypassed",
    ] {
        assert_eq!(metrics.layer(outcome), 0, "{outcome}");
    }
    assert_eq!(metrics.count("refresh_coalesce_flights_active"), 0);
    assert_eq!(
        metrics.count("refresh_coalesce_entries"),
        1,
        "one replay kept"
    );
    assert_eq!(metrics.count("refresh_coalesce_reuse_suspected_total"), 0);

    // One more retry (a replay) and one garbage token (refused by the layer, before the
    // handler).
    let replayed = metrics.layer("replayed");
    server
        .refresh(&tokens.refresh, TokenForm::Bearer)
        .await
        .assert_tokens();
    server
        .refresh("not-a-token", TokenForm::Json)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.layer("replayed"), replayed + 1);
    assert_eq!(metrics.layer("rejected"), 1);
    assert_eq!(metrics.count("refresh_requests_total{outcome=\"ok\"}"), 1);
    assert_eq!(
        metrics.count("refresh_requests_total{outcome=\"invalid_grant\"}"),
        0,
        "the handler never saw the garbage"
    );
    let seen_by_layer: u64 = [
        "leader",
        "joined",
        "replayed",
        "rejected",
        "timed_out",
        "overloaded",
        "leader_failed",
        "bypassed",
    ]
    .into_iter()
    .map(|outcome| metrics.layer(outcome))
    .sum();
    assert_eq!(
        seen_by_layer,
        STORM + 2,
        "every refresh request counted once"
    );
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
}
