//! [`NaturalKey`]: a key from bytes the request already carries (a user id, a session id),
//! hashed with a keyed SipHash instead of SHA-256, without allocating.

use std::{
    fmt,
    future::{Ready, ready},
};

use siphasher::sip128::SipHasher13;

use super::{Admission, Extract, Extracted, Fingerprint, Fingerprinter, check_secret};
use crate::error::{BoxError, BuildError};

/// The domain under which the SipHash key is derived from the secret.
const DOMAIN: &str = "natural-key";

/// Bytes 16 to 31 of every natural key: ASCII `natural-key/v1` and two zero bytes.
const FILLER: [u8; 16] = *b"natural-key/v1\0\0";

/// Extracts a key from bytes the request already has, such as a user or session id, at the
/// cost of one keyed hash.
///
/// A closure returning a `String` is also an [`Extract`], but every call then allocates the
/// string and hashes it with SHA-256 ([`Fingerprint::of`]). `NaturalKey` borrows the bytes
/// from the request (`|r: &Req| Some(r.user.as_str())`) and hashes them with SipHash-1-3 with
/// a 128-bit output, keyed from a secret: a keyed pseudorandom function (the variant Rust's
/// standard `HashMap` keys itself with against chosen collisions), so clients that do not
/// know the secret can neither predict keys nor choose two inputs whose keys collide (which
/// would merge two users' requests). Owning closures, for keys that have to be built, go
/// through [`owned`](NaturalKey::owned).
///
/// The SipHash key is derived from the secret with [`Fingerprinter`] (HMAC-SHA256) under a
/// domain of its own, so every instance configured with the same secret derives the same
/// keys and meets the others' entries in a shared [`Store`](crate::store::Store). The
/// hashed input is the natural key's bytes alone: each hash has one input, and SipHash's
/// last block carries the input's length.
/// The resulting [`Fingerprint`] holds the 128-bit hash in its first 16 bytes and the fixed
/// ASCII filler `natural-key/v1` followed by two zero bytes in the other 16, so that a
/// natural key never equals a SHA-256 or HMAC fingerprint by accident.
///
/// `None` from the closure bypasses the table, and every request is admitted, as with a
/// plain closure.
///
/// ```
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_refresh_coalesce::{NaturalKey, RefreshCoalesceLayer};
///
/// struct Refresh {
///     user: String,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_refresh_coalesce::BoxError> {
/// let by_user = NaturalKey::new(
///     b"a deployment secret of 32 bytes!",
///     |r: &Refresh| Some(r.user.as_str()),
/// )?;
/// // The fingerprint of a natural key, as `Handle::invalidate` takes it.
/// let alice = by_user.fingerprint("alice");
/// let layer = RefreshCoalesceLayer::new(by_user);
/// let handle = layer.handle();
/// let mut service = layer.layer(service_fn(|r: Refresh| async move {
///     Ok::<_, std::convert::Infallible>(format!("new token for {}", r.user))
/// }));
///
/// let request = Refresh { user: "alice".to_owned() };
/// let response = service.ready().await?.call(request).await?;
/// assert_eq!(response, "new token for alice");
/// assert!(handle.invalidate(&alice));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct NaturalKey<F> {
    hasher: SipHasher13,
    key_of: F,
}

/// An owning closure of a [`NaturalKey`]: one that returns its key by value
/// (`Fn(&Req) -> Option<K>`, `K: AsRef<[u8]>`), made by [`NaturalKey::owned`].
#[derive(Clone, Copy)]
pub struct OwnedKey<F>(F);

impl<F> fmt::Debug for OwnedKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnedKey(..)")
    }
}

