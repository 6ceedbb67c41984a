//! Error types.
//!
//! The service's error type is [`BoxError`], as everywhere in tower. Every failure the layer
//! itself produces is one of the small types in this module, so callers can tell them apart
//! with [`downcast_ref`](std::error::Error#method.downcast_ref):
//!
//! ```
//! use tower_refresh_coalesce::{error::Elapsed, BoxError};
//!
//! fn is_timeout(err: &BoxError) -> bool {
//!     err.downcast_ref::<Elapsed>().is_some()
//! }
//! # assert!(is_timeout(&BoxError::from(Elapsed::new(std::time::Duration::from_secs(10)))));
//! ```
//!
//! The HTTP front turns each of them into a response; see [`Rejection`] for the mapping.

use std::{error::Error, fmt, sync::Arc, time::Duration};

/// Alias for a type-erased error, the error type of every tower service in this crate.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// A caller waited `wait_timeout` for a flight and gave up.
///
/// The flight itself goes on; once it completes, its result is replayed to retries of the
/// same key for the replay window.
///
/// ```
/// # use tower_refresh_coalesce::{error::Elapsed, BoxError};
/// let err: BoxError = Elapsed::new(std::time::Duration::from_secs(10)).into();
/// assert_eq!(err.downcast_ref::<Elapsed>().unwrap().waited().as_secs(), 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    waited: Duration,
}

impl Elapsed {
    /// An `Elapsed` error after waiting `waited`.
    pub fn new(waited: Duration) -> Self {
        Self { waited }
    }

    /// How long the caller waited before giving up.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "waited {:?} for a coalesced call", self.waited)
    }
}

impl Error for Elapsed {}

/// A layer, extractor or store was configured in a way that cannot be served safely.
///
/// [`Builder::try_build`](crate::layer::Builder::try_build) returns it, and
/// [`Builder::build`](crate::layer::Builder::build) panics with it, when the layer is built:
/// a deployment finds out at start-up, not from a leaked answer.
///
/// ```
/// # use tower_refresh_coalesce::error::BuildError;
/// let err = BuildError::new("match_by_subject needs a verifier that yields subjects");
/// assert_eq!(err.to_string(), "match_by_subject needs a verifier that yields subjects");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    reason: &'static str,
}

impl BuildError {
    /// A `BuildError` for `reason`.
    pub fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// What is wrong with the configuration.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl Error for BuildError {}

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// The table already holds `max_entries` live flights and replays.
    Entries,
    /// The flight already has `max_waiters` callers waiting on it.
    Waiters,
    /// The request's group (the token's subject) already holds `max_entries_per_group` live
    /// entries: one account cannot fill the table for everyone.
    Group,
}

/// The request was turned away at once because a limit was reached.
///
/// ```
/// # use tower_refresh_coalesce::{error::{Limit, Overloaded}, BoxError};
/// let err: BoxError = Overloaded::new(Limit::Waiters).into();
/// assert_eq!(err.downcast_ref::<Overloaded>().unwrap().limit(), Limit::Waiters);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    limit: Limit,
}

impl Overloaded {
    /// An `Overloaded` error for `limit`.
    pub fn new(limit: Limit) -> Self {
        Self { limit }
    }

    /// The limit that was reached.
    pub fn limit(&self) -> Limit {
        self.limit
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Limit::Entries => f.write_str("coalescing table is full"),
            Limit::Waiters => f.write_str("too many callers waiting on one flight"),
            Limit::Group => f.write_str("too many live refreshes for one subject"),
        }
    }
}

impl Error for Overloaded {}

/// Why the leader's call produced no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The inner service (or its response future) panicked.
    Panicked,
    /// The call ran longer than the hard cap and was aborted.
    HardCap,
    /// The task was cancelled, for example because the runtime shut down.
    Cancelled,
    /// The flight was started by another service of the same layer whose responses have a
    /// different type. Give such services layers of their own.
    Incompatible,
    /// Another instance leads the flight and its result did not arrive within the wait
    /// timeout. This instance never calls the inner service for it; a retry is answered by
    /// the result once it is stored, or elects a new leader once the lease is over.
    RemoteTimeout,
    /// The key (or its group) was invalidated while the call ran, on this instance or on
    /// another: its result is revoked, so it reaches no caller and is never replayed. The
    /// HTTP front answers `invalid_grant`.
    Revoked,
    /// The layer requires its store ([`Builder::require_store`](crate::Builder::require_store))
    /// and the store could not be reached: the inner service was not called. The HTTP front
    /// answers `503` with `Retry-After`.
    StoreUnavailable,
}

/// The leader's call of the inner service failed without producing a result.
///
/// Every caller of the flight receives this error; nothing is replayed and the next request
/// for the key leads a new flight. [`Failure::Revoked`] is the one failure of a call that
/// may have succeeded: its result was revoked by an invalidation while it ran.
///
/// ```
/// # use tower_refresh_coalesce::{error::{Failure, LeaderFailed}, BoxError};
/// let err: BoxError = LeaderFailed::new(Failure::Panicked).into();
/// assert_eq!(err.downcast_ref::<LeaderFailed>().unwrap().failure(), Failure::Panicked);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderFailed {
    failure: Failure,
}

