//! How a request becomes a key.
//!
//! Every entry of the coalescing table is addressed by a [`Fingerprint`]: a 32-byte digest.
//! The HTTP front derives it with a keyed hash ([`Fingerprinter`]) from the exact token bytes
//! and the client binding, so raw tokens are never stored, logged or used as keys. For other
//! request types, any [`Extract`] strategy works; a closure `Fn(&Req) -> Option<K>` with
//! `K: Into<Fingerprint>` is one, and [`NaturalKey`] keys requests by bytes they carry (a user
//! or session id) with a keyed SipHash.

use std::{
    fmt,
    future::{Future, Ready, ready},
    hash::{Hash, Hasher},
    time::SystemTime,
};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{BoxError, BuildError};

mod natural;

pub use self::natural::{NaturalKey, OwnedKey};

/// A 32-byte digest that names one entry of the table.
///
/// Two requests coalesce exactly when their fingerprints are equal. Build one with
/// [`Fingerprint::of`] (SHA-256 of some bytes), from a string or integer with `From`, or with
/// a keyed [`Fingerprinter`] when the input is a secret such as a token.
///
/// ```
/// use tower_refresh_coalesce::Fingerprint;
///
/// assert_eq!(Fingerprint::from("user-1"), Fingerprint::of(b"user-1"));
/// assert_ne!(Fingerprint::from("user-1"), Fingerprint::from("user-2"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a digest computed elsewhere.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The SHA-256 digest of `data` (unkeyed: use a [`Fingerprinter`] for secrets).
    pub fn of(data: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(data.as_ref()).into())
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The fingerprint of 64 hex digits, as [`to_hex`](Self::to_hex) writes them; `None`
    /// for anything else.
    ///
    /// ```
    /// use tower_refresh_coalesce::Fingerprint;
    ///
    /// let fp = Fingerprint::of(b"k");
    /// assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
    /// assert_eq!(Fingerprint::from_hex("not hex"), None);
    /// ```
    pub fn from_hex(digits: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The bytes are a cryptographic digest: any 8 of them are uniformly distributed, and
        // equal fingerprints hash equally. Hashing all 32 would only cost time on the hot path.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        write!(f, "Fingerprint({}…)", &hex[..12])
    }
}

impl From<&str> for Fingerprint {
    fn from(value: &str) -> Self {
        Self::of(value)
    }
}

impl From<String> for Fingerprint {
    fn from(value: String) -> Self {
        Self::of(value)
    }
}

impl From<&[u8]> for Fingerprint {
    fn from(value: &[u8]) -> Self {
        Self::of(value)
    }
}

impl From<u64> for Fingerprint {
    fn from(value: u64) -> Self {
        Self::of(value.to_le_bytes())
    }
}

impl From<[u8; 32]> for Fingerprint {
    fn from(value: [u8; 32]) -> Self {
        Self(value)
    }
}

/// A keyed hash (HMAC-SHA256) over a per-deployment secret.
///
/// Fingerprints of tokens are computed with it, so a leaked table, log line or Redis key
/// cannot be matched against a token without the secret. Every part is length-prefixed and
/// every use names a domain, so `("ab", "c")` and `("a", "bc")` never collide, nor do a token
/// and a subject with the same bytes.
///
/// ```
/// use tower_refresh_coalesce::Fingerprinter;
///
/// let fp = Fingerprinter::new(b"a deployment secret of 32 bytes!")?;
/// let a = fp.fingerprint("token", &[b"eyJ...", b"client-1"]);
/// assert_eq!(a, fp.fingerprint("token", &[b"eyJ...", b"client-1"]));
/// assert_ne!(a, fp.fingerprint("token", &[b"eyJ...", b"client-2"]));
/// let other = Fingerprinter::new(b"another deployment secret, 32 B.")?;
/// assert_ne!(a, other.fingerprint("token", &[b"eyJ...", b"client-1"]));
/// assert!(Fingerprinter::new(b"too short").is_err());
/// # Ok::<(), tower_refresh_coalesce::error::BuildError>(())
/// ```
#[derive(Clone)]
pub struct Fingerprinter {
    mac: Hmac<Sha256>,
}

impl Fingerprinter {
    /// A fingerprinter keyed with `secret`, of at least [`MIN_SECRET_LEN`] bytes. Every
    /// instance of a deployment must use the same secret for their keys to meet (in Redis,
    /// for example).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, BuildError> {
        check_secret(secret.as_ref())?;
        Ok(Self::keyed(secret.as_ref()))
    }

    fn keyed(secret: &[u8]) -> Self {
        let mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
        Self { mac }
    }

    /// A fingerprinter keyed with 32 random bytes from the operating system.
    ///
    /// Fingerprints then differ between processes, which is right for a single instance and
    /// wrong for several instances that coordinate through a shared store.
    pub fn random() -> Self {
        Self::keyed(&random_bytes::<MIN_SECRET_LEN>())
    }

    /// The fingerprint of `parts` in `domain`.
    pub fn fingerprint(&self, domain: &str, parts: &[&[u8]]) -> Fingerprint {
        let mut mac = self.mac.clone();
        update_prefixed(&mut mac, domain.as_bytes());
        for part in parts {
            update_prefixed(&mut mac, part);
        }
        Fingerprint(mac.finalize().into_bytes().into())
    }
}

