//! [`ResponseFuture`], and the life of one request through the client layer.
//!
//! 1. **Authorize.** Read the credentials. With none, fail with
//!    [`NoCredentials`](super::error::NoCredentials) (a store-backed cell loads the store
//!    first). If the access token expires within the margin, move the credentials past its
//!    generation (join or start the refresh); if that fails while the old token is still
//!    valid, go on with it.
//! 2. **Keep the body** if it fits the cap ([`ClientBody`]), so that the request can be
//!    sent again.
//! 3. **Send** with `Authorization: Bearer`, remembering the generation.
//! 4. **On a rejection** (`401`, trailers-only `UNAUTHENTICATED`) of a request whose body
//!    was kept: if the credentials moved past the generation it was sent with, take the
//!    current tokens; otherwise move them past it (join or start the one refresh of that
//!    generation). Send the request again, once. If the credentials ended (the token server
//!    answered `invalid_grant`, or a logout), the rejection is returned as it is; if the
//!    refresh failed otherwise, its [`RefreshFailed`](super::error::RefreshFailed). A
//!    rejected request whose body was not kept is returned as it is, and the refresh it
//!    calls for starts in the background, for the requests that follow.
//!
//! Dropping the future at any point cancels only this request: a refresh it started runs on
//! its own task to the end, and the other requests (and the next ones) get its result.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use super::{
    attempt::Failure,
    body::{self, ClientBody},
    core::Core,
    metrics::Trigger,
    refresh,
    session::{Session, Tokens},
};
use crate::error::BoxError;

/// The response future of [`BearerAuth`](super::BearerAuth).
pub struct ResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<Response<T>, BoxError>> + Send>>,
}

impl<T> ResponseFuture<T> {
    pub(crate) fn new(
        future: impl Future<Output = Result<Response<T>, BoxError>> + Send + 'static,
    ) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<Response<T>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Whether `response` rejects the request's credentials: `401`, or a trailers-only gRPC
/// `UNAUTHENTICATED` (`grpc-status: 16` in the headers).
pub(crate) fn rejected<T>(response: &Response<T>) -> bool {
    response.status() == http::StatusCode::UNAUTHORIZED
        || response
            .headers()
            .get("grpc-status")
            .is_some_and(|status| status.as_bytes() == b"16")
}

/// The life of one request, as the module docs tell it. `inner` was readied for this call.
pub(crate) async fn send<S, B, T>(
    core: Arc<Core>,
    mut inner: S,
    request: Request<B>,
) -> Result<Response<T>, BoxError>
where
    S: Service<Request<ClientBody<B>>, Response = Response<T>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    T: Body,
{
    if request.headers().contains_key(AUTHORIZATION) {
        // The caller authenticated this request itself.
        return inner
            .call(request.map(ClientBody::streaming))
            .await
            .map_err(Into::into);
    }
    let span = tracing::debug_span!(
        "refresh_client_request",
        generation = tracing::field::Empty,
        retried = false
    );
    async move {
        let (generation, tokens) = authorize(&core).await?;
        tracing::Span::current().record("generation", generation);
        let (mut parts, body) = request.into_parts();
        let (body, kept) = body::prepare(body, core.max_body).await?.split();
        parts.headers.insert(AUTHORIZATION, tokens.header().clone());
        // The head is kept only if the request could be sent again.
        let head = kept.as_ref().map(|_| parts.clone());
        let response = inner
            .call(Request::from_parts(parts, body))
            .await
            .map_err(Into::into)?;
        if !rejected(&response) {
            return Ok(response);
        }
        let counters = &core.credentials.shared.counters;
        let (Some(mut parts), Some((data, trailers))) = (head, kept) else {
            counters.not_retried();
            // The token is dead all the same: the next requests should not meet the
            // rejection too. The refresh starts (or is joined) on a task of its own.
            if core.credentials.generation() == generation {
                let core = core.clone();
                tokio::spawn(async move {
                    let _ = refresh::past(&core, generation, Trigger::Rejected).await;
                });
            }
            return Ok(response);
        };
        let header = match after_rejection(&core, generation).await {
            Ok(header) => header,
            // The credentials ended: the rejection is the answer.
            Err(Failure::NoCredentials(_)) => return Ok(response),
            Err(failure) => return Err(failure.into()),
        };
        body::drain_ready(response.into_body());
        parts.headers.insert(AUTHORIZATION, header);
        counters.retried();
        tracing::Span::current().record("retried", true);
        std::future::poll_fn(|cx| inner.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        inner
            .call(Request::from_parts(parts, ClientBody::kept(data, trailers)))
            .await
            .map_err(Into::into)
    }
    .instrument(span)
    .await
}

/// The generation and tokens to send a request with, refreshed first if they expire soon.
pub(crate) async fn authorize(core: &Arc<Core>) -> Result<(u64, Tokens), BoxError> {
    let shared = &core.credentials.shared;
    let (mut snapshot, backoff) = shared.view();
    if matches!(snapshot.session, Session::Empty) && shared.store.is_some() {
        // A store-backed cell's first use: take what the store holds.
        snapshot = refresh::past(core, snapshot.generation, Trigger::Load).await?;
    }
    let tokens = snapshot.tokens()?.clone();
    let now = Instant::now();
    if !tokens.expires_within(now, core.refresh_ahead) {
        return Ok((snapshot.generation, tokens));
    }
    if let Some(backoff) = backoff
        && backoff.until > now
    {
        // A refresh failed a moment ago: go on with the old token while it lasts.
        return if tokens.expired(now) {
            Err(backoff.failure.into())
        } else {
            Ok((snapshot.generation, tokens))
        };
    }
    match refresh::past(core, snapshot.generation, Trigger::Ahead).await {
        Ok(next) => Ok((next.generation, next.tokens()?.clone())),
        Err(Failure::Failed(failure)) if !tokens.expired(Instant::now()) => {
            tracing::debug!(error = %failure, "refresh ahead of expiry failed: the old token goes on");
            Ok((snapshot.generation, tokens))
        }
        Err(failure) => Err(failure.into()),
    }
}

/// The `Authorization` value to send a request again with, after a rejection of the
/// `generation` it was sent with.
pub(crate) async fn after_rejection(
    core: &Arc<Core>,
    generation: u64,
) -> Result<HeaderValue, Failure> {
    let shared = &core.credentials.shared;
    let (snapshot, _) = shared.view();
    if snapshot.generation != generation {
        // The credentials moved on since the request left: a refresh (or login) another
        // request made. Its tokens are the ones to use; nothing to refresh.
        let tokens = snapshot.tokens().map_err(Failure::NoCredentials)?;
        shared.counters.stale();
        return Ok(tokens.header().clone());
    }
    let next = refresh::past(core, generation, Trigger::Rejected).await?;
    next.tokens()
        .map(|tokens| tokens.header().clone())
        .map_err(Failure::NoCredentials)
}
