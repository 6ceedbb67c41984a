//! [`JwtVerifier`]: signed JWT refresh tokens, verified with `jsonwebtoken`.
//!
//! Every check a refresh endpoint needs is on by default or refused at `build()` when it is
//! missing: algorithms pinned by configuration, `exp` and `nbf` with a small leeway, a
//! required non-empty `sub`, `iss`/`aud` when configured, a token-type rule so that an access
//! token cannot start a refresh, no `crit` extensions, no duplicate claims, and a size limit.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    error::Error,
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation,
    errors::{Error as JwtError, ErrorKind},
};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{DEFAULT_MAX_TOKEN_LEN, Verified, Verify, check_shape};
use crate::error::{Rejected, Rejection};

/// Default clock-skew allowance for `exp` and `nbf`.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
/// Largest leeway `build()` accepts: more is a misconfiguration, not clock skew.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);
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
struct RedactedKey(AlgorithmFamily);

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
fn strip_application(typ: &str) -> &str {
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

/// Parses the payload again, to name the reason for a failure. Used only on the error path,
/// after the signature was checked; it never leads to acceptance.
fn unverified_claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The claims the verifier reads. Deserializing never fails on well-formed JSON objects:
/// problems are recorded (`duplicate`, `exp: None`) and judged after decoding.
#[derive(Debug, Default)]
struct Claims {
    /// Every top-level claim whose value is a string (`sub`, `iss`, the type claim, ...).
    strings: BTreeMap<String, String>,
    /// `exp` as whole seconds, if it is a non-negative number.
    exp: Option<u64>,
    /// Every claim name seen.
    names: BTreeSet<String>,
    /// A claim name appeared twice; the payload's meaning is ambiguous (RFC 7519 §4).
    duplicate: bool,
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClaimsVisitor)
    }
}

struct ClaimsVisitor;

impl<'de> Visitor<'de> for ClaimsVisitor {
    type Value = Claims;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        let mut claims = Claims::default();
        while let Some(name) = map.next_key::<String>()? {
            if claims.names.contains(&name) {
                claims.duplicate = true;
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(value) => {
                    claims.strings.insert(name.clone(), value);
                }
                value if name == "exp" => claims.exp = numeric_date(&value),
                _ => {}
            }
            claims.names.insert(name);
        }
        Ok(claims)
    }
}

/// A NumericDate (RFC 7519 §2) as whole seconds; `None` unless a non-negative number.
pub(super) fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    let number = value.as_number()?;
    number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|secs| secs.is_finite() && *secs >= 0.0 && *secs < u64::MAX as f64)
            .map(|secs| secs as u64)
    })
}

/// Builds a [`JwtVerifier`]; start with [`JwtVerifier::builder`].
///
/// A token-type rule is required: [`typ`](Self::typ), [`claim`](Self::claim) or, explicitly,
/// [`any_token_type`](Self::any_token_type). When several are called, the last one wins.
#[derive(Clone)]
pub struct JwtVerifierBuilder {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    issuer: Option<Vec<String>>,
    audience: Option<Vec<String>>,
    token_type: Option<TokenType>,
    max_len: usize,
    max_subject_len: usize,
}

impl fmt::Debug for JwtVerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifierBuilder")
            .field("key", &RedactedKey(self.key.family()))
            .field("algorithms", &self.algorithms)
            .field("leeway", &self.leeway)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("token_type", &self.token_type)
            .field("max_len", &self.max_len)
            .field("max_subject_len", &self.max_subject_len)
            .finish()
    }
}

impl JwtVerifierBuilder {
    /// Clock-skew allowance for `exp` and `nbf`, in whole seconds (fractions are dropped), at
    /// most one hour; also added to the reported expiry. Default: 5 seconds.
    #[must_use]
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Requires an `iss` claim equal to one of `issuers`. Default: `iss` is not checked.
    #[must_use]
    pub fn issuer(mut self, issuers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.issuer = Some(issuers.into_iter().map(Into::into).collect());
        self
    }

    /// Requires an `aud` claim naming one of `audiences`. Default: `aud` is not checked (and
    /// tokens carrying any `aud` are accepted).
    #[must_use]
    pub fn audience(mut self, audiences: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.audience = Some(audiences.into_iter().map(Into::into).collect());
        self
    }

