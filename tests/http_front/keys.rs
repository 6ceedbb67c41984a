//! Token-bound keys: what a key is made of, and whose answer a request may get.

use super::*;

/// Rotates like an identity server: `refresh-rotated` was used already and is answered as
/// reuse; any other token gets a pair named after the token's `jti`.
fn rotating(n: usize, parts: &Inner, body: &Bytes) -> Response<Body> {
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let claims: Value = presented
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or(Value::Null);
    if claims["jti"] == "rotated" {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from(r#"{"error":"invalid_grant"}"#)))
            .unwrap();
    }
    let pair = json!({"refresh_token": format!("next-of-{}-{}", claims["jti"].as_str().unwrap_or("?"), n)});
    Response::new(Full::new(Bytes::from(pair.to_string())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_of_the_same_subject_never_receives_the_fresh_pair() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        rotating,
    );
    let mut stale = tokens::claims("alice");
    stale["jti"] = json!("rotated");
    let stale = tokens::hs256(&stale);
    let mut current = tokens::claims("alice");
    current["jti"] = json!("current");
    let current = tokens::hs256(&current);

    // The fresh pair for `current` is in flight...
    let storm: Vec<_> = (0..50)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&current))))
        .collect();
    until(|| front.handle.stats().leader + front.handle.stats().joined == 50).await;
    // ...when the stale token arrives: it is its own flight and reaches the inner service.
    let stale_in_flight = tokio::spawn(front.service.clone().oneshot(bearer(&stale)));
    until(|| front.handle.stats().leader == 2).await;
    assert_eq!(front.handle.stats().reuse_suspected, 1);
    front.inner.open();

    let stale_response = seen(stale_in_flight.await.unwrap().unwrap()).await;
    assert_eq!(stale_response.status, StatusCode::BAD_REQUEST);
    assert_eq!(stale_response.json()["error"], "invalid_grant");
    for task in join_all(storm).await {
        let response = seen(task.unwrap().unwrap()).await;
        assert!(
            response.json()["refresh_token"]
                .as_str()
                .unwrap()
                .starts_with("next-of-current")
        );
    }

    // And once the fresh pair is a replay, the stale token still goes to the inner service.
    let replay = send(&front.service, bearer(&current)).await;
    assert!(
        replay.json()["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("next-of-current")
    );
    let stale_again = send(&front.service, bearer(&stale)).await;
    assert_eq!(stale_again.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        front.inner.calls(),
        3,
        "current once, the stale token twice (never replayed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_subject_each_get_their_own_pair() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        rotating,
    );
    let (mut phone, mut laptop) = (tokens::claims("alice"), tokens::claims("alice"));
    phone["jti"] = json!("phone");
    laptop["jti"] = json!("laptop");
    let (phone, laptop) = (tokens::hs256(&phone), tokens::hs256(&laptop));

    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let token = if i % 2 == 0 { &phone } else { &laptop }.clone();
            let service = front.service.clone();
            tokio::spawn(async move {
                let response = service.oneshot(bearer(&token)).await;
                (token, response.unwrap_or_else(|never| match never {}))
            })
        })
        .collect();
    until(|| front.handle.stats().leader + front.handle.stats().joined == 100).await;
    front.inner.open();
    for task in join_all(tasks).await {
        let (token, response) = task.unwrap();
        let device = if token == phone { "phone" } else { "laptop" };
        let pair = seen(response).await.json()["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            pair.starts_with(&format!("next-of-{device}")),
            "{device} got {pair}"
        );
    }
    assert_eq!(front.inner.calls(), 2);
}

#[tokio::test]
async fn the_same_token_from_different_clients_is_not_shared() {
    let front = front();
    let token = tokens::refresh("alice");
    let a = {
        let mut request = form(&token, Some("client-a"));
        let body = format!(
            "grant_type=refresh_token&refresh_token={token}&client_id=client-a&client_secret=pw"
        );
        *request.body_mut() = Body::from(body);
        request
    };
    let a = send(&front.service, a).await;
    let b = send(&front.service, form(&token, Some("client-b"))).await;
    let basic_a = {
        let mut request = bearer(&token);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("client-a:pw"))).unwrap(),
        );
        request.headers_mut().insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("refresh_token={token}")).unwrap(),
        );
        request
    };
    let a_again = send(&front.service, basic_a).await;
    assert_ne!(a.json()["refresh_token"], b.json()["refresh_token"]);
    assert_eq!(
        a.json()["refresh_token"],
        a_again.json()["refresh_token"],
        "client-a's secret by Basic meets the same secret in the form"
    );
    assert_eq!(front.inner.calls(), 2);
}

#[tokio::test]
async fn invalidation_by_token_and_by_subject_stops_replays_at_once() {
    let front = front();
    let token = tokens::refresh("alice");
    let first = send(&front.service, bearer(&token)).await;
    assert_eq!(
        send(&front.service, bearer(&token)).await,
        first,
        "replayed"
    );
    assert_eq!(front.inner.calls(), 1);

    assert_eq!(front.handle.invalidate_token(&token), 1);
    let second = send(&front.service, bearer(&token)).await;
    assert_ne!(second, first);
    assert_eq!(front.inner.calls(), 2);

    let other = tokens::refresh("alice");
    send(&front.service, bearer(&other)).await;
    assert_eq!(front.handle.invalidate_subject("alice"), 2);
    assert_eq!(front.handle.invalidate_subject("bob"), 0);
    send(&front.service, bearer(&token)).await;
    send(&front.service, bearer(&other)).await;
    assert_eq!(front.inner.calls(), 5);
}

#[tokio::test]
async fn callers_of_a_flight_invalidated_while_it_ran_get_invalid_grant_and_the_next_request_leads()
{
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (service, request) = (front.service.clone(), bearer(&token));
            tokio::spawn(async move { send(&service, request).await })
        })
        .collect();
    until(|| {
        let stats = front.handle.stats();
        stats.leader == 1 && stats.joined == 1
    })
    .await;

    assert_eq!(front.handle.invalidate_subject("alice"), 1);
    front.inner.open();

    for caller in callers {
        let refused = caller.await.unwrap();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.json()["error"], "invalid_grant");
        assert_eq!(
            refused.json()["error_description"],
            "coalesced call was revoked by an invalidation while it ran"
        );
        assert!(refused.header("www-authenticate").is_some());
    }
    let next = send(&front.service, bearer(&token)).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(front.inner.calls(), 2, "the next request leads a new call");
    assert_eq!(send(&front.service, bearer(&token)).await, next, "replayed");
}

#[tokio::test]
async fn a_replay_is_refused_once_its_token_has_expired() {
    let verifier = JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .leeway(Duration::ZERO)
        .build()
        .unwrap();
    let front = front_with(HttpExtract::new(verifier), HttpShare::new(), new_pair);
    front.inner.open();
    let mut claims = tokens::claims("alice");
    claims["exp"] = json!(tokens::now() + 2);
    let token = tokens::hs256(&claims);
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );

    // Wall-clock time must pass the token's `exp`; the replay itself would live 30 s more.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let refused = send(&front.service, bearer(&token)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json()["error"], "invalid_grant");
    assert_eq!(front.inner.calls(), 1);
}
