//! The layer in the frameworks it is made for: axum, plain hyper, a `ServiceBuilder` stack and
//! tonic. Every storm is gated: the inner handler waits until every caller has joined the
//! flight (counted by the layer's own statistics), so exactly one inner call is expected.

mod with_axum;
mod with_hyper;
mod with_tonic;

use std::{
    convert::Infallible,
    fmt::Debug,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    response::AppendHeaders,
    routing::{MethodRouter, post},
};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{
    HeaderValue, Request, Response, StatusCode,
    header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, SET_COOKIE},
    uri::PathAndQuery,
};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde_json::{Value, json};
use support::{Calls, Gate, until};
use tokio::net::{TcpListener, TcpStream};
use tonic::{
    Code, Status,
    server::NamedService,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_refresh_coalesce::{
    BoxError, Handle, HttpExtract, HttpShare, Opaque, RefreshCoalesceLayer, TokenSource, Verified,
    error::{Rejected, Rejection},
    http::RequestBody,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The longest a storm may take to gather before the test fails instead of hanging.
const GATHER_LIMIT: Duration = Duration::from_secs(20);

/// The HTTP front with opaque tokens, found in the default sources.
fn http_layer() -> RefreshCoalesceLayer<HttpExtract<Opaque>, HttpShare> {
    RefreshCoalesceLayer::http(
        HttpExtract::new(Opaque).secret(b"a test fingerprint secret of 32 B"),
    )
    .build()
}

/// A verifier for test tokens of the form `sub:<subject>:<nonce>`.
fn test_token(token: &str) -> Result<Verified, Rejected> {
    match token.split(':').collect::<Vec<_>>()[..] {
        ["sub", subject, _nonce] if !subject.is_empty() => Ok(Verified::new().subject(subject)),
        _ => Err(Rejected::new(Rejection::InvalidToken("not a test token"))),
    }
}

/// Waits until `n` callers have led or joined a flight of `handle`'s table, then opens `gate`.
async fn open_when_gathered(handle: &Handle, n: u64, gate: &Gate) {
    let gathered = until(|| {
        let stats = handle.stats();
        stats.leader + stats.joined == n
    });
    if tokio::time::timeout(GATHER_LIMIT, gathered).await.is_err() {
        panic!("{n} callers never gathered: {:?}", handle.stats());
    }
    gate.open();
}

/// Runs `call(i)` for `i in 0..n`, each on its own task, and returns the results in order.
async fn storm<T, F>(n: usize, call: impl Fn(usize) -> F) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks = (0..n).map(|i| tokio::spawn(call(i)));
    join_all(tasks)
        .await
        .into_iter()
        .map(|result| result.expect("a caller task panicked"))
        .collect()
}

/// What a caller sees of an HTTP response, minus the per-connection `date` header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    cache_control: Option<HeaderValue>,
    set_cookie: Vec<HeaderValue>,
    body: Bytes,
}

impl Seen {
    async fn of<B>(response: Response<B>) -> Self
    where
        B: Body,
        B::Error: Debug,
    {
        let (parts, body) = response.into_parts();
        let headers = &parts.headers;
        Self {
            status: parts.status,
            content_type: headers.get(CONTENT_TYPE).cloned(),
            cache_control: headers.get(CACHE_CONTROL).cloned(),
            set_cookie: headers.get_all(SET_COOKIE).iter().cloned().collect(),
            body: body.collect().await.expect("response body").to_bytes(),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Asserts that every element of `all` equals the first, and returns it.
fn all_identical<T: PartialEq + Debug + Clone>(all: &[T]) -> T {
    let first = all.first().expect("at least one result").clone();
    if let Some((i, other)) = all.iter().enumerate().find(|(_, r)| **r != first) {
        panic!("result {i} differs:\n{other:?}\nfrom the first:\n{first:?}");
    }
    first
}

/// The JSON a refresh handler answers with, for its `n`th call.
fn issued(n: usize) -> Value {
    json!({ "access_token": format!("access-{n}"), "refresh_token": format!("rotated-{n}") })
}

/// An HTTP/1.1 client that opens a new connection for every request in flight.
fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// A `POST` of `{"refresh_token": token}` to `path`.
fn json_refresh(addr: SocketAddr, path: &str, token: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            json!({ "refresh_token": token }).to_string(),
        )))
        .expect("a valid request")
}

/// Sends `request` with `client` and returns what the caller saw.
async fn send(client: &Client<HttpConnector, Full<Bytes>>, request: Request<Full<Bytes>>) -> Seen {
    Seen::of(client.request(request).await.expect("the server answers")).await
}

/// Binds 127.0.0.1:0 and hands every accepted connection to `serve`.
async fn accept_loop(serve: impl Fn(TcpStream) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => serve(stream),
                Err(error) => panic!("accept failed: {error}"),
            }
        }
    });
    addr
}

/// A layer that counts how often a framework calls [`Layer::layer`].
#[derive(Clone)]
struct CountLayer<L> {
    inner: L,
    layered: Arc<AtomicUsize>,
}

impl<S, L: Layer<S>> Layer<S> for CountLayer<L> {
    type Service = L::Service;

    fn layer(&self, service: S) -> Self::Service {
        self.layered.fetch_add(1, Ordering::SeqCst);
        self.inner.layer(service)
    }
}
