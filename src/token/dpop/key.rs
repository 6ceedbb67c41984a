//! The proof's public key: read from the header's `jwk`, and hashed as RFC 7638 asks.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{NOT_PUBLIC, UNUSABLE_JWK, reject};
use crate::error::Rejected;

/// JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4;
/// RFC 8037 §2).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
/// Bounds on an RSA modulus, in bytes: at least 2048 bits (RFC 7518 §3.3), at most 4096 so
/// that a proof cannot make the server verify with a huge key.
const RSA_MODULUS_LEN: std::ops::RangeInclusive<usize> = 256..=512;

/// The public key of a proof, with the members RFC 7638 hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PublicKey {
    Ec {
        crv: &'static str,
        x: String,
        y: String,
    },
    Rsa {
        n: String,
        e: String,
    },
    Okp {
        crv: &'static str,
        x: String,
    },
}

impl PublicKey {
    /// Reads the header's `jwk`: a public key of the type `alg` needs, with well-formed
    /// members.
    pub(super) fn from_jwk(jwk: Option<&Value>, alg: Algorithm) -> Result<Self, Rejected> {
        let jwk = match jwk {
            Some(Value::Object(jwk)) => jwk,
            Some(_) => return Err(reject(UNUSABLE_JWK)),
            None => return Err(reject("missing jwk")),
        };
        if PRIVATE_MEMBERS.iter().any(|name| jwk.contains_key(*name)) {
            return Err(reject(NOT_PUBLIC));
        }
        let member = |name: &str, len: &dyn Fn(usize) -> bool| -> Result<String, Rejected> {
            let value = jwk
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| reject(UNUSABLE_JWK))?;
            match URL_SAFE_NO_PAD.decode(value) {
                Ok(bytes) if len(bytes.len()) => Ok(value.to_owned()),
                _ => Err(reject(UNUSABLE_JWK)),
            }
        };
        let kty = jwk.get("kty").and_then(Value::as_str);
        let crv = jwk.get("crv").and_then(Value::as_str);
        let wrong_key = || Err(reject("jwk does not fit the algorithm"));
        match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let (want, coordinate_len) = if alg == Algorithm::ES256 {
                    ("P-256", 32)
                } else {
                    ("P-384", 48)
                };
                if kty != Some("EC") || crv != Some(want) {
                    return wrong_key();
                }
                Ok(Self::Ec {
                    crv: want,
                    x: member("x", &|len| len == coordinate_len)?,
                    y: member("y", &|len| len == coordinate_len)?,
                })
            }
            Algorithm::EdDSA => {
                if kty != Some("OKP") || crv != Some("Ed25519") {
                    return wrong_key();
                }
                Ok(Self::Okp {
                    crv: "Ed25519",
                    x: member("x", &|len| len == 32)?,
                })
            }
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(reject(NOT_PUBLIC)),
            // RS256, RS384, RS512, PS256, PS384, PS512.
            _ => {
                if kty != Some("RSA") {
                    return wrong_key();
                }
                Ok(Self::Rsa {
                    n: member("n", &|len| RSA_MODULUS_LEN.contains(&len))?,
                    e: member("e", &|len| (1..=8).contains(&len))?,
                })
            }
        }
    }

    pub(super) fn decoding_key(&self) -> Result<DecodingKey, Rejected> {
        match self {
            Self::Ec { x, y, .. } => DecodingKey::from_ec_components(x, y),
            Self::Rsa { n, e } => DecodingKey::from_rsa_components(n, e),
            Self::Okp { x, .. } => DecodingKey::from_ed_components(x),
        }
        .map_err(|_| reject(UNUSABLE_JWK))
    }

    /// The RFC 7638 SHA-256 thumbprint: the required members only, in lexicographic order,
    /// no whitespace.
    ///
    /// `jsonwebtoken`'s `Jwk::thumbprint` computes the same for these key types (the tests
    /// compare them), but returns it base64url-encoded and does not escape the members;
    /// here they are already checked to be base64url, and JSON-escaped all the same.
    pub(super) fn thumbprint(&self) -> [u8; 32] {
        let string = |value: &str| serde_json::to_string(value).unwrap_or_default();
        let canonical = match self {
            Self::Ec { crv, x, y } => format!(
                r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
                string(crv),
                string(x),
                string(y)
            ),
            Self::Rsa { n, e } => {
                format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, string(e), string(n))
            }
            Self::Okp { crv, x } => {
                format!(r#"{{"crv":{},"kty":"OKP","x":{}}}"#, string(crv), string(x))
            }
        };
        Sha256::digest(canonical.as_bytes()).into()
    }
}
