//! [`JwtVerifier`]: signed JWT refresh tokens, verified with `jsonwebtoken`.
//!
//! Every check a refresh endpoint needs is on by default or refused at `build()` when it is
//! missing: algorithms pinned by configuration, `exp` and `nbf` with a small leeway, a
//! required non-empty `sub`, `iss`/`aud` when configured, a token-type rule so that an access
//! token cannot start a refresh, no `crit` extensions, no duplicate claims, and a size limit.

use std::{
    error::Error,
    fmt,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Header, Validation,
    errors::{Error as JwtError, ErrorKind},
};

pub use self::builder::JwtVerifierBuilder;
use self::claims::{Claims, unverified_claims};
pub(super) use self::{builder::self_test, claims::numeric_date};
use super::{DEFAULT_MAX_TOKEN_LEN, Verified, Verify, check_shape};
use crate::error::{Rejected, Rejection};

mod builder;
mod claims;

/// Default clock-skew allowance for `exp` and `nbf`.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
/// Largest leeway `build()` accepts: more is a misconfiguration, not clock skew.
pub(super) const MAX_LEEWAY: Duration = Duration::from_secs(3600);
/// Default limit on the length of `sub`, in bytes.
const DEFAULT_MAX_SUBJECT_LEN: usize = 256;
/// The media-type prefix RFC 7515 §4.1.9 allows senders to omit from `typ`.
const APPLICATION_PREFIX: &str = "application/";

// Rejection reasons used in more than one place.
const MALFORMED: &str = "malformed token";
const DISALLOWED_ALGORITHM: &str = "disallowed algorithm";
const WRONG_TOKEN_TYPE: &str = "wrong token type";
const INVALID_EXPIRY: &str = "invalid expiry";

/// How a [`JwtVerifier`] tells a refresh token from other tokens signed with the same key.
///
/// Chosen with [`JwtVerifierBuilder::typ`], [`JwtVerifierBuilder::claim`] or
/// [`JwtVerifierBuilder::any_token_type`]; read back with [`JwtVerifier::token_type`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenType {
    /// The JOSE header `typ` must be this media type, compared case-insensitively and with or
    /// without the `application/` prefix (RFC 7515 §4.1.9, RFC 8725 §3.11). Stored without
    /// the prefix, for example `refresh+jwt`.
    Header(String),
    /// The claim `name` must be a string equal to `value`, for example `token_use` = `refresh`.
    Claim {
        /// The claim's name.
        name: String,
        /// The value it must have (compared exactly).
        value: String,
    },
    /// No check: any token signed with the key may start a refresh.
    Any,
}

/// Why a [`JwtVerifierBuilder`] could not build a [`JwtVerifier`].
///
/// ```
/// use tower_refresh_coalesce::token::{ConfigError, JwtVerifier};
///
/// // No token-type rule: an access token signed with the same key would be accepted.
/// let err = JwtVerifier::hs256(b"a secret of at least thirty-two bytes").build().unwrap_err();
/// assert!(matches!(err, ConfigError::NoTokenType));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// No token-type rule was chosen: call [`typ`](JwtVerifierBuilder::typ),
    /// [`claim`](JwtVerifierBuilder::claim) or
    /// [`any_token_type`](JwtVerifierBuilder::any_token_type).
    NoTokenType,
    /// The list of algorithms is empty.
    NoAlgorithms,
    /// Not every algorithm belongs to the key's family (for example `HS256` with an RSA key,
    /// or `RS256` next to `ES256`).
    AlgorithmMismatch,
    /// A setting has a value that cannot work; the text names it.
    InvalidSetting(&'static str),
    /// The key could not be read (the source is `jsonwebtoken`'s error).
    Key(JwtError),
    /// `jsonwebtoken` failed its self-test: it has no usable crypto backend. Enable exactly
    /// one of its features `rust_crypto` and `aws_lc_rs` (with none or both it compiles, and
    /// panics on the first use). The source is `jsonwebtoken`'s error, if it returned one
    /// rather than panicking.
    CryptoBackend(Option<JwtError>),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoTokenType => f.write_str(
                "no token type rule: choose typ, claim or any_token_type so that access tokens \
                 are not accepted as refresh tokens",
            ),
            Self::NoAlgorithms => f.write_str("no algorithm allowed"),
            Self::AlgorithmMismatch => {
                f.write_str("allowed algorithms are not all of the key's family")
            }
            Self::InvalidSetting(what) => write!(f, "invalid jwt verifier setting: {what}"),
            Self::Key(_) => f.write_str("unusable jwt key"),
            Self::CryptoBackend(_) => f.write_str(
                "jsonwebtoken has no usable crypto backend: enable exactly one of its features \
                 rust_crypto and aws_lc_rs",
            ),
        }
    }
}

