//! What a credentials cell holds: [`Tokens`] (an access token with its expiry, and the
//! refresh token that renews it), a [`Session`], and a [`Snapshot`] of it at one generation.
//! Plain data, shared by the cell and the credential stores.

use std::{fmt, sync::Arc, time::Duration};

use http::HeaderValue;
use tokio::time::Instant;

use super::error::{InvalidToken, NoCredentials, Reason};

/// The longest access token accepted: 16 KiB.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// An access token, when it expires, and the refresh token that renews it.
///
/// Cheap to clone (one reference count). `Debug` never shows a token.
///
/// ```
/// use std::time::Duration;
/// use tower_refresh_coalesce::client::Tokens;
///
/// let tokens = Tokens::new("eyJhbGciOi...")?
///     .with_refresh_token("8xLOxBtZp8")
///     .expires_in(Duration::from_secs(900));
/// assert_eq!(tokens.refresh_token(), Some("8xLOxBtZp8"));
/// assert!(!format!("{tokens:?}").contains("8xLOxBtZp8"));
/// # Ok::<(), tower_refresh_coalesce::client::error::InvalidToken>(())
/// ```
#[derive(Clone)]
pub struct Tokens(Arc<TokensInner>);

#[derive(Clone)]
struct TokensInner {
    access_token: Box<str>,
    /// `Bearer <access token>`, marked sensitive.
    header: HeaderValue,
    refresh_token: Option<Box<str>>,
    expires_at: Option<Instant>,
    /// From when the expiry was set to the expiry.
    lifetime: Duration,
}

impl Tokens {
    /// Tokens with `access_token`, no refresh token and no known expiry.
    ///
    /// The access token must be 1 to 16,384 bytes of visible ASCII without spaces, as a
    /// bearer token is (RFC 6750 §2.1).
    pub fn new(access_token: impl Into<String>) -> Result<Self, InvalidToken> {
        let access_token = access_token.into();
        if access_token.is_empty() {
            return Err(InvalidToken::new("it is empty"));
        }
        if access_token.len() > MAX_TOKEN_LEN {
            return Err(InvalidToken::new("it is longer than 16 KiB"));
        }
        if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken::new(
                "only visible ASCII without spaces is allowed",
            ));
        }
        let mut header = HeaderValue::try_from(format!("Bearer {access_token}"))
            .map_err(|_| InvalidToken::new("only visible ASCII without spaces is allowed"))?;
        header.set_sensitive(true);
        Ok(Self(Arc::new(TokensInner {
            access_token: access_token.into_boxed_str(),
            header,
            refresh_token: None,
            expires_at: None,
            lifetime: Duration::ZERO,
        })))
    }

    /// With `refresh_token`, presented to the token server to renew the access token.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.0).refresh_token = Some(refresh_token.into().into_boxed_str());
        self
    }

    /// With the access token expiring `lifetime` from now (a token response's `expires_in`),
    /// on tokio's clock. Default: unknown, so that only a rejection refreshes it.
    #[must_use]
    pub fn expires_in(self, lifetime: Duration) -> Self {
        let at = Instant::now()
            .checked_add(lifetime)
            .unwrap_or_else(far_future);
        self.expiring_at(at)
    }

    /// With the access token expiring at `at`, on tokio's clock.
    #[must_use]
    pub fn expiring_at(mut self, at: Instant) -> Self {
        let inner = Arc::make_mut(&mut self.0);
        inner.expires_at = Some(at);
        inner.lifetime = at.saturating_duration_since(Instant::now());
        self
    }

    /// The access token.
    pub fn access_token(&self) -> &str {
        &self.0.access_token
    }

    /// The refresh token, if any.
    pub fn refresh_token(&self) -> Option<&str> {
        self.0.refresh_token.as_deref()
    }

    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<Instant> {
        self.0.expires_at
    }

    /// How long the access token lived when its expiry was set (zero without one).
    #[cfg(feature = "redis")]
    pub(crate) fn lifetime(&self) -> Duration {
        self.0.lifetime
    }

    /// With the expiry and lifetime another process stored.
    #[cfg(feature = "redis")]
    pub(crate) fn restore_expiry(mut self, at: Instant, lifetime: Duration) -> Self {
        let inner = Arc::make_mut(&mut self.0);
        inner.expires_at = Some(at);
        inner.lifetime = lifetime;
        self
    }

    /// The `Authorization` value: `Bearer <access token>`, marked sensitive.
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.0.header
    }

    /// Whether the access token expires within `margin` of `now` (or has expired), the
    /// margin being at most half the token's lifetime: a token that lives 20 s is renewed
    /// after 10 s, not at once.
    pub(crate) fn expires_within(&self, now: Instant, margin: Duration) -> bool {
        let margin = margin.min(self.0.lifetime / 2);
        self.0
            .expires_at
            .is_some_and(|at| at.saturating_duration_since(now) <= margin)
    }

    /// Whether the access token has expired at `now`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.0.expires_at.is_some_and(|at| at <= now)
    }

    /// These tokens, keeping `previous`'s refresh token if the token server sent none (RFC
    /// 6749 §6: a new refresh token is optional; without one the old one stays valid).
    pub(crate) fn keeping_refresh_token(self, previous: &Tokens) -> Self {
        match (&self.0.refresh_token, previous.refresh_token()) {
            (None, Some(refresh_token)) => self.with_refresh_token(refresh_token),
            _ => self,
        }
    }
}

fn far_future() -> Instant {
    // About 30 years: `Instant` cannot hold more on every platform.
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.0.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at", &self.0.expires_at)
            .finish()
    }
}

/// What a [`Credentials`](super::Credentials) cell holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Session {
    /// Nothing was ever set.
    Empty,
    /// Logged in.
    Active(Tokens),
    /// Over: cleared ([`Reason::Cleared`]) or refused by the token server
    /// ([`Reason::Refused`]).
    Ended(Reason),
}

/// The cell's content at one generation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Snapshot {
    /// The generation: 0 until something is set, then one more with every change.
    pub generation: u64,
    /// What the cell holds.
    pub session: Session,
}

impl Snapshot {
    /// `session` at `generation`.
    pub fn new(generation: u64, session: Session) -> Self {
        Self {
            generation,
            session,
        }
    }

    /// The active tokens, or why there are none.
    pub(crate) fn tokens(&self) -> Result<&Tokens, NoCredentials> {
        match &self.session {
            Session::Active(tokens) => Ok(tokens),
            Session::Empty => Err(NoCredentials::new(Reason::Empty)),
            Session::Ended(reason) => Err(NoCredentials::new(*reason)),
        }
    }
}
