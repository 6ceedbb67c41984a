//! Where the refresh token is found, and how it is verified.
//!
//! [`TokenSource`]s say where to look; a [`Verify`] implementation says whether
//! a token may start a refresh: [`JwtVerifier`] for signed JWTs, [`Opaque`] for random
//! strings whose judgement is left to the inner service. [`DpopVerifier`] checks the DPoP
//! proof (RFC 9449) that binds a request to the client's key.

use std::time::SystemTime;

use crate::error::{Rejected, Rejection};

#[cfg(feature = "jwt")]
mod dpop;
#[cfg(feature = "jwt")]
mod jwt;
pub(crate) mod source;

#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use self::dpop::{DpopConfigError, DpopProof, DpopVerifier, DpopVerifierBuilder};
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use self::jwt::{ConfigError, JwtVerifier, JwtVerifierBuilder, TokenType};
pub use self::source::TokenSource;
/// The `jsonwebtoken` crate, for [`DecodingKey`](jsonwebtoken::DecodingKey) and
/// [`Algorithm`](jsonwebtoken::Algorithm) in [`JwtVerifier::builder`].
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use jsonwebtoken;

/// The longest token accepted by default, in bytes.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;

/// What verification learned about a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The token's subject (`sub`): entries are grouped by it, for
    /// [`invalidate_subject`](crate::Handle::invalidate_subject) and reuse detection.
    pub subject: Option<String>,
    /// When the token expires (`exp`, plus leeway): a request that matches a live entry is
    /// refused after this.
    pub expires_at: Option<SystemTime>,
}

impl Verified {
    /// Nothing learned: no subject, no expiry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the subject.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the expiry.
    #[must_use]
    pub fn expires_at(mut self, expires_at: SystemTime) -> Self {
        self.expires_at = Some(expires_at);
        self
    }
}

/// Decides whether a token may start a refresh.
///
/// Called once per flight, before the inner service is called; requests that later present
/// the same bytes join or replay without a second call. An error refuses the request with
/// `invalid_grant`; its reason must not contain the token.
///
/// Any `Fn(&str) -> Result<Verified, Rejected>` is a `Verify`.
pub trait Verify: Send + Sync + 'static {
    /// Verifies `token`.
    fn verify(&self, token: &str) -> Result<Verified, Rejected>;

    /// Whether verified tokens carry a subject. Default: `true`. A verifier that never
    /// yields one ([`Opaque`]) cannot match by subject: the layer refuses to build with it
    /// in [`match_by_subject`](crate::HttpExtract::match_by_subject) mode.
    fn yields_subjects(&self) -> bool {
        true
    }
}

impl<F> Verify for F
where
    F: Fn(&str) -> Result<Verified, Rejected> + Send + Sync + 'static,
{
    fn verify(&self, token: &str) -> Result<Verified, Rejected> {
        self(token)
    }
}

/// Accepts every well-formed token and leaves judgement to the inner service: for refresh
/// tokens that are random strings rather than JWTs.
///
/// Well-formed means 1 to [`DEFAULT_MAX_TOKEN_LEN`] bytes of visible ASCII (RFC 6750's
/// `b64token` and then some). Entries get no subject and no expiry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opaque;

impl Verify for Opaque {
    fn verify(&self, token: &str) -> Result<Verified, Rejected> {
        check_shape(token, DEFAULT_MAX_TOKEN_LEN)?;
        Ok(Verified::new())
    }

    fn yields_subjects(&self) -> bool {
        false
    }
}

/// Refuses tokens that are empty, too long, or not visible ASCII.
pub(crate) fn check_shape(token: &str, max_len: usize) -> Result<(), Rejected> {
    if token.is_empty() {
        return Err(Rejected::new(Rejection::InvalidToken("empty token")));
    }
    if token.len() > max_len {
        return Err(Rejected::new(Rejection::InvalidToken("token too long")));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Rejected::new(Rejection::InvalidToken(
            "token has characters outside visible ASCII",
        )));
    }
    Ok(())
}