impl Error for ConfigError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Key(err) | Self::CryptoBackend(Some(err)) => Some(err),
            _ => None,
        }
    }
}

/// Verifies refresh tokens that are signed JWTs (JWS compact serialization).
///
/// Built with [`JwtVerifier::builder`] (or [`hs256`](JwtVerifier::hs256),
/// [`rs256_pem`](JwtVerifier::rs256_pem), [`es256_pem`](JwtVerifier::es256_pem)). A token is
/// accepted only if all of these hold, checked cheapest first:
///
/// - at most [`max_len`](JwtVerifierBuilder::max_len) bytes (4096) of visible ASCII, and
///   exactly three dot-separated segments;
/// - no `crit` header (no extension is understood, RFC 7515 §4.1.11);
/// - the header's `alg` is one of the configured algorithms (never taken from the token);
/// - the signature verifies with the configured key;
/// - `exp` is present, numeric and not past, `nbf` (if present) is not in the future, both
///   with [`leeway`](JwtVerifierBuilder::leeway) (5 s);
/// - `iss` and `aud` are present and match, when configured;
/// - no claim appears twice;
/// - `sub` is a non-empty string of at most
///   [`max_subject_len`](JwtVerifierBuilder::max_subject_len) bytes (256);
/// - the [`TokenType`] rule holds, judged on the verified token.
///
/// The [`Verified`] result carries `sub` and `exp` plus the leeway. Rejections are
/// [`Rejection::InvalidToken`] with a short reason that never contains the token or a claim.
/// Cloning is cheap (the configuration is shared), and `Debug` does not show the key.
///
/// # Example
///
/// ```
/// use std::time::{SystemTime, UNIX_EPOCH};
///
/// use jsonwebtoken::{Algorithm, EncodingKey, Header};
/// use tower_refresh_coalesce::token::{JwtVerifier, Verify};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let secret = b"a secret of at least thirty-two bytes";
/// let verifier = JwtVerifier::hs256(secret)
///     .typ("refresh+jwt")
///     .issuer(["https://auth.example"])
///     .build()?;
///
/// // What the token server issues:
/// let mut header = Header::new(Algorithm::HS256);
/// header.typ = Some("refresh+jwt".into());
/// let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
/// let claims = serde_json::json!({"sub": "user-42", "exp": exp, "iss": "https://auth.example"});
/// let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))?;
///
/// let verified = verifier.verify(&token)?;
/// assert_eq!(verified.subject.as_deref(), Some("user-42"));
///
/// // An access token signed with the same key is refused.
/// header.typ = Some("at+jwt".into());
/// let access = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))?;
/// assert!(verifier.verify(&access).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    key: DecodingKey,
    /// Built once by `build()`; every field set explicitly.
    validation: Validation,
    token_type: TokenType,
    leeway_secs: u64,
    max_len: usize,
    max_subject_len: usize,
}

