//! Small cryptographic helpers: randomness, hashing, password hashing.
//!
//! Built on RustCrypto's `sha2`, `hmac` and `pbkdf2`, and `subtle` for comparisons.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PBKDF2-HMAC-SHA256 iterations for newly hashed passwords.
///
/// The count is stored with every user row, so raising it later only affects passwords
/// hashed afterwards. It is kept moderate because the example and its tests run unoptimised
/// builds; a production deployment should prefer a memory-hard function such as Argon2id.
pub(super) const PASSWORD_ITERATIONS: u32 = 10_000;

/// Length of a password salt in bytes.
pub(super) const SALT_LEN: usize = 16;

/// `N` bytes from the operating system's CSPRNG.
pub(super) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A random identifier: 16 bytes as 32 lowercase hex digits.
pub(super) fn random_id() -> String {
    hex::encode(random_bytes::<16>())
}

/// Hex SHA-256 of a token: the only form in which tokens are stored.
pub(super) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// HMAC-SHA256 of `message` under `key`.
pub(super) fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = new_hmac(key);
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn new_hmac(key: &[u8]) -> HmacSha256 {
    // HMAC is defined for keys of every length (long keys are hashed first).
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// PBKDF2-HMAC-SHA256 (RFC 8018 §5.2) with a 32-byte output.
pub(super) fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

/// Compares two byte strings in time that depends only on their lengths.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_the_rfc_7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256, P="passwd", S="salt", c=1 (first 32 bytes).
        let out = pbkdf2_sha256(b"passwd", b"salt", 1);
        assert_eq!(
            hex::encode(out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
