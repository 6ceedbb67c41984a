//! The client side: a layer over an in-process API and token server, with exact counts of
//! refreshes and sends, gated refreshes, and tokio's paused clock where time matters.
//!
//! - `storms`: one refresh for a storm of rejections, two generations, refresh ahead of
//!   expiry, `invalid_grant`, transient failures and their back-off, panics, timeouts,
//!   cancellation, logout and login.
//! - `bodies`: kept bodies sent again byte for byte; bodies too large or still streaming
//!   are not.
//! - `stores`: cells sharing a credential store refresh once between them.
//! - `redis`: the same over a real `redis-server`, sealed.

mod bodies;
#[cfg(feature = "redis")]
mod redis;
mod stores;
mod storms;

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt, Full};
use support::{Calls, Gate};
use tower::{Service, ServiceExt, service_fn};
use tower_refresh_coalesce::{
    BoxError,
    client::{
        BearerAuthLayer, ClientBody, Credentials, RefreshRequest, Tokens, error::RefreshError,
        refresh_fn,
    },
};

/// What the API received: the `Authorization` header and the body of each request.
pub(crate) type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A token server with rotation and reuse detection, and the API its access tokens open.
///
/// Access tokens are `access-N`, refresh tokens `refresh-N`. A refresh presenting the
/// current refresh token rotates both; presenting an older one is reuse: the family is
/// revoked (every token refused from then on) and the answer is `invalid_grant`.
#[derive(Clone)]
pub(crate) struct Auth {
    state: Arc<Mutex<AuthState>>,
    /// Calls of the refresh endpoint.
    pub(crate) refreshes: Calls,
    /// Rejections the API answered.
    pub(crate) rejections: Calls,
    /// Requests that reached the API (counted before their body is read).
    pub(crate) arrived: Calls,
    /// Refreshes wait here.
    pub(crate) gate: Gate,
    pub(crate) seen: Seen,
    /// The request trailers the API received.
    pub(crate) trailers: Arc<Mutex<Vec<http::HeaderMap>>>,
}

struct AuthState {
    issued: u64,
    /// The access token the API accepts, if any.
    valid_access: Option<String>,
    revoked: bool,
    reuse_detected: u64,
    /// How refreshes fail, in order, before they succeed again.
    failures: Vec<Failing>,
    lifetime: Option<Duration>,
    /// Rejections are trailers-only gRPC `UNAUTHENTICATED` answers instead of `401`.
    grpc: bool,
}

/// How one refresh fails.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Failing {
    InvalidGrant,
    Transient,
    Panic,
}

