//! The `token` harness: `JwtVerifier::verify` on arbitrary and on signed, fuzzer-shaped
//! tokens, judged by an independent oracle; and the layer's extraction alone.

use std::time::{Duration, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use tower_refresh_coalesce::{Verified, Verify, error::Rejection};

use crate::{
    front,
    input::{AlgChoice, ClaimsSpec, DuplicateChoice, TokenInput, TypChoice, ValueChoice},
    tokens::{self, now, signed_json, signed_segments},
};

/// Slack for the clock moving between minting, verifying and judging, in seconds.
const SLACK: f64 = 2.0;
/// The verifier's defaults.
const LEEWAY: u64 = 5;
const MAX_SUBJECT: usize = 256;
const MAX_TOKEN: usize = 4096;

pub fn run_token(input: &TokenInput) {
    match input {
        TokenInput::Verify(bytes) => {
            let _ = judge(&String::from_utf8_lossy(bytes.capped(8 * 1024)));
        }
        TokenInput::Choice { token, pad } => {
            let mut token = token.text();
            let pad = usize::from(*pad) % 6000;
            if pad % 2 == 0 {
                token.insert_str(0, &"A".repeat(pad));
            } else {
                token.push_str(&"A".repeat(pad));
            }
            let _ = judge(&token);
        }
        TokenInput::SignJson { header, payload } => {
            let _ = judge(&signed_json(header.capped(1024), payload.capped(4096)));
        }
        TokenInput::SignSegments { header, payload } => {
            let token = signed_segments(header.capped(1024), payload.capped(4096));
            let _ = judge(&String::from_utf8_lossy(&token));
        }
        TokenInput::Claims(spec) => {
            let (header, payload, clean) = render(spec);
            let token = signed_json(header.as_bytes(), payload.as_bytes());
            let result = judge(&token);
            if clean {
                assert!(
                    result.is_ok(),
                    "a well-formed refresh token was refused: {result:?}\n header {header}\n \
                     payload {payload}"
                );
            }
        }
        TokenInput::Extract(req) => front::run_extract(req),
    }
}

/// Verifies `token`; if the verifier accepts it, the oracle must agree.
fn judge(token: &str) -> Result<Verified, String> {
    let result = tokens::verifier().verify(token);
    match result {
        Ok(verified) => {
            if let Err(why) = oracle(token, &verified) {
                panic!("the verifier accepted a token the oracle refuses ({why}): {token:?}");
            }
            Ok(verified)
        }
        Err(rejected) => {
            // A refusal of the token is `invalid_grant` (401), never a malformed request or
            // an overload; and it never carries the token. The reasons are static texts
            // without a '.', so a token with one cannot appear in them by chance.
            assert!(
                matches!(
                    rejected.rejection(),
                    Rejection::InvalidToken(_) | Rejection::Expired
                ),
                "verify refused with {:?}",
                rejected.rejection()
            );
            let text = rejected.to_string();
            assert!(
                !(token.contains('.') && text.contains(token)),
                "rejection echoes the token: {text}"
            );
            Err(text)
        }
    }
}

/// What an accepted token must be: at most 4 KiB of visible ASCII, three segments, signed
/// with the secret over its exact first two segments, header `alg: HS256` and
/// `typ: [application/]refresh+jwt` without `crit`, a payload object without duplicate
/// members, a non-empty `sub` of at most 256 bytes, a numeric `exp` not past (with the 5 s
/// leeway) and a numeric `nbf`, if any, not in the future. `Verified` reports `sub` and
/// `exp` + leeway.
fn oracle(token: &str, verified: &Verified) -> Result<(), String> {
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(format!("length {}", token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("not visible ASCII".into());
    }
    let segments: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = segments[..] else {
        return Err(format!("{} segments", segments.len()));
    };
    let expected = tokens::sign(format!("{header}.{payload}").as_bytes());
    if signature != expected {
        return Err("signature is not the secret's HMAC of the signing input".into());
    }

    let header = decode_segment(header, "header")?;
    let header_json: Value =
        serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let Value::Object(header_json) = header_json else {
        return Err("header is not an object".into());
    };
    let repeated = repeated_members(&header)?;
    if let Some(name) = repeated
        .iter()
        .find(|n| ["alg", "typ", "crit"].contains(&n.as_str()))
    {
        return Err(format!("header member {name:?} repeated"));
    }
    if header_json.get("alg") != Some(&Value::from("HS256")) {
        return Err(format!("alg {:?}", header_json.get("alg")));
    }
    let typ_ok = header_json
        .get("typ")
        .and_then(Value::as_str)
        .is_some_and(|typ| {
            let typ = match typ.get(..12) {
                Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
                _ => typ,
            };
            typ.eq_ignore_ascii_case(tokens::REFRESH_TYP)
        });
    if !typ_ok {
        return Err(format!("typ {:?}", header_json.get("typ")));
    }
    if header_json.get("crit").is_some_and(|c| !c.is_null()) {
        return Err("crit present".into());
    }

    let payload = decode_segment(payload, "payload")?;
    let claims: Value =
        serde_json::from_slice(&payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let Value::Object(claims) = claims else {
        return Err("payload is not an object".into());
    };
    let repeated = repeated_members(&payload)?;
    if !repeated.is_empty() {
        return Err(format!("claims repeated: {repeated:?}"));
    }
    let sub = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() && sub.len() <= MAX_SUBJECT => sub,
        other => return Err(format!("sub {other:?}")),
    };
    if verified.subject.as_deref() != Some(sub.as_str()) {
        return Err(format!(
            "reported subject {:?}, sub {sub:?}",
            verified.subject
        ));
    }
    let now = now() as f64;
    let exp = match claims.get("exp") {
        Some(Value::Number(n)) => n.as_f64().filter(|e| e.is_finite() && *e >= 0.0),
        _ => None,
    };
    let Some(exp) = exp else {
        return Err(format!("exp {:?}", claims.get("exp")));
    };
    if exp + LEEWAY as f64 + SLACK < now {
        return Err(format!("expired: exp {exp}, now {now}"));
    }
    let exp_secs = claims["exp"].as_u64().unwrap_or(exp as u64);
    let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(exp_secs.saturating_add(LEEWAY)));
    if verified.expires_at != expires_at {
        return Err(format!(
            "reported expiry {:?}, exp {exp_secs} + {LEEWAY} s",
            verified.expires_at
        ));
    }
    match claims.get("nbf") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            let nbf = n.as_f64().unwrap_or(f64::INFINITY);
            if nbf > now + LEEWAY as f64 + SLACK {
                return Err(format!("not yet valid: nbf {nbf}, now {now}"));
            }
        }
        Some(other) => return Err(format!("nbf {other}")),
    }
    Ok(())
}

