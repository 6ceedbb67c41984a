//! Plain hyper, and a `ServiceBuilder` stack.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_hyper_service_composes_with_the_layer() {
    const CALLERS: usize = 100;
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = http_layer();
    let handle = layer.handle();
    let inner = service_fn({
        let (calls, gate) = (calls.clone(), gate.clone());
        move |request: Request<RequestBody<Incoming>>| {
            let n = calls.record();
            let open = gate.wait();
            async move {
                assert!(
                    request.headers().contains_key(AUTHORIZATION),
                    "headers pass through"
                );
                open.await;
                let body = Full::new(Bytes::from(issued(n).to_string()));
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(CONTENT_TYPE, "application/json")
                        .body(body)
                        .expect("a valid response"),
                )
            }
        }
    });
    let service = ServiceBuilder::new().layer(layer).service(inner);
    let addr = accept_loop(move |stream| {
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = auto::Builder::new(TokioExecutor::new());
            // A client that goes away early is not this test's concern.
            let _ = connection
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    })
    .await;

    let client = http_client();
    let callers = storm(CALLERS, |_| {
        let client = client.clone();
        let request = Request::post(format!("http://{addr}/token"))
            .header(AUTHORIZATION, "Bearer opaque-bearer-token")
            .body(Full::default())
            .expect("a valid request");
        async move { send(&client, request).await }
    });
    let (seen, ()) = tokio::join!(callers, open_when_gathered(&handle, CALLERS as u64, &gate));

    assert_eq!(calls.get(), 1, "one inner call for the whole storm");
    let seen = all_identical(&seen);
    assert_eq!((seen.status, seen.json()), (StatusCode::OK, issued(1)));
}

// ---------------------------------------------------------------------------------------
// ServiceBuilder
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_builder_stacks_the_layer_with_other_middleware() {
    const CALLERS: usize = 500;
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(test_token)).build();
    let handle = layer.handle();
    let inner = service_fn({
        let (calls, gate) = (calls.clone(), gate.clone());
        move |_: Request<RequestBody<Full<Bytes>>>| {
            let n = calls.record();
            let open = gate.wait();
            async move {
                open.await;
                let body = Full::new(Bytes::from(issued(n).to_string()));
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(SET_COOKIE, format!("refresh_token=rotated-{n}"))
                        .body(body)
                        .expect("a valid response"),
                )
            }
        }
    });
    // The layer goes outside the concurrency limit: callers waiting on a flight must hold
    // none of the inner capacity, and only the one inner call is timed.
    let service = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(4)
        .timeout(Duration::from_secs(30))
        .service(inner);
    let refresh = |cookie: Option<&str>| {
        let mut request = Request::post("/token");
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, format!("theme=dark; refresh_token={cookie}"));
        }
        request
            .body(Full::<Bytes>::default())
            .expect("a valid request")
    };

    let callers = storm(CALLERS, |_| {
        let call = service.clone().oneshot(refresh(Some("sub:alice:1")));
        async move { Seen::of(call.await.expect("the stack answers")).await }
    });
    let (seen, ()) = tokio::join!(callers, open_when_gathered(&handle, CALLERS as u64, &gate));

    assert_eq!(calls.get(), 1, "one inner call for the whole storm");
    let seen = all_identical(&seen);
    assert_eq!((seen.status, seen.json()), (StatusCode::OK, issued(1)));
    assert_eq!(seen.set_cookie, ["refresh_token=rotated-1"]);

    // No token: refused by the layer as JSON, and the inner service is not called.
    let response = service
        .clone()
        .oneshot(refresh(None))
        .await
        .expect("the stack answers");
    let refused = Seen::of(response).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.content_type.as_ref().map(HeaderValue::as_bytes),
        Some(&b"application/json"[..])
    );
    assert_eq!(refused.json()["error"], "invalid_request");
    assert_eq!((calls.get(), handle.stats().rejected), (1, 1));
}
