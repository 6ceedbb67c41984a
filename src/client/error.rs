//! The client side's errors.
//!
//! A request through [`BearerAuth`](super::BearerAuth) fails with [`BoxError`]; the failures
//! the layer itself produces are the small types here, told apart with
//! [`downcast_ref`](std::error::Error#method.downcast_ref):
//!
//! - [`NoCredentials`]: there is nothing to authenticate with: no credentials were set, they
//!   were cleared (logout), or the token server refused the refresh token (`invalid_grant`).
//!   The request was not sent.
//! - [`RefreshFailed`]: a refresh the request needed failed for a reason that may pass (a
//!   5xx, a connection error, a timeout), or the credentials are backing off after such a
//!   failure. Nothing was sent with a token known to be dead.
//!
//! A refresh service tells the layer what kind of failure it met by returning a
//! [`RefreshError`]; any other error counts as transient.
//!
//! ```
//! use tower_refresh_coalesce::{BoxError, client::error::{NoCredentials, Reason}};
//!
//! fn must_log_in_again(error: &BoxError) -> bool {
//!     error.downcast_ref::<NoCredentials>().is_some()
//! }
//! # assert!(must_log_in_again(&BoxError::from(NoCredentials::new(Reason::Cleared))));
//! ```

use std::{borrow::Cow, error::Error, fmt, sync::Arc, time::Duration};

use crate::error::BoxError;

/// Why there are no credentials to send a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No credentials were ever set (nor found in the credential store).
    Empty,
    /// The credentials were cleared: a logout.
    Cleared,
    /// The token server refused the refresh token (`invalid_grant`): the session is over
    /// and the user must log in again. The layer never presents that token again.
    Refused,
}

/// There are no credentials to authenticate a request with; it was not sent.
///
/// ```
/// # use tower_refresh_coalesce::{BoxError, client::error::{NoCredentials, Reason}};
/// let error: BoxError = NoCredentials::new(Reason::Refused).into();
/// let no = error.downcast_ref::<NoCredentials>().unwrap();
/// assert_eq!(no.reason(), Reason::Refused);
/// assert_eq!(no.to_string(), "no credentials: the token server refused the refresh token");
/// ```
#[derive(Debug, Clone)]
pub struct NoCredentials {
    reason: Reason,
    source: Option<Arc<BoxError>>,
}

impl NoCredentials {
    /// A `NoCredentials` error for `reason`.
    pub fn new(reason: Reason) -> Self {
        Self {
            reason,
            source: None,
        }
    }

    pub(crate) fn with_source(reason: Reason, source: Arc<BoxError>) -> Self {
        Self {
            reason,
            source: Some(source),
        }
    }

    /// Why there are none.
    pub fn reason(&self) -> Reason {
        self.reason
    }
}

impl fmt::Display for NoCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.reason {
            Reason::Empty => "no credentials: none were set",
            Reason::Cleared => "no credentials: they were cleared",
            Reason::Refused => "no credentials: the token server refused the refresh token",
        })
    }
}

impl Error for NoCredentials {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| &**source as &(dyn Error + 'static))
    }
}

/// What kind of failure a refresh met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshErrorKind {
    /// The token server refused the refresh token (RFC 6749 §5.2 `invalid_grant`): it is
    /// expired, revoked or already used. The credentials end; nothing retries.
    InvalidGrant,
    /// A failure that may pass: a 5xx or 429, a connection error, a timeout, an unreachable
    /// credential store. The next attempt backs off.
    Transient,
    /// The token server refused the request for another reason (`invalid_client`,
    /// `unauthorized_client`, a malformed answer): the refresh token may still be good, but
    /// retrying at once will not help. The next attempt backs off.
    Rejected,
}

/// What a refresh service returns when a refresh fails, to tell the layer what happened.
///
/// Any other error a refresh service returns counts as [`RefreshErrorKind::Transient`].
///
/// ```
/// # use tower_refresh_coalesce::{BoxError, client::error::{RefreshError, RefreshErrorKind}};
/// let error: BoxError = RefreshError::invalid_grant("refresh token reused").into();
/// let refresh = error.downcast_ref::<RefreshError>().unwrap();
/// assert_eq!(refresh.kind(), RefreshErrorKind::InvalidGrant);
/// assert_eq!(refresh.to_string(), "the token server refused the refresh token (invalid_grant): refresh token reused");
/// ```
#[derive(Debug)]
pub struct RefreshError {
    kind: RefreshErrorKind,
    description: Option<Cow<'static, str>>,
    source: Option<BoxError>,
}