impl JwtVerifier {
    /// Starts a verifier for `key`, accepting only `algorithms`, which must all be of the
    /// key's family (checked by [`build`](JwtVerifierBuilder::build)).
    #[must_use]
    pub fn builder(
        key: DecodingKey,
        algorithms: impl IntoIterator<Item = Algorithm>,
    ) -> JwtVerifierBuilder {
        JwtVerifierBuilder {
            key,
            algorithms: algorithms.into_iter().collect(),
            leeway: DEFAULT_LEEWAY,
            issuer: None,
            audience: None,
            token_type: None,
            max_len: DEFAULT_MAX_TOKEN_LEN,
            max_subject_len: DEFAULT_MAX_SUBJECT_LEN,
        }
    }

    /// Starts a verifier for HS256 tokens signed with `secret` (RFC 7518 §3.2 asks for at
    /// least 32 random bytes; an empty secret is refused by `build`).
    #[must_use]
    pub fn hs256(secret: impl AsRef<[u8]>) -> JwtVerifierBuilder {
        Self::builder(
            DecodingKey::from_secret(secret.as_ref()),
            [Algorithm::HS256],
        )
    }

    /// Starts a verifier for RS256 tokens, from an RSA public key in PEM form (`PUBLIC KEY` or
    /// `RSA PUBLIC KEY`).
    pub fn rs256_pem(pem: &[u8]) -> Result<JwtVerifierBuilder, ConfigError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(ConfigError::Key)?;
        Ok(Self::builder(key, [Algorithm::RS256]))
    }

    /// Starts a verifier for ES256 tokens, from a P-256 public key in PEM form (`PUBLIC KEY`).
    pub fn es256_pem(pem: &[u8]) -> Result<JwtVerifierBuilder, ConfigError> {
        let key = DecodingKey::from_ec_pem(pem).map_err(ConfigError::Key)?;
        Ok(Self::builder(key, [Algorithm::ES256]))
    }

    /// The rule that tells refresh tokens from other tokens.
    pub fn token_type(&self) -> &TokenType {
        &self.inner.token_type
    }
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("JwtVerifier")
            .field("key", &RedactedKey(inner.key.family()))
            .field("algorithms", &inner.validation.algorithms)
            .field("token_type", &inner.token_type)
            .field("leeway_secs", &inner.leeway_secs)
            .field("issuer", &inner.validation.iss)
            .field("audience", &inner.validation.aud)
            .field("max_len", &inner.max_len)
            .field("max_subject_len", &inner.max_subject_len)
            .finish()
    }
}

/// Shows a key's family, never its bytes.
pub(super) struct RedactedKey(AlgorithmFamily);

impl fmt::Debug for RedactedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {:?} key>", self.0)
    }
}

impl Verify for JwtVerifier {
    fn verify(&self, token: &str) -> Result<Verified, Rejected> {
        let inner = &*self.inner;

        // 1. Shape: length, characters, three segments. No decoding yet.
        check_shape(token, inner.max_len)?;
        if token.bytes().filter(|&b| b == b'.').count() != 2 {
            return Err(reject(MALFORMED));
        }

        // 2. The unverified header, only to refuse early (`crit`, `alg`, `typ`). Nothing is
        //    accepted on it: the same checks run again on the verified header below.
        let header =
            jsonwebtoken::decode_header(token).map_err(|err| reject(header_reason(token, &err)))?;
        inner.check_header(&header)?;

        // 3. Signature, then `exp`, `nbf`, `iss`, `aud` and the presence of `sub`.
        let data = jsonwebtoken::decode::<Claims>(token, &inner.key, &inner.validation)
            .map_err(|err| reject(decode_reason(token, &err)))?;

        // 4. What jsonwebtoken does not check, on the signature-verified token.
        inner.check_header(&data.header)?;
        let claims = data.claims;
        if claims.duplicate {
            return Err(reject("duplicate claim"));
        }
        if let TokenType::Claim { name, value } = &inner.token_type
            && claims.strings.get(name) != Some(value)
        {
            return Err(reject(WRONG_TOKEN_TYPE));
        }
        let subject = match claims.strings.get("sub") {
            None => return Err(reject("missing subject")),
            Some(sub) if sub.is_empty() => return Err(reject("empty subject")),
            Some(sub) if sub.len() > inner.max_subject_len => {
                return Err(reject("subject too long"));
            }
            Some(sub) => sub.clone(),
        };
        let expires_at = claims
            .exp
            .and_then(|exp| {
                UNIX_EPOCH.checked_add(Duration::from_secs(exp.saturating_add(inner.leeway_secs)))
            })
            .ok_or_else(|| reject(INVALID_EXPIRY))?;

        Ok(Verified::new().subject(subject).expires_at(expires_at))
    }
}

