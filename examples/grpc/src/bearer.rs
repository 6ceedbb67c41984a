//! The client side: a tonic client of `AccountService` behind tower-refresh-coalesce's
//! client layer, refreshing through `TokenService/Refresh`.
//!
//! ```text
//! AccountServiceClient ──► map_err(NoCredentials → UNAUTHENTICATED)
//!                        ──► BearerAuth (authorization: Bearer, one refresh per generation,
//!                          each UNAUTHENTICATED call sent again once)
//!                        ──► map_request(tonic::body::Body::new) ──► Channel
//! ```
//!
//! A call the interceptor refuses comes back as a trailers-only `UNAUTHENTICATED`; the layer
//! refreshes once for every such call of one generation (through the `Refresh` rpc, with
//! the refresh token in `x-refresh-token`), and sends each call again with the new token.
//! A call made once the credentials have ended is never sent: the layer fails it with
//! `NoCredentials`, which [`grpc_status`] turns into `UNAUTHENTICATED` too (tonic would
//! report an error it does not know as `UNKNOWN`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::{join_all, try_join_all};
use http::Request;
use tonic::{
    Code, Status,
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{
    ServiceBuilder,
    util::{MapErr, MapRequest},
};
use tower_refresh_coalesce::{
    BoxError,
    client::{
        BearerAuth, BearerAuthLayer, ClientBody, Credentials, RefreshRequest, Tokens,
        error::{NoCredentials, RefreshError},
        refresh_fn,
    },
};

use crate::{
    CALLS_PER_CONNECTION, Counter, TOKEN_METADATA,
    pb::{
        MeReply, MeRequest, RefreshRequest as RefreshCall,
        account_service_client::AccountServiceClient, token_service_client::TokenServiceClient,
    },
};

/// A channel with the client layer in front: what `AccountServiceClient` runs on.
pub type Authenticated = MapErr<
    BearerAuth<MapRequest<Channel, fn(Request<ClientBody<Body>>) -> Request<Body>>>,
    fn(BoxError) -> BoxError,
>;

/// The layer's errors as tonic reports them: a call refused because the credentials ended
/// fails with `UNAUTHENTICATED` (the layer's [`NoCredentials`] as its source), as a call
/// the server refuses does. tonic takes a `Status` found in the error as the call's status;
/// other errors (the transport's) pass unchanged.
pub fn grpc_status(error: BoxError) -> BoxError {
    if !error.is::<NoCredentials>() {
        return error;
    }
    let mut status = Status::unauthenticated(error.to_string());
    status.set_source(Arc::from(error));
    Box::new(status)
}

/// A channel's request body from the layer's: tonic's own type, wrapping it.
fn tonic_body(request: Request<ClientBody<Body>>) -> Request<Body> {
    request.map(Body::new)
}

/// `channel` behind `layer`.
pub fn authenticated(channel: Channel, layer: &BearerAuthLayer) -> Authenticated {
    ServiceBuilder::new()
        .map_err(grpc_status as fn(BoxError) -> BoxError)
        .layer(layer.clone())
        .map_request(tonic_body as fn(Request<ClientBody<Body>>) -> Request<Body>)
        .service(channel)
}

/// A refresh service that calls `TokenService/Refresh` on `channel`, and counts its calls
/// in `calls`. A refused refresh token (`UNAUTHENTICATED`) ends the credentials; an
/// unavailable service is transient.
pub fn refresh_over_grpc(
    channel: Channel,
    calls: Counter,
) -> impl tower::Service<
    RefreshRequest,
    Response = Tokens,
    Error = BoxError,
    Future = impl Future<Output = Result<Tokens, BoxError>> + Send + use<>,
> + Clone
+ Send
+ 'static {
    refresh_fn(move |request: RefreshRequest| {
        let mut client = TokenServiceClient::new(channel.clone());
        calls.increment();
        async move {
            let token = request
                .refresh_token()
                .ok_or_else(|| RefreshError::rejected("no refresh token"))?;
            let mut call = tonic::Request::new(RefreshCall {});
            let value = token
                .parse()
                .map_err(|_| RefreshError::rejected("the refresh token is not ASCII metadata"))?;
            call.metadata_mut().insert(TOKEN_METADATA, value);
            let reply = client
                .refresh(call)
                .await
                .map_err(refresh_error)?
                .into_inner();
            Ok(Tokens::new(reply.access_token)?
                .with_refresh_token(reply.refresh_token)
                .expires_in(Duration::from_secs(reply.expires_in)))
        }
    })
}

/// What a failed `Refresh` means to the layer.
fn refresh_error(status: Status) -> BoxError {
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            RefreshError::invalid_grant(message).into()
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            RefreshError::transient(status).into()
        }
        _ => RefreshError::rejected(message).with_source(status).into(),
    }
}

/// The outcome of an [`me_storm`].
#[derive(Debug)]
pub struct MeStormReport {
    /// Every call's result.
    pub replies: Vec<Result<MeReply, Status>>,
    /// `Refresh` calls the client made.
    pub refreshes: u64,
    /// How long the storm took.
    pub elapsed: Duration,
}

/// `calls` concurrent `Me` calls with `credentials` (whose access token may have expired),
/// spread over enough connections that none carries more than 100 at once, each connection
/// behind its own layer over the same credentials.
pub async fn me_storm(
    addr: SocketAddr,
    credentials: Credentials,
    calls: usize,
) -> Result<MeStormReport, BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let refreshes = Counter::default();
    let layer = BearerAuthLayer::new(
        credentials,
        refresh_over_grpc(endpoint.connect().await?, refreshes.clone()),
    );
    let connections = calls.div_ceil(CALLS_PER_CONNECTION).max(1);
    let channels = try_join_all((0..connections).map(|_| endpoint.connect())).await?;
    let clients: Vec<_> = channels
        .into_iter()
        .map(|channel| AccountServiceClient::new(authenticated(channel, &layer)))
        .collect();
    let start = Instant::now();
    let replies = join_all((0..calls).map(|i| {
        let mut client = clients[i % connections].clone();
        async move {
            client
                .me(MeRequest {})
                .await
                .map(tonic::Response::into_inner)
        }
    }))
    .await;
    Ok(MeStormReport {
        replies,
        refreshes: refreshes.get(),
        elapsed: start.elapsed(),
    })
}
