//! Subject mode, secrets and limits, and connections refused before their body is read.

use super::*;

#[test]
fn matching_by_subject_with_a_verifier_without_subjects_is_refused_at_build() {
    let built = RefreshCoalesceLayer::http(HttpExtract::new(Opaque).match_by_subject()).try_build();
    let error = built.expect_err("refused");
    assert!(error.to_string().contains("subjects"), "{error}");
}

#[test]
fn matching_by_subject_with_a_store_is_refused_at_build() {
    let extract = HttpExtract::new(verifier())
        .secret(b"a fingerprint secret of 32 bytes!")
        .match_by_subject();
    let built = RefreshCoalesceLayer::http(extract)
        .store(MemoryStore::new())
        .try_build();
    assert!(built.is_err());
}

#[tokio::test]
async fn a_token_without_a_subject_never_coalesces_in_subject_mode() {
    // A custom verifier that yields no subject: every token used to share one key.
    let no_subject = |_token: &str| Ok::<_, Rejected>(Verified::new());
    let inner = Gated::open_now();
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(no_subject).match_by_subject()).build();
    let service = layer.layer(handler(&inner));
    let a = send(&service, form("token-of-user-a", "")).await;
    let b = send(&service, form("token-of-user-b", "")).await;
    assert_ne!(a.json()["refresh_token"], b.json()["refresh_token"]);
    assert_eq!(inner.calls(), 2);
    assert_eq!(layer.handle().stats().bypassed, 2);
}

#[tokio::test]
async fn different_subjects_never_share_a_key_in_subject_mode() {
    let front = front(extract().match_by_subject());
    front.inner.open();
    let alice = send(&front.service, form(&tokens::refresh("alice"), "")).await;
    let alice_again = send(&front.service, form(&tokens::refresh("alice"), "")).await;
    let bob = send(&front.service, form(&tokens::refresh("bob"), "")).await;
    assert_eq!(alice, alice_again, "subject mode: one subject, one answer");
    assert_ne!(alice, bob);
    assert_eq!(front.inner.calls(), 2);
}

// ---------------------------------------------------------------------------------------
// Secrets and limits
// ---------------------------------------------------------------------------------------

#[test]
fn short_secrets_and_a_store_without_a_secret_are_refused_at_build() {
    let short = RefreshCoalesceLayer::http(
        HttpExtract::new(Opaque).secret(b"31 bytes are not enough, sorry"),
    )
    .try_build();
    assert!(short.is_err());
    let random = RefreshCoalesceLayer::http(HttpExtract::new(Opaque))
        .store(MemoryStore::new())
        .try_build();
    let error = random.expect_err("a store needs an explicit secret");
    assert!(error.to_string().contains("secret"), "{error}");
    assert!(tower_refresh_coalesce::Fingerprinter::new([7u8; 31]).is_err());
}

#[tokio::test]
async fn one_subject_cannot_fill_the_table_for_everyone() {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::http(extract())
        .max_entries_per_group(3)
        .build();
    let handle = layer.handle();
    let service = layer.layer(handler(&inner));
    let flights: Vec<_> = (0..3)
        .map(|_| {
            let service = service.clone();
            let request = form(&tokens::refresh("mallory"), "");
            tokio::spawn(async move { send(&service, request).await })
        })
        .collect();
    until(|| handle.stats().in_flight == 3).await;
    let capped = send(&service, form(&tokens::refresh("mallory"), "")).await;
    assert_eq!(capped.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(capped.headers.iter().any(|(n, _)| n == "retry-after"));
    let other = tokio::spawn({
        let service = service.clone();
        let request = form(&tokens::refresh("trent"), "");
        async move { send(&service, request).await }
    });
    until(|| handle.stats().in_flight == 4).await;
    inner.open();
    assert_eq!(other.await.unwrap().status, StatusCode::OK);
    for flight in join_all(flights).await {
        assert_eq!(flight.unwrap().status, StatusCode::OK);
    }
    assert_eq!(inner.calls(), 4);
}

#[tokio::test]
async fn invalidating_a_token_reaches_the_entries_of_every_client_that_presented_it() {
    let front = front(extract());
    front.inner.open();
    let token = tokens::refresh("ivan");
    send(&front.service, basic(&token, "app", "secret")).await;
    send(&front.service, form(&token, "&client_id=other")).await;
    assert_eq!(front.handle.stats().entries, 2);
    assert_eq!(front.handle.invalidate_token(&token), 2);
    assert_eq!(front.handle.stats().entries, 0);
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

/// A refusal sent before the request body was read closes the HTTP/1.1 connection with
/// `Connection: close`, so that a pooled client's next request goes on a new connection.
#[tokio::test]
async fn a_refusal_before_the_body_is_read_closes_the_connection_and_the_next_request_works() {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let layer = RefreshCoalesceLayer::http(HttpExtract::new(verifier()).body_limit(1024)).build();
    let app = axum::Router::new().route(
        "/auth/refresh",
        axum::routing::post(|| async { "refreshed" }).route_layer(layer),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http::<Body>();
    let uri: http::Uri = format!("http://{address}/auth/refresh").parse().unwrap();
    let request = |body: Bytes| {
        Request::post(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap()
    };

    let big = client
        .request(request(Bytes::from(vec![b' '; 4096])))
        .await
        .expect("an answer");
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        big.headers().get(header::CONNECTION).map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    drop(big.into_body().collect().await);

    let token = tokens::refresh("judy");
    let next = client
        .request(request(Bytes::from(
            json!({ "refresh_token": token }).to_string(),
        )))
        .await
        .expect("the next request on the pool works");
    assert_eq!(next.status(), StatusCode::OK);

    // A refusal after the whole body was read keeps the connection.
    let malformed = client
        .request(request(Bytes::from_static(b"{")))
        .await
        .expect("an answer");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert!(malformed.headers().get(header::CONNECTION).is_none());
}
