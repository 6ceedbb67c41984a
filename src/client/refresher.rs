//! The refresh service as the layer calls it: what it receives ([`RefreshRequest`]), closures
//! as refresh services ([`refresh_fn`]), and [`Refresher`], the service behind a trait
//! object.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
};

use tower_service::Service;

use super::session::Tokens;
use crate::error::BoxError;

/// What a refresh service receives: the tokens to renew, and their generation.
///
/// `Debug` never shows a token.
#[derive(Debug, Clone)]
pub struct RefreshRequest {
    generation: u64,
    tokens: Tokens,
}

impl RefreshRequest {
    /// A request to renew `tokens`, of `generation` (for testing refresh services).
    pub fn new(generation: u64, tokens: Tokens) -> Self {
        Self { generation, tokens }
    }

    /// The refresh token to present, if the tokens have one. A refresh service without one
    /// may still obtain new tokens another way (a client credentials grant, say).
    pub fn refresh_token(&self) -> Option<&str> {
        self.tokens.refresh_token()
    }

    /// The tokens being renewed.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Their generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A refresh service made of a closure; see [`refresh_fn`].
#[derive(Clone)]
pub struct RefreshFn<F> {
    f: F,
}

/// A refresh service that calls `f`: any `FnMut(RefreshRequest) -> impl Future<Output =
/// Result<Tokens, E>>`, as `tower::service_fn` makes services of closures.
///
/// ```
/// use tower_refresh_coalesce::client::{RefreshRequest, Tokens, error::RefreshError, refresh_fn};
///
/// let refresh = refresh_fn(|request: RefreshRequest| async move {
///     let Some(refresh_token) = request.refresh_token() else {
///         return Err(RefreshError::rejected("no refresh token"));
///     };
///     // POST it to the token server...
///     # let _ = refresh_token;
///     Tokens::new("new-access-token").map_err(|e| RefreshError::rejected("bad token").with_source(e))
/// });
/// # let _ = refresh;
/// ```
pub fn refresh_fn<F>(f: F) -> RefreshFn<F> {
    RefreshFn { f }
}

impl<F, Fut, E> Service<RefreshRequest> for RefreshFn<F>
where
    F: FnMut(RefreshRequest) -> Fut,
    Fut: Future<Output = Result<Tokens, E>>,
{
    type Response = Tokens;
    type Error = E;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RefreshRequest) -> Fut {
        (self.f)(request)
    }
}

impl<F> fmt::Debug for RefreshFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshFn").finish_non_exhaustive()
    }
}

/// The refresh future, type-erased.
pub(crate) type RefreshFuture = Pin<Box<dyn Future<Output = Result<Tokens, BoxError>> + Send>>;

/// A refresh service behind a trait object, so that neither the layer nor the flight is
/// generic over it.
pub(crate) trait Refresher: Send + Sync {
    fn refresh(&self, request: RefreshRequest) -> RefreshFuture;
}

/// A refresh service `R`, cloned out of its lock for each call (so that `R` need not be
/// `Sync`); the clone is readied before it is called.
pub(crate) struct RefreshWith<R>(pub(crate) Mutex<R>);

impl<R> Refresher for RefreshWith<R>
where
    R: Service<RefreshRequest, Response = Tokens> + Clone + Send + 'static,
    R::Error: Into<BoxError>,
    R::Future: Send + 'static,
{
    fn refresh(&self, request: RefreshRequest) -> RefreshFuture {
        let mut service = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(request).await.map_err(Into::into)
        })
    }
}
