//! [`BearerAuthLayer`] and its [`Builder`]: configuration only, no I/O.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tower_layer::Layer;
use tower_service::Service;

use super::{
    authorizer::Authorizer,
    backoff::BackoffPolicy,
    core::Core,
    credentials::Credentials,
    refresher::{RefreshRequest, RefreshWith, Refresher},
    service::BearerAuth,
    session::Tokens,
};
use crate::error::BoxError;

/// Applies [`BearerAuth`] to an HTTP or gRPC client: each request gets `Authorization:
/// Bearer` from the shared [`Credentials`], which are refreshed ahead of expiry and after a
/// rejection, once per generation, and a rejected request is sent again once with the new
/// token.
///
/// Cheap to clone. The credentials, their table of refreshes and their counters live in the
/// [`Credentials`] cell: **every layer built with clones of one cell, every service those
/// layers make, and every clone of those services, refresh it at most once per
/// generation.** `refresh` is any tower service from [`RefreshRequest`] to [`Tokens`]
/// ([`refresh_fn`](super::refresh_fn) makes one of a closure;
/// [`OAuth2Refresh`](super::oauth2::OAuth2Refresh) is RFC 6749 §6).
///
/// ```
/// use std::{convert::Infallible, time::Duration};
/// use tower_refresh_coalesce::client::{BearerAuthLayer, Credentials, RefreshRequest, Tokens, refresh_fn};
///
/// let credentials = Credentials::from_tokens(Tokens::new("access-1")?.with_refresh_token("refresh-1"));
/// let refresh = refresh_fn(|request: RefreshRequest| async move {
///     // POST grant_type=refresh_token to the token server...
///     Ok::<_, Infallible>(Tokens::new("access-2").unwrap().expires_in(Duration::from_secs(900)))
/// });
/// let layer = BearerAuthLayer::builder(credentials, refresh)
///     .refresh_ahead(Duration::from_secs(30))
///     .max_body(64 * 1024)
///     .build();
/// // ServiceBuilder::new().layer(layer).service(hyper_util_client)
/// # let _ = layer;
/// # Ok::<(), tower_refresh_coalesce::client::error::InvalidToken>(())
/// ```
#[derive(Clone)]
pub struct BearerAuthLayer {
    core: Arc<Core>,
}

impl BearerAuthLayer {
    /// A layer with the default settings that authenticates with `credentials` and renews
    /// them with `refresh`.
    pub fn new<R>(credentials: Credentials, refresh: R) -> Self
    where
        R: Service<RefreshRequest, Response = Tokens> + Clone + Send + 'static,
        R::Error: Into<BoxError>,
        R::Future: Send + 'static,
    {
        Self::builder(credentials, refresh).build()
    }

    /// A builder that authenticates with `credentials` and renews them with `refresh`.
    pub fn builder<R>(credentials: Credentials, refresh: R) -> Builder
    where
        R: Service<RefreshRequest, Response = Tokens> + Clone + Send + 'static,
        R::Error: Into<BoxError>,
        R::Future: Send + 'static,
    {
        Builder {
            credentials,
            refresh: Box::new(RefreshWith(Mutex::new(refresh))),
            refresh_ahead: Duration::from_secs(30),
            max_body: 64 * 1024,
            refresh_timeout: Duration::from_secs(30),
            backoff: BackoffPolicy::DEFAULT,
        }
    }

    /// The credentials the layer authenticates with.
    pub fn credentials(&self) -> &Credentials {
        &self.core.credentials
    }

    /// The layer's refresh core as two calls, for an HTTP client that is not a tower
    /// service; it shares the layer's credentials, settings and refreshes.
    pub fn authorizer(&self) -> Authorizer {
        Authorizer::new(self.core.clone())
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> BearerAuth<S> {
        BearerAuth::new(inner, self.core.clone())
    }
}

impl fmt::Debug for BearerAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuthLayer")
            .field("core", &self.core)
            .finish()
    }
}

/// Builds a [`BearerAuthLayer`]; start with [`BearerAuthLayer::builder`].
pub struct Builder {
    credentials: Credentials,
    refresh: Box<dyn Refresher>,
    refresh_ahead: Duration,
    max_body: usize,
    refresh_timeout: Duration,
    backoff: BackoffPolicy,
}

impl Builder {
    /// How long before the access token expires a request refreshes it before it is sent
    /// (tokens without a known expiry are refreshed only after a rejection). A token whose
    /// whole lifetime is shorter than twice this is refreshed at half its lifetime instead.
    /// If that refresh fails, requests go on with the old token until it expires. Default:
    /// 30 s.
    #[must_use]
    pub fn refresh_ahead(mut self, margin: Duration) -> Self {
        self.refresh_ahead = margin;
        self
    }

    /// The largest request body kept in memory so that a rejected request can be sent again;
    /// a larger or streaming body is sent once, and its rejection is returned as it is.
    /// Default: 64 KiB.
    #[must_use]
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The longest a call of the refresh service may take; a slower one fails as transient.
    /// Default: 30 s.
    #[must_use]
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.refresh_timeout = timeout;
        self
    }

    /// After a failed refresh (other than `invalid_grant`), no new attempt is made for
    /// `initial`, doubling with each failure in a row up to `max`, less a random part (see
    /// [`backoff_jitter`](Self::backoff_jitter)); meanwhile requests that need a refresh
    /// fail at once with the failure, whose
    /// [`retry_after`](super::error::RefreshFailed::retry_after) tells the wait. Default:
    /// 500 ms, up to 30 s.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff.initial = initial;
        self.backoff.max = max.max(initial);
        self
    }

    /// The share of each back-off, from 0 to 1, that is taken off at random, so that
    /// processes that saw one token server fail together do not all try again at the same
    /// instant (processes sharing a [`CredentialStore`](super::CredentialStore) are
    /// serialised by its lock anyway). 0 makes the back-off exact; values outside `[0, 1]`
    /// are clamped. Default: 0.5, each wait between half and all of its doubled delay.
    #[must_use]
    pub fn backoff_jitter(mut self, jitter: f64) -> Self {
        self.backoff.jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// Builds the layer.
    pub fn build(self) -> BearerAuthLayer {
        BearerAuthLayer {
            core: Arc::new(Core {
                credentials: self.credentials,
                refresh: self.refresh,
                refresh_ahead: self.refresh_ahead,
                max_body: self.max_body,
                refresh_timeout: self.refresh_timeout,
                backoff: self.backoff,
            }),
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("credentials", &self.credentials)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("max_body", &self.max_body)
            .field("refresh_timeout", &self.refresh_timeout)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}