fn decode_segment(segment: &str, what: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| format!("{what} is not canonical base64url: {e}"))
}

/// The names that appear more than once among the members of the JSON object `json`
/// (compared after unescaping).
fn repeated_members(json: &[u8]) -> Result<Vec<String>, String> {
    struct Names;
    impl<'de> Visitor<'de> for Names {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut seen = std::collections::BTreeSet::new();
            let mut repeated = Vec::new();
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(name.clone()) {
                    repeated.push(name);
                }
            }
            Ok(repeated)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let names = (&mut deserializer)
        .deserialize_map(Names)
        .map_err(|e: serde_json::Error| format!("not an object: {e}"))?;
    deserializer
        .end()
        .map_err(|e| format!("trailing data: {e}"))?;
    Ok(names)
}

/// The JSON text of `value`.
fn value_json(value: &ValueChoice, now: i64) -> String {
    match value {
        ValueChoice::FromNow(s) => (now + i64::from(*s)).to_string(),
        ValueChoice::FromNowFloat(s) => format!("{}.5", now + i64::from(*s)),
        ValueChoice::Int(i) => i.to_string(),
        ValueChoice::Float(bits) => {
            let f = f64::from_bits(*bits);
            if f.is_finite() {
                serde_json::to_string(&f).expect("a finite float")
            } else {
                "null".into()
            }
        }
        ValueChoice::Str(b) => {
            serde_json::to_string(&String::from_utf8_lossy(b.capped(512))).expect("a string")
        }
        ValueChoice::Bool(b) => b.to_string(),
        ValueChoice::Null => "null".into(),
        ValueChoice::Array => "[1]".into(),
        ValueChoice::Object => "{}".into(),
        ValueChoice::Raw(b) => String::from_utf8_lossy(b.capped(256)).into_owned(),
    }
}

