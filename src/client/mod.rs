//! The client side: a layer over outgoing requests that refreshes once and retries.
//!
//! The refresh storm starts at the client. When an access token expires, every request in
//! flight gets a `401`, and a client that refreshes on each of them sends one refresh per
//! request: with rotating refresh tokens (RFC 9700 §4.14.2) the first wins, the others
//! present a rotated token, and the token server revokes the family. The server-side layer
//! absorbs storms from clients you do not control; this module fixes the ones you do:
//! service-to-service callers, backends for frontends, CLIs, gRPC clients.
//!
//! [`BearerAuthLayer`] wraps any `Service<http::Request<B>>` (hyper-util's client, a tonic
//! `Channel`, axum or hyper used as a proxy):
//!
//! - it sends `Authorization: Bearer` from shared [`Credentials`] (an access token with
//!   its expiry, a refresh token, a generation that each change increments);
//! - **ahead of expiry** (within `refresh_ahead`, 30 s, or half the token's lifetime), it
//!   refreshes before sending;
//! - **after a rejection** (`401`, or a trailers-only gRPC `UNAUTHENTICATED`) of a request
//!   sent with generation `g`, it refreshes once for every such request of `g` (they join
//!   one flight of the crate's table, keyed by `g`); if the credentials moved past `g`
//!   already, the request takes the newer token; then the request is **sent again once**;
//! - request bodies up to `max_body` (64 KiB) are kept, so that the second send is byte for
//!   byte the first; a larger or still-streaming body is sent once and its rejection
//!   returned (its refresh starts in the background, for the requests that follow);
//! - `invalid_grant` **ends** the credentials: requests holding a rejection get it back,
//!   later requests fail with [`NoCredentials`](error::NoCredentials) without being sent;
//!   nothing retries in a loop;
//! - other failures (a `5xx`, a connection error, a timeout) reach the waiting requests as
//!   [`RefreshFailed`](error::RefreshFailed), and the next attempt **backs off** (500 ms,
//!   doubling up to 30 s, less up to half of each wait at random:
//!   [`Builder::backoff_jitter`]);
//! - at most one refresh per credentials is in flight, and a refresh token is never
//!   presented after it was rotated: a refresh re-reads the credentials before it calls
//!   anything.
//!
//! The refresh is any tower service from [`RefreshRequest`] to [`Tokens`] (a closure with
//! [`refresh_fn`]); [`oauth2::OAuth2Refresh`] (feature `oauth2`) is RFC 6749 §6 on the
//! `oauth2` crate, over any tower HTTP service.
//!
//! # hyper-util
//!
//! One client type carries the requests and the refreshes: hyper-util's legacy client
//! whose request body is the layer's [`ClientBody`].
//!
//! ```no_run
//! # #[cfg(feature = "oauth2")]
//! # async fn example() -> Result<(), tower_refresh_coalesce::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_refresh_coalesce::client::{
//!     BearerAuthLayer, ClientBody, Credentials, Tokens, oauth2::OAuth2Refresh,
//! };
//!
//! let http = Client::builder(TokioExecutor::new()).build_http::<ClientBody<Full<Bytes>>>();
//! let refresh = OAuth2Refresh::new(http.clone(), "https://auth.example.com/token", "my-client")?
//!     .client_secret("s3cret");
//! // After the login (or from a credential store):
//! let credentials = Credentials::new();
//! credentials.set(Tokens::new("eyJ...")?.with_refresh_token("8xLOxBtZp8")).await?;
//!
//! let client = ServiceBuilder::new()
//!     .layer(BearerAuthLayer::new(credentials.clone(), refresh))
//!     .service(http);
//! let request = http::Request::get("https://api.example.com/me").body(Full::<Bytes>::default())?;
//! let response = client.oneshot(request).await?;
//! let body = response.into_body().collect().await?.to_bytes();
//! # let _ = body;
//! # Ok(())
//! # }
//! ```
//!
//! # tonic
//!
//! A tonic client runs on any `GrpcService`; put the layer between it and the `Channel`,
//! which takes tonic's own body (`tonic::body::Body::new` wraps the layer's). The refresh
//! service can be a call of your token service's own rpc; the `grpc` crate of the workspace
//! (`examples/grpc`, `bearer.rs`) is a complete example.
//!
//! ```no_run
//! # async fn example() -> Result<(), tower_refresh_coalesce::BoxError> {
//! use std::convert::Infallible;
//! use tonic::{body::Body, transport::Channel};
//! use tower::ServiceBuilder;
//! use tower_refresh_coalesce::client::{
//!     BearerAuthLayer, ClientBody, Credentials, RefreshRequest, Tokens, refresh_fn,
//! };
//!
//! let channel = Channel::from_static("http://[::1]:50051").connect().await?;
//! let credentials = Credentials::from_tokens(Tokens::new("eyJ...")?.with_refresh_token("r1"));
//! let refresh = refresh_fn(|request: RefreshRequest| async move {
//!     // Call the token service's Refresh rpc with request.refresh_token()...
//!     Ok::<_, Infallible>(Tokens::new("eyJ...new").unwrap())
//! });
//! let service = ServiceBuilder::new()
//!     .layer(BearerAuthLayer::new(credentials, refresh))
//!     .map_request(|request: http::Request<ClientBody<Body>>| request.map(Body::new))
//!     .service(channel);
//! // let mut client = MyServiceClient::new(service);
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
//!
//! gRPC servers reject a call before running it with a trailers-only `UNAUTHENTICATED` (an
//! interceptor does); that is what the layer retries. A status sent in the trailers of a
//! streamed answer arrives after the response was handed on, and is not. A call made after
//! the credentials ended fails with the layer's error, which tonic reports as `Unknown`
//! with the [`NoCredentials`](error::NoCredentials) as its source; to report it as
//! `UNAUTHENTICATED`, as a refused call is, put a `map_err` above the layer that turns it
//! into a `tonic::Status` (tonic takes a `Status` found in a service's error as the call's
//! status): the `grpc` example's `grpc_status` does.
//!
//! # reqwest
//!
//! reqwest is not a tower service: its middleware (`reqwest-middleware`) is an async trait
//! with a `Next` to call. The layer's refresh core is available there as an [`Authorizer`]
//! (two calls: [`authorize`](Authorizer::authorize) before sending,
//! [`rejected`](Authorizer::rejected) after a `401`), which shares the layer's credentials,
//! settings and refreshes. A middleware is then a few lines (not compiled here: the library
//! does not depend on reqwest):
//!
//! ```ignore
//! use reqwest_middleware::{Middleware, Next, Result};
//! use tower_refresh_coalesce::client::Authorizer;
//!
//! struct BearerAuth(Authorizer);
//!
//! #[async_trait::async_trait]
//! impl Middleware for BearerAuth {
//!     async fn handle(&self, mut req: reqwest::Request, ext: &mut http::Extensions, next: Next<'_>) -> Result<reqwest::Response> {
//!         let sent = self.0.authorize().await.map_err(reqwest_middleware::Error::middleware)?;
//!         req.headers_mut().insert(http::header::AUTHORIZATION, sent.header().clone());
//!         // `try_clone` is `None` for a streaming body: such a request is sent once.
//!         let again = req.try_clone();
//!         let response = next.clone().run(req, ext).await?;
//!         let (Some(mut again), 401) = (again, response.status().as_u16()) else { return Ok(response) };
//!         match self.0.rejected(&sent).await.map_err(reqwest_middleware::Error::middleware)? {
//!             Some(next_auth) => {
//!                 again.headers_mut().insert(http::header::AUTHORIZATION, next_auth.header().clone());
//!                 next.run(again, ext).await
//!             }
//!             None => Ok(response), // the credentials ended: the 401 is the answer
//!         }
//!     }
//! }
//! ```
//!
//! # Many processes, one credential
//!
//! Pods sharing one service account, or a CLI and a daemon sharing a login, build their
//! cells with [`Credentials::shared`] over one [`store::CredentialStore`]: an in-memory one
//! ([`store::MemoryCredentialStore`]) or Redis ([`store::RedisCredentialStore`], features
//! `client` and `redis`, on a [`RedisStore`](crate::store::RedisStore)'s connection, sealing
//! and election lock). A refresh takes the store's lock, re-reads the store, presents the
//! stored refresh token, and stores the result with a compare-and-swap on the generation;
//! the other processes wait for it and take it. A process that cannot reach the store fails
//! its refresh (transient) rather than refresh alone.
//!
//! # Observability
//!
//! [`Credentials::stats`] counts the refresh calls (ahead of expiry, after a rejection),
//! the requests that joined one, took another process's result or a newer generation, the
//! retries and the failures; with the `metrics` feature they also go to the `metrics` facade
//! (`refresh_client_*`). Each request runs in a `refresh_client_request` span (its
//! generation, whether it was retried) and each refresh in a `refresh_client_flight` span;
//! failures are logged at `warn`. No token is ever logged: `Debug` of [`Tokens`] redacts
//! them and the `Authorization` value is marked sensitive.

mod attempt;
mod authorizer;
mod backoff;
pub mod body;
mod core;
mod credentials;
pub mod error;
pub mod future;
mod layer;
mod metrics;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
mod refresh;
mod refresher;
mod remote;
mod service;
mod session;
pub mod store;

pub use self::{
    authorizer::{Authorization, Authorizer},
    body::ClientBody,
    credentials::Credentials,
    layer::{BearerAuthLayer, Builder},
    metrics::ClientStats,
    refresher::{RefreshFn, RefreshRequest, refresh_fn},
    service::BearerAuth,
    session::{Session, Snapshot, Tokens},
    store::{CredentialStore, MemoryCredentialStore},
};

/// An error with its sources, for log lines: "a: b: c".
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}