impl Inner {
    fn check_header(&self, header: &Header) -> Result<(), Rejected> {
        if header.crit.is_some() {
            return Err(reject("unsupported critical header"));
        }
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(reject(DISALLOWED_ALGORITHM));
        }
        if let TokenType::Header(expected) = &self.token_type
            && !header
                .typ
                .as_deref()
                .is_some_and(|typ| strip_application(typ).eq_ignore_ascii_case(expected))
        {
            return Err(reject(WRONG_TOKEN_TYPE));
        }
        Ok(())
    }
}

fn reject(reason: &'static str) -> Rejected {
    Rejected::new(Rejection::InvalidToken(reason))
}

/// `application/refresh+jwt` -> `refresh+jwt`; the prefix is matched case-insensitively.
pub(super) fn strip_application(typ: &str) -> &str {
    match typ.split_at_checked(APPLICATION_PREFIX.len()) {
        Some((prefix, rest)) if prefix.eq_ignore_ascii_case(APPLICATION_PREFIX) => rest,
        _ => typ,
    }
}

/// The reason for a header `jsonwebtoken` could not parse.
fn header_reason(token: &str, err: &JwtError) -> &'static str {
    // An `alg` jsonwebtoken does not know (`none` among them) fails the header's parse; say
    // so rather than "malformed".
    if matches!(err.kind(), ErrorKind::Json(_)) {
        let alg = token
            .split('.')
            .next()
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
            .and_then(|json| serde_json::from_slice::<RawHeader>(&json).ok())
            .and_then(|header| header.alg);
        if alg.is_some_and(|alg| alg.parse::<Algorithm>().is_err()) {
            return DISALLOWED_ALGORITHM;
        }
    }
    MALFORMED
}

/// Just enough of a header to name its algorithm.
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: Option<String>,
}

/// The reason for an error of `jsonwebtoken::decode`.
fn decode_reason(token: &str, err: &JwtError) -> &'static str {
    match err.kind() {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSubject => "wrong subject",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => DISALLOWED_ALGORITHM,
        // jsonwebtoken counts a claim of the wrong JSON type (a string `exp`) as missing.
        ErrorKind::MissingRequiredClaim(claim) => {
            let present = unverified_claims(token).is_some_and(|c| c.names.contains(claim));
            match (claim.as_str(), present) {
                ("exp", false) => "missing expiry",
                ("exp", true) => INVALID_EXPIRY,
                ("sub", false) => "missing subject",
                ("sub", true) => "invalid subject",
                ("iss", false) => "missing issuer",
                ("iss", true) => "invalid issuer",
                ("aud", false) => "missing audience",
                ("aud", true) => "invalid audience",
                _ => "missing claim",
            }
        }
        ErrorKind::InvalidClaimFormat(claim) => match claim.as_str() {
            "exp" => INVALID_EXPIRY,
            "nbf" => "invalid not-before",
            _ => "invalid claim",
        },
        // `Claims` itself never fails on well-formed JSON, but jsonwebtoken's own claims
        // struct refuses a duplicate `exp`, `nbf`, `sub`, `iss` or `aud`.
        ErrorKind::Json(_) => match unverified_claims(token) {
            Some(claims) if claims.duplicate => "duplicate claim",
            _ => MALFORMED,
        },
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat => "unusable key",
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => MALFORMED,
        _ => "verification failed",
    }
}

#[cfg(test)]
mod tests;
