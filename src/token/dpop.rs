//! [`DpopVerifier`]: DPoP proofs (RFC 9449), checked with `jsonwebtoken`.
//!
//! A DPoP proof is a JWT the client signs with a private key of its own and sends in the
//! `DPoP` header; its header carries the public key (`jwk`), its claims the request it is for
//! (`htm`, `htu`), when it was made (`iat`) and a unique id (`jti`). The verifier checks one
//! proof against one request and returns the key's RFC 7638 thumbprint, to which the
//! integrator binds the tokens it issues (`cnf.jkt`).

use std::{
    collections::HashSet,
    error::Error,
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderValue, Method, Uri, request::Parts};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, Validation,
    errors::{Error as JwtError, ErrorKind},
};
use serde::Deserialize;
use serde_json::{Map, Value};

use self::{htu::Origin, key::PublicKey, replay::JtiCache};
use super::jwt::{ConfigError, numeric_date, self_test};
use crate::error::{Rejected, Rejection};

/// The `typ` every proof carries (RFC 9449 §4.2).
const DPOP_TYP: &str = "dpop+jwt";
/// The request header that carries the proof (RFC 9449 §4.1).
const DPOP_HEADER: &str = "dpop";
/// Default allowance either side of now for `iat`.
const DEFAULT_IAT_WINDOW: Duration = Duration::from_secs(60);
/// Largest window `build()` accepts: more is a misconfiguration, not clock skew.
const MAX_IAT_WINDOW: Duration = Duration::from_secs(3600);
/// Default bound of the replay cache.
const DEFAULT_MAX_JTIS: usize = 100_000;
/// Default limit on the length of a proof, in bytes.
const DEFAULT_MAX_PROOF_LEN: usize = 4096;
/// The algorithms accepted by default.
const DEFAULT_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::EdDSA,
];

// Rejection reasons used in more than one place.
const MALFORMED: &str = "malformed proof";
const DISALLOWED_ALGORITHM: &str = "disallowed algorithm";
const NOT_PUBLIC: &str = "jwk is not a public key";
const UNUSABLE_JWK: &str = "unusable jwk";
const HTU_MISMATCH: &str = "htu does not match the request";

/// Why a [`DpopVerifierBuilder`] could not build a [`DpopVerifier`].
///
/// ```
/// use tower_refresh_coalesce::token::{DpopConfigError, DpopVerifier, jsonwebtoken::Algorithm};
///
/// // A proof is signed with the client's own key pair: a shared secret makes no sense.
/// let err = DpopVerifier::builder().algorithms([Algorithm::HS256]).build().unwrap_err();
/// assert_eq!(err, DpopConfigError::SymmetricAlgorithm(Algorithm::HS256));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DpopConfigError {
    /// The list of algorithms is empty.
    NoAlgorithms,
    /// An algorithm of the list is symmetric (`HS256`, `HS384`, `HS512`): DPoP proofs are
    /// signed with asymmetric keys only (RFC 9449 §4.2).
    SymmetricAlgorithm(Algorithm),
    /// A setting has a value that cannot work; the text names it.
    InvalidSetting(&'static str),
    /// `jsonwebtoken` failed its self-test: it has no usable crypto backend (see
    /// [`ConfigError::CryptoBackend`]). The source is `jsonwebtoken`'s error, if it returned
    /// one rather than panicking.
    CryptoBackend(Option<JwtError>),
}

impl fmt::Display for DpopConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAlgorithms => f.write_str("no dpop algorithm allowed"),
            Self::SymmetricAlgorithm(alg) => {
                write!(f, "{alg:?} is symmetric: dpop proofs use asymmetric keys")
            }
            Self::InvalidSetting(what) => write!(f, "invalid dpop verifier setting: {what}"),
            Self::CryptoBackend(_) => f.write_str(
                "jsonwebtoken has no usable crypto backend: enable exactly one of its features \
                 rust_crypto and aws_lc_rs",
            ),
        }
    }
}

impl Error for DpopConfigError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::CryptoBackend(Some(err)) => Some(err),
            _ => None,
        }
    }
}

