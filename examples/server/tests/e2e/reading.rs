//! One reading of a request: a body that a form reader and a JSON reader read differently.

use super::*;
use crate::clients::ServerExt as _;

/// A form body that reads as JSON too: `{"refresh_token":"V","x":"=&…&refresh_token=A&y="}`.
/// Read as a form (its Content-Type), it carries `grant_type` and token A; a reader that
/// decides by the first byte sees JSON and token V.
fn two_faced(json_token: &str, form: &str) -> String {
    format!(r#"{{"refresh_token":"{json_token}","x":"=&{form}&y="}}"#)
}

#[tokio::test]
async fn a_body_that_reads_as_two_requests_is_handled_as_the_layer_read_it() {
    for config in [
        config(),
        Config {
            no_coalesce: true,
            ..config()
        },
    ] {
        let server = start(config).await;
        let attacker = server.login_demo().await.assert_tokens();
        let victim = server.login_demo().await.assert_tokens();
        // The layer verifies and keys A; the handler must rotate A, never V.
        let body = two_faced(
            &victim.refresh,
            &format!(
                "grant_type=refresh_token&refresh_token={}",
                attacker.refresh
            ),
        );
        let reply = server.post_form(app::REFRESH_PATH, body, None).await;
        reply.assert_tokens();
        // A hidden `grant_type=password`: the layer passes the request through as no
        // refresh, and the handler must not refresh V either.
        let body = two_faced(&victim.refresh, "grant_type=password&username=demo");
        let reply = server.post_form(app::REFRESH_PATH, body, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.json());
        assert_eq!(reply.json()["error"], "unsupported_grant_type");
        // V was never rotated: it still refreshes, once, with no reuse detected.
        server
            .refresh(&victim.refresh, TokenForm::Json)
            .await
            .assert_tokens();
        let metrics = server.metrics().await;
        assert_eq!(metrics.rotations(), 2, "A once and V once");
        assert_eq!(metrics.reuse_detected(), 0);
    }
}