impl Auth {
    /// A token server that issued `access-0`/`refresh-0`, the API accepting `access-0`.
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(AuthState {
                issued: 0,
                valid_access: Some("access-0".into()),
                revoked: false,
                reuse_detected: 0,
                failures: Vec::new(),
                lifetime: None,
                grpc: false,
            })),
            refreshes: Calls::default(),
            rejections: Calls::default(),
            arrived: Calls::default(),
            gate: Gate::open_now(),
            seen: Seen::default(),
            trailers: Arc::default(),
        }
    }

    /// Refreshes wait at a closed gate until [`Gate::open`].
    pub(crate) fn gated(mut self) -> Self {
        self.gate = Gate::closed();
        self
    }

    /// New access tokens live `lifetime`.
    pub(crate) fn lifetime(self, lifetime: Duration) -> Self {
        self.state().lifetime = Some(lifetime);
        self
    }

    /// Rejections are gRPC `UNAUTHENTICATED` (trailers-only).
    pub(crate) fn grpc(self) -> Self {
        self.state().grpc = true;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap()
    }

    /// The credentials the client logged in with: `access-0`, `refresh-0`.
    pub(crate) fn login(&self) -> Tokens {
        Tokens::new("access-0")
            .unwrap()
            .with_refresh_token("refresh-0")
    }

    /// Rotates the current pair as a login would hand out a new one, without the refresh
    /// endpoint (not counted as a refresh).
    pub(crate) fn refresh_now(&self) -> Tokens {
        let presented = format!("refresh-{}", self.state().issued);
        self.rotate(Some(&presented)).expect("rotates")
    }

    /// The API stops accepting the current access token (it expired on the server).
    pub(crate) fn expire_access(&self) {
        self.state().valid_access = None;
    }

    /// The next refreshes fail so, in order.
    pub(crate) fn fail_next(&self, failures: &[Failing]) {
        self.state().failures.extend_from_slice(failures);
    }

    pub(crate) fn reuse_detected(&self) -> u64 {
        self.state().reuse_detected
    }

    /// The refresh endpoint as a refresh service.
    pub(crate) fn refresh(
        &self,
    ) -> impl Service<
        RefreshRequest,
        Response = Tokens,
        Error = BoxError,
        Future = impl Future<Output = Result<Tokens, BoxError>> + Send + use<>,
    > + Clone
    + Send
    + 'static {
        let auth = self.clone();
        refresh_fn(move |request: RefreshRequest| {
            let auth = auth.clone();
            auth.refreshes.record();
            let wait = auth.gate.wait();
            async move {
                wait.await;
                auth.rotate(request.refresh_token())
            }
        })
    }

    fn rotate(&self, presented: Option<&str>) -> Result<Tokens, BoxError> {
        let mut state = self.state();
        if let Some(failing) = (!state.failures.is_empty()).then(|| state.failures.remove(0)) {
            match failing {
                Failing::InvalidGrant => {
                    return Err(RefreshError::invalid_grant("refresh token revoked").into());
                }
                Failing::Transient => {
                    return Err(RefreshError::transient("503 Service Unavailable").into());
                }
                Failing::Panic => {
                    drop(state);
                    panic!("the token server's handler panicked")
                }
            }
        }
        let current = format!("refresh-{}", state.issued);
        if state.revoked || presented != Some(current.as_str()) {
            // A rotated (or unknown) token: theft, as far as the server can tell.
            state.reuse_detected += 1;
            state.revoked = true;
            state.valid_access = None;
            return Err(RefreshError::invalid_grant("refresh token reused").into());
        }
        state.issued += 1;
        let access = format!("access-{}", state.issued);
        state.valid_access = Some(access.clone());
        let mut tokens =
            Tokens::new(access)?.with_refresh_token(format!("refresh-{}", state.issued));
        if let Some(lifetime) = state.lifetime {
            tokens = tokens.expires_in(lifetime);
        }
        Ok(tokens)
    }

    /// An API behind the layer: `200` with the request's body for the current access token,
    /// a rejection otherwise. Requests to `/held` wait at `hold` first.
    pub(crate) fn api<B>(
        &self,
        hold: Gate,
    ) -> impl Service<
        Request<ClientBody<B>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + use<B>,
    > + Clone
    + Send
    + 'static
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let auth = self.clone();
        service_fn(move |request: Request<ClientBody<B>>| {
            let auth = auth.clone();
            auth.arrived.record();
            let held = (request.uri().path() == "/held").then(|| hold.wait());
            async move {
                let authorization = request
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let collected = request.into_body().collect().await.unwrap();
                if let Some(trailers) = collected.trailers() {
                    auth.trailers.lock().unwrap().push(trailers.clone());
                }
                let body = collected.to_bytes();
                // The token is judged when the request arrives, as a server does.
                let valid = {
                    let state = auth.state();
                    state
                        .valid_access
                        .as_ref()
                        .is_some_and(|a| authorization == format!("Bearer {a}"))
                };
                auth.seen
                    .lock()
                    .unwrap()
                    .push((authorization, body.clone()));
                if let Some(held) = held {
                    held.await;
                }
                if valid {
                    return Ok(Response::new(Full::new(body)));
                }
                auth.rejections.record();
                let grpc = auth.state().grpc;
                let response = if grpc {
                    Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "16")
                        .body(Full::default())
                } else {
                    Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header("www-authenticate", r#"Bearer error="invalid_token""#)
                        .body(Full::from(r#"{"error":"invalid_token"}"#))
                };
                Ok(response.unwrap())
            }
        })
    }

    /// The `Authorization` headers the API saw, in order.
    pub(crate) fn authorizations(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }
}

/// A GET of `path`.
pub(crate) fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

/// Sends `request` through `service` (readied first).
pub(crate) async fn send<S, B>(
    mut service: S,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, BoxError>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    service.ready().await?.call(request).await
}

/// The body of a response.
pub(crate) async fn body(response: Response<Full<Bytes>>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// `n` requests sent at once through clones of `service`, each on a task.
pub(crate) fn storm<S>(
    service: &S,
    n: usize,
    path: &'static str,
) -> Vec<tokio::task::JoinHandle<Result<Response<Full<Bytes>>, BoxError>>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    (0..n)
        .map(|_| tokio::spawn(send(service.clone(), get(path))))
        .collect()
}

/// The layer over `auth`'s API and refresh endpoint, for `credentials`.
pub(crate) fn client(
    auth: &Auth,
    credentials: &Credentials,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    client_with(auth, credentials, Gate::open_now(), |b| b)
}

/// [`client`] with the `/held` gate and a configured builder, for requests with `B` bodies.
pub(crate) fn client_with<B>(
    auth: &Auth,
    credentials: &Credentials,
    hold: Gate,
    configure: impl FnOnce(
        tower_refresh_coalesce::client::Builder,
    ) -> tower_refresh_coalesce::client::Builder,
) -> impl Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let layer = configure(BearerAuthLayer::builder(
        credentials.clone(),
        auth.refresh(),
    ))
    .build();
    tower::ServiceBuilder::new()
        .layer(layer)
        .service(auth.api::<B>(hold))
}

/// The distinct values of `items`.
pub(crate) fn distinct<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> usize {
    items.into_iter().collect::<HashSet<_>>().len()
}
