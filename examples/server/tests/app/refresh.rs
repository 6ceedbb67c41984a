//! Refresh: every token form, the refusals, reuse detection and the storm without the
//! layer.

use std::sync::Arc;

use axum::http::HeaderValue;
use base64::Engine as _;
use server::harness::family_revoked;
use tokio::task::JoinSet;

use super::*;

// ---------------------------------------------------------------------------------------
// Refresh: every token form
// ---------------------------------------------------------------------------------------

/// Presents `token` in one of the accepted forms and checks the rotation.
async fn assert_rotates(build: impl Fn(&str) -> Request<Body>) {
    let App { router, state } = start_app(config());
    let first = login_demo(&router).await;
    let second = call(&router, build(&first.refresh)).await.assert_tokens();
    assert_ne!(second.refresh, first.refresh, "a new refresh token");
    assert_ne!(second.access, first.access, "a new access token");
    // The new pair works: the access token on the API, the refresh token once more.
    let me = get_with_bearer(&router, "/api/me", &second.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    let third = call(&router, build(&second.refresh)).await.assert_tokens();
    assert_ne!(third.refresh, second.refresh);
    assert_eq!(state.metrics().rotations_total(), 2);
    assert_eq!(state.metrics().reuse_detected_total(), 0);
}

#[tokio::test]
async fn refresh_with_a_json_body_rotates_the_pair() {
    assert_rotates(|token| json_request("/auth/refresh", &json!({ "refresh_token": token }))).await;
}

#[tokio::test]
async fn refresh_with_an_oauth_form_rotates_the_pair() {
    assert_rotates(|token| {
        form_request(
            "/auth/refresh",
            &format!("grant_type=refresh_token&refresh_token={token}&scope=profile"),
        )
    })
    .await;
}

#[tokio::test]
async fn refresh_with_an_oauth_form_and_basic_client_auth_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::AUTHORIZATION, basic("mobile-app", "not-checked"))
            .body(Body::from(format!(
                "grant_type=refresh_token&refresh_token={token}&client_id=mobile-app"
            )))
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_with_the_cookie_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::COOKIE, format!("theme=dark; refresh_token={token}"))
            .body(Body::empty())
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_with_a_bearer_header_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_over_a_socket_answers_no_store_and_one_set_cookie() {
    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();
    let request = server
        .post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::from(format!(
            "grant_type=refresh_token&refresh_token={}",
            tokens.refresh
        )))
        .expect("valid request");
    let rotated = server.send(request).await.assert_tokens();
    assert_ne!(rotated.refresh, tokens.refresh);
    assert_eq!(server.state().metrics().rotations_total(), 1);
}

#[tokio::test]
async fn refresh_accepts_any_request_body_type() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;
    let body = json!({ "refresh_token": tokens.refresh }).to_string();
    let with_string: Request<String> = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("valid request");
    let next = call(&router, with_string).await.assert_tokens();
    let with_full: Request<Full<Bytes>> = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::from(
            json!({ "refresh_token": next.refresh }).to_string(),
        ))
        .expect("valid request");
    call(&router, with_full).await.assert_tokens();
}

#[tokio::test]
async fn the_same_token_in_several_places_is_accepted() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;
    let request = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::COOKIE, format!("refresh_token={}", tokens.refresh))
        .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
        .body(Body::from(
            json!({ "refresh_token": tokens.refresh }).to_string(),
        ))
        .expect("valid request");
    call(&router, request).await.assert_tokens();
}

// ---------------------------------------------------------------------------------------
// Refresh: refusals
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_without_a_token_is_invalid_request() {
    let App { router, .. } = start_app(config());
    let requests = [
        post("/auth/refresh").body(Body::empty()),
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}")),
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=refresh_token")),
        post("/auth/refresh")
            .header(header::AUTHORIZATION, basic("client", "secret"))
            .body(Body::empty()),
        post("/auth/refresh")
            .header(header::COOKIE, "refresh_token=; other=1")
            .body(Body::empty()),
    ];
    for request in requests {
        call(&router, request.expect("valid request"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
}

#[tokio::test]
async fn malformed_requests_get_json_errors_and_never_reach_the_store() {
    let App { router, state } = start_app(config());
    let tokens = login_demo(&router).await;
    let form = "application/x-www-form-urlencoded";
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"refresh_token": 5}"#))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("not json"))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!("grant_type=password&refresh_token={}", tokens.refresh),
            ),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!("refresh_token={}", tokens.refresh),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!(
                    "grant_type=refresh_token&refresh_token={0}&refresh_token={0}",
                    tokens.refresh
                ),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, form)
                .body(Body::from(vec![0xff, b'=', 0xfe]))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Digest realm=x")
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Bearer")
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
                .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            // Two different tokens in one request.
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::COOKIE, "refresh_token=other")
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            // Two different client identifiers in one request.
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, form)
                .header(header::AUTHORIZATION, basic("one", "s"))
                .body(Body::from(format!(
                    "grant_type=refresh_token&refresh_token={}&client_id=two",
                    tokens.refresh
                )))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Basic !!!not-base64")
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            // Read as the layer reads it: a malformed header, not a failed authentication.
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(
                    header::AUTHORIZATION,
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("no-colon")
                    ),
                )
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(
                    header::AUTHORIZATION,
                    HeaderValue::from_bytes(b"Bearer \xfftoken").expect("opaque header"),
                )
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (request, status, error) in cases {
        let described = format!("{} {:?}", request.uri(), request.headers());
        let reply = call(&router, request).await;
        assert_eq!(reply.status, status, "{described}: {:?}", reply.body);
        reply.assert_error(status, error);
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                reply
                    .header(header::WWW_AUTHENTICATE)
                    .is_some_and(|c| c.starts_with("Basic")),
                "invalid_client carries a Basic challenge"
            );
        }
    }
    assert_eq!(state.metrics().rotations_total(), 0);
    // The token survived all of that.
    refresh_json(&router, &tokens.refresh).await.assert_tokens();
}

