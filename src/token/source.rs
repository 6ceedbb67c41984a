//! Where a refresh token is found in an HTTP request.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{AUTHORIZATION, CONTENT_TYPE, COOKIE},
};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::error::{Rejected, Rejection};

/// One place a refresh token may travel in a request.
///
/// Sources are tried in the configured order. A request that carries two *different* tokens
/// (say a cookie and a JSON field) is refused with `400 invalid_request`, because the layer
/// and the inner service might otherwise act on different tokens (RFC 6750 §2 allows one
/// method per request).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (RFC 6750 §2.1). `Authorization: Basic` is client
    /// authentication (RFC 6749 §2.3.1) and never a token.
    Bearer,
    /// The cookie with this name.
    Cookie(String),
    /// The string field with this name of a JSON object body (`application/json`).
    Json(String),
    /// An `application/x-www-form-urlencoded` body with `grant_type=refresh_token` and the
    /// token in `refresh_token` (RFC 6749 §6). A form with another `grant_type` is not a
    /// refresh and passes through uncoalesced.
    Form,
    /// The request header (gRPC metadata entry) with this name; a `Bearer ` prefix is
    /// stripped.
    Metadata(HeaderName),
}

impl TokenSource {
    /// `Authorization: Bearer`.
    pub fn bearer() -> Self {
        Self::Bearer
    }

    /// The cookie `name` (the usual one is `refresh_token`).
    pub fn cookie(name: impl Into<String>) -> Self {
        Self::Cookie(name.into())
    }

    /// The JSON body field `field` (the usual one is `refresh_token`).
    pub fn json(field: impl Into<String>) -> Self {
        Self::Json(field.into())
    }

    /// The RFC 6749 §6 form body.
    pub fn form() -> Self {
        Self::Form
    }

    /// The gRPC metadata entry `name` (lowercase ASCII, for example `x-refresh-token`).
    pub fn metadata(name: HeaderName) -> Self {
        Self::Metadata(name)
    }

    /// The default sources, in order: Bearer, the cookie `refresh_token`, the JSON field
    /// `refresh_token`, and the RFC 6749 form.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::Bearer,
            Self::cookie("refresh_token"),
            Self::json("refresh_token"),
            Self::Form,
        ]
    }

    pub(crate) fn reads_body(&self) -> bool {
        matches!(self, Self::Json(_) | Self::Form)
    }
}

/// The media type of a body, as far as token sources care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    Form,
    Other,
}

pub(crate) fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or("").trim();
    Some(
        if essence.eq_ignore_ascii_case("application/json")
            || essence
                .get(essence.len().saturating_sub(5)..)
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json"))
        {
            BodyKind::Json
        } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            BodyKind::Form
        } else {
            BodyKind::Other
        },
    )
}

/// How a client authenticated itself in one request (RFC 6749 §2.3, RFC 7523 §2.2).
///
/// Everything here goes into the request's key: two requests share an answer only if the
/// inner service would authenticate both the same way.
#[derive(Default, Clone, PartialEq, Eq)]
pub(crate) struct Client {
    /// The client id, from `Authorization: Basic` or a form or JSON `client_id`.
    pub(crate) id: Option<String>,
    /// The client's credential, if it sent one.
    pub(crate) credential: Credential,
}

/// A client credential as it was presented.
#[derive(Default, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// None: a public client (its token is its only credential).
    #[default]
    None,
    /// A client secret, by Basic or as `client_secret`.
    Secret(String),
    /// A client assertion (RFC 7523): its type and the assertion itself.
    Assertion { kind: String, assertion: String },
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credential = match self.credential {
            Credential::None => "none",
            Credential::Secret(_) => "secret",
            Credential::Assertion { .. } => "assertion",
        };
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("credential", &credential)
            .finish()
    }
}

/// What the sources found in one request.
#[derive(Default)]
pub(crate) struct Found {
    /// The token, if any source held one.
    pub(crate) token: Option<String>,
    /// The client and its authentication.
    pub(crate) client: Client,
    /// The form named another grant type: not a refresh.
    pub(crate) other_grant: bool,
}

impl fmt::Debug for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Found")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client", &self.client)
            .field("other_grant", &self.other_grant)
            .finish()
    }
}

impl Found {
    fn token(&mut self, token: String) -> Result<(), Rejected> {
        match &self.token {
            Some(existing) if *existing != token => {
                Err(malformed("more than one token in the request"))
            }
            Some(_) => Ok(()),
            None => {
                self.token = Some(token);
                Ok(())
            }
        }
    }

    fn client_id(&mut self, client: String) -> Result<(), Rejected> {
        match &self.client.id {
            Some(existing) if *existing != client => {
                Err(malformed("more than one client id in the request"))
            }
            Some(_) => Ok(()),
            None => {
                self.client.id = Some(client);
                Ok(())
            }
        }
    }

