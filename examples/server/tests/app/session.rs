//! Logout, `/api/me`, `/metrics`, `/healthz`, fallbacks, the body limit, and secrets and a
//! database file shared by several instances.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use server::harness::{Metrics, TempDir, family_revoked};

use super::*;

// ---------------------------------------------------------------------------------------
// Logout
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn logout_revokes_the_family_and_calls_the_hook() {
    let App { router, state } = start_app(config());
    let events: Arc<Mutex<Vec<LogoutEvent>>> = Arc::default();
    let seen = Arc::clone(&events);
    state.set_on_logout(move |event| {
        // The hook may hand slow work (a Redis invalidation) to the runtime.
        assert!(
            tokio::runtime::Handle::try_current().is_ok(),
            "runtime available"
        );
        seen.lock().unwrap().push(event.clone());
    });

    let first = login_demo(&router).await;
    let second = refresh_json(&router, &first.refresh).await.assert_tokens();

    let request = post("/auth/logout")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::AUTHORIZATION, basic("web%20app", "x"))
        .body(Body::from(format!("token={}", second.refresh)))
        .expect("valid request");
    let reply = call(&router, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({ "status": "logged_out" }));
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));
    let cleared = reply.header(header::SET_COOKIE).expect("cookie cleared");
    assert!(cleared.starts_with("refresh_token=;") && cleared.contains("Max-Age=0"));

    assert!(family_revoked(&state, &second.refresh).await);
    refresh_json(&router, &second.refresh)
        .await
        .assert_invalid_grant();
    {
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, "demo");
        assert_eq!(events[0].token, second.refresh);
        assert_eq!(events[0].client_id.as_deref(), Some("web app"));
        assert!(!format!("{:?}", events[0]).contains(&second.refresh));
    }

    // Idempotent, with any token of the family and any accepted form.
    for request in [
        json_request("/auth/logout", &json!({ "refresh_token": first.refresh })),
        post("/auth/logout")
            .header(header::COOKIE, format!("refresh_token={}", second.refresh))
            .body(Body::empty())
            .expect("valid request"),
        post("/auth/logout")
            .header(header::AUTHORIZATION, format!("Bearer {}", second.refresh))
            .body(Body::empty())
            .expect("valid request"),
    ] {
        let reply = call(&router, request).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
    assert_eq!(events.lock().unwrap().len(), 4);
    // A logout is not a reuse.
    assert_eq!(state.metrics().reuse_detected_total(), 0);
}

#[tokio::test]
async fn logout_with_an_invalid_token_is_invalid_grant() {
    let App { router, state } = start_app(config());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    state.set_on_logout(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let tokens = login_demo(&router).await;
    for token in ["garbage", tokens.access.as_str()] {
        call(
            &router,
            json_request("/auth/logout", &json!({ "refresh_token": token })),
        )
        .await
        .assert_invalid_grant();
    }
    call(
        &router,
        post("/auth/logout")
            .body(Body::empty())
            .expect("valid request"),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(!family_revoked(&state, &tokens.refresh).await);
}

// ---------------------------------------------------------------------------------------
// /api/me, /metrics, /healthz, fallbacks, limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn api_me_accepts_access_tokens_and_refuses_refresh_tokens() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;

    let me = get_with_bearer(&router, "/api/me", &tokens.access).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json(), json!({ "sub": "demo" }));

    let refused = get_with_bearer(&router, "/api/me", &tokens.refresh).await;
    refused.assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    assert!(
        refused
            .header(header::WWW_AUTHENTICATE)
            .is_some_and(|c| c.starts_with("Bearer"))
    );

    get_with_bearer(&router, "/api/me", "garbage")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    let anonymous = Request::builder()
        .uri("/api/me")
        .body(Body::empty())
        .expect("valid request");
    call(&router, anonymous)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
}

#[tokio::test]
async fn api_me_refuses_expired_access_tokens() {
    let App { router, .. } = start_app(Config {
        access_ttl: 0,
        ..config()
    });
    let reply = login(&router, "demo", "demo").await;
    let access = reply.json()["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();
    get_with_bearer(&router, "/api/me", &access)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
}

#[tokio::test]
async fn metrics_are_openmetrics_text_with_the_rotation_counters() {
    let server = start(config()).await;
    let extra = prometheus_client::metrics::counter::Counter::<u64>::default();
    server.state().register_metrics(|registry| {
        registry.register(
            "layer_test",
            "A counter registered from outside",
            extra.clone(),
        );
    });
    extra.inc();

    let first = server.login_demo().await.assert_tokens();
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_tokens();
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_invalid_grant();

    let reply = server.get("/metrics", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header(header::CONTENT_TYPE)
            .is_some_and(|c| c.starts_with("application/openmetrics-text"))
    );
    let text = std::str::from_utf8(&reply.body).expect("UTF-8 metrics");
    assert!(text.contains("# TYPE refresh_rotations counter"));
    let metrics = Metrics::parse(text).expect("OpenMetrics text");
    let sample = |series: &str| {
        metrics
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {metrics:?}"))
    };
    assert_eq!(sample("refresh_rotations_total"), 1.0);
    assert_eq!(sample("refresh_reuse_detected_total"), 1.0);
    assert_eq!(sample(r#"refresh_requests_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        sample(r#"refresh_requests_total{outcome="invalid_grant"}"#),
        1.0
    );
    assert_eq!(sample(r#"login_requests_total{outcome="ok"}"#), 1.0);
    assert_eq!(sample("layer_test_total"), 1.0);
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = start(config()).await;
    let reply = server.get("/healthz", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"ok");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let App { router, .. } = start_app(config());
    let missing = Request::builder()
        .uri("/nope")
        .body(Body::empty())
        .expect("valid request");
    call(&router, missing)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let wrong_method = Request::builder()
        .uri("/auth/refresh")
        .body(Body::empty())
        .expect("valid request");
    let reply = call(&router, wrong_method).await;
    reply.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(
        reply
            .header(header::ALLOW)
            .is_some_and(|a| a.contains("POST"))
    );
}

#[tokio::test]
async fn bodies_over_16_kib_are_refused_with_a_json_413() {
    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();
    let padding = "x".repeat(app::MAX_BODY_BYTES);
    for path in ["/auth/refresh", "/auth/login", "/auth/logout"] {
        let body = json!({ "refresh_token": tokens.refresh, "padding": padding });
        server
            .post_json(path, &body)
            .await
            .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    }
    // A streamed body without Content-Length is cut off at the same size.
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = (0..20)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b' '; 1024]))))
        .collect();
    let App { router, .. } = start_app(config());
    let streamed = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )))
        .expect("valid request");
    call(&router, streamed)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    // The token was never consumed.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": tokens.refresh }))
        .await
        .assert_tokens();
}