/// Checks DPoP proofs (RFC 9449 §4.3) and remembers their `jti`s to refuse replays.
///
/// Built with [`DpopVerifier::builder`]. A proof is accepted only if all of these hold,
/// checked cheapest first, and each failure is a [`Rejection::InvalidDpopProof`] with a short
/// reason that never contains the proof:
///
/// - at most [`max_proof_len`](DpopVerifierBuilder::max_proof_len) bytes (4096) of visible
///   ASCII, in three dot-separated segments;
/// - the header's `typ` is exactly `dpop+jwt`, and it has no `crit`;
/// - the header's `alg` is one of the [`algorithms`](DpopVerifierBuilder::algorithms) (never
///   `none` nor a symmetric one);
/// - the header's `jwk` is a public key of the type `alg` needs (EC P-256 for `ES256`, P-384
///   for `ES384`, RSA of 2048 to 4096 bits for `RS*`/`PS*`, OKP Ed25519 for `EdDSA`), with
///   no private member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`);
/// - the signature verifies under that key;
/// - `jti` is a non-empty string, `htm` equals the request method, `htu` matches the request
///   URI (see below), and `iat` is a number within
///   [`iat_window`](DpopVerifierBuilder::iat_window) (60 s) either side of `now`; proofs
///   have no `exp`, and one is not required;
/// - no claim appears twice;
/// - the same key has not sent the same `jti` within the window. A `jti` is remembered only
///   once every other check passed, until the window of its `iat` is over.
///
/// # `htu`
///
/// As RFC 9449 §4.3 asks, `htu` is compared with the request URI without its query and
/// fragment: scheme and host case-insensitively, default ports (`:443` for `https`, `:80`
/// for `http`) dropped, and the path exactly, after percent-encoding is normalized (hex
/// digits upper-cased, unreserved characters decoded; RFC 3986 §6.2.2). The request's
/// scheme and authority come from, in order:
///
/// 1. the configured [`origin`](DpopVerifierBuilder::origin), when there is one, whatever
///    the request URI says: behind a proxy the server sees its internal scheme and host,
///    even in absolute URIs (HTTP/2 `:authority`);
/// 2. the request URI, if it has a scheme and an authority;
/// 3. with [`check_request`](Self::check_request) only, the `Host` header: its authority
///    must match, and the scheme of `htu` is not compared (it may be `http` or `https`);
/// 4. otherwise the proof is refused (`request origin unknown`): configure an origin.
///
/// # Replay cache
///
/// The cache holds at most [`max_jtis`](DpopVerifierBuilder::max_jtis) entries (100,000) of
/// 32 bytes plus bookkeeping (about 100 to 150 bytes each, some 15 MB at the default). An
/// entry leaves once its window is over;
/// still-valid entries are never evicted: when the cache is full of them, new proofs are
/// refused with [`Rejection::Unavailable`] (`503 temporarily_unavailable` on the HTTP front)
/// until some expire. The cache is per verifier: every clone shares it, but several
/// instances of a server each have their own, so a proof can be replayed once against each
/// instance within its window.
///
/// Not checked: `ath` (the access-token hash a resource server checks, RFC 9449 §4.3 step
/// 12) and server-provided nonces (§8). Binding a refresh token to the thumbprint is the
/// caller's job.
///
/// Cloning is cheap (the configuration and cache are shared).
///
/// # Example
///
/// ```
/// use std::time::SystemTime;
///
/// use tower_refresh_coalesce::token::DpopVerifier;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let verifier = DpopVerifier::builder()
///     .origin("https://auth.example.com")
///     .build()?;
///
/// let request = http::Request::post("/token").body(())?;
/// let (parts, ()) = request.into_parts();
/// // No `DPoP` header: refused.
/// assert!(verifier.check_request(&parts, SystemTime::now()).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DpopVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    algorithms: Vec<Algorithm>,
    iat_window_secs: u64,
    max_proof_len: usize,
    origin: Option<Origin>,
    jtis: JtiCache,
}

impl fmt::Debug for DpopVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("DpopVerifier")
            .field("algorithms", &inner.algorithms)
            .field("iat_window_secs", &inner.iat_window_secs)
            .field("max_jtis", &inner.jtis.max)
            .field("max_proof_len", &inner.max_proof_len)
            .field("origin", &inner.origin)
            .finish_non_exhaustive()
    }
}