    /// RFC 6749 §2.3: a client must not use more than one authentication method in a
    /// request, not even the same secret twice (an inner service may refuse it).
    fn credential(&mut self, credential: Credential) -> Result<(), Rejected> {
        if self.client.credential != Credential::None {
            return Err(malformed(
                "more than one client authentication in the request",
            ));
        }
        self.client.credential = credential;
        Ok(())
    }

    /// The client parameters of a form or JSON body.
    fn client_params(&mut self, params: ClientParams) -> Result<(), Rejected> {
        if let Some(id) = params.id.filter(|id| !id.is_empty()) {
            self.client_id(id)?;
        }
        if let Some(secret) = params.secret {
            self.credential(Credential::Secret(secret))?;
        }
        match (params.assertion_type, params.assertion) {
            (None, None) => {}
            (Some(kind), Some(assertion)) if !kind.is_empty() && !assertion.is_empty() => {
                self.credential(Credential::Assertion { kind, assertion })?;
            }
            _ => {
                return Err(malformed(
                    "client_assertion and client_assertion_type go together",
                ));
            }
        }
        Ok(())
    }
}

/// The client parameters a form or JSON body may carry.
#[derive(Default)]
struct ClientParams {
    id: Option<String>,
    secret: Option<String>,
    assertion_type: Option<String>,
    assertion: Option<String>,
}

/// The body members that carry client authentication.
const CLIENT_FIELDS: [&str; 4] = [
    "client_id",
    "client_secret",
    "client_assertion_type",
    "client_assertion",
];

impl ClientParams {
    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "client_id" => &mut self.id,
            "client_secret" => &mut self.secret,
            "client_assertion_type" => &mut self.assertion_type,
            "client_assertion" => &mut self.assertion,
            _ => return None,
        })
    }
}

fn malformed(why: &'static str) -> Rejected {
    Rejected::new(Rejection::Malformed(why))
}

/// Looks for the token in `headers` and, if given, in `body` of media type `kind`.
pub(crate) fn find(
    sources: &[TokenSource],
    headers: &HeaderMap,
    body: Option<(&Bytes, BodyKind)>,
) -> Result<Found, Rejected> {
    let mut found = Found::default();
    let authorization = authorization(headers)?;
    if let Some(Authorization::Basic { id, secret }) = &authorization {
        found.client_id(id.clone())?;
        found.credential(Credential::Secret(secret.clone()))?;
    }
    if let Some((body, BodyKind::Json)) = body {
        json_body(body, sources, &mut found)?;
    }
    for source in sources {
        match source {
            TokenSource::Bearer => {
                if let Some(Authorization::Bearer(token)) = &authorization {
                    found.token(token.clone())?;
                }
            }
            TokenSource::Cookie(name) => {
                if let Some(token) = cookie(headers, name)? {
                    found.token(token)?;
                }
            }
            TokenSource::Metadata(name) => {
                if let Some(token) = metadata(headers, name)? {
                    found.token(token)?;
                }
            }
            // Read with the whole JSON body, above.
            TokenSource::Json(_) => {}
            TokenSource::Form => {
                if let Some((body, BodyKind::Form)) = body {
                    form(body, &mut found)?;
                }
            }
        }
    }
    Ok(found)
}

enum Authorization {
    Bearer(String),
    Basic { id: String, secret: String },
    Other,
}

fn authorization(headers: &HeaderMap) -> Result<Option<Authorization>, Rejected> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed("more than one authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| malformed("authorization header is not visible ASCII"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let credentials = rest.trim_start_matches(' ');
    if scheme.eq_ignore_ascii_case("bearer") {
        if credentials.is_empty() || credentials.contains(' ') {
            return Err(malformed("malformed bearer credentials"));
        }
        Ok(Some(Authorization::Bearer(credentials.to_owned())))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let (id, secret) = basic(credentials)?;
        Ok(Some(Authorization::Basic { id, secret }))
    } else {
        Ok(Some(Authorization::Other))
    }
}

/// The client id and secret of `Authorization: Basic` credentials, each of which RFC 6749
/// §2.3.1 encodes with `application/x-www-form-urlencoded` before base64.
fn basic(credentials: &str) -> Result<(String, String), Rejected> {
    let invalid = || malformed("malformed basic credentials");
    let decoded = STANDARD.decode(credentials).map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let (user, password) = decoded.split_once(':').ok_or_else(invalid)?;
    let decode = |part: &str| -> Result<String, Rejected> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(&format!("v={part}")).map_err(|_| invalid())?;
        Ok(pairs.into_iter().next().map(|(_, v)| v).unwrap_or_default())
    };
    let user = decode(user)?;
    if user.is_empty() {
        return Err(invalid());
    }
    Ok((user, decode(password)?))
}

