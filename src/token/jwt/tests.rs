//! Unit tests of the JWT verifier.

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use jsonwebtoken::EncodingKey;

use super::*;

const SECRET: &[u8] = b"test secret of thirty-two bytes!";
const ISS: &str = "https://auth.example";
const AUD: &str = "refresh-api";
const REFRESH_HEADER: &str = r#"{"alg":"HS256","typ":"refresh+jwt"}"#;

// 2048-bit RSA and P-256 test keys, generated once with openssl for these tests only.
const RSA_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC2lyM/RhqHsY3/
fQUkAcVm+ZlhQWwhA0e+XnBATI8+vJDxrRerF9k3/G3iZv1m1bGVCyK6wIzbk42+
C+EYsPLxMLYCw8gvH7hiUInZp+ieyCM4ptShAynu9FwwVrxwIdn9t9jZZ+xH1GJy
+8L9tqoUUU61SLvcxf8Wm8cKL2oEPxLoIWKrRTTOzboJus1IZlFIZhCqjjp4k8yU
ZTX7yN+s3dPFi6Ynynx51zUBb9eWD8PpxMR/+McI4h/eekZAMrhj0znMrxZtlVgL
II7E1ymt5tvkeGHpfiR160IbWm0L65I0+FejY/Rr6VVE/1uE+Ohu6pfMxsM4ooX1
8MWtl4O/AgMBAAECggEAKACYskYTjeLybyTeuXLB4ruQRORmYh0r3KMoCI49W8tI
HgqEAvHonwFouY9CuQLcMwELjMqekYSUKyzDFfu+XeUEGzr1Yo2agb+PU+Ybap4C
SWkTcGsXBsj2YYi/I/nmnlVm5sqD04DOSM6re5ZHUMg3bDQRJF8kcbmTM8ILgf5I
y8uRaJxMmlJqZbwKpVcnGHISm3imp5WEXu5+oUMdFhQ3VNTLe3BfdE0yRuXVJQ6I
ikzO5pqzFrRGVXRHi7g4RGX3fxKWOYry1GjDYdkTf3DmOxwaFfW12MnUwruPBvDM
QzsFR/cYhqVRcvHhaJ8N5SoyEScd18AikkPTKDMj0QKBgQDeB+QJ4lfaSS2nk9Qj
wKmlcu4niHBggHBMSZcL1+Q09edAHvzxzgx1kmptWgd9N2jnTg55dJB/FU6lnQlI
ildau/ZGVbqk4VL2/dEibRyOAg42gteksKw+BbYurinqJS600l3XX8bR48l2fwvI
qhGp/49+TKxaiGz+ZyHrbKvqjQKBgQDShoOA3O/4hLczzLBGTPk/wcN0WziFxdsK
rdEGcwbATZoD2kL1Py2yYPoNgmQb17jFISBJoO9dbd0z+bgUEaYXN5EkA7OgglxV
JzTTLIl7Gtjv6ODw0fs7p+CtgF5fskkgx/8WaLFqmrS2Jv46xFuy5SxmNzrFI1qu
WStBvLmaewKBgQDGraDtB1E9z0W/MpUd+QTVO+bIEVsdv1C9swwqWOGoUnK/+fq2
FX8opf/+IhWZgr+oWzywihHS5ioeIEtyUfihBJj3jzcY21f2FGHTwHdQy54UQTjd
8gnu5gWD9+0hzGvi+mtmkhnDL2XTVxQgV66+xCSPC+Uejf2aGIdNt0yO8QKBgQC0
sVOJdRha275KrXLWxBZijLJv2iPHXazFm65+tJek0nZQvDMgQBu+sNGuaq3138/t
EqOdzo3kSPnFNJ60Svmdj8n5eVvhdkI9rCsA3YcarE5qjB0VVYUnDM4g3L8jr+ho
RIBDAZTVhPd6KDmowwRZpa3YBathrRiV8F7aS1uapQKBgHiMfo2B5oMQpNxSaFGG
JwgJNi9tGJZdkC8SstbXMopXpBrBve/urg6fAP806eGTE2jMOcUglra/ckTijElK
oyLJr5rzWkt+4+Bi7s0++8kHN0gVbG7NJQ4GKOy+iKEh3Dk/uQUkhmFB4nNuQ7Vo
jfK1OIbvrn4FdbzQVtr+Fi4q
-----END PRIVATE KEY-----
";
const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtpcjP0Yah7GN/30FJAHF
ZvmZYUFsIQNHvl5wQEyPPryQ8a0XqxfZN/xt4mb9ZtWxlQsiusCM25ONvgvhGLDy
8TC2AsPILx+4YlCJ2afonsgjOKbUoQMp7vRcMFa8cCHZ/bfY2WfsR9RicvvC/baq
FFFOtUi73MX/FpvHCi9qBD8S6CFiq0U0zs26CbrNSGZRSGYQqo46eJPMlGU1+8jf
rN3TxYumJ8p8edc1AW/Xlg/D6cTEf/jHCOIf3npGQDK4Y9M5zK8WbZVYCyCOxNcp
rebb5Hhh6X4kdetCG1ptC+uSNPhXo2P0a+lVRP9bhPjobuqXzMbDOKKF9fDFrZeD
vwIDAQAB
-----END PUBLIC KEY-----
";
const EC_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgbPCFZOpRpDbVNt/Q
fgm41der6EgEls2+EYhMF1c33NGhRANCAARDe490f1cMl6ZZOIfp+RR5StCGS4g0
4eWFWFJOiY12nmYzO5uNycHguzq7pmC6slRxxDKRlN+Fvvppz7jlYiUE
-----END PRIVATE KEY-----
";
const EC_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQ3uPdH9XDJemWTiH6fkUeUrQhkuI
NOHlhVhSTomNdp5mMzubjcnB4Ls6u6ZgurJUccQykZTfhb76ac+45WIlBA==
-----END PUBLIC KEY-----
";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Assembles and signs a token by hand, so headers and payloads can be anything.
fn sign_hs256(header: &str, payload: &str, secret: &[u8]) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key");
    mac.update(message.as_bytes());
    format!("{message}.{}", b64(&mac.finalize().into_bytes()))
}