impl Default for DpopVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl DpopVerifier {
    /// A verifier with the defaults of [`builder`](Self::builder).
    ///
    /// # Panics
    ///
    /// If `jsonwebtoken` has no working crypto backend (see [`DpopConfigError::CryptoBackend`]).
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default DPoP settings are valid")
    }

    /// Starts a verifier with the defaults: algorithms `ES256`, `ES384`, `RS256`, `PS256`
    /// and `EdDSA`, a 60 s `iat` window, 100,000 remembered `jti`s, proofs of at most 4096
    /// bytes, and no configured origin.
    #[must_use]
    pub fn builder() -> DpopVerifierBuilder {
        DpopVerifierBuilder {
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            iat_window: DEFAULT_IAT_WINDOW,
            max_jtis: DEFAULT_MAX_JTIS,
            max_proof_len: DEFAULT_MAX_PROOF_LEN,
            origin: None,
        }
    }

    /// Checks `proof` (the value of the `DPoP` header) for a request `method uri` at `now`,
    /// and remembers its `jti`.
    ///
    /// `uri` is the request URI as the server received it: when it has no scheme and
    /// authority, the configured [`origin`](DpopVerifierBuilder::origin) must supply them
    /// (use [`check_request`](Self::check_request) to fall back on the `Host` header).
    pub fn check(
        &self,
        proof: &str,
        method: &Method,
        uri: &Uri,
        now: SystemTime,
    ) -> Result<DpopProof, Rejected> {
        self.check_with(proof, method, uri, None, now)
    }

    /// Checks the request's only `DPoP` header for the request's method and URI at `now`,
    /// as [`check`](Self::check) does, with the `Host` header as the last source of the
    /// authority (see [`DpopVerifier`]).
    ///
    /// A request with no `DPoP` header, or with more than one, is refused (RFC 9449 §4.3):
    /// if DPoP is optional at an endpoint, look for the header before calling this.
    pub fn check_request(&self, parts: &Parts, now: SystemTime) -> Result<DpopProof, Rejected> {
        let mut values = parts.headers.get_all(DPOP_HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(reject("not exactly one dpop header"));
        };
        let proof = value.to_str().map_err(|_| reject(MALFORMED))?;
        let host = parts.headers.get(http::header::HOST);
        self.check_with(proof, &parts.method, &parts.uri, host, now)
    }

    fn check_with(
        &self,
        proof: &str,
        method: &Method,
        uri: &Uri,
        host: Option<&HeaderValue>,
        now: SystemTime,
    ) -> Result<DpopProof, Rejected> {
        let inner = &*self.inner;

        // 1. Shape: length, characters, three segments. No decoding yet.
        if proof.is_empty() {
            return Err(reject("empty proof"));
        }
        if proof.len() > inner.max_proof_len {
            return Err(reject("proof too long"));
        }
        if !proof.bytes().all(|b| b.is_ascii_graphic()) || proof.split('.').count() != 3 {
            return Err(reject(MALFORMED));
        }

        // 2. The header, unverified: it names the key that must have signed the proof, and
        // nothing in it is trusted until that signature verifies.
        let header = parse_header(proof)?;
        if header.get("typ").and_then(Value::as_str) != Some(DPOP_TYP) {
            return Err(reject("wrong typ"));
        }
        if header.contains_key("crit") {
            return Err(reject("unsupported crit header"));
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(|alg| Algorithm::from_str(alg).ok())
            .filter(|alg| inner.algorithms.contains(alg))
            .ok_or_else(|| reject(DISALLOWED_ALGORITHM))?;
        let key = PublicKey::from_jwk(header.get("jwk"), alg)?;

        // 3. The signature, under the proof's own key and the pinned algorithm.
        let decoding_key = key.decoding_key()?;
        let claims = jsonwebtoken::decode::<ProofClaims>(proof, &decoding_key, &validation(alg))
            .map_err(|err| reject(decode_failure(&err)))?
            .claims;

        // 4. The claims, now that they are known to come from the key's holder.
        let jti = match claims.jti {
            Some(Value::String(jti)) if !jti.is_empty() => jti,
            Some(_) => return Err(reject("invalid jti")),
            None => return Err(reject("missing jti")),
        };
        match claims.htm {
            Some(Value::String(htm)) if htm == method.as_str() => {}
            Some(Value::String(_)) => return Err(reject("htm does not match the request")),
            Some(_) => return Err(reject("invalid htm")),
            None => return Err(reject("missing htm")),
        }
        match claims.htu {
            Some(Value::String(htu)) => {
                htu::check(&htu, inner.origin.as_ref(), uri, host).map_err(reject)?;
            }
            Some(_) => return Err(reject("invalid htu")),
            None => return Err(reject("missing htu")),
        }
        let iat = match &claims.iat {
            Some(value) => numeric_date(value).ok_or_else(|| reject("invalid iat"))?,
            None => return Err(reject("missing iat")),
        };
        let now = unix_secs(now);
        if iat.saturating_add(inner.iat_window_secs) < now {
            return Err(reject("iat too old"));
        }
        if iat > now.saturating_add(inner.iat_window_secs) {
            return Err(reject("iat in the future"));
        }

        // 5. Replay, last: a proof refused for another reason leaves no trace.
        let thumbprint = key.thumbprint();
        inner.jtis.remember(
            &thumbprint,
            &jti,
            iat.saturating_add(inner.iat_window_secs),
            now,
        )?;

        Ok(DpopProof {
            thumbprint,
            algorithm: alg,
            issued_at: iat,
        })
    }
}

