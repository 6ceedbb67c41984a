//! What is shared and what is not: headers, bodies, statuses and responses too large to keep.

use super::*;

#[tokio::test]
async fn the_coalescing_header_reports_leader_joined_and_replayed() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new().report_coalescing(true),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let leader = tokio::spawn(front.service.clone().oneshot(bearer(&token)));
    until(|| front.handle.stats().leader == 1).await;
    let joined = tokio::spawn(front.service.clone().oneshot(bearer(&token)));
    until(|| front.handle.stats().joined == 1).await;
    front.inner.open();
    let header = |seen: &Seen| seen.header("x-refresh-coalesced").map(str::to_owned);
    assert_eq!(
        header(&seen(leader.await.unwrap().unwrap()).await).as_deref(),
        Some("leader")
    );
    assert_eq!(
        header(&seen(joined.await.unwrap().unwrap()).await).as_deref(),
        Some("joined")
    );
    let replayed = send(&front.service, bearer(&token)).await;
    assert_eq!(header(&replayed).as_deref(), Some("replayed"));
}

fn server_error(_n: usize, _parts: &Inner, _body: &Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .body(Full::new(Bytes::from_static(
            b"{\"error\":\"database down\"}",
        )))
        .unwrap()
}

#[tokio::test]
async fn non_2xx_responses_reach_their_flight_and_are_not_replayed() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        server_error,
    );
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&token))))
        .collect();
    until(|| front.handle.stats().joined == 2).await;
    front.inner.open();
    for caller in join_all(callers).await {
        let response = seen(caller.unwrap().unwrap()).await;
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&response.body[..], b"{\"error\":\"database down\"}");
    }
    send(&front.service, bearer(&token)).await;
    assert_eq!(front.inner.calls(), 2);
}

fn large(_n: usize, _parts: &Inner, _body: &Bytes) -> Response<Body> {
    Response::new(Full::new(Bytes::from(vec![b'x'; 70 * 1024])))
}

#[tokio::test]
async fn a_response_over_the_cap_is_streamed_to_one_caller_and_not_replayed() {
    let front = front_with(HttpExtract::new(hs256_verifier()), HttpShare::new(), large);
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&token))))
        .collect();
    until(|| front.handle.stats().joined == 1).await;
    front.inner.open();
    let mut statuses = Vec::new();
    for caller in join_all(callers).await {
        let response = seen(caller.unwrap().unwrap()).await;
        if response.status == StatusCode::OK {
            assert_eq!(response.body.len(), 70 * 1024);
        }
        statuses.push(response.status);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE]);
    assert_eq!(front.handle.stats().entries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_times_out_gets_429_with_retry_after() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let response = send(&front.service, bearer(&token)).await;
    assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.json()["error"], "temporarily_unavailable");
    front.inner.open();
    until(|| front.handle.stats().in_flight == 0).await;
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );
    assert_eq!(front.inner.calls(), 1);
}

#[tokio::test]
async fn the_waiter_cap_answers_503_with_retry_after() {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(hs256_verifier()))
        .max_waiters(1)
        .build();
    let handle = layer.handle();
    let service = layer.layer(refresh_handler(&inner, new_pair));
    let token = tokens::refresh("alice");
    let leader = tokio::spawn(service.clone().oneshot(bearer(&token)));
    until(|| handle.stats().leader == 1).await;
    let refused = send(&service, bearer(&token)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("retry-after"), Some("1"));
    inner.open();
    assert_eq!(leader.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn sources_can_be_restricted_to_headers_and_the_body_then_streams_untouched() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()).sources([TokenSource::bearer()]),
        HttpShare::new(),
        new_pair,
    );
    front.inner.open();
    let token = tokens::refresh("alice");
    // The JSON body holds a token, but only Bearer is configured: nothing is read.
    let response = send(&front.service, json_body(&token)).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    let mut request = json_body("ignored");
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let response = send(&front.service, request).await;
    assert_eq!(response.json()["echo"], "{\"refresh_token\":\"ignored\"}");
}

#[tokio::test]
async fn requests_to_other_paths_pass_through_untouched() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()).paths(["/auth/refresh"]),
        HttpShare::new(),
        new_pair,
    );
    front.inner.open();
    let other = Request::post("/auth/stats")
        .body(Body::from("no token here"))
        .unwrap();
    let response = send(&front.service, other).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "not refused for want of a token"
    );
    assert_eq!(
        response.json()["echo"],
        "no token here",
        "the body streamed through"
    );
    assert_eq!(front.handle.stats().bypassed, 1);

    let token = tokens::refresh("alice");
    let first = send(&front.service, bearer(&token)).await;
    assert_eq!(send(&front.service, bearer(&token)).await, first);
    assert_eq!(
        front.inner.calls(),
        2,
        "one call for the other path, one for the refresh"
    );
}

#[tokio::test]
async fn another_grant_type_passes_through_even_with_a_refresh_cookie() {
    let front = front();
    let exchange = |cookie: &str| {
        post()
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("refresh_token={cookie}"))
            .body(Body::from("grant_type=authorization_code&code=abc"))
            .unwrap()
    };
    // A valid refresh cookie does not make the exchange a refresh of it...
    let valid = tokens::refresh("alice");
    let (a, b) = futures_util::join!(
        send(&front.service, exchange(&valid)),
        send(&front.service, exchange(&valid))
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_ne!(
        a.json()["refresh_token"],
        b.json()["refresh_token"],
        "not shared"
    );
    // ...and an expired one does not block the login.
    let expired = tokens::hs256(&json!({"sub": "alice", "exp": tokens::now() - 3600}));
    assert_eq!(
        send(&front.service, exchange(&expired)).await.status,
        StatusCode::OK
    );
    let stats = front.handle.stats();
    assert_eq!((stats.bypassed, stats.leader, stats.rejected), (3, 0, 0));
    assert_eq!(front.inner.calls(), 3);
}
