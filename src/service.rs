//! [`RefreshCoalesce`]: the service.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use tower_service::Service;

use crate::{
    core::Core,
    future::ResponseFuture,
    handle::Handle,
    key::Extract,
    share::{CloneResponse, Share},
};

/// Coalesces concurrent requests with the same key into one call of the inner service.
///
/// Made by [`RefreshCoalesceLayer`](crate::RefreshCoalesceLayer); see there for the behaviour
/// and [`ResponseFuture`] for the life of one request. All clones share one table.
pub struct RefreshCoalesce<S, X, P = CloneResponse> {
    inner: S,
    core: Arc<Core<X, P>>,
}

impl<S, X, P> RefreshCoalesce<S, X, P> {
    pub(crate) fn new(inner: S, core: Arc<Core<X, P>>) -> Self {
        Self { inner, core }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// A handle on the shared table, for invalidation and statistics.
    pub fn handle(&self) -> Handle {
        self.core.handle()
    }
}

impl<S: Clone, X, P> Clone for RefreshCoalesce<S, X, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug, X, P> fmt::Debug for RefreshCoalesce<S, X, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshCoalesce")
            .field("inner", &self.inner)
            .field("core", &self.core)
            .finish()
    }
}

impl<S, X, P, Req> Service<Req> for RefreshCoalesce<S, X, P>
where
    X: Extract<Req> + Send + Sync + 'static,
    S: Service<X::Request> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    P: Share<S::Response, S::Error>,
{
    type Response = P::Response;
    type Error = P::Error;
    type Future = ResponseFuture<Req, S, X, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| self.core.flights.share.ready_error(error))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // The readied service goes with this request: if it leads a flight, the flight's
        // task calls it. A fresh clone stays behind, to be readied before the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(self.core.extract.extract(request), inner, self.core.clone())
    }
}