/// What a valid DPoP proof established: the key it was signed with.
///
/// Bind issued tokens to [`thumbprint_b64`](Self::thumbprint_b64) (the `jkt` of RFC 9449
/// §6), and refuse a refresh token bound to another thumbprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopProof {
    thumbprint: [u8; 32],
    algorithm: Algorithm,
    issued_at: u64,
}

impl DpopProof {
    /// The RFC 7638 SHA-256 thumbprint of the proof's public key.
    pub fn thumbprint(&self) -> &[u8; 32] {
        &self.thumbprint
    }

    /// The thumbprint in base64url without padding: the `jkt` form of RFC 9449 §6.1.
    pub fn thumbprint_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.thumbprint)
    }

    /// The algorithm the proof was signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// When the client made the proof (its `iat`, whole seconds).
    pub fn issued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.issued_at)
    }
}

/// Builds a [`DpopVerifier`]; start with [`DpopVerifier::builder`].
#[derive(Debug, Clone)]
pub struct DpopVerifierBuilder {
    algorithms: Vec<Algorithm>,
    iat_window: Duration,
    max_jtis: usize,
    max_proof_len: usize,
    origin: Option<String>,
}

impl DpopVerifierBuilder {
    /// The algorithms a proof may be signed with; symmetric ones (`HS*`) are refused by
    /// [`build`](Self::build), and `none` is never accepted. Default: `ES256`, `ES384`,
    /// `RS256`, `PS256` and `EdDSA`.
    #[must_use]
    pub fn algorithms(mut self, algorithms: impl IntoIterator<Item = Algorithm>) -> Self {
        self.algorithms = algorithms.into_iter().collect();
        self
    }

    /// How far `iat` may be from now, either side, in whole seconds (fractions are
    /// dropped), from 1 s to one hour; also how long a `jti` is remembered. Default: 60
    /// seconds.
    #[must_use]
    pub fn iat_window(mut self, iat_window: Duration) -> Self {
        self.iat_window = iat_window;
        self
    }

    /// How many `jti`s the replay cache holds at most; when it is full of `jti`s still in
    /// their window, new proofs are refused (see [`DpopVerifier`]). Default: 100,000.
    #[must_use]
    pub fn max_jtis(mut self, max_jtis: usize) -> Self {
        self.max_jtis = max_jtis;
        self
    }

    /// The longest proof accepted, in bytes; longer ones are refused before any decoding.
    /// Default: 4096.
    #[must_use]
    pub fn max_proof_len(mut self, max_proof_len: usize) -> Self {
        self.max_proof_len = max_proof_len;
        self
    }

