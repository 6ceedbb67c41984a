//! Minting refresh tokens for tests: well-formed ones with `jsonwebtoken`, broken ones by
//! hand.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Sha256;

/// The HS256 secret of the test verifier.
pub const SECRET: &[u8] = b"test signing secret, 32 bytes ok";
/// The `typ` header of refresh tokens.
pub const REFRESH_TYP: &str = "refresh+jwt";
/// A 2048-bit RSA private key (PKCS#8 PEM).
pub const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa_private.pem");
/// The public key of [`RSA_PRIVATE`] (PEM).
pub const RSA_PUBLIC: &[u8] = include_bytes!("keys/rsa_public.pem");
/// Another 2048-bit RSA private key, unrelated to [`RSA_PRIVATE`].
pub const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("keys/rsa_other_private.pem");

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Claims of a valid refresh token of `sub`, unique per call.
pub fn claims(sub: &str) -> Value {
    static NONCE: AtomicU64 = AtomicU64::new(0);
    json!({
        "sub": sub,
        "exp": now() + 3600,
        "iat": now(),
        "jti": format!("jti-{}", NONCE.fetch_add(1, Ordering::Relaxed)),
    })
}

/// A valid HS256 refresh token of `sub`.
pub fn refresh(sub: &str) -> String {
    hs256(&claims(sub))
}

/// `claims` signed with HS256 and `typ: refresh+jwt`.
pub fn hs256(claims: &Value) -> String {
    encode(
        Algorithm::HS256,
        Some(REFRESH_TYP),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
}

/// `claims` signed with `key` under `alg`, with header `typ`.
pub fn encode(alg: Algorithm, typ: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.typ = typ.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

/// A token assembled by hand from raw header and payload JSON, HMAC-SHA256-signed with
/// `key` (or unsigned when `key` is `None`): for what `jsonwebtoken` refuses to produce.
pub fn raw(header: &str, payload: &str, key: Option<&[u8]>) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = match key {
        Some(key) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            mac.update(signing_input.as_bytes());
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        }
        None => String::new(),
    };
    format!("{signing_input}.{signature}")
}
