//! Signing DPoP proofs (RFC 9449) for tests, with fixed keys generated once with `openssl
//! genpkey` for tests only.
//!
//! Also compiled into the unit tests of `src/token/dpop.rs` (from this path), so it uses only
//! crates that the library itself depends on with the `jwt` feature; there, unused helpers
//! and `pub` items of a private module are expected.
#![allow(dead_code, unreachable_pub)]

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey,
    jwk::{Jwk, ThumbprintHash},
};
use serde_json::{Value, json};

/// A private key for signing proofs, and the algorithm it signs with.
#[derive(Debug, Clone, Copy)]
pub struct TestKey {
    /// The JWS algorithm.
    pub alg: Algorithm,
    /// The private key, PKCS#8 PEM.
    pub pem: &'static [u8],
}

/// A P-256 key (ES256).
pub const ES256_A: TestKey = TestKey {
    alg: Algorithm::ES256,
    pem: include_bytes!("keys/dpop_es256_a.pem"),
};
/// Another P-256 key (ES256), unrelated to [`ES256_A`].
pub const ES256_B: TestKey = TestKey {
    alg: Algorithm::ES256,
    pem: include_bytes!("keys/dpop_es256_b.pem"),
};
/// A P-384 key (ES384).
pub const ES384: TestKey = TestKey {
    alg: Algorithm::ES384,
    pem: include_bytes!("keys/dpop_es384.pem"),
};
/// A 2048-bit RSA key (RS256; PS256 works with it too).
pub const RS256: TestKey = TestKey {
    alg: Algorithm::RS256,
    pem: include_bytes!("keys/dpop_rs256.pem"),
};
/// An Ed25519 key (EdDSA).
pub const ED25519: TestKey = TestKey {
    alg: Algorithm::EdDSA,
    pem: include_bytes!("keys/dpop_ed25519.pem"),
};

impl TestKey {
    /// The same key, signing with `alg` (for example [`RS256`] with `PS256`).
    pub fn with_alg(self, alg: Algorithm) -> Self {
        Self { alg, ..self }
    }

    /// The private key, for `jsonwebtoken`.
    pub fn encoding_key(&self) -> EncodingKey {
        match self.alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(self.pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.pem),
            _ => EncodingKey::from_rsa_pem(self.pem),
        }
        .expect("a valid test key")
    }

    /// The public JWK, derived from the private key: only the public members (`kty`, `crv`,
    /// `x`, `y` or `kty`, `n`, `e`).
    pub fn public_jwk(&self) -> Value {
        let jwk = self.jwk();
        let mut value = serde_json::to_value(&jwk).expect("a jwk serializes");
        if let Value::Object(members) = &mut value {
            members
                .retain(|name, _| matches!(name.as_str(), "kty" | "crv" | "x" | "y" | "n" | "e"));
        }
        value
    }

    /// The RFC 7638 SHA-256 thumbprint of the public key, base64url without padding (the
    /// `jkt` form), as `jsonwebtoken` computes it.
    pub fn thumbprint(&self) -> String {
        self.jwk()
            .thumbprint(ThumbprintHash::SHA256)
            .expect("a thumbprint")
    }

    fn jwk(&self) -> Jwk {
        Jwk::from_encoding_key(&self.encoding_key(), self.alg).expect("a public jwk")
    }
}

/// A valid DPoP proof signed by `key` for a request `method htu`, issued at `iat` (seconds
/// since the epoch), with the unique id `jti`.
pub fn proof(key: &TestKey, method: &str, htu: &str, iat: u64, jti: &str) -> String {
    sign(key, &header(key), &claims(method, htu, iat, jti))
}

/// The header of a valid proof by `key`: `typ`, `alg` and the public `jwk`.
pub fn header(key: &TestKey) -> Value {
    json!({
        "typ": "dpop+jwt",
        "alg": serde_json::to_value(key.alg).expect("an algorithm serializes"),
        "jwk": key.public_jwk(),
    })
}

/// The claims of a valid proof.
pub fn claims(method: &str, htu: &str, iat: u64, jti: &str) -> Value {
    json!({ "jti": jti, "htm": method, "htu": htu, "iat": iat })
}

/// Signs `header` and `claims` as given (whatever they say) with `key`.
pub fn sign(key: &TestKey, header: &Value, claims: &Value) -> String {
    sign_with(header, claims, &key.encoding_key(), key.alg)
}

/// Signs `header` and `claims` as given with `key` and `alg`.
pub fn sign_with(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", encode(header), encode(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("signs");
    format!("{message}.{signature}")
}

/// A JSON value as a base64url segment.
pub fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json serializes"))
}
