//! Sealing stored values: XChaCha20-Poly1305 under a key derived from the deployment secret
//! and the presented token.
//!
//! The key of one value is `HMAC-SHA256(secret, "seal" || token seal)`, where the token seal
//! is itself a keyed hash of the exact token (see [`Admission::seal`](crate::Admission::seal)).
//! A dump of the store therefore reveals no token pair without the token that was refreshed:
//! the one secret a thief would need is the one that was just rotated away. The key's
//! fingerprint and the value's kind are authenticated as associated data, so a value cannot
//! be moved to another key or passed off as another kind.

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::key::{Fingerprint, random_bytes};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

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

    fn aad(key: &Fingerprint, kind: u8) -> [u8; 33] {
        let mut aad = [0u8; 33];
        aad[..32].copy_from_slice(key.as_bytes());
        aad[32] = kind;
        aad
    }

    /// `VERSION || nonce || ciphertext`.
    pub(crate) fn seal(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        kind: u8,
        value: &[u8],
    ) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let aad = Self::aad(key, kind);
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
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The value, or `None` if it was sealed for another token, key or kind, or tampered with.
    pub(crate) fn open(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        kind: u8,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = XNonce::from(<[u8; NONCE_LEN]>::try_from(nonce).ok()?);
        let aad = Self::aad(key, kind);
        self.cipher(seal)
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .ok()
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

    #[test]
    fn a_sealed_value_opens_only_with_its_token_key_and_kind() {
        let sealer = Sealer::new(b"deployment");
        let key = Fingerprint::from("k");
        let sealed = sealer.seal(&key, &[1; 32], 1, b"token pair");
        assert_eq!(
            sealer.open(&key, &[1; 32], 1, &sealed).as_deref(),
            Some(&b"token pair"[..])
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
}