/// Valid refresh claims with `edits` applied; a `null` edit removes the claim.
fn claims(edits: &[(&str, Value)]) -> Value {
    let mut claims = json!({
        "sub": "user-1", "exp": now() + 600, "iss": ISS, "aud": AUD, "token_use": "refresh",
    });
    let map = claims.as_object_mut().expect("an object");
    for (name, value) in edits {
        if value.is_null() {
            map.remove(*name);
        } else {
            map.insert((*name).to_owned(), value.clone());
        }
    }
    claims
}

/// A refresh token (HS256, `typ: refresh+jwt`) with `edits` applied to valid claims.
fn token(edits: &[(&str, Value)]) -> String {
    sign_hs256(REFRESH_HEADER, &claims(edits).to_string(), SECRET)
}

/// A refresh header over a hand-written payload.
fn raw(payload: &str) -> String {
    sign_hs256(REFRESH_HEADER, payload, SECRET)
}

/// Valid claims under another header.
fn with_header(header: &str) -> String {
    sign_hs256(header, &claims(&[]).to_string(), SECRET)
}

/// Valid claims, signed by jsonwebtoken with `key` under `alg` and `typ: refresh+jwt`.
fn encoded(alg: Algorithm, key: &EncodingKey, edits: &[(&str, Value)]) -> String {
    let mut header = Header::new(alg);
    header.typ = Some("refresh+jwt".to_owned());
    jsonwebtoken::encode(&header, &claims(edits), key).expect("encodes")
}

fn hs_verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .typ("refresh+jwt")
        .issuer([ISS])
        .audience([AUD])
        .build()
        .expect("valid configuration")
}

fn claim_verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .claim("token_use", "refresh")
        .build()
        .expect("valid configuration")
}

fn rs_verifier() -> JwtVerifier {
    JwtVerifier::rs256_pem(RSA_PUBLIC_PEM.as_bytes())
        .expect("public key")
        .typ("refresh+jwt")
        .build()
        .expect("valid configuration")
}

fn rs_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("private key")
}

fn reason(result: Result<Verified, Rejected>) -> Option<&'static str> {
    match result.map_err(|err| err.rejection().clone()) {
        Err(Rejection::InvalidToken(reason)) => Some(reason),
        Err(other) => panic!("unexpected rejection {other:?}"),
        Ok(_) => None,
    }
}

fn assert_rejections(verifier: &JwtVerifier, cases: &[(&str, String, &str)]) {
    for (name, token, want) in cases {
        let got = reason(verifier.verify(token));
        assert_eq!(got, Some(*want), "case {name:?}");
    }
}

fn assert_accepted(verifier: &JwtVerifier, cases: &[(&str, String)]) {
    for (name, token) in cases {
        let result = verifier.verify(token);
        assert!(result.is_ok(), "case {name:?}: {result:?}");
    }
}

