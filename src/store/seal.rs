//! Sealing stored values: XChaCha20-Poly1305 under a key derived from the deployment secret
//! and the presented token.
//!
//! The key of one value is `HMAC-SHA256(secret, "seal" || token seal)`, where the token seal
//! is itself a keyed hash of the exact token (see [`Admission::seal`](crate::Admission::seal)).
//! A dump of the store therefore reveals no token pair without the token that was refreshed:
//! the one secret a thief would need is the one that was just rotated away. The key's
//! fingerprint and the value's kind are authenticated as associated data, so a value cannot
//! be moved to another key or passed off as another kind; so is the plaintext header, which
//! binds the value's absolute expiry and the key and group generations it was stored under,
//! so that neither can be changed to revive a value that expired or was revoked.

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::key::{Fingerprint, random_bytes};

const VERSION: u8 = 2;
const NONCE_LEN: usize = 24;
/// `VERSION || expires (unix ms) || key generation || group generation`, big-endian.
const HEADER_LEN: usize = 1 + 3 * 8;

/// What a sealed value is bound to, in its plaintext header and its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bound {
    /// When the value expires, in milliseconds since the Unix epoch.
    pub(crate) expires_ms: u64,
    /// The key's generation it was stored under.
    pub(crate) key_generation: u64,
    /// The group's generation it was stored under (0 without a group).
    pub(crate) group_generation: u64,
}

impl Bound {
    fn header(&self) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[0] = VERSION;
        header[1..9].copy_from_slice(&self.expires_ms.to_be_bytes());
        header[9..17].copy_from_slice(&self.key_generation.to_be_bytes());
        header[17..25].copy_from_slice(&self.group_generation.to_be_bytes());
        header
    }

    fn parse(header: &[u8]) -> Option<Self> {
        let word = |at: usize| Some(u64::from_be_bytes(header.get(at..at + 8)?.try_into().ok()?));
        (header.first() == Some(&VERSION)).then_some(())?;
        Some(Self {
            expires_ms: word(1)?,
            key_generation: word(9)?,
            group_generation: word(17)?,
        })
    }
}

/// Seals and opens values for one deployment.
#[derive(Clone)]
pub(crate) struct Sealer {
    mac: Hmac<Sha256>,
}

impl Sealer {
    pub(crate) fn new(secret: &[u8]) -> Self {
        Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(secret)
                .expect("HMAC accepts keys of any length"),
        }
    }

    fn cipher(&self, seal: &[u8; 32]) -> XChaCha20Poly1305 {
        let mut mac = self.mac.clone();
        mac.update(b"seal");
        mac.update(seal);
        XChaCha20Poly1305::new(&mac.finalize().into_bytes())
    }

    fn aad(key: &Fingerprint, kind: u8, header: &[u8; HEADER_LEN]) -> [u8; 33 + HEADER_LEN] {
        let mut aad = [0u8; 33 + HEADER_LEN];
        aad[..32].copy_from_slice(key.as_bytes());
        aad[32] = kind;
        aad[33..].copy_from_slice(header);
        aad
    }

    /// `header || nonce || ciphertext`, the header naming `bound`.
    pub(crate) fn seal(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        kind: u8,
        bound: Bound,
        value: &[u8],
    ) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let header = bound.header();
        let aad = Self::aad(key, kind, &header);
        let ciphertext = self
            .cipher(seal)
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .expect("encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The value and what it is bound to, or `None` if it was sealed for another token, key
    /// or kind, or tampered with (its header included). The caller compares the bounds.
    pub(crate) fn open(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        kind: u8,
        sealed: &[u8],
    ) -> Option<(Bound, Vec<u8>)> {
        if sealed.len() < HEADER_LEN + NONCE_LEN {
            return None;
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let bound = Bound::parse(header)?;
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = XNonce::from(<[u8; NONCE_LEN]>::try_from(nonce).ok()?);
        let aad = Self::aad(key, kind, &bound.header());
        self.cipher(seal)
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .ok()
            .map(|value| (bound, value))
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer { secret: <redacted> }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Bound = Bound {
        expires_ms: 1_700_000_000_000,
        key_generation: 3,
        group_generation: 7,
    };

    #[test]
    fn a_sealed_value_opens_only_with_its_token_key_and_kind() {
        let sealer = Sealer::new(b"deployment");
        let key = Fingerprint::from("k");
        let sealed = sealer.seal(&key, &[1; 32], 1, BOUND, b"token pair");
        assert_eq!(
            sealer.open(&key, &[1; 32], 1, &sealed),
            Some((BOUND, b"token pair".to_vec()))
        );
        assert_eq!(
            sealer.open(&key, &[2; 32], 1, &sealed),
            None,
            "another token"
        );
        assert_eq!(
            sealer.open(&Fingerprint::from("j"), &[1; 32], 1, &sealed),
            None,
            "another key"
        );
        assert_eq!(
            sealer.open(&key, &[1; 32], 0, &sealed),
            None,
            "another kind"
        );
        assert_eq!(
            Sealer::new(b"other").open(&key, &[1; 32], 1, &sealed),
            None,
            "another deployment"
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open(&key, &[1; 32], 1, &tampered), None, "tampered");
        assert!(
            !sealed.windows(10).any(|w| w == b"token pair"),
            "no plaintext"
        );
    }

    #[test]
    fn a_sealed_values_expiry_and_generations_cannot_be_rewritten() {
        let sealer = Sealer::new(b"deployment");
        let key = Fingerprint::from("k");
        let sealed = sealer.seal(&key, &[1; 32], 1, BOUND, b"token pair");
        // The expiry, the key generation and the group generation, one byte each.
        for at in [8, 16, 24] {
            let mut rewritten = sealed.clone();
            rewritten[at] ^= 1;
            assert_eq!(
                sealer.open(&key, &[1; 32], 1, &rewritten),
                None,
                "byte {at}"
            );
        }
    }
}
