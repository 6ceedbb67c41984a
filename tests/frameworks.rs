//! The layer in the frameworks it is made for: axum, plain hyper, a `ServiceBuilder` stack and
//! tonic. Every storm is gated: the inner handler waits until every caller has joined the
//! flight (counted by the layer's own statistics), so exactly one inner call is expected.

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

// ---------------------------------------------------------------------------------------
// axum
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// hyper
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// tonic
// ---------------------------------------------------------------------------------------

/// The request of `auth.Refresh/Refresh`: the token travels in metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct RefreshRequest {}

/// The reply of `auth.Refresh/Refresh`.
#[derive(Clone, PartialEq, prost::Message)]
struct RefreshReply {
    #[prost(string, tag = "1")]
    access_token: String,
    #[prost(string, tag = "2")]
    refresh_token: String,
}

const REFRESH_PATH: &str = "/auth.Refresh/Refresh";
const TOKEN_METADATA: &str = "x-refresh-token";

/// What the gRPC handler answers on its `n`th call.
type Answer = fn(usize) -> Result<RefreshReply, Status>;

fn rotated(n: usize) -> Result<RefreshReply, Status> {
    Ok(RefreshReply {
        access_token: format!("access-{n}"),
        refresh_token: format!("rotated-{n}"),
    })
}

fn unknown_token(_: usize) -> Result<RefreshReply, Status> {
    Err(Status::not_found("no such refresh token"))
}

/// A hand-written tonic service, shaped like generated code: one unary method, gated and
/// counted.
#[derive(Clone)]
struct RefreshServer {
    calls: Calls,
    gate: Gate,
    answer: Answer,
}

impl NamedService for RefreshServer {
    const NAME: &'static str = "auth.Refresh";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<B> Service<Request<B>> for RefreshServer
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.uri().path() != REFRESH_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let server = self.clone();
        let method = service_fn(move |_: tonic::Request<RefreshRequest>| {
            let n = server.calls.record();
            let (open, answer) = (server.gate.wait(), server.answer);
            async move {
                open.await;
                answer(n).map(tonic::Response::new)
            }
        });
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// A tonic server on 127.0.0.1:0 with the layer (token in metadata, gRPC refusals) in
/// front of a [`RefreshServer`] that answers with `answer`.
async fn grpc_server(answer: Answer) -> (SocketAddr, Calls, Gate, Handle) {
    let (calls, gate) = (Calls::default(), Gate::closed());
    let extract = HttpExtract::new(Opaque).sources([TokenSource::metadata(
        http::HeaderName::from_static(TOKEN_METADATA),
    )]);
    let layer = RefreshCoalesceLayer::http(extract)
        .share(HttpShare::new().grpc())
        .build();
    let handle = layer.handle();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let server = RefreshServer {
        calls: calls.clone(),
        gate: gate.clone(),
        answer,
    };
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(server)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (addr, calls, gate, handle)
}

/// One HTTP/2 connection to `addr`.
async fn grpc_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .connect()
        .await
        .expect("connect")
}

/// `auth.Refresh/Refresh` over `channel`, as a generated client would call it.
async fn refresh_call(channel: Channel, token: Option<&str>) -> Result<RefreshReply, Code> {
    let mut request = tonic::Request::new(RefreshRequest {});
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(TOKEN_METADATA, token.parse().expect("ASCII metadata"));
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let path = PathAndQuery::from_static(REFRESH_PATH);
    match grpc.unary(request, path, ProstCodec::default()).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(status) => Err(status.code()),
    }
}

/// `n` concurrent calls with `token`, spread over `connections` connections (each carries
/// at most a server's default of 200 concurrent streams).
async fn grpc_storm(
    addr: SocketAddr,
    connections: usize,
    n: usize,
    token: &'static str,
) -> Vec<Result<RefreshReply, Code>> {
    let channels = join_all((0..connections).map(|_| grpc_channel(addr))).await;
    storm(n, |i| {
        refresh_call(channels[i % connections].clone(), Some(token))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_service_behind_the_layer_makes_one_call_for_a_storm_and_keeps_trailers() {
    const CALLERS: usize = 500;
    let (addr, calls, gate, handle) = grpc_server(rotated).await;

    let callers = grpc_storm(addr, 5, CALLERS, "opaque-grpc-token");
    let (replies, ()) = tokio::join!(callers, open_when_gathered(&handle, CALLERS as u64, &gate));
    assert_eq!(calls.get(), 1, "one inner call for the whole storm");
    // Every call succeeded, so every reply carried its `grpc-status` trailer.
    assert_eq!(all_identical(&replies), rotated(1).map_err(|s| s.code()));

    // No metadata: UNAUTHENTICATED, and no inner call.
    let channel = grpc_channel(addr).await;
    assert_eq!(
        refresh_call(channel, None).await,
        Err(Code::Unauthenticated)
    );
    // On the wire: trailers-only (the status in the headers, no body), not JSON.
    let raw = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{addr}{REFRESH_PATH}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::default())
        .expect("a valid request");
    let response = raw.request(request).await.expect("the server answers");
    assert_eq!(response.headers()["grpc-status"], "16");
    let refused = Seen::of(response).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert_eq!(
        refused.content_type,
        Some(HeaderValue::from_static("application/grpc"))
    );
    assert!(refused.body.is_empty());
    assert_eq!((calls.get(), handle.stats().rejected), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_error_status_reaches_its_flight_but_is_not_replayed() {
    const CALLERS: usize = 20;
    const TOKEN: &str = "opaque-unknown-token";
    let (addr, calls, gate, handle) = grpc_server(unknown_token).await;

    let callers = grpc_storm(addr, 2, CALLERS, TOKEN);
    let (replies, ()) = tokio::join!(callers, open_when_gathered(&handle, CALLERS as u64, &gate));
    assert_eq!(calls.get(), 1, "the flight's callers share the one call");
    assert_eq!(all_identical(&replies), Err(Code::NotFound));

    // Not replayed: the next call with the same token reaches the handler again.
    let channel = grpc_channel(addr).await;
    assert_eq!(
        refresh_call(channel, Some(TOKEN)).await,
        Err(Code::NotFound)
    );
    assert_eq!((calls.get(), handle.stats().replayed), (2, 0));
}