#[tokio::test]
async fn invalid_refresh_tokens_are_invalid_grant() {
    let App { router, state } = start_app(config());
    let tokens = login_demo(&router).await;

    // An access token is not a refresh token (typ check).
    refresh_json(&router, &tokens.access)
        .await
        .assert_invalid_grant();
    // A tampered signature.
    let mut tampered = tokens.refresh.clone();
    let last = tampered.pop().expect("non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    refresh_json(&router, &tampered)
        .await
        .assert_invalid_grant();
    // Not a JWT at all, and an oversized token.
    refresh_json(&router, "garbage")
        .await
        .assert_invalid_grant();
    refresh_json(&router, &"a.b.c".repeat(2000))
        .await
        .assert_invalid_grant();
    // Signed by another deployment.
    let other = start_app(Config {
        secret: Some("another deployment".into()),
        ..config()
    });
    let foreign = login_demo(&other.router).await;
    refresh_json(&router, &foreign.refresh)
        .await
        .assert_invalid_grant();

    assert_eq!(state.metrics().rotations_total(), 0);
    assert!(!family_revoked(&state, &tokens.refresh).await);
    refresh_json(&router, &tokens.refresh).await.assert_tokens();
}

#[tokio::test]
async fn expired_refresh_token_is_invalid_grant() {
    // A zero lifetime makes tokens expire in the second they are issued.
    let App { router, state } = start_app(Config {
        refresh_ttl: 0,
        ..config()
    });
    let tokens = login_demo(&router).await;
    let body = refresh_json(&router, &tokens.refresh)
        .await
        .assert_invalid_grant();
    assert_eq!(body["error_description"], "token has expired");
    assert_eq!(state.metrics().rotations_total(), 0);
}

#[tokio::test]
async fn reused_refresh_token_revokes_the_family() {
    let server = start(config()).await;
    let first = server.login_demo().await.assert_tokens();
    let second = server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_tokens();

    // The used token again: reuse detected, the whole family revoked.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_invalid_grant();
    assert!(family_revoked(server.state(), &first.refresh).await);
    // The legitimate successor stops working too.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": second.refresh }))
        .await
        .assert_invalid_grant();

    assert_eq!(server.state().metrics().reuse_detected_total(), 1);
    assert_eq!(server.state().metrics().rotations_total(), 1);

    // Another session of the same user is untouched.
    let other = server.login_demo().await.assert_tokens();
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": other.refresh }))
        .await
        .assert_tokens();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_refreshes_of_one_token_without_the_layer_revoke_the_family() {
    // The storm the coalescing layer exists for. The simulated upstream delay makes the
    // requests overlap in the handler; the outcome does not depend on it.
    let server = Arc::new(
        start(Config {
            refresh_delay_ms: 20,
            ..config()
        })
        .await,
    );
    let tokens = server.login_demo().await.assert_tokens();

    let mut storm = JoinSet::new();
    for _ in 0..50 {
        let server = Arc::clone(&server);
        let token = tokens.refresh.clone();
        storm.spawn(async move {
            server
                .post_json("/auth/refresh", &json!({ "refresh_token": token }))
                .await
        });
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    while let Some(reply) = storm.join_next().await {
        let reply = reply.expect("request task completes");
        if reply.status == StatusCode::OK {
            winners.push(reply.assert_tokens());
        } else {
            reply.assert_invalid_grant();
            losers += 1;
        }
    }
    assert_eq!(winners.len(), 1, "exactly one refresh wins");
    assert_eq!(losers, 49);

    // The losers looked like token theft: the family is gone, the winner's tokens too.
    assert!(family_revoked(server.state(), &tokens.refresh).await);
    server
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": winners[0].refresh }),
        )
        .await
        .assert_invalid_grant();
    assert_eq!(server.state().metrics().rotations_total(), 1);
    assert_eq!(server.state().metrics().reuse_detected_total(), 1);
}
