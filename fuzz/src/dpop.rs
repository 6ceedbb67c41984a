//! DPoP proofs (RFC 9449) for the `front` target: two fixed keys (the test suite's, from
//! `tests/support/keys`), proofs signed for one request (fresh `jti`, its method and URI,
//! `iat` now), proofs damaged in ways that certainly make them invalid, and the registry of
//! the valid proofs made in one run, by which the model tells what key a proof binds.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey,
    jwk::{Jwk, ThumbprintHash},
};
use serde_json::{Value, json};

use crate::{
    input::{DpopChoice, DpopFault, KeyChoice},
    tokens::now,
};

/// The scheme and authority of every `htu` (the layer's `DpopVerifier` is configured with
/// it: fuzz requests are path-only).
pub const ORIGIN: &str = "https://id.example";

const ES256_A: &[u8] = include_bytes!("../../tests/support/keys/dpop_es256_a.pem");
const ED25519: &[u8] = include_bytes!("../../tests/support/keys/dpop_ed25519.pem");

/// A signing key with its public JWK and RFC 7638 thumbprint, derived once.
pub struct Key {
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    /// Only the public members.
    pub public_jwk: Value,
    /// The JWK with the private member `d` as well (a proof must refuse it).
    pub private_jwk: Value,
    /// base64url SHA-256 (the `jkt` form).
    pub thumbprint: String,
}

fn make(alg: Algorithm, pem: &[u8]) -> Key {
    let encoding = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        _ => EncodingKey::from_ec_pem(pem),
    }
    .expect("a valid test key");
    let jwk = Jwk::from_encoding_key(&encoding, alg).expect("a public jwk");
    let thumbprint = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .expect("a thumbprint");
    let mut public_jwk = serde_json::to_value(&jwk).expect("a jwk serializes");
    if let Value::Object(members) = &mut public_jwk {
        members.retain(|name, _| matches!(name.as_str(), "kty" | "crv" | "x" | "y" | "n" | "e"));
    }
    let mut private_jwk = public_jwk.clone();
    private_jwk["d"] = Value::String(URL_SAFE_NO_PAD.encode([7u8; 32]));
    Key {
        alg,
        encoding,
        public_jwk,
        private_jwk,
        thumbprint,
    }
}

/// Key A (ES256, P-256) and key B (EdDSA, Ed25519).
pub fn key(choice: &KeyChoice) -> &'static Key {
    static KEYS: OnceLock<[Key; 2]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        [
            make(Algorithm::ES256, ES256_A),
            make(Algorithm::EdDSA, ED25519),
        ]
    });
    match choice {
        KeyChoice::A => &keys[0],
        KeyChoice::B => &keys[1],
    }
}

fn segment(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json serializes"))
}

/// `header.claims` signed with `key` (whatever they say).
fn sign(key: &Key, header: &Value, claims: &Value) -> String {
    let message = format!("{}.{}", segment(header), segment(claims));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.alg).expect("signs");
    format!("{message}.{signature}")
}

