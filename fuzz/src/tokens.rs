//! Tokens minted once per process, as `tests/support/tokens.rs` mints them, and the
//! verifier that judges them.

use std::{
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Sha256;
use tower_refresh_coalesce::JwtVerifier;

use crate::input::{Mutation, TokenChoice};

/// The HS256 secret of the verifier (the test suite's).
pub const SECRET: &[u8] = b"test signing secret, 32 bytes ok";
/// The `typ` header of refresh tokens.
pub const REFRESH_TYP: &str = "refresh+jwt";
/// The fingerprint secret of the layer.
pub const FINGERPRINT_SECRET: &[u8] = b"fuzz fingerprint secret, 32 bytes";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The tokens of [`TokenChoice`]'s fixed variants.
pub struct Minted {
    pub valid: String,
    pub valid2: String,
    pub expired: String,
    pub access: String,
}

pub fn minted() -> &'static Minted {
    static MINTED: OnceLock<Minted> = OnceLock::new();
    MINTED.get_or_init(|| {
        let now = now();
        // A day of validity: far longer than any fuzzing run.
        let claims = |sub: &str, exp: i64| json!({"sub": sub, "exp": exp, "iat": now, "jti": format!("fuzz-{sub}")});
        Minted {
            valid: encode(Some(REFRESH_TYP), &claims("alice", now + 86_400)),
            valid2: encode(Some(REFRESH_TYP), &claims("bob", now + 86_400)),
            expired: encode(Some(REFRESH_TYP), &claims("alice", now - 3_600)),
            access: encode(Some("at+jwt"), &claims("alice", now + 86_400)),
        }
    })
}

/// `claims` signed with HS256 and the secret, with header `typ`.
pub fn encode(typ: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = typ.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(SECRET)).expect("encode")
}

/// The HMAC-SHA256 of `input` under the secret, base64url without padding.
pub fn sign(input: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
    mac.update(input);
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// `header.payload` (taken as they are) and its signature.
pub fn signed_segments(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut input = header.to_vec();
    input.push(b'.');
    input.extend_from_slice(payload);
    let signature = sign(&input);
    input.push(b'.');
    input.extend_from_slice(signature.as_bytes());
    input
}

/// Header and payload JSON bytes, base64url-encoded and signed.
pub fn signed_json(header: &[u8], payload: &[u8]) -> String {
    let token = signed_segments(
        URL_SAFE_NO_PAD.encode(header).as_bytes(),
        URL_SAFE_NO_PAD.encode(payload).as_bytes(),
    );
    String::from_utf8(token).expect("base64 is ASCII")
}

/// The verifier of the `front` target: HS256, `typ: refresh+jwt`, every default.
pub fn verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        JwtVerifier::hs256(SECRET)
            .typ(REFRESH_TYP)
            .build()
            .expect("valid verifier configuration")
    })
}

impl TokenChoice {
    /// The token's bytes (not necessarily UTF-8).
    pub fn bytes(&self) -> Vec<u8> {
        let minted = minted();
        match self {
            TokenChoice::Valid => minted.valid.clone().into_bytes(),
            TokenChoice::Valid2 => minted.valid2.clone().into_bytes(),
            TokenChoice::Expired => minted.expired.clone().into_bytes(),
            TokenChoice::Access => minted.access.clone().into_bytes(),
            TokenChoice::Mutated { at, op, bytes } => {
                let mut token = minted.valid.clone().into_bytes();
                let at = usize::from(*at) % (token.len() + 1);
                let bytes = bytes.capped(64);
                match op {
                    Mutation::Overwrite => {
                        for (i, b) in bytes.iter().enumerate() {
                            match token.get_mut(at + i) {
                                Some(slot) => *slot = *b,
                                None => token.push(*b),
                            }
                        }
                    }
                    Mutation::Insert => {
                        token.splice(at..at, bytes.iter().copied());
                    }
                    Mutation::Delete => {
                        let end = (at + bytes.len().max(1)).min(token.len());
                        token.drain(at..end);
                    }
                    Mutation::Truncate => token.truncate(at),
                }
                token
            }
            TokenChoice::Raw(bytes) => bytes.capped(8 * 1024).to_vec(),
        }
    }

    /// The token as text (lossy), for JSON bodies.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}
