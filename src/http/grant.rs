//! [`RefreshGrant`]: what a refresh request presents, read once, the way the layer reads it.

use std::fmt;

use ::http::{HeaderMap, header::CONTENT_TYPE};
use bytes::Bytes;

use crate::{
    error::{Rejected, Rejection},
    token::{
        DEFAULT_MAX_TOKEN_LEN, TokenSource, Verified, check_shape,
        source::{self, BodyKind, Client, Credential},
    },
};

/// A refresh request as the layer read it: the token, the client's authentication and the
/// sender constraint, plus what verification learned.
///
/// The layer puts it in the extensions of the request it hands the inner service, so that
/// the inner service acts on exactly what the layer verified and keyed, never on a second
/// reading of its own. An inner service that may also run without the layer reads the
/// request with [`RefreshGrant::read`], which parses as the layer does (by `Content-Type`,
/// one token however many places carry it, one client authentication method).
///
/// Its `Debug` form never shows the token or a credential.
#[derive(Clone)]
pub struct RefreshGrant {
    token: String,
    client: Client,
    claims: Option<Verified>,
    sender: Option<String>,
}

impl RefreshGrant {
    pub(crate) fn new(token: String, client: Client) -> Self {
        Self {
            token,
            client,
            claims: None,
            sender: None,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn with_claims(mut self, claims: Verified) -> Self {
        self.claims = Some(claims);
        self
    }

    pub(crate) fn with_sender(mut self, thumbprint: Option<String>) -> Self {
        self.sender = thumbprint;
        self
    }

    /// Reads a refresh request from its headers and (already read) body exactly as the
    /// layer's [`HttpExtract`](super::HttpExtract) with these `sources` does, without
    /// verifying the token. `Ok(None)`: the body is a form of another grant type, not a
    /// refresh.
    pub fn read(
        headers: &HeaderMap,
        body: &[u8],
        sources: &[TokenSource],
    ) -> Result<Option<Self>, Rejected> {
        one_content_type(headers)?;
        let body = Bytes::copy_from_slice(body);
        let reads_body = sources.iter().any(TokenSource::reads_body);
        let read = match source::body_kind(headers) {
            Some(kind @ (BodyKind::Json | BodyKind::Form)) if reads_body => Some((&body, kind)),
            _ => None,
        };
        let unread_body = read.is_none() && !body.is_empty();
        presented(sources, headers, read, unread_body, DEFAULT_MAX_TOKEN_LEN)
            .map(|found| found.map(|(token, client)| Self::new(token, client)))
    }

    /// The refresh token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The client id, however it was sent (Basic, form or JSON `client_id`).
    pub fn client_id(&self) -> Option<&str> {
        self.client.id.as_deref()
    }

    /// The client secret, by Basic or as `client_secret`.
    pub fn client_secret(&self) -> Option<&str> {
        match &self.client.credential {
            Credential::Secret(secret) => Some(secret),
            _ => None,
        }
    }

    /// The client assertion (RFC 7523): its `client_assertion_type` and `client_assertion`.
    pub fn client_assertion(&self) -> Option<(&str, &str)> {
        match &self.client.credential {
            Credential::Assertion { kind, assertion } => Some((kind, assertion)),
            _ => None,
        }
    }

    /// What verification learned (subject, expiry): `None` for a grant read without the
    /// layer.
    pub fn claims(&self) -> Option<&Verified> {
        self.claims.as_ref()
    }

    /// The RFC 7638 thumbprint (base64url, the `jkt` form) of the key of the request's
    /// verified DPoP proof, if it had one.
    pub fn dpop_thumbprint(&self) -> Option<&str> {
        self.sender.as_deref()
    }
}

impl fmt::Debug for RefreshGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshGrant")
            .field("token", &"<redacted>")
            .field("client", &self.client)
            .field("claims", &self.claims)
            .field("dpop_thumbprint", &self.sender)
            .finish()
    }
}

/// Refuses a request with more than one `Content-Type`: a singleton field (RFC 9110 §8.3),
/// and an inner service reading another value than the first would parse a body the layer
/// did not look at.
pub(crate) fn one_content_type(headers: &HeaderMap) -> Result<(), Rejected> {
    if headers.get_all(CONTENT_TYPE).iter().nth(1).is_some() {
        return Err(Rejected::new(Rejection::Malformed(
            "more than one content type",
        )));
    }
    Ok(())
}

/// The token and client of a request, or `None` for another grant type. `unread_body`: the
/// request has a body of a type the sources do not read.
pub(crate) fn presented(
    sources: &[TokenSource],
    headers: &HeaderMap,
    read: Option<(&Bytes, BodyKind)>,
    unread_body: bool,
    max_token_len: usize,
) -> Result<Option<(String, Client)>, Rejected> {
    let found = source::find(sources, headers, read)?;
    if found.other_grant {
        // The grant type decides: an authorization-code exchange that happens to carry a
        // refresh cookie (browsers attach it) is no refresh of that cookie's token.
        return Ok(None);
    }
    let Some(token) = found.token else {
        let reads_body = sources.iter().any(TokenSource::reads_body);
        return Err(Rejected::new(if unread_body && reads_body {
            Rejection::Malformed("unsupported content type for a token in the body")
        } else {
            Rejection::MissingToken
        }));
    };
    check_shape(&token, max_token_len)?;
    Ok(Some((token, found.client)))
}
