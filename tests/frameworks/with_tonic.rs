//! tonic: a unary method behind the layer, with gRPC statuses for refusals.

use super::*;

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