    /// Requires the JOSE header `typ` to be `typ` (for example `refresh+jwt`), compared
    /// case-insensitively and with or without the `application/` prefix, as RFC 8725 §3.11
    /// and RFC 9068 (`at+jwt`) use it. Default: no token-type rule, which `build` refuses.
    #[must_use]
    pub fn typ(mut self, typ: impl Into<String>) -> Self {
        let typ = typ.into();
        self.token_type = Some(TokenType::Header(strip_application(&typ).to_owned()));
        self
    }

    /// Requires the claim `name` to be a string equal to `value`, for example `token_use` =
    /// `refresh`. Default: no token-type rule, which `build` refuses.
    #[must_use]
    pub fn claim(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.token_type = Some(TokenType::Claim {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Accepts every token the key signed, whatever its type. Default: no token-type rule,
    /// which `build` refuses.
    ///
    /// Unsafe when access and refresh tokens are signed with the same key: an access token
    /// would then be accepted as a refresh token. Use it only when the key signs refresh
    /// tokens alone.
    #[must_use]
    pub fn any_token_type(mut self) -> Self {
        self.token_type = Some(TokenType::Any);
        self
    }

    /// The longest token accepted, in bytes; longer ones are refused before any decoding.
    /// Default: 4096 ([`DEFAULT_MAX_TOKEN_LEN`]).
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// The longest `sub` accepted, in bytes. Default: 256.
    #[must_use]
    pub fn max_subject_len(mut self, max_subject_len: usize) -> Self {
        self.max_subject_len = max_subject_len;
        self
    }

    /// Checks the configuration and builds the verifier.
    ///
    /// Fails without a token-type rule, with no algorithms or algorithms outside the key's
    /// family, with an empty HMAC secret, issuer or audience list, `typ` or claim, a zero
    /// limit or a leeway over an hour. It also signs and verifies a throwaway token, so that a
    /// `jsonwebtoken` without a usable crypto backend fails here rather than on the first
    /// request ([`ConfigError::CryptoBackend`]).
    pub fn build(self) -> Result<JwtVerifier, ConfigError> {
        let token_type = self.token_type.ok_or(ConfigError::NoTokenType)?;
        match &token_type {
            TokenType::Header(typ) if typ.is_empty() => {
                return Err(ConfigError::InvalidSetting("typ is empty"));
            }
            TokenType::Claim { name, value } if name.is_empty() || value.is_empty() => {
                return Err(ConfigError::InvalidSetting("token type claim is empty"));
            }
            _ => {}
        }

        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        let family = self.key.family();
        if self.algorithms.iter().any(|alg| alg.family() != family) {
            return Err(ConfigError::AlgorithmMismatch);
        }
        if family == AlgorithmFamily::Hmac
            && self.key.try_get_as_bytes().is_ok_and(<[u8]>::is_empty)
        {
            return Err(ConfigError::InvalidSetting("hmac secret is empty"));
        }

        let issuer = non_empty_set(self.issuer, "issuer list is empty")?;
        let audience = non_empty_set(self.audience, "audience list is empty")?;
        if self.leeway > MAX_LEEWAY {
            return Err(ConfigError::InvalidSetting("leeway is over an hour"));
        }
        if self.max_len == 0 {
            return Err(ConfigError::InvalidSetting("max_len is zero"));
        }
        if self.max_subject_len == 0 {
            return Err(ConfigError::InvalidSetting("max_subject_len is zero"));
        }

        self_test()?;

        let mut required_spec_claims: HashSet<String> =
            ["exp", "sub"].into_iter().map(String::from).collect();
        if issuer.is_some() {
            required_spec_claims.insert("iss".to_owned());
        }
        if audience.is_some() {
            required_spec_claims.insert("aud".to_owned());
        }
        let leeway_secs = self.leeway.as_secs();
        // Every field is set here: `Validation::new`'s defaults (60 s leeway, `nbf` unchecked,
        // only `exp` required) are not ours. A struct literal also fails to compile if a
        // later jsonwebtoken adds a field, so it cannot default silently.
        let validation = Validation {
            required_spec_claims,
            leeway: leeway_secs,
            reject_tokens_expiring_in_less_than: 0,
            validate_exp: true,
            validate_nbf: true,
            // Without a configured audience jsonwebtoken would refuse every token that has
            // an `aud`; with one, `aud` is required and must match.
            validate_aud: audience.is_some(),
            aud: audience,
            iss: issuer,
            sub: None,
            algorithms: self.algorithms,
        };

        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                key: self.key,
                validation,
                token_type,
                leeway_secs,
                max_len: self.max_len,
                max_subject_len: self.max_subject_len,
            }),
        })
    }
}