/// A `jti` never used before in this process.
fn fresh_jti() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("fuzz-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A valid proof by `key` for `method` `htu`, now.
fn valid(key: &Key, method: &str, htu: &str) -> String {
    let header = json!({"typ": "dpop+jwt", "alg": key.alg, "jwk": key.public_jwk});
    let claims = json!({"jti": fresh_jti(), "htm": method, "htu": htu, "iat": now()});
    sign(key, &header, &claims)
}

/// A proof by `key` that `fault` makes invalid for `method` `htu`, whatever else happens.
fn corrupt(key: &Key, other: &Key, fault: &DpopFault, method: &str, htu: &str) -> String {
    let mut header = json!({"typ": "dpop+jwt", "alg": key.alg, "jwk": key.public_jwk});
    let mut claims = json!({"jti": fresh_jti(), "htm": method, "htu": htu, "iat": now()});
    match fault {
        DpopFault::Signature => {
            let proof = sign(key, &header, &claims);
            // A character in the middle of the signature: other signature bytes.
            let (message, signature) = proof.rsplit_once('.').expect("three segments");
            let mut signature = signature.as_bytes().to_vec();
            let at = signature.len() / 2;
            signature[at] = if signature[at] == b'A' { b'B' } else { b'A' };
            return format!("{message}.{}", String::from_utf8(signature).expect("ascii"));
        }
        DpopFault::Method => claims["htm"] = json!(if method == "PATCH" { "GET" } else { "PATCH" }),
        DpopFault::Htu => claims["htu"] = json!(format!("{htu}/x")),
        DpopFault::OtherOrigin => {
            claims["htu"] = json!(htu.replacen(ORIGIN, "https://evil.example", 1))
        }
        DpopFault::OldIat => claims["iat"] = json!(now() - 600),
        DpopFault::FutureIat => claims["iat"] = json!(now() + 600),
        DpopFault::Typ => header["typ"] = json!("jwt"),
        DpopFault::AlgNone => {
            header["alg"] = json!("none");
            return format!("{}.{}.", segment(&header), segment(&claims));
        }
        DpopFault::NoJti => {
            claims.as_object_mut().expect("object").remove("jti");
        }
        DpopFault::EmptyJti => claims["jti"] = json!(""),
        DpopFault::OtherJwk => header["jwk"] = other.public_jwk.clone(),
        DpopFault::PrivateJwk => header["jwk"] = key.private_jwk.clone(),
        DpopFault::NoJwk => {
            header.as_object_mut().expect("object").remove("jwk");
        }
        DpopFault::Truncated => {
            let mut proof = sign(key, &header, &claims);
            proof.truncate(proof.len() - 4);
            return proof;
        }
    }
    sign(key, &header, &claims)
}

/// The proofs made during one run: every valid one, by its text, with the thumbprint of its
/// key, in the order they were made (for replays).
#[derive(Default)]
pub struct Proofs {
    valid: HashMap<String, String>,
    made: Vec<String>,
    /// How many proofs were made for each key, method and URI.
    slots: HashMap<Slot, usize>,
}

/// A proof's key thumbprint, method and URI.
type Slot = (String, String, String);

/// The proof of `slot` and `index` signed less than 20 s ago, or a new one from `sign`.
fn cached(slot: Slot, index: usize, sign: impl FnOnce() -> String) -> String {
    SIGNED.with(|signed| {
        let mut signed = signed.borrow_mut();
        if signed.len() > 4096 {
            signed.clear();
        }
        let now = now();
        match signed.get(&(slot.clone(), index)) {
            Some((proof, iat)) if now - iat < 20 => proof.clone(),
            _ => {
                let proof = sign();
                signed.insert((slot, index), (proof.clone(), now));
                proof
            }
        }
    })
}

thread_local! {
    /// Valid proofs signed by earlier runs, with their `iat`, by slot and rank in the run.
    static SIGNED: RefCell<HashMap<(Slot, usize), (String, i64)>> = RefCell::new(HashMap::new());
}

impl Proofs {
    /// The thumbprint of the key of `proof`, if the harness made it valid; `None` for any
    /// other text (damaged, made up, or a proof of someone else).
    pub fn thumbprint(&self, proof: &str) -> Option<&str> {
        self.valid.get(proof).map(String::as_str)
    }

    fn valid(&mut self, key: &Key, method: &str, htu: &str) -> String {
        // The n-th proof of this run for this key, method and URI: signed once and reused by
        // later runs while its `iat` is recent (each run has a fresh verifier, whose `jti`
        // cache is empty, so that is no replay), since signing costs more than a run.
        let slot = (key.thumbprint.clone(), method.to_owned(), htu.to_owned());
        let n = self.slots.entry(slot.clone()).or_default();
        let index = *n;
        *n += 1;
        let proof = cached(slot, index, || valid(key, method, htu));
        self.valid.insert(proof.clone(), key.thumbprint.clone());
        self.made.push(proof.clone());
        proof
    }

    /// The `DPoP` header values of a request `method` `htu` (path, without the query).
    pub fn values(&mut self, choice: &DpopChoice, method: &str, path: &str) -> Vec<Vec<u8>> {
        let htu = format!("{ORIGIN}{path}");
        match choice {
            DpopChoice::Valid(k) => vec![self.valid(key(k), method, &htu).into_bytes()],
            DpopChoice::Twice(k) => vec![
                self.valid(key(k), method, &htu).into_bytes(),
                self.valid(key(k), method, &htu).into_bytes(),
            ],
            DpopChoice::Corrupt { key: k, fault } => {
                let other = match k {
                    KeyChoice::A => key(&KeyChoice::B),
                    KeyChoice::B => key(&KeyChoice::A),
                };
                // Invalid whatever its jti: signed once per key, fault, method and URI, as
                // valid ones are.
                let slot = (
                    format!("{}/{fault:?}", key(k).thumbprint),
                    method.to_owned(),
                    htu.clone(),
                );
                let proof = cached(slot, 0, || corrupt(key(k), other, fault, method, &htu));
                vec![proof.into_bytes()]
            }
            DpopChoice::Replay(back) => {
                if self.made.is_empty() {
                    return Vec::new();
                }
                let back = usize::from(*back) % self.made.len();
                vec![self.made[self.made.len() - 1 - back].clone().into_bytes()]
            }
            DpopChoice::Raw(bytes) => vec![bytes.capped(4200).to_vec()],
        }
    }
}