impl<F> NaturalKey<F> {
    /// Keys requests by the bytes `key_of` borrows from them, hashed under `secret`, of at
    /// least [`MIN_SECRET_LEN`](crate::MIN_SECRET_LEN) bytes. Every instance of a deployment
    /// that coordinates through a store must use the same secret.
    ///
    /// ```
    /// use tower_refresh_coalesce::NaturalKey;
    ///
    /// struct Refresh {
    ///     session: Vec<u8>,
    /// }
    ///
    /// let key = NaturalKey::new(b"a deployment secret of 32 bytes!", |r: &Refresh| {
    ///     Some(r.session.as_slice())
    /// })?;
    /// # let _ = key;
    /// assert!(NaturalKey::new(b"too short", |r: &Refresh| Some(r.session.as_slice())).is_err());
    /// # Ok::<(), tower_refresh_coalesce::error::BuildError>(())
    /// ```
    pub fn new<Req, K>(secret: impl AsRef<[u8]>, key_of: F) -> Result<Self, BuildError>
    where
        F: for<'a> Fn(&'a Req) -> Option<&'a K>,
        K: AsRef<[u8]> + ?Sized,
    {
        Ok(Self::with(derive(secret.as_ref())?, key_of))
    }

    /// Keys requests by the bytes `key_of` borrows from them, hashed under a key drawn from
    /// the operating system's random source.
    ///
    /// Keys then differ between processes, which is right for a single instance and wrong
    /// for several instances that coordinate through a shared store.
    pub fn random<Req, K>(key_of: F) -> Self
    where
        F: for<'a> Fn(&'a Req) -> Option<&'a K>,
        K: AsRef<[u8]> + ?Sized,
    {
        Self::with(derive_random(), key_of)
    }

    fn with(hasher: SipHasher13, key_of: F) -> Self {
        Self { hasher, key_of }
    }

    /// The fingerprint of the natural key `natural`: what the table holds for requests whose
    /// closure returns these bytes, for [`Handle::invalidate`](crate::Handle::invalidate).
    ///
    /// ```
    /// use tower_refresh_coalesce::NaturalKey;
    ///
    /// let secret = b"a deployment secret of 32 bytes!";
    /// let a = NaturalKey::new(secret, |r: &String| Some(r.as_str()))?;
    /// let b = NaturalKey::owned(secret, |r: &String| Some(r.clone()))?;
    /// assert_eq!(a.fingerprint("alice"), b.fingerprint("alice"));
    /// assert_ne!(a.fingerprint("alice"), a.fingerprint("bob"));
    /// # Ok::<(), tower_refresh_coalesce::error::BuildError>(())
    /// ```
    pub fn fingerprint(&self, natural: impl AsRef<[u8]>) -> Fingerprint {
        let natural = natural.as_ref();
        // One input per hash: SipHash's last block carries the input's length, so inputs of
        // different lengths (runs of zero bytes included) never share a padded form.
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&self.hasher.hash(natural).as_bytes());
        bytes[16..].copy_from_slice(&FILLER);
        Fingerprint::from_bytes(bytes)
    }
}

impl<F> NaturalKey<OwnedKey<F>> {
    /// Keys requests by the bytes `key_of` returns by value (a `String` it builds, say),
    /// hashed under `secret` as [`new`](NaturalKey::new) does. Prefer `new` where the key can
    /// be borrowed from the request: it saves an allocation per request.
    ///
    /// ```
    /// use tower_refresh_coalesce::NaturalKey;
    ///
    /// struct Refresh {
    ///     tenant: u32,
    ///     user: String,
    /// }
    ///
    /// let key = NaturalKey::owned(b"a deployment secret of 32 bytes!", |r: &Refresh| {
    ///     Some(format!("{}/{}", r.tenant, r.user))
    /// })?;
    /// assert_eq!(key.fingerprint("7/alice"), key.fingerprint(String::from("7/alice")));
    /// # Ok::<(), tower_refresh_coalesce::error::BuildError>(())
    /// ```
    pub fn owned<Req, K>(secret: impl AsRef<[u8]>, key_of: F) -> Result<Self, BuildError>
    where
        F: Fn(&Req) -> Option<K>,
        K: AsRef<[u8]>,
    {
        Ok(Self::with(derive(secret.as_ref())?, OwnedKey(key_of)))
    }

    /// Keys requests by the bytes `key_of` returns by value, hashed under a random key, as
    /// [`random`](NaturalKey::random) does.
    pub fn random_owned<Req, K>(key_of: F) -> Self
    where
        F: Fn(&Req) -> Option<K>,
        K: AsRef<[u8]>,
    {
        Self::with(derive_random(), OwnedKey(key_of))
    }
}