/// Header and payload JSON for `spec`, and whether the token is one the verifier must
/// accept.
fn render(spec: &ClaimsSpec) -> (String, String, bool) {
    let now = now();
    let mut clean = true;
    let mut header = Vec::new();
    match &spec.alg {
        AlgChoice::Hs256 => header.push(r#""alg":"HS256""#.to_owned()),
        AlgChoice::Hs384 => header.push(r#""alg":"HS384""#.to_owned()),
        AlgChoice::None => header.push(r#""alg":"none""#.to_owned()),
        AlgChoice::Raw(b) => header.push(format!(
            r#""alg":{}"#,
            serde_json::to_string(&String::from_utf8_lossy(b.capped(32))).expect("string")
        )),
        AlgChoice::Missing => {}
    }
    clean &= spec.alg == AlgChoice::Hs256;
    let typ = match &spec.typ {
        TypChoice::Refresh => Some("refresh+jwt".to_owned()),
        TypChoice::ApplicationRefresh => Some("application/refresh+jwt".to_owned()),
        TypChoice::Upper => Some("REFRESH+JWT".to_owned()),
        TypChoice::Access => Some("at+jwt".to_owned()),
        TypChoice::Jwt => Some("JWT".to_owned()),
        TypChoice::Raw(b) => Some(String::from_utf8_lossy(b.capped(64)).into_owned()),
        TypChoice::Missing => None,
    };
    clean &= matches!(
        spec.typ,
        TypChoice::Refresh | TypChoice::ApplicationRefresh | TypChoice::Upper
    );
    if let Some(typ) = typ {
        header.push(format!(
            r#""typ":{}"#,
            serde_json::to_string(&typ).expect("string")
        ));
    }
    if let Some(crit) = &spec.crit {
        header.push(format!(r#""crit":{}"#, value_json(crit, now)));
        clean = false;
    }

    let mut members: Vec<(String, String)> = Vec::new();
    if let Some(sub) = &spec.sub {
        members.push(("sub".into(), value_json(sub, now)));
        clean &= matches!(sub, ValueChoice::Str(b)
            if !b.0.is_empty() && b.0.len() <= MAX_SUBJECT && std::str::from_utf8(&b.0).is_ok());
    } else {
        clean = false;
    }
    if let Some(exp) = &spec.exp {
        members.push(("exp".into(), value_json(exp, now)));
        clean &= matches!(exp, ValueChoice::FromNow(s) if (60..10_000_000).contains(s));
    } else {
        clean = false;
    }
    if let Some(nbf) = &spec.nbf {
        members.push(("nbf".into(), value_json(nbf, now)));
        // A negative NumericDate (before 1970) is refused by jsonwebtoken; harmless.
        clean &= matches!(nbf, ValueChoice::FromNow(s) if *s <= -60 && now + i64::from(*s) >= 0);
    }
    const RESERVED: [&str; 7] = ["sub", "exp", "nbf", "iat", "iss", "aud", "jti"];
    for (name, value) in spec.extra.iter().take(8) {
        let name = String::from_utf8_lossy(name.capped(32)).into_owned();
        clean &= !RESERVED.contains(&name.as_str())
            && !members.iter().any(|(n, _)| *n == name)
            && !matches!(value, ValueChoice::Raw(_));
        members.push((name, value_json(value, now)));
    }
    let mut payload: Vec<String> = members
        .iter()
        .map(|(n, v)| format!("{}:{v}", serde_json::to_string(n).expect("string")))
        .collect();
    if let Some(duplicate) = &spec.duplicate
        && !members.is_empty()
    {
        clean = false;
        let (i, escaped) = match duplicate {
            DuplicateChoice::Plain(i) => (*i, false),
            DuplicateChoice::Escaped(i) => (*i, true),
        };
        let (name, value) = &members[usize::from(i) % members.len()];
        let name = if escaped && !name.is_empty() {
            let mut chars = name.chars();
            let first = chars.next().expect("non-empty");
            let rest = serde_json::to_string(chars.as_str()).expect("string");
            format!("\"\\u{:04x}{}", u32::from(first).min(0xffff), &rest[1..])
        } else {
            serde_json::to_string(name).expect("string")
        };
        payload.push(format!("{name}:{value}"));
    }
    (
        format!("{{{}}}", header.join(",")),
        format!("{{{}}}", payload.join(",")),
        clean,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Blob;

    #[test]
    fn a_clean_spec_is_accepted_and_a_duplicate_refused() {
        let mut spec = ClaimsSpec {
            alg: AlgChoice::Hs256,
            typ: TypChoice::ApplicationRefresh,
            crit: None,
            sub: Some(ValueChoice::Str(Blob::from("alice"))),
            exp: Some(ValueChoice::FromNow(600)),
            nbf: Some(ValueChoice::FromNow(-600)),
            duplicate: None,
            extra: vec![(Blob::from("x"), ValueChoice::Object)],
        };
        let (h, p, clean) = render(&spec);
        assert!(clean);
        assert!(judge(&signed_json(h.as_bytes(), p.as_bytes())).is_ok());
        spec.duplicate = Some(DuplicateChoice::Escaped(0));
        let (h, p, clean) = render(&spec);
        assert!(!clean);
        assert!(p.contains(r#""\u0073ub""#), "{p}");
        assert!(judge(&signed_json(h.as_bytes(), p.as_bytes())).is_err());
    }

    #[test]
    fn the_oracle_refuses_what_the_verifier_must_refuse() {
        let minted = tokens::minted();
        let verified = tokens::verifier().verify(&minted.valid).expect("valid");
        assert_eq!(oracle(&minted.valid, &verified), Ok(()));
        assert!(oracle(&minted.access, &verified).is_err());
        assert!(oracle(&minted.expired, &verified).is_err());
        assert!(
            oracle(&minted.valid2, &verified).is_err(),
            "another subject"
        );
    }
}

#[cfg(test)]
mod malleability {
    use super::*;

    /// Only the canonical encoding of the signature is accepted: changing the unused low
    /// bits of its last character (or padding it) makes another string, which is refused.
    #[test]
    fn only_the_canonical_signature_encoding_verifies() {
        let valid = &tokens::minted().valid;
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let (head, last) = valid.split_at(valid.len() - 1);
        let mut accepted = Vec::new();
        for c in alphabet.chars() {
            let token = format!("{head}{c}");
            if tokens::verifier().verify(&token).is_ok() {
                accepted.push(c);
            }
        }
        assert_eq!(accepted, vec![last.chars().next().unwrap()]);
        for suffix in ["=", "==", "A"] {
            assert!(
                tokens::verifier()
                    .verify(&format!("{valid}{suffix}"))
                    .is_err(),
                "{suffix}"
            );
        }
    }
}
