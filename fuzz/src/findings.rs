//! The fuzzer's findings (F1, F2; both fixed) as plain tests of the library's behaviour,
//! through its public API. The same cases are regression tests in `tests/http_front.rs`;
//! these keep the harness's own reading of the findings honest.

#![cfg(test)]

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_refresh_coalesce::{HttpExtract, RefreshCoalesceLayer, http::RequestBody};

use crate::tokens;

type Body = Full<Bytes>;

/// Sends `requests` concurrently through a fresh layer with the default sources; returns
/// the statuses, the bodies the inner service received, and the layer's stats.
fn send(
    requests: Vec<Request<Body>>,
) -> (Vec<StatusCode>, Vec<Bytes>, tower_refresh_coalesce::Stats) {
    crate::front::block_on(async move {
        let layer =
            RefreshCoalesceLayer::http(HttpExtract::new(tokens::verifier().clone())).build();
        let handle = layer.handle();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let seen = seen.clone();
            service_fn(move |request: Request<RequestBody<Body>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .expect("body")
                        .to_bytes();
                    seen.lock().unwrap().push(body);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                }
            })
        };
        let service = layer.layer(inner);
        let statuses = join_all(requests.into_iter().map(|r| service.clone().oneshot(r)))
            .await
            .into_iter()
            .map(|r| r.expect("infallible").status())
            .collect();
        let seen = seen.lock().unwrap().clone();
        (statuses, seen, handle.stats())
    })
}

/// F1: a request with two `Content-Type` values is read by the first only. With
/// `text/plain` first, the JSON body's (forged) token is never looked at, the Bearer token
/// is verified, and the inner service receives a JSON body with another token; a
/// concurrent request of that kind joins the Bearer token's flight.
#[test]
fn f1_conflicting_content_types_are_refused() {
    let valid = &tokens::minted().valid;
    let request = || {
        Request::post("/auth/refresh")
            .header(header::CONTENT_TYPE, "text/plain")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {valid}"))
            .body(Body::from(r#"{"refresh_token":"forged"}"#))
            .unwrap()
    };
    let (statuses, seen, _) = send(vec![request()]);
    assert!(
        seen.is_empty(),
        "the inner service received a body with an unverified token: {seen:?}"
    );
    assert_eq!(statuses, [StatusCode::BAD_REQUEST]);
}

/// F2: a form of another grant type is coalesced when a header carries a refresh token:
/// the authorization-code exchange becomes a flight keyed by the cookie's refresh token,
/// concurrent requests join it, and its result is replayed to refreshes of that token.
#[test]
fn f2_other_grant_types_pass_through_even_with_a_token_in_a_header() {
    let valid = &tokens::minted().valid;
    let request = || {
        Request::post("/auth/refresh")
            .header(header::COOKIE, format!("refresh_token={valid}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=authorization_code&code=abc"))
            .unwrap()
    };
    let (statuses, seen, stats) = send(vec![request(), request()]);
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK]);
    assert_eq!(
        (stats.leader, stats.joined, stats.bypassed),
        (0, 0, 2),
        "{stats:?}"
    );
    assert_eq!(seen.len(), 2, "each exchange reaches the inner service");
}

/// F2, the worst of it: with a stale refresh-token cookie, a login by authorization code on
/// the shared token endpoint is refused by the layer (the cookie's token is verified as if
/// the exchange were a refresh), until the cookie is cleared.
#[test]
fn f2_a_stale_cookie_does_not_block_an_authorization_code_exchange() {
    let expired = &tokens::minted().expired;
    let request = Request::post("/auth/refresh")
        .header(header::COOKIE, format!("refresh_token={expired}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("grant_type=authorization_code&code=abc"))
        .unwrap();
    let (statuses, seen, _) = send(vec![request]);
    assert_eq!(statuses, [StatusCode::OK]);
    assert_eq!(seen.len(), 1);
}