#[test]
fn a_valid_hs256_refresh_token_is_accepted_with_subject_and_expiry() {
    let exp = now() + 600;
    let verified = hs_verifier()
        .verify(&token(&[("exp", json!(exp))]))
        .expect("valid");
    assert_eq!(verified.subject.as_deref(), Some("user-1"));
    assert_eq!(
        verified.expires_at,
        Some(UNIX_EPOCH + Duration::from_secs(exp + 5))
    );
}

#[test]
fn tokens_within_the_leeway_and_equivalent_typ_forms_are_accepted() {
    let aud_list = json!(["other", AUD]);
    let ok = |typ: &str| with_header(&format!(r#"{{"alg":"HS256","typ":"{typ}"}}"#));
    #[rustfmt::skip]
        let cases = [
            ("expired within leeway", token(&[("exp", json!(now() - 2))])),
            ("nbf within leeway", token(&[("nbf", json!(now() + 2))])),
            ("nbf in the past", token(&[("nbf", json!(now() - 60))])),
            ("fractional exp", token(&[("exp", json!(now() as f64 + 600.5))])),
            ("audience list", token(&[("aud", aud_list)])),
            ("typ with application/ prefix", ok("application/refresh+jwt")),
            ("typ in upper case", ok("REFRESH+JWT")),
            ("prefix in mixed case", ok("Application/Refresh+JWT")),
            ("other claims", token(&[("jti", json!("x")), ("iat", json!(now())), ("x", json!({}))])),
        ];
    assert_accepted(&hs_verifier(), &cases);
}

#[test]
fn hs256_tokens_are_rejected_with_the_exact_reason() {
    let exp = now() + 600;
    let valid = token(&[]);
    let payload = valid.split('.').nth(1).expect("three segments");
    let signature = valid.rsplit('.').next().expect("three segments");
    let none = format!(
        "{}.{payload}.",
        b64(br#"{"alg":"none","typ":"refresh+jwt"}"#)
    );
    let big_none = format!(
        "{}.{payload}.",
        b64(br#"{"alg":"None","typ":"refresh+jwt"}"#)
    );
    let not_json = format!("{}.{payload}.{signature}", b64(b"{not json"));
    let hs512 = encoded(Algorithm::HS512, &EncodingKey::from_secret(SECRET), &[]);
    let wrong_key = sign_hs256(REFRESH_HEADER, &claims(&[]).to_string(), b"another key");
    let crit = r#"{"alg":"HS256","typ":"refresh+jwt","crit":["x"],"x":1}"#;
    let empty_crit = r#"{"alg":"HS256","typ":"refresh+jwt","crit":[]}"#;
    let common = format!(r#""exp":{exp},"iss":"{ISS}","aud":"{AUD}""#);
    let dup_sub = format!(r#"{{"sub":"a","sub":"b",{common}}}"#);
    let escaped_dup_sub = format!(r#"{{"sub":"a","s\u0075b":"b",{common}}}"#);
    let dup_exp = format!(r#"{{"sub":"a","exp":1,{common}}}"#);
    let dup_jti = format!(r#"{{"sub":"a","jti":"1","jti":"2",{common}}}"#);
    let padded = format!("{}{valid}", "A".repeat(5 * 1024 - valid.len()));
    let non_ascii = valid.replacen('.', "é.", 1);
    #[rustfmt::skip]
        let cases = [
            ("alg none", none, "disallowed algorithm"),
            ("alg None", big_none, "disallowed algorithm"),
            ("alg HS512, not pinned", hs512, "disallowed algorithm"),
            ("wrong key", wrong_key, "bad signature"),
            ("expired 30 s ago", token(&[("exp", json!(now() - 30))]), "expired"),
            ("nbf in 30 s", token(&[("nbf", json!(now() + 30))]), "not yet valid"),
            ("missing exp", token(&[("exp", Value::Null)]), "missing expiry"),
            ("string exp", token(&[("exp", json!(exp.to_string()))]), "invalid expiry"),
            ("negative exp", token(&[("exp", json!(-1))]), "invalid expiry"),
            ("exp beyond SystemTime", token(&[("exp", json!(u64::MAX))]), "invalid expiry"),
            ("string nbf", token(&[("nbf", json!("0"))]), "invalid not-before"),
            ("missing sub", token(&[("sub", Value::Null)]), "missing subject"),
            ("numeric sub", token(&[("sub", json!(42))]), "invalid subject"),
            ("empty sub", token(&[("sub", json!(""))]), "empty subject"),
            ("300-byte sub", token(&[("sub", json!("s".repeat(300)))]), "subject too long"),
            ("wrong iss", token(&[("iss", json!("https://evil.example"))]), "wrong issuer"),
            ("missing iss", token(&[("iss", Value::Null)]), "missing issuer"),
            ("wrong aud", token(&[("aud", json!("other-api"))]), "wrong audience"),
            ("missing aud", token(&[("aud", Value::Null)]), "missing audience"),
            ("access token", with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#), "wrong token type"),
            ("typ JWT", with_header(r#"{"alg":"HS256","typ":"JWT"}"#), "wrong token type"),
            ("no typ", with_header(r#"{"alg":"HS256"}"#), "wrong token type"),
            ("unknown crit", with_header(crit), "unsupported critical header"),
            ("empty crit", with_header(empty_crit), "unsupported critical header"),
            ("duplicate sub", raw(&dup_sub), "duplicate claim"),
            ("duplicate sub, escaped", raw(&escaped_dup_sub), "duplicate claim"),
            ("duplicate exp", raw(&dup_exp), "duplicate claim"),
            ("duplicate jti", raw(&dup_jti), "duplicate claim"),
            ("payload not an object", raw("[1]"), "malformed token"),
            ("header not json", not_json, "malformed token"),
            ("garbage", "garbage".to_owned(), "malformed token"),
            ("four segments", format!("{valid}.AAAA"), "malformed token"),
            ("truncated signature", valid[..valid.len() - 10].to_owned(), "malformed token"),
            ("truncated in half", valid[..valid.len() / 2].to_owned(), "malformed token"),
            ("5 KiB token", padded, "token too long"),
            ("non-ASCII", non_ascii, "token has characters outside visible ASCII"),
            ("empty", String::new(), "empty token"),
        ];
    assert_rejections(&hs_verifier(), &cases);
}

#[test]
fn the_claim_rule_rejects_other_token_uses() {
    let exp = now() + 600;
    let dup = format!(r#"{{"sub":"a","exp":{exp},"token_use":"access","token_use":"refresh"}}"#);
    let access = with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#);
    assert_accepted(
        &claim_verifier(),
        &[("token_use refresh, typ at+jwt", access)],
    );
    #[rustfmt::skip]
        let cases = [
            ("token_use access", token(&[("token_use", json!("access"))]), "wrong token type"),
            ("token_use missing", token(&[("token_use", Value::Null)]), "wrong token type"),
            ("token_use not a string", token(&[("token_use", json!(["refresh"]))]), "wrong token type"),
            ("token_use in upper case", token(&[("token_use", json!("REFRESH"))]), "wrong token type"),
            ("duplicate token_use", raw(&dup), "duplicate claim"),
        ];
    assert_rejections(&claim_verifier(), &cases);
}

#[test]
fn rs256_tokens_are_verified_and_key_confusion_is_refused() {
    let valid = encoded(Algorithm::RS256, &rs_key(), &[]);
    let verified = rs_verifier().verify(&valid).expect("valid");
    assert_eq!(verified.subject.as_deref(), Some("user-1"));

    // HS256 "signed" with the RSA public key as the HMAC secret.
    let confused = sign_hs256(
        REFRESH_HEADER,
        &claims(&[]).to_string(),
        RSA_PUBLIC_PEM.as_bytes(),
    );
    let (head, rest) = valid.split_once('.').expect("three segments");
    let signature = valid.rsplit('.').next().expect("three segments");
    let admin = claims(&[("sub", json!("admin"))]).to_string();
    let tampered = format!("{head}.{}.{signature}", b64(admin.as_bytes()));
    let ps256 = format!("{}.{rest}", b64(br#"{"alg":"PS256","typ":"refresh+jwt"}"#));
    let expired = encoded(Algorithm::RS256, &rs_key(), &[("exp", json!(now() - 60))]);
    #[rustfmt::skip]
        let cases = [
            ("key confusion", confused, "disallowed algorithm"),
            ("tampered payload", tampered, "bad signature"),
            ("alg PS256, not pinned", ps256, "disallowed algorithm"),
            ("expired", expired, "expired"),
        ];
    assert_rejections(&rs_verifier(), &cases);
}

#[test]
fn es256_tokens_are_verified() {
    let key = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("private key");
    let verifier = JwtVerifier::es256_pem(EC_PUBLIC_PEM.as_bytes())
        .expect("public key")
        .typ("refresh+jwt")
        .build()
        .expect("valid configuration");
    let verified = verifier
        .verify(&encoded(Algorithm::ES256, &key, &[]))
        .expect("valid");
    assert_eq!(verified.subject.as_deref(), Some("user-1"));
    let hs = token(&[]);
    assert_eq!(reason(verifier.verify(&hs)), Some("disallowed algorithm"));
}

#[test]
fn any_token_type_accepts_access_tokens_when_asked_to() {
    let verifier = JwtVerifier::hs256(SECRET)
        .any_token_type()
        .build()
        .expect("valid");
    assert_eq!(verifier.token_type(), &TokenType::Any);
    let access = with_header(r#"{"alg":"HS256","typ":"at+jwt"}"#);
    assert!(verifier.verify(&access).is_ok());
}

#[test]
fn build_without_a_token_type_rule_fails() {
    let err = JwtVerifier::hs256(SECRET)
        .build()
        .expect_err("no type rule");
    assert_eq!(err, ConfigError::NoTokenType);
    assert!(err.to_string().starts_with("no token type rule"));
}

#[test]
fn build_refuses_algorithms_that_do_not_fit_the_key() {
    let hmac = || DecodingKey::from_secret(SECRET);
    let rsa = DecodingKey::from_rsa_pem(RSA_PUBLIC_PEM.as_bytes()).expect("public key");
    #[rustfmt::skip]
        let cases = [
            (JwtVerifier::builder(hmac(), []), ConfigError::NoAlgorithms),
            (JwtVerifier::builder(hmac(), [Algorithm::HS256, Algorithm::RS256]), ConfigError::AlgorithmMismatch),
            (JwtVerifier::builder(rsa, [Algorithm::HS256]), ConfigError::AlgorithmMismatch),
        ];
    for (builder, want) in cases {
        assert_eq!(builder.any_token_type().build().expect_err("refused"), want);
    }
}

#[test]
fn build_refuses_settings_that_cannot_work() {
    let base = || JwtVerifier::hs256(SECRET).typ("refresh+jwt");
    #[rustfmt::skip]
        let cases = [
            (base().typ(""), "typ is empty"),
            (base().typ("application/"), "typ is empty"),
            (base().claim("", "refresh"), "token type claim is empty"),
            (base().claim("token_use", ""), "token type claim is empty"),
            (JwtVerifier::hs256(b"").any_token_type(), "hmac secret is empty"),
            (base().issuer(Vec::<String>::new()), "issuer list is empty"),
            (base().audience([""]), "audience list is empty"),
            (base().leeway(Duration::from_secs(3601)), "leeway is over an hour"),
            (base().max_len(0), "max_len is zero"),
            (base().max_subject_len(0), "max_subject_len is zero"),
        ];
    for (builder, want) in cases {
        let err = builder.build().expect_err(want);
        assert_eq!(err, ConfigError::InvalidSetting(want));
    }
}

#[test]
fn settings_change_what_is_accepted() {
    let verifier = JwtVerifier::hs256(SECRET)
        .typ("application/refresh+jwt")
        .leeway(Duration::ZERO)
        .max_subject_len(4)
        .build()
        .expect("valid");
    assert_eq!(
        verifier.token_type(),
        &TokenType::Header("refresh+jwt".to_owned())
    );
    assert_rejections(
        &verifier,
        &[
            (
                "expired a second ago",
                token(&[("exp", json!(now() - 1))]),
                "expired",
            ),
            (
                "5-byte sub",
                token(&[("sub", json!("user1"))]),
                "subject too long",
            ),
        ],
    );
    let valid = token(&[]);
    let short = JwtVerifier::hs256(SECRET)
        .typ("refresh+jwt")
        .max_len(valid.len() - 1);
    let short = short.build().expect("valid");
    assert_eq!(reason(short.verify(&valid)), Some("token too long"));
}

#[test]
fn bad_pem_keys_are_config_errors_with_a_source() {
    let err = JwtVerifier::rs256_pem(b"not a pem").expect_err("garbage");
    assert!(matches!(err, ConfigError::Key(_)));
    assert!(err.source().is_some());
    assert!(JwtVerifier::es256_pem(RSA_PUBLIC_PEM.as_bytes()).is_err());
}

#[test]
fn the_crypto_backend_passes_its_self_test() {
    assert_eq!(self_test(), Ok(()));
    let err = ConfigError::CryptoBackend(Some(JwtError::from(ErrorKind::InvalidSignature)));
    assert!(err.source().is_some());
    assert!(
        err.to_string()
            .starts_with("jsonwebtoken has no usable crypto backend")
    );
}

#[test]
fn debug_output_redacts_the_key() {
    let secret = "a very recognisable secret value";
    let verifier = JwtVerifier::hs256(secret).typ("refresh+jwt");
    let shown = format!(
        "{verifier:?} {:?}",
        verifier.clone().build().expect("valid")
    );
    assert!(!shown.contains(secret));
    assert!(!shown.contains(&format!("{:?}", secret.as_bytes())[1..20]));
    assert!(shown.contains("<redacted Hmac key>"));
}
