//! Tower middleware that stops refresh-token storms: concurrent refreshes with the same
//! token become one call of the inner service, and every caller gets the same response.
//!
//! # Overview
//!
//! When an access token expires, every request a client has in flight gets a `401` and tries
//! to refresh at once. With rotating refresh tokens (RFC 9700 §4.14.2) the first refresh
//! wins and the others present an already-used token, which the identity server treats as
//! theft: it revokes the token family and the user is logged out.
//!
//! [`RefreshCoalesceLayer`] sits in front of the refresh service:
//!
//! - concurrent requests with the same key (by default: the exact token) become **one call**
//!   of the inner service, spawned on its own task;
//! - every caller receives **the same result**;
//! - a successful result is **replayed** to late retries of the same key for a short window
//!   (`ttl`, 30 s by default);
//! - a caller that waits longer than `wait_timeout` (10 s) gets
//!   [`Elapsed`](error::Elapsed), while the call goes on and its result is replayed;
//! - the inner call is aborted after `hard_cap` (30 s); a panic or an abort reaches every
//!   caller as [`LeaderFailed`](error::LeaderFailed), never as a panic.
//!
//! ## When coalescing is not safe
//!
//! Coalescing hands one response to several requests. That is right only when those
//! requests are *the same request*: the same refresh token from the same client. Keying by
//! anything coarser (the user, the session) gives one request another's response; see the
//! security notes below. Do not put the layer in front of endpoints whose effect each caller
//! must cause once (payments, sends), and keep `ttl` shorter than the window in which the
//! identity server would still accept a retry of the old token.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_refresh_coalesce::RefreshCoalesceLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_refresh_coalesce::BoxError> {
//! #[derive(Clone)]
//! struct RefreshRequest {
//!     refresh_token: String,
//! }
//!
//! let layer = RefreshCoalesceLayer::builder(|req: &RefreshRequest| Some(req.refresh_token.clone()))
//!     .ttl(Duration::from_secs(30))
//!     .build();
//! let handle = layer.handle();
//!
//! let mut service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|req: RefreshRequest| async move {
//!         // Rotate the token in the database, issue a new pair...
//!         Ok::<_, Infallible>(format!("pair for {}", req.refresh_token))
//!     }));
//!
//! let request = RefreshRequest { refresh_token: "r1".into() };
//! let first = service.ready().await?.call(request.clone()).await?;
//! let retry = service.ready().await?.call(request).await?; // replayed, no second rotation
//! assert_eq!(first, retry);
//! assert_eq!((handle.stats().leader, handle.stats().replayed), (1, 1));
//! # Ok(())
//! # }
//! ```
//!
//! # Building blocks
//!
//! - [`Extract`]: how a request becomes a [`Fingerprint`] key, and how a request that has to
//!   lead is verified. Any `Fn(&Req) -> Option<K>` is one; [`NaturalKey`] keys requests by
//!   bytes they carry (a user id) without allocating; [`HttpExtract`] is the HTTP front.
//! - [`Share`]: how one result is stored, replayed and answered. [`CloneResponse`] (the
//!   default) clones `Clone` responses and replays every `Ok`; [`HttpShare`] buffers whole
//!   HTTP responses.
//! - [`Handle`]: invalidation (by key, token, group or subject) and [`Stats`].
//! - [`store::Store`]: coordination across instances ([`store::RedisStore`]).
//!
//! # The HTTP front
//!
//! [`RefreshCoalesceLayer::http`] puts the layer in front of an HTTP refresh endpoint:
//!
//! 1. **Find the token**: `Authorization: Bearer`, the cookie `refresh_token`, the JSON field
//!    `refresh_token` or an RFC 6749 §6 form, in that order ([`TokenSource`]). The body is
//!    read only for the body sources, capped at 16 KiB (`413` beyond), and handed on
//!    unchanged. `Authorization: Basic` is client authentication, never the token.
//! 2. **Key it**: a keyed hash of the exact token and of everything else the inner service
//!    authenticates: the client id (Basic, form or JSON `client_id`), the client credential
//!    (Basic or `client_secret` secret, or the RFC 7523 `client_assertion`), the RFC 7638
//!    thumbprint of a verified DPoP proof's key (RFC 9449), and what
//!    [`HttpExtract::bind`] adds (an mTLS certificate thumbprint, say).
//! 3. **Replay or join** a live entry for that key, without a second signature check (the
//!    bytes are identical) but not past the token's `exp`.
//! 4. **Verify** before leading: [`JwtVerifier`] pins algorithms, checks `exp` and `nbf`
//!    with a 5 s leeway, requires a non-empty `sub`, checks `iss`/`aud` when configured,
//!    refuses access tokens by `typ` or a claim, refuses unknown `crit` and tokens over
//!    4 KiB. [`Opaque`] leaves judgement to the inner service. The leader's request carries
//!    what was verified as a [`RefreshGrant`] extension: the inner service acts on it, and an
//!    inner service that also runs without the layer reads requests with
//!    [`RefreshGrant::read`], the layer's own reading.
//! 5. **Share** the inner response: buffered once (up to 64 KiB) and rebuilt byte-identical
//!    for every caller, `Set-Cookie`, `Cache-Control` and trailers included. Only `2xx` is
//!    replayed.
//!
//! Refusals are JSON: `400 invalid_request` (no or malformed token, two client
//! authentication methods), `400 invalid_dpop_proof`, `401 invalid_grant` (status
//! configurable), `413`, `429` with `Retry-After` for a caller that waited too long, `503`
//! with `Retry-After` for overload, a subject over its cap or a failed flight. A refusal sent
//! before the request body was read carries `Connection: close` on HTTP/1. With [`HttpShare::grpc`] they are
//! trailers-only gRPC statuses instead. No refusal ever reaches the inner service, and none
//! echoes the token.
//!
//! ## axum
//!
//! Attach the layer to the refresh route alone. Every route and connection gets its own
//! service, and all of them share the layer's one table.
//!
//! ```
//! use axum::{Router, body::Bytes, routing::post};
//! use tower_refresh_coalesce::{HttpExtract, JwtVerifier, RefreshCoalesceLayer};
//!
//! async fn refresh(body: Bytes) -> &'static str {
//!     // Rotate the refresh token in one transaction, issue a new pair...
//!     "{}"
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = JwtVerifier::hs256(b"token signing key").typ("refresh+jwt").build()?;
//! let extract = HttpExtract::new(verifier).secret(b"a fingerprint secret of 32 bytes!");
//! let layer = RefreshCoalesceLayer::http(extract).build();
//! let handle = layer.handle(); // for logout: handle.invalidate_subject(sub)
//!
//! let app: Router = Router::new().route("/auth/refresh", post(refresh).route_layer(layer));
//! # let _ = (app, handle);
//! # Ok(())
//! # }
//! ```
//!
//! ## hyper
//!
//! Wrap the service with `tower::ServiceBuilder` and serve it through
//! `hyper_util::service::TowerToHyperService`; the inner service takes
//! `http::Request<RequestBody<hyper::body::Incoming>>`.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::ServiceBuilder;
//! use tower_refresh_coalesce::{HttpExtract, Opaque, RefreshCoalesceLayer, http::RequestBody};
//!
//! let service = ServiceBuilder::new()
//!     .layer(RefreshCoalesceLayer::http(HttpExtract::new(Opaque)).build())
//!     .service_fn(|request: Request<RequestBody<hyper::body::Incoming>>| async move {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     });
//! let service = hyper_util::service::TowerToHyperService::new(service);
//! # let _ = service;
//! ```
//!
//! ## tonic
//!
//! A tonic server's layer sees every method: name the refresh method with
//! [`HttpExtract::paths`], take the token from metadata, and answer with gRPC statuses.
//!
//! ```
//! use http::HeaderName;
//! use tower_refresh_coalesce::{HttpExtract, HttpShare, Opaque, RefreshCoalesceLayer, TokenSource};
//!
//! let extract = HttpExtract::new(Opaque)
//!     .paths(["/auth.v1.TokenService/Refresh"])
//!     .sources([TokenSource::metadata(HeaderName::from_static("x-refresh-token"))]);
//! let layer = RefreshCoalesceLayer::http(extract).share(HttpShare::new().grpc()).build();
//! // tonic::transport::Server::builder().layer(layer).add_service(...)
//! # let _ = layer;
//! ```
//!
//! The `grpc` crate of the workspace (`examples/grpc`) is a complete tonic server and client.
//!
//! # Several instances
//!
//! Behind a load balancer, a storm spreads over the instances and each would refresh once.
//! With a shared [`store::RedisStore`] (feature `redis`) they elect one leader per token; the
//! others wait for its result, which is stored sealed and replayed everywhere. The store
//! runs on a standalone Redis, on the master a Sentinel group names, or on a Redis Cluster,
//! with one protocol: every script touches the keys of one token, which share a hash tag and
//! so one cluster slot.
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_refresh_coalesce::{HttpExtract, Opaque, RefreshCoalesceLayer, store::RedisStore};
//!
//! const STORE_SECRET: &[u8] = b"a deployment secret of 32 bytes!";
//! // One Redis:
//! let client = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let store = RedisStore::standalone(client, STORE_SECRET).build()?;
//! // Or the master that three sentinels name `refresh`:
//! let sentinels = ["redis://10.0.0.5:26379/", "redis://10.0.0.6:26379/", "redis://10.0.0.7:26379/"];
//! let store = RedisStore::sentinel(sentinels, "refresh", STORE_SECRET).build()?;
//! // Or a cluster, from any of its nodes:
//! let store = RedisStore::cluster(["redis://10.0.1.1:6379/"], STORE_SECRET).build()?;
//!
//! let layer = RefreshCoalesceLayer::http(HttpExtract::new(Opaque).secret(b"a fingerprint secret of 32 bytes!"))
//!     .store(store)
//!     .build();
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! Every instance needs the same fingerprint secret and store secret. Each Redis command has
//! a budget (100 ms); after repeated failures a breaker skips Redis for a while and each
//! instance coalesces on its own (at most one inner call per instance per token), or, with
//! [`Builder::require_store`], refuses with `503` and `Retry-After` instead. A request
//! already waiting on another instance's flight never starts a refresh of its own: it waits
//! until `wait_timeout` and gets `429`.
//!
//! ## What a failover of the store keeps, and what it does not
//!
//! Redis replicates asynchronously: a master that fails takes its last writes with it.
//!
//! - **Kept: a flight already running.** Its leader waits until the configured number of
//!   replicas acknowledged its election (`WAIT`, [`store::RedisStoreBuilder::min_replicas`]:
//!   1 with Sentinel and in a cluster) before it calls the inner service, so the promoted
//!   replica still holds the lock and no second leader is elected for the token. Requests
//!   already following it on other instances keep waiting through the failover and never
//!   call the inner service. Its leader answers its own callers and goes on writing the
//!   result until the new master takes it (for up to `wait_timeout`), so the followers
//!   receive it too.
//! - **Kept: invalidations, as far as the replicas acknowledge them.** An invalidation waits
//!   for `min_replicas` acknowledgements as an election does, and is sent again until they
//!   come (for up to `wait_timeout`). A generation that a failover loses reads as 0, lower
//!   than the one any result stored under it carries: such results are refused, not
//!   replayed.
//! - **Not kept: a lock the replicas did not acknowledge in time.** The leader goes on
//!   (counted in [`Stats::store_unreplicated`]); a failover in that window can elect a
//!   second leader. Raise `min_replicas` only as far as the replicas answer within the
//!   command budget.
//! - **Not kept: coalescing during the failover itself.** While no master answers, a new
//!   flight cannot be elected: it refreshes on its instance alone (at most one call per
//!   instance per token), or is refused with [`Builder::require_store`]. Pub/sub messages
//!   sent meanwhile are lost; waiters poll (every 250 ms) and lose nothing else.
//! - **Standalone** Redis has no failover: a restart loses every lock and result, with the
//!   same consequences as the last two points.
//!
//! # The client side
//!
//! With the `client` feature, [`client::BearerAuthLayer`] stops the storm where it starts:
//! over an outgoing HTTP or gRPC client, it attaches `Authorization: Bearer` from shared
//! [`client::Credentials`], refreshes ahead of expiry and after a `401` or
//! `UNAUTHENTICATED` once per generation (through this crate's flight table), and sends each
//! rejected request again once. See [`client`].
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `http` | yes | the HTTP front: token sources, response buffering, JSON and gRPC refusals |
//! | `jwt` | yes | JWT verification of refresh tokens with `jsonwebtoken` (pure-Rust crypto) |
//! | `redis` | no | [`store::RedisStore`]: coordination across instances |
//! | `metrics` | no | the instruments of [Observability](#observability) through the `metrics` facade (and `refresh_client_*` with `client`) |
//! | `opentelemetry` | no | the same instruments through an OpenTelemetry meter ([`Builder::meter`]) |
//! | `client` | no | [`client`]: the other end of the storm, a layer over outgoing requests that refreshes once per credentials and generation and retries; with `redis`, a credential shared by processes |
//! | `oauth2` | no | [`client::oauth2::OAuth2Refresh`]: RFC 6749 §6 refresh on the `oauth2` crate, over any tower HTTP service |
//!
//! # Observability
//!
//! - **The outcome of every response.** The HTTP front puts a [`Coalesced`] in the
//!   extensions of each response it answers: [`Outcome`] (leader, joined, replayed,
//!   rejected, timed out, overloaded, leader failed, bypassed) and, for refusals and
//!   failures, the reason (`missing_token`, `waiters`, `panicked`, ...). An outer
//!   `TraceLayer`, metrics layer or handler labels with it, so the layer records nothing that
//!   an HTTP metrics layer records already.
//! - **Instruments.** With `metrics` or `opentelemetry`, under OpenTelemetry's naming
//!   conventions in both (a Prometheus exporter writes `refresh_coalesce_requests_total`,
//!   `refresh_coalesce_wait_duration_seconds`, ...). Counters and gauges read the atomics of
//!   [`Handle::stats`], so the two always agree:
//!
//!   | name | kind | attributes |
//!   |---|---|---|
//!   | `refresh_coalesce.requests` | counter | `outcome` |
//!   | `refresh_coalesce.reuse_suspected` | counter | |
//!   | `refresh_coalesce.store.events` | counter | `event`: `won`, `lost`, `replayed`, `error`, `breaker_opened`, `unreplicated` |
//!   | `refresh_coalesce.wait.duration` | histogram, s | |
//!   | `refresh_coalesce.inner.duration` | histogram, s | |
//!   | `refresh_coalesce.store.duration` | histogram, s | `command`: `load`, `elect`, `replicate`, `complete`, `group_generation`, `remember`, `invalidate`, `invalidate_group` |
//!   | `refresh_coalesce.flights.active` | gauge | |
//!   | `refresh_coalesce.entries` | gauge | |
//!   | `refresh_coalesce.breaker.open` | gauge | |
//!
//!   OpenTelemetry observes the counters and gauges at each collection (nothing on the
//!   request path); the `metrics` facade counts as events happen and sets the gauges as each
//!   flight starts and ends.
//! - **Tracing.** Each flight runs in a span `refresh_coalesce_flight` (field `flight`), a
//!   child of the leader's request span. A caller who joins the flight links to it
//!   (`follows_from`, a span link in OpenTelemetry); a replayed caller links to the span
//!   `refresh_coalesce_replay`, which lasts the replay window and links to the flight. One
//!   storm is then one linked trace; without a subscriber nothing is created.
//! - **Audit events.** [`Builder::audit`] hands every [`AuditEvent`] to a hook: suspected
//!   reuse, invalidations, refusals with their reason, the per-subject cap reached, the
//!   store's breaker opening and closing; with the subject where it was verified, never a
//!   token.
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service, and the leader calls the very service it
//! readied. Every other caller releases its readied service (and whatever capacity it
//! reserved, a `ConcurrencyLimit` permit say) as soon as its key is known, so waiting
//! callers hold no inner capacity. Put the layer outside such limits. The table is bounded:
//! at most `max_entries` live entries (100,000) and `max_waiters` callers per flight
//! (10,000); beyond either, requests get [`Overloaded`](error::Overloaded) at once.
//!
//! # Cancellation
//!
//! The inner call runs on its own task. Dropping a caller's future (a client that
//! disconnects) never cancels it: a refresh rotates tokens, so it must run to completion
//! exactly once, and its result is replayed to the retry. The task alone finishes the
//! table entry, and a drop guard removes the entry if it panics or is cancelled.
//!
//! # Security
//!
//! - **The rule.** Two requests share one answer only if the inner service, given each
//!   alone, would authenticate both the same way: the same refresh token, the same client
//!   id, the same client credential (secret or assertion) and the same sender constraint
//!   (DPoP key, or the integrator's [`HttpExtract::bind`]). A thief holding the token but not
//!   the client secret or the DPoP key never joins the victim's refresh and never receives
//!   its replay; it meets the inner service alone, which refuses it.
//! - **Its limits.** A *public* client's token is its only credential: whoever holds it
//!   within the `ttl` receives the replay that the rightful client would, so the TTL is a
//!   reuse window; use DPoP (or mTLS through [`HttpExtract::bind`]) to bind public clients.
//!   The layer checks what it can see of the request (the DPoP proof fully, including its
//!   signature and `jti`); client secrets and assertions are compared exactly but judged by
//!   the inner service. Client authentication in a body is read only with a body source.
//! - **Token-bound keys.** Entries are matched through a keyed hash (a secret of at least 32
//!   bytes; a layer with a store refuses to build without one); raw tokens are never stored,
//!   logged or used as keys. Matching by the user alone would hand an old, already rotated
//!   (possibly stolen) token the user's fresh pair, hide the reuse from the identity server,
//!   and give one device another's session; it is available only as the documented opt-in
//!   [`HttpExtract::match_by_subject`], where different subjects still never share a key, a
//!   token without a subject never coalesces, and [`Opaque`] or a store is refused at build.
//! - **Bounded per subject.** One subject holds at most 32 live entries
//!   ([`Builder::max_entries_per_group`]); beyond that only that subject gets `503`.
//! - **Verification first.** A request may call the inner service only after
//!   [`Extract::admit`] verified it. Requests matching a live entry carry identical bytes and
//!   skip a second check, but never past the token's own expiry.
//! - **Reuse stays visible.** A different token of a subject with a live entry goes to the
//!   inner service like any other and is counted as `reuse_suspected`.
//! - **The TTL is a reuse window.** Keep `ttl` (30 s) shorter than the identity server's own
//!   grace period for a rotated token, and call [`Handle::invalidate_subject`] (or
//!   [`Handle::invalidate_token`], which reaches every client that presented the token) on
//!   logout and password change so a revoked family is never replayed: on every instance, the
//!   invalidation also revokes a refresh already running (its callers get `invalid_grant`,
//!   and its result is neither stored nor replayed). No replay outlives the token's `exp`.
//! - **Sealed at rest.** Values in Redis are encrypted with a key derived from the deployment
//!   secret and the refreshed token; key names carry only fingerprints.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod error;
pub mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod store;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod token;

mod audit;
mod core;
mod durations;
mod flight;
mod handle;
mod key;
mod layer;
mod leader;
mod metrics;
#[cfg(feature = "opentelemetry")]
mod otel;
mod outcome;
mod service;
mod share;
mod sync;

pub use crate::{
    audit::{AuditEvent, InvalidationScope},
    error::BoxError,
    handle::Handle,
    key::{
        Admission, Extract, Extracted, Fingerprint, Fingerprinter, MIN_SECRET_LEN, NaturalKey,
        OwnedKey,
    },
    layer::{Builder, RefreshCoalesceLayer},
    metrics::Stats,
    outcome::{Coalesced, Outcome},
    service::RefreshCoalesce,
    share::{CloneResponse, ReplayAll, ReplayPredicate, Served, Share},
};

#[cfg(feature = "jwt")]
pub use crate::token::JwtVerifier;
#[cfg(feature = "http")]
pub use crate::{
    http::{HttpExtract, HttpShare, RefreshGrant},
    token::{Opaque, TokenSource, Verified, Verify},
};