fn cookie(headers: &HeaderMap, name: &str) -> Result<Option<String>, Rejected> {
    let mut found: Option<String> = None;
    for header in headers.get_all(COOKIE) {
        let Ok(header) = header.to_str() else {
            return Err(malformed("cookie header is not visible ASCII"));
        };
        for cookie in cookie::Cookie::split_parse(header).flatten() {
            if cookie.name() != name || cookie.value().is_empty() {
                continue;
            }
            match &found {
                Some(existing) if existing != cookie.value() => {
                    return Err(malformed("more than one token in the request"));
                }
                Some(_) => {}
                None => found = Some(cookie.value().to_owned()),
            }
        }
    }
    Ok(found)
}

fn metadata(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, Rejected> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed("more than one token in the request"));
    }
    let value = visible(value).ok_or_else(|| malformed("token metadata is not visible ASCII"))?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim_start(),
        _ => value,
    };
    Ok((!token.is_empty()).then(|| token.to_owned()))
}

fn visible(value: &HeaderValue) -> Option<&str> {
    value.to_str().ok().map(str::trim)
}

/// The token fields of the configured JSON sources and the client parameters of a JSON
/// object body. A repeated member among them is refused (two parsers could otherwise pick
/// different ones), and so is one that is not a string. The whole body must be JSON as RFC
/// 8259 defines it (UTF-8, no lone surrogate escapes, numbers in range), as a strict parser
/// behind the layer reads it: a body the layer accepts is one every parser accepts.
fn json_body(body: &Bytes, sources: &[TokenSource], found: &mut Found) -> Result<(), Rejected> {
    let fields: Vec<&str> = sources
        .iter()
        .filter_map(|source| match source {
            TokenSource::Json(field) => Some(field.as_str()),
            _ => None,
        })
        .collect();
    let text = std::str::from_utf8(body).map_err(|_| malformed("the JSON body is not UTF-8"))?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let members = FieldSeed { fields: &fields }
        .deserialize(&mut deserializer)
        .map_err(|_| malformed("body is not a JSON object with string token and client members"))?;
    deserializer
        .end()
        .map_err(|_| malformed("trailing data after the JSON body"))?;
    let mut params = ClientParams::default();
    for (name, value) in members {
        if let Some(slot) = params.slot(name) {
            *slot = Some(value);
        } else if !value.is_empty() {
            found.token(value)?;
        }
    }
    found.client_params(params)
}

/// Reads the string members named `fields` or [`CLIENT_FIELDS`] of a JSON object.
struct FieldSeed<'f> {
    fields: &'f [&'f str],
}

impl<'f> FieldSeed<'f> {
    fn wanted(&self, key: &str) -> Option<&'f str> {
        self.fields
            .iter()
            .chain(CLIENT_FIELDS.iter())
            .find(|field| **field == key)
            .copied()
    }
}

impl<'de, 'f> DeserializeSeed<'de> for FieldSeed<'f> {
    type Value = Vec<(&'f str, String)>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, 'f> Visitor<'de> for FieldSeed<'f> {
    type Value = Vec<(&'f str, String)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(&'f str, String)> = Vec::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match self.wanted(&key) {
                Some(name) => {
                    if members.iter().any(|(seen, _)| *seen == name) {
                        return Err(de::Error::custom("repeated member"));
                    }
                    members.push((name, map.next_value::<String>()?));
                }
                None => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(members)
    }
}

/// Any JSON value, read and dropped. Unlike `IgnoredAny`, strings are decoded (serde_json
/// skips an ignored string without checking its escapes) and numbers converted, so that a
/// value a strict parser refuses is refused here too.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map
            .next_entry::<std::borrow::Cow<'de, str>, Checked>()?
            .is_some()
        {}
        Ok(Checked)
    }
}

