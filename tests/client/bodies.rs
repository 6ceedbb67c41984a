//! Request bodies: kept and sent again byte for byte when they fit the cap; sent once when
//! they do not, or are still streaming.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use support::{Gate, until};
use tower_refresh_coalesce::client::Credentials;

use super::{Auth, client_with, get, send};

/// `len` bytes that differ from one offset to the next.
fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn post(body: Bytes) -> Request<Full<Bytes>> {
    Request::post("/api").body(Full::new(body)).unwrap()
}

#[tokio::test]
async fn a_kept_body_is_sent_again_byte_for_byte() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.max_body(64 * 1024)
    });
    // Exactly at the cap: kept.
    let body = pattern(64 * 1024);
    let response = send(client, post(body.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = auth.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, "Bearer access-0");
    assert_eq!(seen[1].0, "Bearer access-1");
    assert_eq!(seen[0].1, body, "the first send carried the body");
    assert_eq!(seen[1].1, body, "the retry carried the same bytes");
    assert_eq!(super::body(response).await, body);
}

#[tokio::test]
async fn a_ready_body_of_unknown_length_is_kept_with_its_trailers() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| b);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first "))),
        Ok(Frame::data(Bytes::from_static(b"second"))),
        Ok(Frame::trailers(trailers.clone())),
    ];
    let body = StreamBody::new(stream::iter(frames));
    let response = send(client, Request::post("/api").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = auth.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|(_, body)| body == "first second"),
        "{seen:?}"
    );
    assert_eq!(*auth.trailers.lock().unwrap(), [trailers.clone(), trailers]);
}

#[tokio::test]
async fn a_body_over_the_cap_is_sent_once_and_its_rejection_returned() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.max_body(64 * 1024)
    });
    let body = pattern(64 * 1024 + 1);
    let response = send(client.clone(), post(body.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "not retried");
    let seen = auth.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1, body, "sent whole, once");
    assert_eq!(credentials.stats().not_retried, 1);
    // The refresh it called for ran in the background: the next request goes with the new
    // token at once.
    until(|| credentials.generation() == 2).await;
    let response = send(client, get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.authorizations().last().unwrap(), "Bearer access-1");
    assert_eq!(auth.refreshes.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_streaming_is_sent_once_without_waiting_for_it() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| b);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let frames = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(Frame::data(data)), rx))
    });
    tx.send(Bytes::from_static(b"ready ")).unwrap();
    let request = Request::post("/api").body(StreamBody::new(frames)).unwrap();
    // The request is on its way while the caller still produces the body.
    let call = tokio::spawn(send(client, request));
    until(|| auth.arrived.get() == 1).await;
    tx.send(Bytes::from_static(b"later")).unwrap();
    drop(tx);
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let seen = auth.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1, "ready later", "every byte, in order, once");
    assert_eq!(credentials.stats().not_retried, 1);
}
