//! JWT access and refresh tokens (HS256, `jsonwebtoken` with the pure-Rust backend).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::crypto;

/// `typ` header of access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// `typ` header of refresh tokens.
pub const REFRESH_TOKEN_TYP: &str = "refresh+jwt";
/// Value of the `token_use` claim of refresh tokens.
pub const REFRESH_TOKEN_USE: &str = "refresh";
/// Longest token accepted before any parsing, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest accepted `sub` claim, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user the token was issued to.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    pub iat: u64,
    /// Random token id.
    pub jti: String,
    /// Never present in access tokens; parsed only to refuse tokens that carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_use: Option<String>,
}

/// Claims of a refresh token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshClaims {
    /// The user the token was issued to.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    pub iat: u64,
    /// Random token id: makes every refresh token unique.
    pub jti: String,
    /// The token family (one login session) this token belongs to.
    pub fam: String,
    /// Always [`REFRESH_TOKEN_USE`].
    pub token_use: String,
}

/// Why a presented token was refused. The messages are safe to return to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_LEN`].
    TooLong,
    /// Not a JWT, bad signature, wrong algorithm or unparsable claims.
    Malformed,
    /// `exp` is in the past.
    Expired,
    /// A token of another type (for example an access token used as a refresh token).
    WrongType,
    /// Missing, empty or oversized subject, or an unsupported `crit` header.
    InvalidClaims,
}

impl TokenError {
    /// A short description for the `error_description` field.
    pub fn description(self) -> &'static str {
        match self {
            TokenError::TooLong => "token is too long",
            TokenError::Malformed => "token is malformed or its signature is invalid",
            TokenError::Expired => "token has expired",
            TokenError::WrongType => "token is not of the expected type",
            TokenError::InvalidClaims => "token claims are invalid",
        }
    }
}

/// A freshly signed access/refresh pair.
#[derive(Clone)]
pub struct IssuedPair {
    /// The access token.
    pub access_token: String,
    /// The refresh token (never stored: see [`IssuedPair::refresh_hash`]).
    pub refresh_token: String,
    /// Hex SHA-256 of the refresh token, the database key.
    pub refresh_hash: String,
    /// Expiry of the refresh token, seconds since the Unix epoch.
    pub refresh_expires_at: u64,
}

impl std::fmt::Debug for IssuedPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedPair")
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("refresh_hash", &self.refresh_hash)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .finish()
    }
}

/// Signing and verification keys plus token lifetimes.
pub struct TokenKeys {
    signing_key: [u8; 32],
    encoding: EncodingKey,
    decoding: DecodingKey,
    access_ttl: u64,
    refresh_ttl: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("keys", &"<redacted>")
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish()
    }
}

impl TokenKeys {
    /// Derives the HS256 signing key from the deployment secret:
    /// `HMAC-SHA256(secret, "jwt-signing")`, so the secret itself never signs anything and
    /// other uses of it (the layer's fingerprints) get independent keys.
    pub fn from_secret(secret: &[u8], access_ttl: u64, refresh_ttl: u64) -> Self {
        let key = crypto::hmac_sha256(secret, b"jwt-signing");
        Self {
            signing_key: key,
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            access_ttl,
            refresh_ttl,
        }
    }

    /// The derived HS256 key, for verifiers outside this module (the coalescing layer).
    pub fn signing_key(&self) -> &[u8] {
        &self.signing_key
    }

    /// Lifetime of access tokens in seconds (`expires_in`).
    pub fn access_ttl(&self) -> u64 {
        self.access_ttl
    }

    /// Lifetime of refresh tokens in seconds.
    pub fn refresh_ttl(&self) -> u64 {
        self.refresh_ttl
    }

    /// Signs a new access token and a new refresh token of family `family` for `subject`.
    pub fn issue_pair(
        &self,
        subject: &str,
        family: &str,
        now: u64,
    ) -> Result<IssuedPair, jsonwebtoken::errors::Error> {
        let access = AccessClaims {
            sub: subject.to_owned(),
            exp: now.saturating_add(self.access_ttl),
            iat: now,
            jti: crypto::random_id(),
            token_use: None,
        };
        let refresh = RefreshClaims {
            sub: subject.to_owned(),
            exp: now.saturating_add(self.refresh_ttl),
            iat: now,
            jti: crypto::random_id(),
            fam: family.to_owned(),
            token_use: REFRESH_TOKEN_USE.to_owned(),
        };
        let access_token =
            jsonwebtoken::encode(&header(ACCESS_TOKEN_TYP), &access, &self.encoding)?;
        let refresh_token =
            jsonwebtoken::encode(&header(REFRESH_TOKEN_TYP), &refresh, &self.encoding)?;
        Ok(IssuedPair {
            refresh_hash: crypto::token_hash(&refresh_token),
            access_token,
            refresh_token,
            refresh_expires_at: refresh.exp,
        })
    }

    /// Verifies a refresh token: signature (HS256 only), `exp`, `typ` and `token_use`.
    pub fn verify_refresh(&self, token: &str, now: u64) -> Result<RefreshClaims, TokenError> {
        let claims = self.decode::<RefreshClaims>(token, REFRESH_TOKEN_TYP)?;
        if claims.token_use != REFRESH_TOKEN_USE {
            return Err(TokenError::WrongType);
        }
        check_common(&claims.sub, claims.exp, now)?;
        if claims.fam.is_empty() || claims.fam.len() > 64 {
            return Err(TokenError::InvalidClaims);
        }
        Ok(claims)
    }

    /// Verifies an access token: signature (HS256 only), `exp` and `typ`.
    pub fn verify_access(&self, token: &str, now: u64) -> Result<AccessClaims, TokenError> {
        let claims = self.decode::<AccessClaims>(token, ACCESS_TOKEN_TYP)?;
        if claims.token_use.is_some() {
            return Err(TokenError::WrongType);
        }
        check_common(&claims.sub, claims.exp, now)?;
        Ok(claims)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        typ: &str,
    ) -> Result<T, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<T>(token, &self.decoding, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Malformed,
            }
        })?;
        if data.header.typ.as_deref() != Some(typ) {
            return Err(TokenError::WrongType);
        }
        if data.header.crit.is_some() {
            return Err(TokenError::InvalidClaims);
        }
        Ok(data.claims)
    }
}

fn header(typ: &str) -> Header {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some(typ.to_owned());
    header
}

fn check_common(sub: &str, exp: u64, now: u64) -> Result<(), TokenError> {
    if sub.is_empty() || sub.len() > MAX_SUBJECT_LEN {
        return Err(TokenError::InvalidClaims);
    }
    // A token whose `exp` equals the current second is already expired, so a zero TTL
    // yields tokens that are refused at once (deterministic expiry in tests).
    if exp <= now {
        return Err(TokenError::Expired);
    }
    Ok(())
}