/// An RFC 6749 §6 refresh request: `grant_type=refresh_token`, `refresh_token`, and the
/// client's `client_id`, `client_secret` or `client_assertion` (RFC 7523). Parameters must
/// not repeat (RFC 6749 §3.2).
fn form(body: &Bytes, found: &mut Found) -> Result<(), Rejected> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|_| malformed("malformed form body"))?;
    let mut grant_type = None;
    let mut token = None;
    let mut params = ClientParams::default();
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "grant_type" => &mut grant_type,
            "refresh_token" => &mut token,
            other => match params.slot(other) {
                Some(slot) => slot,
                None => continue,
            },
        };
        if slot.replace(value).is_some() {
            return Err(malformed("repeated form parameter"));
        }
    }
    match grant_type.as_deref() {
        Some("refresh_token") => {}
        Some(_) => {
            found.other_grant = true;
            return Ok(());
        }
        None => return Err(malformed("grant_type is missing")),
    }
    found.client_params(params)?;
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        found.token(token)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let credentials = STANDARD.encode("my%20client:s%3Acret");
        assert_eq!(
            basic(&credentials).unwrap(),
            ("my client".to_owned(), "s:cret".to_owned())
        );
        assert!(basic("not base64!").is_err());
        assert!(basic(&STANDARD.encode("no-colon")).is_err());
    }

    #[test]
    fn client_authentication_is_read_from_basic_form_and_json() {
        let sources = TokenSource::defaults();
        let basic = format!("Basic {}", STANDARD.encode("app:pw"));
        let found = find(&sources, &headers(&[("authorization", &basic)]), None).unwrap();
        assert_eq!(found.client.id.as_deref(), Some("app"));
        assert!(found.client.credential == Credential::Secret("pw".into()));

        let body = Bytes::from_static(
            b"grant_type=refresh_token&refresh_token=t&client_id=app&client_secret=pw",
        );
        let found = find(&sources, &HeaderMap::new(), Some((&body, BodyKind::Form))).unwrap();
        assert_eq!(found.client.id.as_deref(), Some("app"));
        assert!(found.client.credential == Credential::Secret("pw".into()));

        let body = Bytes::from_static(
            br#"{"refresh_token":"t","client_id":"app","client_assertion_type":"jwt-bearer","client_assertion":"a.b.c"}"#,
        );
        let found = find(&sources, &HeaderMap::new(), Some((&body, BodyKind::Json))).unwrap();
        assert_eq!(found.client.id.as_deref(), Some("app"));
        assert!(matches!(
            found.client.credential,
            Credential::Assertion { .. }
        ));

        let body = Bytes::from_static(b"grant_type=refresh_token&refresh_token=t&client_secret=x");
        let two = find(
            &sources,
            &headers(&[("authorization", &basic)]),
            Some((&body, BodyKind::Form)),
        );
        assert!(two.is_err(), "two authentication methods are refused");
        let body = Bytes::from_static(b"grant_type=refresh_token&refresh_token=t&client_secret=pw");
        let twice = find(
            &sources,
            &headers(&[("authorization", &basic)]),
            Some((&body, BodyKind::Form)),
        );
        assert!(twice.is_err(), "the same secret twice is two methods too");
        let body = Bytes::from_static(br#"{"refresh_token":"t","client_secret":5}"#);
        assert!(find(&sources, &HeaderMap::new(), Some((&body, BodyKind::Json))).is_err());
    }

    #[test]
    fn bearer_and_basic_are_told_apart() {
        let sources = TokenSource::defaults();
        let found = find(&sources, &headers(&[("authorization", "Bearer abc")]), None).unwrap();
        assert_eq!(found.token.as_deref(), Some("abc"));
        let basic = format!("Basic {}", STANDARD.encode("client-1:pw"));
        let found = find(&sources, &headers(&[("authorization", &basic)]), None).unwrap();
        assert_eq!(
            (found.token, found.client.id.as_deref()),
            (None, Some("client-1"))
        );
    }

    #[test]
    fn json_bodies_refuse_repeats_and_non_strings() {
        let token = |s: &'static str| {
            let mut found = Found::default();
            json_body(
                &Bytes::from_static(s.as_bytes()),
                &TokenSource::defaults(),
                &mut found,
            )
            .map(|()| found.token)
        };
        assert_eq!(
            token(r#"{"refresh_token":"t","x":[1]}"#)
                .unwrap()
                .as_deref(),
            Some("t")
        );
        assert!(token(r#"{"refresh_token":"a","refresh_token":"b"}"#).is_err());
        assert!(token(r#"{"refresh_token":5}"#).is_err());
        assert!(token(r#"["refresh_token"]"#).is_err());
        assert!(token(r#"{"refresh_token":"t"} x"#).is_err());
    }

    #[test]
    fn forms_of_other_grants_are_not_refreshes() {
        let mut found = Found::default();
        form(
            &Bytes::from_static(b"grant_type=authorization_code&code=x"),
            &mut found,
        )
        .unwrap();
        assert!(found.other_grant && found.token.is_none());
        let mut found = Found::default();
        assert!(form(&Bytes::from_static(b"refresh_token=x"), &mut found).is_err());
    }

    #[test]
    fn content_types_are_recognised_by_essence() {
        let kind = |v: &str| body_kind(&headers(&[("content-type", v)]));
        assert_eq!(
            kind("application/json; charset=utf-8"),
            Some(BodyKind::Json)
        );
        assert_eq!(kind("application/vnd.api+json"), Some(BodyKind::Json));
        assert_eq!(
            kind("Application/X-WWW-Form-Urlencoded"),
            Some(BodyKind::Form)
        );
        assert_eq!(kind("text/plain"), Some(BodyKind::Other));
    }
}