impl Fingerprinter {
    /// The key of a refresh token presented by `party`: everything else the inner service
    /// authenticates (client id, client credential, sender constraint, integrator binding),
    /// as length-prefixed parts.
    #[cfg(feature = "http")]
    pub(crate) fn token_key(&self, token: &str, party: &[&[u8]]) -> Fingerprint {
        self.keyed_parts("refresh-token", token.as_bytes(), party)
    }

    /// The key of a subject's requests when matching by subject is opted into.
    #[cfg(feature = "http")]
    pub(crate) fn subject_key(&self, subject: &str, party: &[&[u8]]) -> Fingerprint {
        self.keyed_parts("subject-key", subject.as_bytes(), party)
    }

    #[cfg(feature = "http")]
    fn keyed_parts(&self, domain: &str, head: &[u8], party: &[&[u8]]) -> Fingerprint {
        let mut mac = self.mac.clone();
        update_prefixed(&mut mac, domain.as_bytes());
        update_prefixed(&mut mac, head);
        for part in party {
            update_prefixed(&mut mac, part);
        }
        Fingerprint(mac.finalize().into_bytes().into())
    }

    /// The tag of every entry of one token, whoever presented it, for
    /// [`Handle::invalidate_token`](crate::Handle::invalidate_token).
    pub(crate) fn token_tag(&self, token: &str) -> Fingerprint {
        self.fingerprint("token", &[token.as_bytes()])
    }

    /// The group of a subject's entries.
    pub(crate) fn subject_group(&self, subject: &str) -> Fingerprint {
        self.fingerprint("subject", &[subject.as_bytes()])
    }

    /// The sealing secret of a token's stored values (see [`Admission::seal`]).
    #[cfg(feature = "http")]
    pub(crate) fn token_seal(&self, token: &str) -> [u8; 32] {
        *self.fingerprint("seal", &[token.as_bytes()]).as_bytes()
    }
}

/// The shortest secret accepted for fingerprints and stores: 32 bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Refuses a secret shorter than [`MIN_SECRET_LEN`].
pub(crate) fn check_secret(secret: &[u8]) -> Result<(), BuildError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(BuildError::new(
            "secrets of fingerprints and stores must be at least 32 bytes",
        ));
    }
    Ok(())
}

fn update_prefixed(mac: &mut Hmac<Sha256>, part: &[u8]) {
    mac.update(&(part.len() as u64).to_be_bytes());
    mac.update(part);
}

/// `N` random bytes from the operating system.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source failed");
    bytes
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter { secret: <redacted> }")
    }
}

/// What a verified request tells the table about its entry.
///
/// A request that leads a flight is admitted once; requests that later match its entry
/// skip verification (they carry the same bytes) but are still refused once `not_after` has
/// passed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Admission {
    group: Option<Fingerprint>,
    tag: Option<Fingerprint>,
    not_after: Option<SystemTime>,
    seal: Option<[u8; 32]>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("group", &self.group)
            .field("tag", &self.tag)
            .field("not_after", &self.not_after)
            .field("seal", &self.seal.map(|_| "<redacted>"))
            .finish()
    }
}

impl Admission {
    /// An admission with no group and no expiry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the entry in `group` (the HTTP front uses the token's subject), so that
    /// [`Handle::invalidate_group`](crate::Handle::invalidate_group) reaches it.
    #[must_use]
    pub fn group(mut self, group: Fingerprint) -> Self {
        self.group = Some(group);
        self
    }

    /// Gives the entry a second name that
    /// [`Handle::invalidate_group`](crate::Handle::invalidate_group) reaches, without counting
    /// it as a group: the HTTP front tags every entry of one token with the token's tag, so
    /// that [`Handle::invalidate_token`](crate::Handle::invalidate_token) reaches the entries
    /// of every client and sender that presented it.
    #[must_use]
    pub fn tag(mut self, tag: Fingerprint) -> Self {
        self.tag = Some(tag);
        self
    }

    /// The entry's second name, if any.
    pub fn tag_key(&self) -> Option<&Fingerprint> {
        self.tag.as_ref()
    }

    /// Refuses requests that match the entry after `not_after` (the token's `exp`).
    #[must_use]
    pub fn not_after(mut self, not_after: SystemTime) -> Self {
        self.not_after = Some(not_after);
        self
    }