fn non_empty_set(
    list: Option<Vec<String>>,
    empty: &'static str,
) -> Result<Option<HashSet<String>>, ConfigError> {
    match list {
        Some(list) if list.is_empty() || list.iter().any(String::is_empty) => {
            Err(ConfigError::InvalidSetting(empty))
        }
        list => Ok(list.map(|list| list.into_iter().collect())),
    }
}

/// Signs and verifies a throwaway HS256 token, and checks that a wrong key is refused.
///
/// With no crypto backend, or two unified in one build, jsonwebtoken compiles and panics on
/// first use; the panic is caught here so that it becomes a `ConfigError` at build time.
pub(super) fn self_test() -> Result<(), ConfigError> {
    const SECRET: &[u8] = b"tower-refresh-coalesce jwt self-test";
    const OTHER: &[u8] = b"tower-refresh-coalesce jwt self-test, other key";

    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, JwtError> {
        let claims = serde_json::json!({ "sub": "self-test" });
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        jsonwebtoken::decode::<IgnoredAny>(&token, &DecodingKey::from_secret(SECRET), &validation)?;
        let other = DecodingKey::from_secret(OTHER);
        Ok(jsonwebtoken::decode::<IgnoredAny>(&token, &other, &validation).is_err())
    }));
    match outcome {
        Ok(Ok(true)) => Ok(()),
        // A backend that accepts a wrong key is no backend.
        Ok(Ok(false)) => Err(ConfigError::CryptoBackend(None)),
        Ok(Err(err)) => Err(ConfigError::CryptoBackend(Some(err))),
        Err(_panic) => Err(ConfigError::CryptoBackend(None)),
    }
}

#[cfg(test)]
mod tests {
    use hmac::{Hmac, Mac};
    use serde_json::{Value, json};
    use sha2::Sha256;

    use super::*;

    const SECRET: &[u8] = b"test secret of thirty-two bytes!";
    const ISS: &str = "https://auth.example";
    const AUD: &str = "refresh-api";
    const REFRESH_HEADER: &str = r#"{"alg":"HS256","typ":"refresh+jwt"}"#;