impl<F> fmt::Debug for NaturalKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NaturalKey { key: <redacted>, .. }")
    }
}

/// The SipHash key of `secret`: the first 128 bits of its HMAC in this module's domain.
fn derive(secret: &[u8]) -> Result<SipHasher13, BuildError> {
    check_secret(secret)?;
    Ok(from_fingerprinter(&Fingerprinter::keyed(secret)))
}

fn derive_random() -> SipHasher13 {
    from_fingerprinter(&Fingerprinter::random())
}

fn from_fingerprinter(keys: &Fingerprinter) -> SipHasher13 {
    let derived = keys.fingerprint(DOMAIN, &[]);
    let mut key = [0u8; 16];
    key.copy_from_slice(&derived.as_bytes()[..16]);
    SipHasher13::new_with_key(&key)
}

fn coalesce<Req>(
    key: Option<Fingerprint>,
    request: Req,
) -> Ready<Result<Extracted<(), Req>, BoxError>> {
    ready(Ok(match key {
        Some(key) => Extracted::Coalesce {
            key,
            token: (),
            request,
        },
        None => Extracted::Bypass(request),
    }))
}

impl<Req, K, F> Extract<Req> for NaturalKey<F>
where
    F: for<'a> Fn(&'a Req) -> Option<&'a K>,
    K: AsRef<[u8]> + ?Sized,
    Req: Send + 'static,
{
    type Request = Req;
    type Token = ();
    type Future = Ready<Result<Extracted<(), Req>, BoxError>>;

    fn extract(&self, request: Req) -> Self::Future {
        let key = (self.key_of)(&request).map(|natural| self.fingerprint(natural));
        coalesce(key, request)
    }

    fn admit(&self, _token: (), _request: &mut Req) -> Result<Admission, BoxError> {
        Ok(Admission::new())
    }
}