    /// A secret derived from the exact token (a keyed hash, never the token itself): a
    /// [`Store`](crate::store::Store) shared by several instances mixes it into the key that
    /// seals this entry's value, so the stored value cannot be read without the token.
    /// Without it, values are sealed under the store's secret and the key alone.
    #[must_use]
    pub fn seal(mut self, seal: [u8; 32]) -> Self {
        self.seal = Some(seal);
        self
    }

    /// The token-derived sealing secret, if any.
    pub fn seal_key(&self) -> Option<&[u8; 32]> {
        self.seal.as_ref()
    }

    /// The entry's group, if any.
    pub fn group_key(&self) -> Option<&Fingerprint> {
        self.group.as_ref()
    }

    /// The time after which matching requests are refused, if any.
    pub fn expires(&self) -> Option<SystemTime> {
        self.not_after
    }
}

/// The outcome of [`Extract::extract`].
#[derive(Debug)]
pub enum Extracted<T, R> {
    /// Coalesce the request under `key`. If no entry exists for the key, `token` is passed
    /// to [`Extract::admit`] before the request may lead a flight.
    Coalesce {
        /// The table key.
        key: Fingerprint,
        /// Whatever [`Extract::admit`] needs to verify the request.
        token: T,
        /// The request to hand to the inner service if this request leads.
        request: R,
    },
    /// Do not coalesce: call the inner service directly.
    Bypass(R),
}

/// How a request becomes a key, and how a request that has to lead is verified.
///
/// The service calls [`extract`](Extract::extract) on every request. If the table holds a
/// live entry for the key, the request joins or replays it; otherwise it must be
/// [`admit`](Extract::admit)ted first, and only then may it call the inner service. This
/// order lets requests that carry bytes already verified skip a second verification.
///
/// Any `Fn(&Req) -> Option<K>` with `K: Into<Fingerprint>` is an `Extract`: `None` bypasses
/// the table and every request is admitted. To key requests by bytes they carry (a user or
/// session id), prefer [`NaturalKey`]: it borrows the bytes and hashes them with a keyed
/// SipHash, where a closure returning a `String` allocates it and hashes it with SHA-256.
///
/// ```
/// use tower_refresh_coalesce::{Extract, Fingerprint};
///
/// fn by_user(req: &(u64, &'static str)) -> Option<u64> {
///     Some(req.0)
/// }
/// fn assert_extract<E: Extract<(u64, &'static str)>>(_: E) {}
/// assert_extract(by_user);
/// ```
pub trait Extract<Req> {
    /// The request handed to the inner service.
    type Request: Send + 'static;
    /// What [`admit`](Extract::admit) verifies.
    type Token: Send + 'static;
    /// The future returned by [`extract`](Extract::extract).
    type Future: Future<Output = Result<Extracted<Self::Token, Self::Request>, BoxError>>
        + Send
        + 'static;

    /// Finds the key of `request`. An error refuses the request without calling the inner
    /// service (the HTTP front answers it with `400`, `401` or `413`).
    fn extract(&self, request: Req) -> Self::Future;

    /// Verifies a request that is about to lead a flight. An error refuses it.
    ///
    /// `request` is the request the inner service will receive: an implementation may hand
    /// the inner service what it verified there (the HTTP front puts a
    /// [`RefreshGrant`](crate::http::RefreshGrant) in its extensions).
    fn admit(&self, token: Self::Token, request: &mut Self::Request)
    -> Result<Admission, BoxError>;

    /// The verified subject of a request that [`admit`](Extract::admit) accepted, for
    /// [audit events](crate::AuditEvent); `None` by default. Called only when the layer has an
    /// audit hook, so that a request without one pays nothing for it (the HTTP front reads
    /// the `sub` of the [`RefreshGrant`](crate::http::RefreshGrant) it put in the request).
    fn subject<'r>(&self, request: &'r Self::Request) -> Option<&'r str> {
        let _ = request;
        None
    }
}

/// Any closure or function that returns a key: `None` bypasses the table.
///
/// `K` is turned into a [`Fingerprint`] on every request: a `String` or `&str` is hashed with
/// SHA-256 ([`Fingerprint::of`]), after the closure allocated it if it returns a `String`.
/// That is the general path; [`NaturalKey`] is the fast one for keys the request already
/// carries (a keyed SipHash over borrowed bytes, no allocation), and a closure returning a
/// precomputed [`Fingerprint`] costs nothing to convert.
impl<Req, K, F> Extract<Req> for F
where
    F: Fn(&Req) -> Option<K>,
    K: Into<Fingerprint>,
    Req: Send + 'static,
{
    type Request = Req;
    type Token = ();
    type Future = Ready<Result<Extracted<(), Req>, BoxError>>;

    fn extract(&self, request: Req) -> Self::Future {
        ready(Ok(match self(&request) {
            Some(key) => Extracted::Coalesce {
                key: key.into(),
                token: (),
                request,
            },
            None => Extracted::Bypass(request),
        }))
    }

    fn admit(&self, _token: (), _request: &mut Req) -> Result<Admission, BoxError> {
        Ok(Admission::new())
    }
}