    // 2048-bit RSA and P-256 test keys, generated once with openssl for these tests only.
    const RSA_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC2lyM/RhqHsY3/
fQUkAcVm+ZlhQWwhA0e+XnBATI8+vJDxrRerF9k3/G3iZv1m1bGVCyK6wIzbk42+
C+EYsPLxMLYCw8gvH7hiUInZp+ieyCM4ptShAynu9FwwVrxwIdn9t9jZZ+xH1GJy
+8L9tqoUUU61SLvcxf8Wm8cKL2oEPxLoIWKrRTTOzboJus1IZlFIZhCqjjp4k8yU
ZTX7yN+s3dPFi6Ynynx51zUBb9eWD8PpxMR/+McI4h/eekZAMrhj0znMrxZtlVgL
II7E1ymt5tvkeGHpfiR160IbWm0L65I0+FejY/Rr6VVE/1uE+Ohu6pfMxsM4ooX1
8MWtl4O/AgMBAAECggEAKACYskYTjeLybyTeuXLB4ruQRORmYh0r3KMoCI49W8tI
HgqEAvHonwFouY9CuQLcMwELjMqekYSUKyzDFfu+XeUEGzr1Yo2agb+PU+Ybap4C
SWkTcGsXBsj2YYi/I/nmnlVm5sqD04DOSM6re5ZHUMg3bDQRJF8kcbmTM8ILgf5I
y8uRaJxMmlJqZbwKpVcnGHISm3imp5WEXu5+oUMdFhQ3VNTLe3BfdE0yRuXVJQ6I
ikzO5pqzFrRGVXRHi7g4RGX3fxKWOYry1GjDYdkTf3DmOxwaFfW12MnUwruPBvDM
QzsFR/cYhqVRcvHhaJ8N5SoyEScd18AikkPTKDMj0QKBgQDeB+QJ4lfaSS2nk9Qj
wKmlcu4niHBggHBMSZcL1+Q09edAHvzxzgx1kmptWgd9N2jnTg55dJB/FU6lnQlI
ildau/ZGVbqk4VL2/dEibRyOAg42gteksKw+BbYurinqJS600l3XX8bR48l2fwvI
qhGp/49+TKxaiGz+ZyHrbKvqjQKBgQDShoOA3O/4hLczzLBGTPk/wcN0WziFxdsK
rdEGcwbATZoD2kL1Py2yYPoNgmQb17jFISBJoO9dbd0z+bgUEaYXN5EkA7OgglxV
JzTTLIl7Gtjv6ODw0fs7p+CtgF5fskkgx/8WaLFqmrS2Jv46xFuy5SxmNzrFI1qu
WStBvLmaewKBgQDGraDtB1E9z0W/MpUd+QTVO+bIEVsdv1C9swwqWOGoUnK/+fq2
FX8opf/+IhWZgr+oWzywihHS5ioeIEtyUfihBJj3jzcY21f2FGHTwHdQy54UQTjd
8gnu5gWD9+0hzGvi+mtmkhnDL2XTVxQgV66+xCSPC+Uejf2aGIdNt0yO8QKBgQC0
sVOJdRha275KrXLWxBZijLJv2iPHXazFm65+tJek0nZQvDMgQBu+sNGuaq3138/t
EqOdzo3kSPnFNJ60Svmdj8n5eVvhdkI9rCsA3YcarE5qjB0VVYUnDM4g3L8jr+ho
RIBDAZTVhPd6KDmowwRZpa3YBathrRiV8F7aS1uapQKBgHiMfo2B5oMQpNxSaFGG
JwgJNi9tGJZdkC8SstbXMopXpBrBve/urg6fAP806eGTE2jMOcUglra/ckTijElK
oyLJr5rzWkt+4+Bi7s0++8kHN0gVbG7NJQ4GKOy+iKEh3Dk/uQUkhmFB4nNuQ7Vo
jfK1OIbvrn4FdbzQVtr+Fi4q
-----END PRIVATE KEY-----
";
    const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtpcjP0Yah7GN/30FJAHF
ZvmZYUFsIQNHvl5wQEyPPryQ8a0XqxfZN/xt4mb9ZtWxlQsiusCM25ONvgvhGLDy
8TC2AsPILx+4YlCJ2afonsgjOKbUoQMp7vRcMFa8cCHZ/bfY2WfsR9RicvvC/baq
FFFOtUi73MX/FpvHCi9qBD8S6CFiq0U0zs26CbrNSGZRSGYQqo46eJPMlGU1+8jf
rN3TxYumJ8p8edc1AW/Xlg/D6cTEf/jHCOIf3npGQDK4Y9M5zK8WbZVYCyCOxNcp
rebb5Hhh6X4kdetCG1ptC+uSNPhXo2P0a+lVRP9bhPjobuqXzMbDOKKF9fDFrZeD
vwIDAQAB
-----END PUBLIC KEY-----
";
    const EC_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgbPCFZOpRpDbVNt/Q
fgm41der6EgEls2+EYhMF1c33NGhRANCAARDe490f1cMl6ZZOIfp+RR5StCGS4g0
4eWFWFJOiY12nmYzO5uNycHguzq7pmC6slRxxDKRlN+Fvvppz7jlYiUE
-----END PRIVATE KEY-----
";
    const EC_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQ3uPdH9XDJemWTiH6fkUeUrQhkuI
NOHlhVhSTomNdp5mMzubjcnB4Ls6u6ZgurJUccQykZTfhb76ac+45WIlBA==
-----END PUBLIC KEY-----
";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Assembles and signs a token by hand, so headers and payloads can be anything.
    fn sign_hs256(header: &str, payload: &str, secret: &[u8]) -> String {
        let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key");
        mac.update(message.as_bytes());
        format!("{message}.{}", b64(&mac.finalize().into_bytes()))
    }

