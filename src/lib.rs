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
//!   lead is verified. Any `Fn(&Req) -> Option<K>` is one.
//! - [`Share`]: how one result is stored, replayed and answered. [`CloneResponse`] (the
//!   default) clones `Clone` responses and replays every `Ok`.
//! - [`Handle`]: invalidation (by key or by group) and [`Stats`].
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `http` | yes | the HTTP front: token sources, response buffering, JSON rejections |
//! | `jwt` | yes | JWT verification of refresh tokens with `jsonwebtoken` |
//! | `metrics` | no | counters through the `metrics` crate facade |
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service, and the leader calls the very service it
//! readied. Every other caller releases its readied service (and whatever capacity it
//! reserved, a `ConcurrencyLimit` permit say) as soon as its key is known, so waiting
//! callers hold no inner capacity. Put the layer outside such limits. The table is bounded: at most
//! `max_entries` live entries (100,000) and `max_waiters` callers per flight (10,000);
//! beyond either, requests get [`Overloaded`](error::Overloaded) at once.
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
//! - Keys are fingerprints of the *exact* token (a keyed hash); raw tokens are never stored,
//!   logged or used as keys. Matching by the user alone would hand an old, already rotated
//!   (possibly stolen) token the user's fresh pair, and hide the reuse from the server.
//! - A request may lead a flight only after [`Extract::admit`] verified it; requests that
//!   match a live entry carry the same bytes and skip a second verification, but are still
//!   refused once the token's own expiry has passed.
//! - Entries can be grouped (by subject) and invalidated as a group, for logout.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod store;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod token;

mod flight;
mod handle;
mod key;
mod layer;
mod metrics;
mod service;
mod share;

pub use crate::{
    error::BoxError,
    handle::Handle,
    key::{Admission, Extract, Extracted, Fingerprint, Fingerprinter},
    layer::{Builder, RefreshCoalesceLayer},
    metrics::{Outcome, Stats},
    service::RefreshCoalesce,
    share::{CloneResponse, ReplayAll, ReplayPredicate, Served, Share},
};

#[cfg(feature = "jwt")]
pub use crate::token::JwtVerifier;
#[cfg(feature = "http")]
pub use crate::{
    http::{HttpExtract, HttpShare},
    token::{Opaque, TokenSource, Verified, Verify},
};
