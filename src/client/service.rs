//! [`BearerAuth`]: the client layer's service.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{body::ClientBody, core::Core, future::ResponseFuture};
use crate::error::BoxError;

/// Sends each request with `Authorization: Bearer` from the layer's
/// [`Credentials`](super::Credentials); refreshes them ahead of expiry and after a
/// rejection (once per generation, whatever the number of requests); sends a rejected
/// request again once with the new token.
///
/// The inner service receives [`ClientBody<B>`] bodies (see its docs for tonic). A request
/// that already carries `Authorization` is passed on untouched: no refresh, no retry.
///
/// What counts as a rejection: `401 Unauthorized`, or a trailers-only gRPC response whose
/// `grpc-status` is `16` (`UNAUTHENTICATED`), as a server answers before it runs a method.
/// An `UNAUTHENTICATED` status in the trailers of a streamed answer arrives after the
/// response was handed on, and is not retried.
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> BearerAuth<S> {
    pub(crate) fn new(inner: S, core: Arc<Core>) -> Self {
        Self { inner, core }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming `self`.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, T> Service<Request<B>> for BearerAuth<S>
where
    S: Service<Request<ClientBody<B>>, Response = Response<T>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    T: Body + Send + 'static,
{
    type Response = Response<T>;
    type Error = BoxError;
    type Future = ResponseFuture<T>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The readied service goes with the request, a clone stays for the next `poll_ready`:
        // a clone that was not readied must never be called (a `ConcurrencyLimit` panics).
        // The future readies it again before a retry.
        let clone = self.inner.clone();
        let readied = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(super::future::send(self.core.clone(), readied, request))
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for BearerAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("inner", &self.inner)
            .field("core", &self.core)
            .finish()
    }
}
