//! Audit events: each kind reaches the hook, with the subject where it is known, and none
//! carries any part of a token.

use super::*;

/// The parts of a JWT an event must never contain: the whole token, its claims and its
/// signature.
fn secret_parts(token: &str) -> Vec<String> {
    let mut parts: Vec<String> = token.split('.').skip(1).map(str::to_owned).collect();
    parts.push(token.to_owned());
    parts
}

#[tokio::test]
async fn the_hook_hears_each_kind_of_event_with_its_subject_and_no_token() {
    let heard = Heard::default();
    let inner = Gated::open_now();
    let (front, handle) = front(
        |builder| heard.hook(builder).max_entries_per_group(2),
        &inner,
    );
    let first = tokens::refresh("alice");
    let second = tokens::refresh("alice");
    let third = tokens::refresh("alice");

    assert_eq!(send(&front, bearer(&first)).await.status, StatusCode::OK);
    assert!(heard.kinds().is_empty(), "{:?}", heard.all());
    // A second token of alice while the first one's replay lives.
    assert_eq!(send(&front, bearer(&second)).await.status, StatusCode::OK);
    // A third: alice holds the two entries her cap allows.
    let capped = send(&front, bearer(&third)).await;
    assert_eq!(capped.status, StatusCode::SERVICE_UNAVAILABLE);
    // No token at all.
    let missing = Request::post("/auth/refresh")
        .body(Body::default())
        .unwrap();
    assert_eq!(send(&front, missing).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(handle.invalidate_token(&first), 1);
    assert_eq!(handle.invalidate_subject("alice"), 1);

    let all = heard.all();
    let summary: Vec<(&str, Option<&str>)> = all
        .iter()
        .map(|(kind, subject, _)| (kind.as_str(), subject.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("reuse_suspected", Some("alice")),
            ("subject_cap_reached", Some("alice")),
            ("refused", Some("alice")),
            ("refused", None),
            ("invalidated", None),
            ("invalidated", Some("alice")),
        ]
    );
    let debug: Vec<&str> = all.iter().map(|(_, _, debug)| debug.as_str()).collect();
    assert!(
        debug[2].contains("Overloaded") && debug[2].contains("\"group\""),
        "{}",
        debug[2]
    );
    assert!(
        debug[3].contains("Rejected") && debug[3].contains("\"missing_token\""),
        "{}",
        debug[3]
    );
    assert!(
        debug[4].contains("Token") && debug[4].contains("entries: 1"),
        "{}",
        debug[4]
    );
    assert!(
        debug[5].contains("Subject") && debug[5].contains("entries: 1"),
        "{}",
        debug[5]
    );
    assert_eq!(handle.stats().reuse_suspected, 1);
    for token in [&first, &second, &third] {
        for part in secret_parts(token) {
            for event in &debug {
                assert!(!event.contains(&part), "{event} contains a token part");
            }
        }
    }
}

/// The breaker's events, with a real `redis-server` that is killed and restarted.
#[cfg(feature = "redis")]
#[tokio::test]
async fn the_hook_hears_the_breaker_open_when_redis_dies_and_close_when_it_is_back() {
    use support::redis::RedisServer;
    use tower_refresh_coalesce::store::RedisStore;

    let mut server = RedisServer::start();
    let store = RedisStore::standalone(server.client(), b"audit test sealing secret, 32 B!")
        .command_timeout(Duration::from_millis(100))
        .build()
        .expect("store");
    let heard = Heard::default();
    let inner = Gated::open_now();
    let cool_down = Duration::from_millis(300);
    let layer = heard
        .hook(RefreshCoalesceLayer::http(
            HttpExtract::new(verifier()).secret(b"audit test fingerprint secret 32"),
        ))
        .store(store)
        .breaker(1, cool_down)
        .build();
    let front = BoxCloneSyncService::new(tower::Layer::layer(
        &layer,
        inner.service(|_request: Request<RequestBody<Body>>, n| async move {
            Ok::<_, Infallible>(Response::new(Body::from(format!("pair {n}"))))
        }),
    ));
    assert_eq!(
        send(&front, bearer(&tokens::refresh("carol"))).await.status,
        StatusCode::OK
    );
    assert!(heard.kinds().is_empty(), "{:?}", heard.all());

    server.kill();
    // Local-only while the store is away: the refresh still succeeds. (Another subject: a
    // second token of carol would be reported as suspected reuse.)
    assert_eq!(
        send(&front, bearer(&tokens::refresh("dan"))).await.status,
        StatusCode::OK
    );
    assert_eq!(heard.kinds(), ["breaker_opened"]);
    assert_eq!(layer.handle().stats().breaker_open, 1);

    server.restart();
    tokio::time::sleep(cool_down + Duration::from_millis(100)).await;
    // The first command after the cool-down may still meet the reconnecting client.
    for attempt in 0..50 {
        send(&front, bearer(&tokens::refresh(&format!("user-{attempt}")))).await;
        if heard.kinds().last().map(String::as_str) == Some("breaker_closed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kinds = heard.kinds();
    assert_eq!(kinds.first().map(String::as_str), Some("breaker_opened"));
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("breaker_closed"),
        "{kinds:?}"
    );
    assert_eq!(layer.handle().stats().breaker_open, 0);
    for (_, subject, _) in heard.all() {
        assert_eq!(subject, None, "breaker events name no subject");
    }
}