// ---------------------------------------------------------------------------------------
// Secrets and a shared database file
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_apps_sharing_a_database_file_accept_each_others_tokens() {
    let db = TempDir::new("shared-db").expect("a temporary directory");
    let a = start_app(Config {
        db: Some(db.join("tokens.db")),
        ..config()
    });
    let b = start_app(Config {
        db: Some(db.join("tokens.db")),
        ..config()
    });
    assert_eq!(a.state.secret().len(), 32, "a generated 32-byte secret");
    assert_eq!(
        a.state.secret(),
        b.state.secret(),
        "one secret kept in the database"
    );
    assert_eq!(a.state.jwt_signing_key(), b.state.jwt_signing_key());

    let first = login_demo(&a.router).await;
    let me = get_with_bearer(&b.router, "/api/me", &first.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    let second = refresh_json(&b.router, &first.refresh)
        .await
        .assert_tokens();
    let third = refresh_json(&a.router, &second.refresh)
        .await
        .assert_tokens();

    // Reuse seen by one instance revokes the family for both.
    refresh_json(&b.router, &first.refresh)
        .await
        .assert_invalid_grant();
    assert_eq!(b.state.metrics().reuse_detected_total(), 1);
    refresh_json(&a.router, &third.refresh)
        .await
        .assert_invalid_grant();

    // A restart on the same file keeps the secret.
    drop(a);
    let c = start_app(Config {
        db: Some(db.join("tokens.db")),
        ..config()
    });
    assert_eq!(c.state.secret(), b.state.secret());
}

#[tokio::test]
async fn a_configured_secret_replaces_the_stored_one() {
    let with_secret = |secret: &str| Config {
        secret: Some(secret.to_owned()),
        ..config()
    };
    let a = start_app(with_secret("shared secret"));
    let b = start_app(with_secret("shared secret"));
    let c = start_app(with_secret("another secret"));
    assert_eq!(a.state.secret(), b"shared secret");
    let tokens = login_demo(&a.router).await;
    // Access tokens are stateless: same secret, accepted; other secret, refused.
    let me = get_with_bearer(&b.router, "/api/me", &tokens.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    get_with_bearer(&c.router, "/api/me", &tokens.access)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    // Refresh tokens also need the store: b never issued this one.
    refresh_json(&b.router, &tokens.refresh)
        .await
        .assert_invalid_grant();
    // An empty secret is a configuration error.
    assert!(matches!(
        app::app(with_secret("")),
        Err(app::AppError::Config(_))
    ));
}

// ---------------------------------------------------------------------------------------
// The coalescing layer's audit log
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_audit_log_has_a_json_line_per_layer_decision_and_no_token() {
    let dir = TempDir::new("audit").expect("temp dir");
    let path = dir.path().join("audit.jsonl");
    let App { router, .. } = start_app(Config {
        audit_log: Some(path.clone()),
        ..harness::config()
    });
    let tokens = login_demo(&router).await;
    // Refused by the layer: no token at all.
    let reply = call(&router, post("/auth/refresh").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // A logout invalidates the token's entries and the subject's.
    let reply = call(
        &router,
        json_request("/auth/logout", &json!({ "refresh_token": tokens.refresh })),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let text = std::fs::read_to_string(&path).expect("audit log written");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let summary: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|line| (line["audit"].as_str().unwrap(), line["subject"].as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("refused", None),
            ("invalidated", None),
            ("invalidated", Some("demo")),
        ],
        "{text}"
    );
    assert_eq!(lines[0]["outcome"], "rejected");
    assert_eq!(lines[0]["reason"], "missing_token");
    assert_eq!(lines[1]["scope"], "token");
    assert_eq!(lines[2]["scope"], "subject");
    assert!(lines.iter().all(|line| line["ts_ms"].as_u64().is_some()));
    for part in tokens.refresh.split('.') {
        assert!(!text.contains(part), "the audit log holds a token part");
    }
}
