//! [`Claims`]: the claims the verifier reads, and where decoding fails, why.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Parses the payload again, to name the reason for a failure. Used only on the error path,
/// after the signature was checked; it never leads to acceptance.
pub(super) fn unverified_claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The claims the verifier reads. Deserializing never fails on well-formed JSON objects:
/// problems are recorded (`duplicate`, `exp: None`) and judged after decoding.
#[derive(Debug, Default)]
pub(super) struct Claims {
    /// Every top-level claim whose value is a string (`sub`, `iss`, the type claim, ...).
    pub(super) strings: BTreeMap<String, String>,
    /// `exp` as whole seconds, if it is a non-negative number.
    pub(super) exp: Option<u64>,
    /// Every claim name seen.
    pub(super) names: BTreeSet<String>,
    /// A claim name appeared twice; the payload's meaning is ambiguous (RFC 7519 §4).
    pub(super) duplicate: bool,
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClaimsVisitor)
    }
}

struct ClaimsVisitor;

impl<'de> Visitor<'de> for ClaimsVisitor {
    type Value = Claims;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        let mut claims = Claims::default();
        while let Some(name) = map.next_key::<String>()? {
            if claims.names.contains(&name) {
                claims.duplicate = true;
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(value) => {
                    claims.strings.insert(name.clone(), value);
                }
                value if name == "exp" => claims.exp = numeric_date(&value),
                _ => {}
            }
            claims.names.insert(name);
        }
        Ok(claims)
    }
}

/// A NumericDate (RFC 7519 §2) as whole seconds; `None` unless a non-negative number.
pub(crate) fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    let number = value.as_number()?;
    number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|secs| secs.is_finite() && *secs >= 0.0 && *secs < u64::MAX as f64)
            .map(|secs| secs as u64)
    })
}