    /// Valid refresh claims with `edits` applied; a `null` edit removes the claim.
    fn claims(edits: &[(&str, Value)]) -> Value {
        let mut claims = json!({
            "sub": "user-1", "exp": now() + 600, "iss": ISS, "aud": AUD, "token_use": "refresh",
        });
        let map = claims.as_object_mut().expect("an object");
        for (name, value) in edits {
            if value.is_null() {
                map.remove(*name);
            } else {
                map.insert((*name).to_owned(), value.clone());
            }
        }
        claims
    }

    /// A refresh token (HS256, `typ: refresh+jwt`) with `edits` applied to valid claims.
    fn token(edits: &[(&str, Value)]) -> String {
        sign_hs256(REFRESH_HEADER, &claims(edits).to_string(), SECRET)
    }

    /// A refresh header over a hand-written payload.
    fn raw(payload: &str) -> String {
        sign_hs256(REFRESH_HEADER, payload, SECRET)
    }

    /// Valid claims under another header.
    fn with_header(header: &str) -> String {
        sign_hs256(header, &claims(&[]).to_string(), SECRET)
    }

    /// Valid claims, signed by jsonwebtoken with `key` under `alg` and `typ: refresh+jwt`.
    fn encoded(alg: Algorithm, key: &EncodingKey, edits: &[(&str, Value)]) -> String {
        let mut header = Header::new(alg);
        header.typ = Some("refresh+jwt".to_owned());
        jsonwebtoken::encode(&header, &claims(edits), key).expect("encodes")
    }

    fn hs_verifier() -> JwtVerifier {
        JwtVerifier::hs256(SECRET)
            .typ("refresh+jwt")
            .issuer([ISS])
            .audience([AUD])
            .build()
            .expect("valid configuration")
    }

    fn claim_verifier() -> JwtVerifier {
        JwtVerifier::hs256(SECRET)
            .claim("token_use", "refresh")
            .build()
            .expect("valid configuration")
    }

    fn rs_verifier() -> JwtVerifier {
        JwtVerifier::rs256_pem(RSA_PUBLIC_PEM.as_bytes())
            .expect("public key")
            .typ("refresh+jwt")
            .build()
            .expect("valid configuration")
    }