impl<Req, K, F> Extract<Req> for NaturalKey<OwnedKey<F>>
where
    F: Fn(&Req) -> Option<K>,
    K: AsRef<[u8]>,
    Req: Send + 'static,
{
    type Request = Req;
    type Token = ();
    type Future = Ready<Result<Extracted<(), Req>, BoxError>>;

    fn extract(&self, request: Req) -> Self::Future {
        let key = (self.key_of.0)(&request).map(|natural| self.fingerprint(natural));
        coalesce(key, request)
    }

    fn admit(&self, _token: (), _request: &mut Req) -> Result<Admission, BoxError> {
        Ok(Admission::new())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use siphasher::sip128::SipHasher13;

    use super::*;

    const SECRET: &[u8] = b"a deployment secret of 32 bytes!";
    const OTHER: &[u8] = b"another deployment secret, 32 B.";

    fn by_str(secret: &[u8]) -> NaturalKey<impl Fn(&String) -> Option<&str> + Clone> {
        NaturalKey::new(secret, |r: &String| Some(r.as_str())).expect("a long secret")
    }

    /// The key `extract` gives `request`, or `None` if it bypasses the table.
    fn key_of<E: Extract<String, Request = String>>(
        extract: &E,
        request: &str,
    ) -> Option<Fingerprint> {
        let extracted = extract
            .extract(request.to_owned())
            .now_or_never()
            .expect("ready at once")
            .expect("extracted");
        match extracted {
            Extracted::Coalesce {
                key, request: r, ..
            } => {
                assert_eq!(r, request, "the request goes on unchanged");
                Some(key)
            }
            Extracted::Bypass(_) => None,
        }
    }

    /// The key computed from the documented construction, with the crates directly.
    fn documented(secret: &[u8], natural: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any length");
        mac.update(&(DOMAIN.len() as u64).to_be_bytes());
        mac.update(DOMAIN.as_bytes());
        let derived = mac.finalize().into_bytes();
        let mut key = [0u8; 16];
        key.copy_from_slice(&derived[..16]);
        let hash = SipHasher13::new_with_key(&key).hash(natural).as_bytes();
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&hash);
        bytes[16..].copy_from_slice(b"natural-key/v1\0\0");
        bytes
    }

    #[test]
    fn the_key_is_siphash_of_the_input_under_the_derived_key() {
        let key = by_str(SECRET);
        for natural in [
            "alice",
            "",
            "a much longer natural key than one SipHash block",
        ] {
            let expected = Fingerprint::from_bytes(documented(SECRET, natural.as_bytes()));
            assert_eq!(key.fingerprint(natural), expected, "{natural:?}");
            assert_eq!(key_of(&key, natural), Some(expected), "{natural:?}");
        }
    }

    #[test]
    fn equal_inputs_under_one_secret_give_equal_keys_on_every_instance() {
        let (one, two) = (by_str(SECRET), by_str(SECRET));
        assert_eq!(key_of(&one, "alice"), key_of(&two, "alice"));
        assert_eq!(key_of(&one, "alice"), key_of(&one, "alice"));
        let owned = NaturalKey::owned(SECRET, |r: &String| Some(r.clone())).expect("secret");
        assert_eq!(key_of(&owned, "alice"), key_of(&one, "alice"));
        let bytes = NaturalKey::new(SECRET, |r: &String| Some(r.as_bytes())).expect("secret");
        assert_eq!(key_of(&bytes, "alice"), key_of(&one, "alice"));
    }

    #[test]
    fn different_secrets_give_different_keys() {
        assert_ne!(
            by_str(SECRET).fingerprint("alice"),
            by_str(OTHER).fingerprint("alice")
        );
        fn user(r: &(u32, String)) -> Option<&str> {
            Some(&r.1)
        }
        assert_ne!(
            NaturalKey::random(user).fingerprint("alice"),
            NaturalKey::random(user).fingerprint("alice"),
            "each random key is drawn anew"
        );
    }

    #[test]
    fn different_inputs_give_different_keys() {
        let key = by_str(SECRET);
        let inputs = ["alice", "bob", "alice ", "Alice", "alicf"];
        for (i, a) in inputs.iter().enumerate() {
            for b in &inputs[i + 1..] {
                assert_ne!(key.fingerprint(a), key.fingerprint(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn inputs_that_differ_only_in_framing_give_different_keys() {
        let key = by_str(SECRET);
        let zeros = [0u8; 16];
        // The empty key and runs of zero bytes (what padding would add).
        let mut seen: Vec<Fingerprint> = (0..=16).map(|n| key.fingerprint(&zeros[..n])).collect();
        // An input against the same input behind its own length prefix.
        let mut prefixed = 5u64.to_le_bytes().to_vec();
        prefixed.extend_from_slice(b"alice");
        seen.push(key.fingerprint(b"alice"));
        seen.push(key.fingerprint(&prefixed));
        // A prefix of another input.
        seen.push(key.fingerprint(b"alic"));
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "{seen:?}");
    }

    #[test]
    fn a_natural_key_carries_the_filler_and_never_equals_a_sha256_fingerprint() {
        let key = by_str(SECRET).fingerprint("alice");
        assert_eq!(&key.as_bytes()[16..], b"natural-key/v1\0\0");
        assert_ne!(key, Fingerprint::of("alice"));
        assert_ne!(key, Fingerprint::from("alice"));
    }

    #[test]
    fn none_bypasses_the_table() {
        let key = NaturalKey::new(SECRET, |r: &String| (!r.is_empty()).then_some(r.as_str()))
            .expect("secret");
        assert_eq!(key_of(&key, ""), None);
        assert!(key_of(&key, "alice").is_some());
        let owned = NaturalKey::random_owned(|r: &String| (!r.is_empty()).then(|| r.clone()));
        assert_eq!(key_of(&owned, ""), None);
    }

    #[test]
    fn a_short_secret_is_refused() {
        let short = &SECRET[..31];
        assert!(NaturalKey::new(short, |r: &String| Some(r.as_str())).is_err());
        assert!(NaturalKey::owned(short, |r: &String| Some(r.clone())).is_err());
    }

    #[test]
    fn the_debug_form_hides_the_key() {
        assert_eq!(
            format!("{:?}", by_str(SECRET)),
            "NaturalKey { key: <redacted>, .. }"
        );
    }
}