impl LeaderFailed {
    /// A `LeaderFailed` error for `failure`.
    pub fn new(failure: Failure) -> Self {
        Self { failure }
    }

    /// What went wrong.
    pub fn failure(&self) -> Failure {
        self.failure
    }
}

impl fmt::Display for LeaderFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failure {
            Failure::Panicked => f.write_str("coalesced call panicked"),
            Failure::HardCap => f.write_str("coalesced call exceeded its hard cap and was aborted"),
            Failure::Cancelled => f.write_str("coalesced call was cancelled"),
            Failure::StoreUnavailable => {
                f.write_str("coordination store unreachable: the refresh was not attempted")
            }
            Failure::RemoteTimeout => {
                f.write_str("the instance leading this refresh did not answer in time")
            }
            Failure::Incompatible => {
                f.write_str("coalesced call was made by a service with another response type")
            }
            Failure::Revoked => {
                f.write_str("coalesced call was revoked by an invalidation while it ran")
            }
        }
    }
}

impl Error for LeaderFailed {}

/// The inner service returned an error, shared with every caller of the flight.
///
/// The original error is the [`source`](Error::source); it is reference-counted because
/// several callers receive it.
///
/// ```
/// # use tower_refresh_coalesce::{error::Shared, BoxError};
/// let inner: BoxError = "database down".into();
/// let err: BoxError = Shared::new(inner).into();
/// let shared = err.downcast_ref::<Shared>().unwrap();
/// assert_eq!(shared.inner().to_string(), "database down");
/// ```
#[derive(Debug, Clone)]
pub struct Shared {
    inner: Arc<BoxError>,
}

impl Shared {
    /// Wraps the inner service's error.
    pub fn new(inner: BoxError) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The inner service's error.
    pub fn inner(&self) -> &(dyn Error + Send + Sync + 'static) {
        &**self.inner
    }
}

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("inner service failed")
    }
}

impl Error for Shared {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self.inner)
    }
}

/// What was wrong with a request the layer refused before any coalescing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// No token was found (`400 invalid_request`).
    MissingToken,
    /// The request was malformed: wrong content type, bad JSON or form, bad `Authorization`
    /// header (`400 invalid_request`).
    Malformed(&'static str),
    /// The request body exceeded the configured cap (`413`).
    BodyTooLarge,
    /// The token failed verification (`401 invalid_grant` by default).
    InvalidToken(&'static str),
    /// The token matched a live entry, but it has expired since (`401 invalid_grant`).
    Expired,
    /// The DPoP proof failed a check; the text names which (`400 invalid_dpop_proof`,
    /// RFC 9449 §5).
    InvalidDpopProof(&'static str),
    /// The request could not be checked now, for example because the DPoP replay cache is
    /// full of proofs still in their window (`503 temporarily_unavailable`, with
    /// `Retry-After`).
    Unavailable(&'static str),
}

/// The layer refused a request before any coalescing; the inner service was not called.
///
/// The reason never contains the token.
///
/// ```
/// # use tower_refresh_coalesce::{error::{Rejected, Rejection}, BoxError};
/// let err: BoxError = Rejected::new(Rejection::MissingToken).into();
/// assert_eq!(err.downcast_ref::<Rejected>().unwrap().rejection(), &Rejection::MissingToken);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    rejection: Rejection,
    closes: bool,
}

impl Rejected {
    /// A `Rejected` error for `rejection`.
    pub fn new(rejection: Rejection) -> Self {
        Self {
            rejection,
            closes: false,
        }
    }

    /// Marks a refusal sent before the request body was read to its end, when `closes`: its
    /// HTTP/1 response carries `Connection: close`, so that a pooled client does not send
    /// its next request into the rest of this one's body.
    #[cfg(feature = "http")]
    pub(crate) fn closing(mut self, closes: bool) -> Self {
        self.closes |= closes;
        self
    }

    /// Whether the refusal closes the connection.
    pub fn closes_connection(&self) -> bool {
        self.closes
    }

    /// Why the request was refused.
    pub fn rejection(&self) -> &Rejection {
        &self.rejection
    }
}

impl From<Rejection> for Rejected {
    fn from(rejection: Rejection) -> Self {
        Self::new(rejection)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rejection {
            Rejection::MissingToken => f.write_str("no refresh token in the request"),
            Rejection::Malformed(why) => write!(f, "malformed request: {why}"),
            Rejection::BodyTooLarge => f.write_str("request body too large"),
            Rejection::InvalidToken(why) => write!(f, "invalid refresh token: {why}"),
            Rejection::Expired => f.write_str("refresh token expired"),
            Rejection::InvalidDpopProof(why) => write!(f, "invalid dpop proof: {why}"),
            Rejection::Unavailable(why) => write!(f, "temporarily unavailable: {why}"),
        }
    }
}

impl Error for Rejected {}