    fn rs_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("private key")
    }

    fn reason(result: Result<Verified, Rejected>) -> Option<&'static str> {
        match result.map_err(|err| err.rejection().clone()) {
            Err(Rejection::InvalidToken(reason)) => Some(reason),
            Err(other) => panic!("unexpected rejection {other:?}"),
            Ok(_) => None,
        }
    }

    fn assert_rejections(verifier: &JwtVerifier, cases: &[(&str, String, &str)]) {
        for (name, token, want) in cases {
            let got = reason(verifier.verify(token));
            assert_eq!(got, Some(*want), "case {name:?}");
        }
    }

    fn assert_accepted(verifier: &JwtVerifier, cases: &[(&str, String)]) {
        for (name, token) in cases {
            let result = verifier.verify(token);
            assert!(result.is_ok(), "case {name:?}: {result:?}");
        }
    }

    #[test]
    fn a_valid_hs256_refresh_token_is_accepted_with_subject_and_expiry() {
        let exp = now() + 600;
        let verified = hs_verifier()
            .verify(&token(&[("exp", json!(exp))]))
            .expect("valid");
        assert_eq!(verified.subject.as_deref(), Some("user-1"));
        assert_eq!(
            verified.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(exp + 5))
        );
    }

    #[test]
    fn tokens_within_the_leeway_and_equivalent_typ_forms_are_accepted() {
        let aud_list = json!(["other", AUD]);
        let ok = |typ: &str| with_header(&format!(r#"{{"alg":"HS256","typ":"{typ}"}}"#));
        #[rustfmt::skip]
        let cases = [
            ("expired within leeway", token(&[("exp", json!(now() - 2))])),
            ("nbf within leeway", token(&[("nbf", json!(now() + 2))])),
            ("nbf in the past", token(&[("nbf", json!(now() - 60))])),
            ("fractional exp", token(&[("exp", json!(now() as f64 + 600.5))])),
            ("audience list", token(&[("aud", aud_list)])),
            ("typ with application/ prefix", ok("application/refresh+jwt")),
            ("typ in upper case", ok("REFRESH+JWT")),
            ("prefix in mixed case", ok("Application/Refresh+JWT")),
            ("other claims", token(&[("jti", json!("x")), ("iat", json!(now())), ("x", json!({}))])),
        ];
        assert_accepted(&hs_verifier(), &cases);
    }

    #[test]
    fn hs256_tokens_are_rejected_with_the_exact_reason() {
        let exp = now() + 600;
        let valid = token(&[]);
        let payload = valid.split('.').nth(1).expect("three segments");
        let signature = valid.rsplit('.').next().expect("three segments");
        let none = format!(
            "{}.{payload}.",
            b64(br#"{"alg":"none","typ":"refresh+jwt"}"#)
        );
        let big_none = format!(
            "{}.{payload}.",
            b64(br#"{"alg":"None","typ":"refresh+jwt"}"#)
        );
        let not_json = format!("{}.{payload}.{signature}", b64(b"{not json"));
        let hs512 = encoded(Algorithm::HS512, &EncodingKey::from_secret(SECRET), &[]);
        let wrong_key = sign_hs256(REFRESH_HEADER, &claims(&[]).to_string(), b"another key");
        let crit = r#"{"alg":"HS256","typ":"refresh+jwt","crit":["x"],"x":1}"#;
        let empty_crit = r#"{"alg":"HS256","typ":"refresh+jwt","crit":[]}"#;
        let common = format!(r#""exp":{exp},"iss":"{ISS}","aud":"{AUD}""#);
        let dup_sub = format!(r#"{{"sub":"a","sub":"b",{common}}}"#);
        let escaped_dup_sub = format!(r#"{{"sub":"a","s\u0075b":"b",{common}}}"#);
        let dup_exp = format!(r#"{{"sub":"a","exp":1,{common}}}"#);
        let dup_jti = format!(r#"{{"sub":"a","jti":"1","jti":"2",{common}}}"#);
        let padded = format!("{}{valid}", "A".repeat(5 * 1024 - valid.len()));
        let non_ascii = valid.replacen('.', "é.", 1);
        #[rustfmt::skip]
        let cases = [
            ("alg none", none, "disallowed algorithm"),
            ("alg None", big_none, "disallowed algorithm"),
            ("alg HS512, not pinned", hs512, "disallowed algorithm"),
            ("wrong key", wrong_key, "bad signature"),
            ("expired 30 s ago", token(&[("exp", json!(now() - 30))]), "expired"),
            ("nbf in 30 s", token(&[("nbf", json!(now() + 30))]), "not yet valid"),
            ("missing exp", token(&[("exp", Value::Null)]), "missing expiry"),
            ("string exp", token(&[("exp", json!(exp.to_string()))]), "invalid expiry"),
            ("negative exp", token(&[("exp", json!(-1))]), "invalid expiry"),
            ("exp beyond SystemTime", token(&[("exp", json!(u64::MAX))]), "invalid expiry"),
            ("string nbf", token(&[("nbf", json!("0"))]), "invalid not-before"),
            ("missing sub", token(&[("sub", Value::Null)]), "missing subject"),
            ("numeric sub", token(&[("sub", json!(42))]), "invalid subject"),
            ("empty sub", token(&[("sub", json!(""))]), "empty subject"),
            ("300-byte sub", token(&[("sub", json!("s".repeat(300)))]), "subject too long"),
            ("wrong iss", token(&[("iss", json!("https://evil.example"))]), "wrong issuer"),
            ("missing iss", token(&[("iss", Value::Null)]), "missing issuer"),
            ("wrong aud", token(&[("aud", json!("other-api"))]), "wrong audience"),
            ("missing aud", token(&[("aud", Value::Null)]), "missing audience"),
            ("access token", with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#), "wrong token type"),
            ("typ JWT", with_header(r#"{"alg":"HS256","typ":"JWT"}"#), "wrong token type"),
            ("no typ", with_header(r#"{"alg":"HS256"}"#), "wrong token type"),
            ("unknown crit", with_header(crit), "unsupported critical header"),
            ("empty crit", with_header(empty_crit), "unsupported critical header"),
            ("duplicate sub", raw(&dup_sub), "duplicate claim"),
            ("duplicate sub, escaped", raw(&escaped_dup_sub), "duplicate claim"),
            ("duplicate exp", raw(&dup_exp), "duplicate claim"),
            ("duplicate jti", raw(&dup_jti), "duplicate claim"),
            ("payload not an object", raw("[1]"), "malformed token"),
            ("header not json", not_json, "malformed token"),
            ("garbage", "garbage".to_owned(), "malformed token"),
            ("four segments", format!("{valid}.AAAA"), "malformed token"),
            ("truncated signature", valid[..valid.len() - 10].to_owned(), "malformed token"),
            ("truncated in half", valid[..valid.len() / 2].to_owned(), "malformed token"),
            ("5 KiB token", padded, "token too long"),
            ("non-ASCII", non_ascii, "token has characters outside visible ASCII"),
            ("empty", String::new(), "empty token"),
        ];
        assert_rejections(&hs_verifier(), &cases);
    }

    #[test]
    fn the_claim_rule_rejects_other_token_uses() {
        let exp = now() + 600;
        let dup =
            format!(r#"{{"sub":"a","exp":{exp},"token_use":"access","token_use":"refresh"}}"#);
        let access = with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#);
        assert_accepted(
            &claim_verifier(),
            &[("token_use refresh, typ at+jwt", access)],
        );
        #[rustfmt::skip]
        let cases = [
            ("token_use access", token(&[("token_use", json!("access"))]), "wrong token type"),
            ("token_use missing", token(&[("token_use", Value::Null)]), "wrong token type"),
            ("token_use not a string", token(&[("token_use", json!(["refresh"]))]), "wrong token type"),
            ("token_use in upper case", token(&[("token_use", json!("REFRESH"))]), "wrong token type"),
            ("duplicate token_use", raw(&dup), "duplicate claim"),
        ];
        assert_rejections(&claim_verifier(), &cases);
    }

    #[test]
    fn rs256_tokens_are_verified_and_key_confusion_is_refused() {
        let valid = encoded(Algorithm::RS256, &rs_key(), &[]);
        let verified = rs_verifier().verify(&valid).expect("valid");
        assert_eq!(verified.subject.as_deref(), Some("user-1"));

        // HS256 "signed" with the RSA public key as the HMAC secret.
        let confused = sign_hs256(
            REFRESH_HEADER,
            &claims(&[]).to_string(),
            RSA_PUBLIC_PEM.as_bytes(),
        );
        let (head, rest) = valid.split_once('.').expect("three segments");
        let signature = valid.rsplit('.').next().expect("three segments");
        let admin = claims(&[("sub", json!("admin"))]).to_string();
        let tampered = format!("{head}.{}.{signature}", b64(admin.as_bytes()));
        let ps256 = format!("{}.{rest}", b64(br#"{"alg":"PS256","typ":"refresh+jwt"}"#));
        let expired = encoded(Algorithm::RS256, &rs_key(), &[("exp", json!(now() - 60))]);
        #[rustfmt::skip]
        let cases = [
            ("key confusion", confused, "disallowed algorithm"),
            ("tampered payload", tampered, "bad signature"),
            ("alg PS256, not pinned", ps256, "disallowed algorithm"),
            ("expired", expired, "expired"),
        ];
        assert_rejections(&rs_verifier(), &cases);
    }

    #[test]
    fn es256_tokens_are_verified() {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("private key");
        let verifier = JwtVerifier::es256_pem(EC_PUBLIC_PEM.as_bytes())
            .expect("public key")
            .typ("refresh+jwt")
            .build()
            .expect("valid configuration");
        let verified = verifier
            .verify(&encoded(Algorithm::ES256, &key, &[]))
            .expect("valid");
        assert_eq!(verified.subject.as_deref(), Some("user-1"));
        let hs = token(&[]);
        assert_eq!(reason(verifier.verify(&hs)), Some("disallowed algorithm"));
    }

    #[test]
    fn any_token_type_accepts_access_tokens_when_asked_to() {
        let verifier = JwtVerifier::hs256(SECRET)
            .any_token_type()
            .build()
            .expect("valid");
        assert_eq!(verifier.token_type(), &TokenType::Any);
        let access = with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#);
        assert!(verifier.verify(&access).is_ok());
    }

    #[test]
    fn build_without_a_token_type_rule_fails() {
        let err = JwtVerifier::hs256(SECRET)
            .build()
            .expect_err("no type rule");
        assert_eq!(err, ConfigError::NoTokenType);
        assert!(err.to_string().starts_with("no token type rule"));
    }

    #[test]
    fn build_refuses_algorithms_that_do_not_fit_the_key() {
        let hmac = || DecodingKey::from_secret(SECRET);
        let rsa = DecodingKey::from_rsa_pem(RSA_PUBLIC_PEM.as_bytes()).expect("public key");
        #[rustfmt::skip]
        let cases = [
            (JwtVerifier::builder(hmac(), []), ConfigError::NoAlgorithms),
            (JwtVerifier::builder(hmac(), [Algorithm::HS256, Algorithm::RS256]), ConfigError::AlgorithmMismatch),
            (JwtVerifier::builder(rsa, [Algorithm::HS256]), ConfigError::AlgorithmMismatch),
        ];
        for (builder, want) in cases {
            assert_eq!(builder.any_token_type().build().expect_err("refused"), want);
        }
    }

    #[test]
    fn build_refuses_settings_that_cannot_work() {
        let base = || JwtVerifier::hs256(SECRET).typ("refresh+jwt");
        #[rustfmt::skip]
        let cases = [
            (base().typ(""), "typ is empty"),
            (base().typ("application/"), "typ is empty"),
            (base().claim("", "refresh"), "token type claim is empty"),
            (base().claim("token_use", ""), "token type claim is empty"),
            (JwtVerifier::hs256(b"").any_token_type(), "hmac secret is empty"),
            (base().issuer(Vec::<String>::new()), "issuer list is empty"),
            (base().audience([""]), "audience list is empty"),
            (base().leeway(Duration::from_secs(3601)), "leeway is over an hour"),
            (base().max_len(0), "max_len is zero"),
            (base().max_subject_len(0), "max_subject_len is zero"),
        ];
        for (builder, want) in cases {
            let err = builder.build().expect_err(want);
            assert_eq!(err, ConfigError::InvalidSetting(want));
        }
    }

    #[test]
    fn settings_change_what_is_accepted() {
        let verifier = JwtVerifier::hs256(SECRET)
            .typ("application/refresh+jwt")
            .leeway(Duration::ZERO)
            .max_subject_len(4)
            .build()
            .expect("valid");
        assert_eq!(
            verifier.token_type(),
            &TokenType::Header("refresh+jwt".to_owned())
        );
        assert_rejections(
            &verifier,
            &[
                (
                    "expired a second ago",
                    token(&[("exp", json!(now() - 1))]),
                    "expired",
                ),
                (
                    "5-byte sub",
                    token(&[("sub", json!("user1"))]),
                    "subject too long",
                ),
            ],
        );
        let valid = token(&[]);
        let short = JwtVerifier::hs256(SECRET)
            .typ("refresh+jwt")
            .max_len(valid.len() - 1);
        let short = short.build().expect("valid");
        assert_eq!(reason(short.verify(&valid)), Some("token too long"));
    }

    #[test]
    fn bad_pem_keys_are_config_errors_with_a_source() {
        let err = JwtVerifier::rs256_pem(b"not a pem").expect_err("garbage");
        assert!(matches!(err, ConfigError::Key(_)));
        assert!(err.source().is_some());
        assert!(JwtVerifier::es256_pem(RSA_PUBLIC_PEM.as_bytes()).is_err());
    }

    #[test]
    fn the_crypto_backend_passes_its_self_test() {
        assert_eq!(self_test(), Ok(()));
        let err = ConfigError::CryptoBackend(Some(JwtError::from(ErrorKind::InvalidSignature)));
        assert!(err.source().is_some());
        assert!(
            err.to_string()
                .starts_with("jsonwebtoken has no usable crypto backend")
        );
    }

    #[test]
    fn debug_output_redacts_the_key() {
        let secret = "a very recognisable secret value";
        let verifier = JwtVerifier::hs256(secret).typ("refresh+jwt");
        let shown = format!(
            "{verifier:?} {:?}",
            verifier.clone().build().expect("valid")
        );
        assert!(!shown.contains(secret));
        assert!(!shown.contains(&format!("{:?}", secret.as_bytes())[1..20]));
        assert!(shown.contains("<redacted Hmac key>"));
    }
}