impl RefreshError {
    /// A failure of `kind`, described by `description` (never a token).
    pub fn new(kind: RefreshErrorKind, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            description: Some(description.into()),
            source: None,
        }
    }

    /// The token server answered `invalid_grant`.
    pub fn invalid_grant(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(RefreshErrorKind::InvalidGrant, description)
    }

    /// A failure that may pass, caused by `source`.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            kind: RefreshErrorKind::Transient,
            description: None,
            source: Some(source.into()),
        }
    }

    /// A refusal other than `invalid_grant`, described by `description`.
    pub fn rejected(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(RefreshErrorKind::Rejected, description)
    }

    /// Keeps `source` as the cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> RefreshErrorKind {
        self.kind
    }

    /// The kind of any error a refresh service returned: a [`RefreshError`]'s own, else
    /// transient.
    pub(crate) fn kind_of(error: &BoxError) -> RefreshErrorKind {
        error
            .downcast_ref::<RefreshError>()
            .map_or(RefreshErrorKind::Transient, RefreshError::kind)
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            RefreshErrorKind::InvalidGrant => {
                "the token server refused the refresh token (invalid_grant)"
            }
            RefreshErrorKind::Transient => "the refresh failed for now",
            RefreshErrorKind::Rejected => "the token server refused the refresh request",
        })?;
        match &self.description {
            Some(description) => write!(f, ": {description}"),
            None => Ok(()),
        }
    }
}

impl Error for RefreshError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn Error + 'static))
    }
}

/// A refresh that a request needed failed, and may succeed later; the request was not sent
/// again.
///
/// Every request waiting on the failed refresh receives a clone; until the back-off is
/// over, requests that need a refresh receive it at once, without a call to the token
/// server. The refresh service's error is the [`source`](Error::source).
///
/// ```
/// # use std::time::Duration;
/// # use tower_refresh_coalesce::{BoxError, client::error::{RefreshErrorKind, RefreshFailed}};
/// let error: BoxError = RefreshFailed::new(RefreshErrorKind::Transient, Duration::from_secs(1), "503".into()).into();
/// let failed = error.downcast_ref::<RefreshFailed>().unwrap();
/// assert_eq!(failed.kind(), RefreshErrorKind::Transient);
/// assert_eq!(failed.retry_after(), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone)]
pub struct RefreshFailed {
    kind: RefreshErrorKind,
    retry_after: Duration,
    source: Arc<BoxError>,
}

impl RefreshFailed {
    /// A failure of `kind` caused by `source`, after which the next attempt waits
    /// `retry_after`.
    pub fn new(kind: RefreshErrorKind, retry_after: Duration, source: BoxError) -> Self {
        Self::shared(kind, retry_after, Arc::new(source))
    }

    pub(crate) fn shared(
        kind: RefreshErrorKind,
        retry_after: Duration,
        source: Arc<BoxError>,
    ) -> Self {
        Self {
            kind,
            retry_after,
            source,
        }
    }

    /// What kind of failure the refresh met.
    pub fn kind(&self) -> RefreshErrorKind {
        self.kind
    }

    /// How long after the failure the next refresh may be attempted (the back-off).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for RefreshFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refreshing the access token failed; the next attempt waits {:?}",
            self.retry_after
        )
    }
}

impl Error for RefreshFailed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self.source)
    }
}

/// An access token that cannot be sent as `Authorization: Bearer`: empty, too long, or with
/// a character outside visible ASCII.
///
/// ```
/// # use tower_refresh_coalesce::client::{Tokens, error::InvalidToken};
/// let error: InvalidToken = Tokens::new("two words").unwrap_err();
/// assert_eq!(error.to_string(), "invalid access token: only visible ASCII without spaces is allowed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidToken {
    reason: &'static str,
}

impl InvalidToken {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// What is wrong with the token.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid access token: {}", self.reason)
    }
}

impl Error for InvalidToken {}