    /// The scheme and authority clients use to reach this server, for example
    /// `https://auth.example.com`, compared with `htu` instead of the request's own (see
    /// [`DpopVerifier`]). Checked by [`build`](Self::build): `http` or `https`, a host, and
    /// no path, query or user info. Default: none, the request URI or `Host` header is used.
    #[must_use]
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Checks the configuration and builds the verifier.
    ///
    /// Fails with no algorithms or a symmetric one, a window of zero or over an hour, a zero
    /// limit, or an origin that is not `http(s)://host[:port]`. It also signs and verifies a
    /// throwaway token, so that a `jsonwebtoken` without a usable crypto backend fails here
    /// rather than on the first request ([`DpopConfigError::CryptoBackend`]).
    pub fn build(self) -> Result<DpopVerifier, DpopConfigError> {
        if self.algorithms.is_empty() {
            return Err(DpopConfigError::NoAlgorithms);
        }
        if let Some(&alg) = self
            .algorithms
            .iter()
            .find(|alg| alg.family() == AlgorithmFamily::Hmac)
        {
            return Err(DpopConfigError::SymmetricAlgorithm(alg));
        }
        let iat_window_secs = self.iat_window.as_secs();
        if iat_window_secs == 0 {
            return Err(DpopConfigError::InvalidSetting(
                "iat_window is under a second",
            ));
        }
        if self.iat_window > MAX_IAT_WINDOW {
            return Err(DpopConfigError::InvalidSetting(
                "iat_window is over an hour",
            ));
        }
        if self.max_jtis == 0 {
            return Err(DpopConfigError::InvalidSetting("max_jtis is zero"));
        }
        if self.max_proof_len == 0 {
            return Err(DpopConfigError::InvalidSetting("max_proof_len is zero"));
        }
        let origin = self
            .origin
            .map(|origin| {
                Origin::parse(&origin).ok_or(DpopConfigError::InvalidSetting(
                    "origin is not http(s)://host[:port]",
                ))
            })
            .transpose()?;

        self_test().map_err(|err| match err {
            ConfigError::CryptoBackend(source) => DpopConfigError::CryptoBackend(source),
            _ => DpopConfigError::CryptoBackend(None),
        })?;

        let mut algorithms = self.algorithms;
        algorithms.dedup();
        Ok(DpopVerifier {
            inner: Arc::new(Inner {
                algorithms,
                iat_window_secs,
                max_proof_len: self.max_proof_len,
                origin,
                jtis: JtiCache::new(self.max_jtis),
            }),
        })
    }
}

fn reject(reason: &'static str) -> Rejected {
    Rejected::new(Rejection::InvalidDpopProof(reason))
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The proof's JOSE header as a JSON object. Duplicate members are refused later, by
/// `jsonwebtoken`'s own parse of the header, before the proof is accepted.
fn parse_header(proof: &str) -> Result<Map<String, Value>, Rejected> {
    let segment = proof.split('.').next().unwrap_or_default();
    let json = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| reject(MALFORMED))?;
    serde_json::from_slice(&json).map_err(|_| reject(MALFORMED))
}

/// Every field set explicitly: proofs have no `exp`, `nbf`, `iss` or `aud`; `iat` is judged
/// by the verifier. A struct literal also fails to compile if a later jsonwebtoken adds a
/// field, so it cannot default silently.
fn validation(alg: Algorithm) -> Validation {
    Validation {
        required_spec_claims: HashSet::new(),
        leeway: 0,
        reject_tokens_expiring_in_less_than: 0,
        validate_exp: false,
        validate_nbf: false,
        validate_aud: false,
        aud: None,
        iss: None,
        sub: None,
        algorithms: vec![alg],
    }
}

/// A short reason for a failure of `jsonwebtoken::decode`.
fn decode_failure(err: &JwtError) -> &'static str {
    match err.kind() {
        ErrorKind::InvalidSignature => "invalid signature",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => DISALLOWED_ALGORITHM,
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat => UNUSABLE_JWK,
        // Includes a duplicate claim or header member.
        ErrorKind::Json(_) => MALFORMED,
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => MALFORMED,
        _ => "verification failed",
    }
}

/// The claims the verifier reads, as JSON values so that a wrong type gets its own reason.
/// serde refuses a duplicate of any of them.
#[derive(Deserialize)]
struct ProofClaims {
    jti: Option<Value>,
    htm: Option<Value>,
    htu: Option<Value>,
    iat: Option<Value>,
}

mod htu;
mod key;
mod replay;

#[cfg(test)]
mod tests;
