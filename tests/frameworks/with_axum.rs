//! axum: `route_layer` on the refresh route.

use super::*;

/// An axum refresh route: gated, counted, rotating; two `Set-Cookie`s and `no-store`.
fn refresh_route(calls: Calls, gate: Gate, expected_token: &'static str) -> MethodRouter {
    post(move |Json(body): Json<Value>| {
        let n = calls.record();
        let open = gate.wait();
        async move {
            // The layer read the body to find the token; the handler gets the same bytes.
            assert_eq!(body, json!({ "refresh_token": expected_token }));
            open.await;
            (
                AppendHeaders([
                    (
                        SET_COOKIE,
                        format!("refresh_token=rotated-{n}; HttpOnly; Path=/auth"),
                    ),
                    (SET_COOKIE, format!("session=s-{n}; HttpOnly; Path=/")),
                ]),
                [(CACHE_CONTROL, "no-store")],
                Json(issued(n)),
            )
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_layer_coalesces_a_storm_on_the_refresh_route() {
    const TOKEN: &str = "opaque-refresh-token-1";
    const CALLERS: usize = 200;
    let (calls, gate, profile_calls) = (Calls::default(), Gate::closed(), Calls::default());
    let layer = http_layer();
    let handle = layer.handle();
    let layered = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/auth/refresh",
            refresh_route(calls.clone(), gate.clone(), TOKEN),
        )
        .route(
            "/v2/auth/refresh",
            refresh_route(calls.clone(), gate.clone(), TOKEN),
        )
        .route_layer(CountLayer {
            inner: layer,
            layered: layered.clone(),
        })
        // Added after `route_layer`: not behind the layer.
        .route(
            "/profile",
            post({
                let profile_calls = profile_calls.clone();
                move || async move { format!("profile {}", profile_calls.record()) }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The storm, split across both layered routes, one connection per request.
    let client = http_client();
    let callers = storm(CALLERS, |i| {
        let client = client.clone();
        let path = if i % 2 == 0 {
            "/auth/refresh"
        } else {
            "/v2/auth/refresh"
        };
        async move { send(&client, json_refresh(addr, path, TOKEN)).await }
    });
    let (seen, ()) = tokio::join!(callers, open_when_gathered(&handle, CALLERS as u64, &gate));

    assert!(
        layered.load(Ordering::SeqCst) >= 2,
        "axum called Layer::layer once per route at least"
    );
    assert_eq!(calls.get(), 1, "one inner call for the whole storm");
    let seen = all_identical(&seen);
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.json(), issued(1));
    assert_eq!(
        seen.cache_control.as_ref().map(HeaderValue::as_bytes),
        Some(&b"no-store"[..])
    );
    assert_eq!(
        seen.set_cookie,
        [
            "refresh_token=rotated-1; HttpOnly; Path=/auth",
            "session=s-1; HttpOnly; Path=/"
        ]
    );
    let stats = handle.stats();
    assert_eq!((stats.leader, stats.joined), (1, CALLERS as u64 - 1));

    // A late retry is replayed, byte for byte, on either route.
    let retry = send(&client, json_refresh(addr, "/v2/auth/refresh", TOKEN)).await;
    assert_eq!(retry, seen);
    assert_eq!((calls.get(), handle.stats().replayed), (1, 1));

    // The other route never meets the layer: the same token is not coalesced, and a request
    // without a token is not refused.
    let before = handle.stats();
    for n in 1..=3 {
        let other = send(&client, json_refresh(addr, "/profile", TOKEN)).await;
        assert_eq!(
            (other.status, &other.body[..]),
            (StatusCode::OK, format!("profile {n}").as_bytes())
        );
    }
    let empty = Request::post(format!("http://{addr}/profile"))
        .body(Full::default())
        .expect("a valid request");
    assert_eq!(send(&client, empty).await.status, StatusCode::OK);
    assert_eq!(profile_calls.get(), 4);
    assert_eq!(
        handle.stats(),
        before,
        "the layer saw none of the other route's requests"
    );
}
