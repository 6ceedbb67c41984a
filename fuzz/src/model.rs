//! Requests from fuzz input, and a model of the token sources: what token (and client) a
//! request carries, read independently of the layer, the way the layer documents its
//! sources and the way an inner service would read the same request.
//!
//! The model collects tokens from *every* place a source looks (all `Authorization` values,
//! every cookie, every `x-refresh-token` value, the body for every content type that names
//! JSON or a form), so that a request the layer lets through with one verified token while
//! it carries another is caught.

use std::{collections::BTreeSet, convert::Infallible, io};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use tower_refresh_coalesce::BoxError;

use crate::{
    dpop::Proofs,
    input::{
        AssertionChoice, AuthChoice, BodyChoice, ClientAuth, ClientIdChoice, ContentTypeChoice,
        CookieChoice, CredentialChoice, GrantChoice, HeaderChoice, LengthChoice, MAX_BODY,
        MethodChoice, NameChoice, PathChoice, Req, SecretChoice,
    },
};

/// The paths the layer coalesces; any other passes through.
pub const PATHS: [&str; 2] = ["/auth/refresh", "/auth.v1.TokenService/Refresh"];
/// The metadata source's header.
pub const METADATA: HeaderName = HeaderName::from_static("x-refresh-token");
/// The header that numbers each request of a run, echoed by the inner service.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-fuzz-request");
/// The DPoP proof header (RFC 9449 §4.1).
pub const DPOP: HeaderName = HeaderName::from_static("dpop");
/// The `client_assertion_type` of RFC 7523.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The request body type of the fuzz targets.
pub type FuzzBody = BoxBody<Bytes, BoxError>;

/// A request ready to send, and what the model makes of it.
pub struct Built {
    pub request: Request<FuzzBody>,
    pub seen: Seen,
}

/// What a request carries, by the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seen {
    /// The path is one the layer coalesces.
    pub in_scope: bool,
    /// Distinct non-empty tokens, from every source.
    pub tokens: BTreeSet<String>,
    /// Distinct client ids (Basic user, form or JSON `client_id`).
    pub clients: BTreeSet<String>,
    /// Every client credential presented (Basic password, form or JSON `client_secret`,
    /// client assertions): more than one is two methods, even if they are equal.
    pub credentials: Vec<Credential>,
    /// What the `DPoP` header binds the request to.
    pub sender: Sender,
    /// The `DPoP` header values (lossy UTF-8).
    pub proofs: Vec<String>,
    /// A form whose single `grant_type` is not `refresh_token` (its `refresh_token` and
    /// `client_id` parameters are then not counted above).
    pub other_grant: bool,
    /// More than one `Content-Type` value, and they disagree on JSON, form or other.
    pub ambiguous_content_type: bool,
}

/// A client credential, as presented.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Credential {
    Secret(String),
    Assertion { kind: String, assertion: String },
}

/// The sender constraint of a request, by the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Sender {
    /// No `DPoP` header.
    #[default]
    None,
    /// One `DPoP` header, a valid proof the harness made, by the key of this thumbprint.
    Key(String),
    /// Anything else: more than one header, a damaged or made-up proof. Such a request must
    /// never reach the inner service as a refresh.
    Invalid,
}

/// Everything the inner service authenticates a refresh by: two requests may share one
/// answer only if theirs are equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    pub token: String,
    pub client: Option<String>,
    pub credential: Option<Credential>,
    /// The RFC 7638 thumbprint of the DPoP key.
    pub sender: Option<String>,
}

impl Seen {
    /// The request's identity, if it has exactly one token, at most one client id, at most
    /// one credential and no invalid DPoP header: what the layer must key it by.
    pub fn identity(&self) -> Option<Identity> {
        if self.tokens.len() != 1 || self.clients.len() > 1 || self.credentials.len() > 1 {
            return None;
        }
        let sender = match &self.sender {
            Sender::None => None,
            Sender::Key(thumbprint) => Some(thumbprint.clone()),
            Sender::Invalid => return None,
        };
        Some(Identity {
            token: self.tokens.iter().next().cloned()?,
            client: self.clients.iter().next().cloned(),
            credential: self.credentials.iter().next().cloned(),
            sender,
        })
    }
}

/// Form-encodes one value (RFC 6749 §2.3.1 for Basic credentials).
fn form_encode(value: &str) -> String {
    let encoded = serde_urlencoded::to_string([("v", value)]).expect("a string encodes");
    encoded["v=".len()..].to_owned()
}

impl ClientIdChoice {
    pub fn text(&self) -> String {
        match self {
            ClientIdChoice::A => "app-a".into(),
            ClientIdChoice::B => "app b".into(),
            ClientIdChoice::Raw(b) => String::from_utf8_lossy(b.capped(64)).into_owned(),
        }
    }
}

impl SecretChoice {
    pub fn text(&self) -> String {
        match self {
            SecretChoice::One => "s3cret".into(),
            SecretChoice::Two => "other:secret".into(),
            SecretChoice::Empty => String::new(),
            SecretChoice::Raw(b) => String::from_utf8_lossy(b.capped(64)).into_owned(),
        }
    }
}

/// The body parameters of a credential.
fn credential_params(credential: &CredentialChoice, out: &mut Vec<(String, String)>) {
    let assertion_a = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhcHAtYSIsInN1YiI6ImFwcC1hIn0.c2lnLWE";
    let assertion_b = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhcHAtYSIsImp0aSI6IjIifQ.c2lnLWI";
    let mut pair = |name: &str, value: String| out.push((name.into(), value));
    match credential {
        CredentialChoice::None => {}
        CredentialChoice::Secret(secret) => pair("client_secret", secret.text()),
        CredentialChoice::Assertion(assertion) => match assertion {
            AssertionChoice::A => {
                pair("client_assertion_type", JWT_BEARER.into());
                pair("client_assertion", assertion_a.into());
            }
            AssertionChoice::B => {
                pair("client_assertion_type", JWT_BEARER.into());
                pair("client_assertion", assertion_b.into());
            }
            AssertionChoice::WithoutType => pair("client_assertion", assertion_a.into()),
            AssertionChoice::Raw { kind, assertion } => {
                pair(
                    "client_assertion_type",
                    String::from_utf8_lossy(kind.capped(64)).into_owned(),
                );
                pair(
                    "client_assertion",
                    String::from_utf8_lossy(assertion.capped(256)).into_owned(),
                );
            }
        },
    }
}

/// What `client` adds: an `Authorization: Basic` value, and body parameters.
fn client_parts(client: Option<&ClientAuth>) -> (Option<Vec<u8>>, Vec<(String, String)>) {
    let Some(client) = client else {
        return (None, Vec::new());
    };
    let mut params = Vec::new();
    let id = client.id.as_ref().map(ClientIdChoice::text);
    let basic = if client.basic {
        let secret = match &client.credential {
            CredentialChoice::Secret(secret) => secret.text(),
            other => {
                credential_params(other, &mut params);
                String::new()
            }
        };
        let credentials = format!(
            "{}:{}",
            form_encode(id.as_deref().unwrap_or("")),
            form_encode(&secret)
        );
        Some(format!("Basic {}", STANDARD.encode(credentials)).into_bytes())
    } else {
        if let Some(id) = id {
            params.push(("client_id".into(), id));
        }
        credential_params(&client.credential, &mut params);
        None
    };
    if let Some(also) = &client.also {
        credential_params(also, &mut params);
    }
    (basic, params)
}

pub fn build(req: &Req, id: usize, proofs: &mut Proofs) -> Built {
    let method = match &req.method {
        MethodChoice::Post => Method::POST,
        MethodChoice::Get => Method::GET,
        MethodChoice::Put => Method::PUT,
        MethodChoice::Raw(b) => Method::from_bytes(b.capped(16)).unwrap_or(Method::POST),
    };
    let uri: Uri = match &req.path {
        PathChoice::Refresh => Uri::from_static("/auth/refresh"),
        PathChoice::Grpc => Uri::from_static("/auth.v1.TokenService/Refresh"),
        PathChoice::RefreshQuery(q) => {
            let mut s = b"/auth/refresh?".to_vec();
            s.extend_from_slice(q.capped(64));
            Uri::try_from(s).unwrap_or(Uri::from_static("/auth/refresh"))
        }
        PathChoice::Absolute => Uri::from_static("https://id.example/auth/refresh"),
        PathChoice::TrailingSlash => Uri::from_static("/auth/refresh/"),
        PathChoice::Other => Uri::from_static("/other"),
        PathChoice::Raw(b) => {
            Uri::try_from(b.capped(128).to_vec()).unwrap_or(Uri::from_static("/auth/refresh"))
        }
    };

    let (basic, params) = client_parts(req.client.as_ref());
    let (body_bytes, failing, chunk) = body_of(&req.body, &params);
    let body_bytes = Bytes::from(body_bytes);

    let mut headers = HeaderMap::new();
    for choice in req.headers.iter().take(8) {
        if let Some((name, value)) = header_of(choice, body_bytes.len()) {
            headers.append(name, value);
        }
    }
    if let Some(value) = basic.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
        headers.append(header::AUTHORIZATION, value);
    }
    if let Some(dpop) = &req.dpop {
        for value in proofs.values(dpop, method.as_str(), uri.path()) {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.append(DPOP, value);
            }
        }
    }
    headers.insert(REQUEST_ID, HeaderValue::from(id));

    // The model reads the body only when the layer could (a body that fails is unreadable
    // to both).
    let readable = (!failing).then_some(&body_bytes[..]);
    let seen = model(uri.path(), &headers, readable, proofs);

    let body: FuzzBody = if failing {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks(&body_bytes, chunk)
            .into_iter()
            .map(|c| Ok(Frame::data(c)))
            .collect();
        frames.push(Err(Box::new(io::Error::other("client went away"))));
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else if chunk > 0 {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks(&body_bytes, chunk)
            .into_iter()
            .map(|c| Ok(Frame::data(c)))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else {
        Full::new(body_bytes)
            .map_err(|never: Infallible| match never {})
            .boxed()
    };

    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Built { request, seen }
}

fn chunks(bytes: &Bytes, size: usize) -> Vec<Bytes> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let size = size.max(1);
    (0..bytes.len())
        .step_by(size)
        .map(|i| bytes.slice(i..(i + size).min(bytes.len())))
        .collect()
}

/// The body's bytes, whether it fails after them, and the frame size (0: one frame).
/// `params` (client authentication) are added to a JSON or form body.
fn body_of(choice: &BodyChoice, params: &[(String, String)]) -> (Vec<u8>, bool, usize) {
    fn bytes(
        choice: &BodyChoice,
        params: &[(String, String)],
        depth: u8,
    ) -> (Vec<u8>, bool, usize) {
        let mut out = match choice {
            BodyChoice::Empty => Vec::new(),
            BodyChoice::Json { token, pad, extra } => {
                let mut object = serde_json::Map::new();
                if let Some(token) = token {
                    object.insert("refresh_token".into(), token.text().into());
                }
                if *pad > 0 {
                    let pad = usize::from(*pad).min(MAX_BODY);
                    object.insert("pad".into(), "x".repeat(pad).into());
                }
                let mut json = serde_json::to_vec(&object).expect("a map serializes");
                // Members written as text, so that a repeated one stays repeated.
                for (name, value) in params {
                    json.pop(); // the closing brace
                    if json.len() > 1 {
                        json.push(b',');
                    }
                    json.extend_from_slice(&serde_json::to_vec(name).expect("a string"));
                    json.push(b':');
                    json.extend_from_slice(&serde_json::to_vec(value).expect("a string"));
                    json.push(b'}');
                }
                let extra = extra.capped(512);
                if !extra.is_empty() {
                    json.pop(); // the closing brace
                    if json.len() > 1 {
                        json.push(b',');
                    }
                    json.extend_from_slice(extra);
                    json.push(b'}');
                }
                json
            }
            BodyChoice::Form {
                grant,
                token,
                client,
                extra,
            } => {
                let mut pairs: Vec<(String, String)> = Vec::new();
                match grant {
                    GrantChoice::Refresh => {
                        pairs.push(("grant_type".into(), "refresh_token".into()))
                    }
                    GrantChoice::AuthorizationCode => {
                        pairs.push(("grant_type".into(), "authorization_code".into()))
                    }
                    GrantChoice::Raw(b) => pairs.push((
                        "grant_type".into(),
                        String::from_utf8_lossy(b.capped(64)).into_owned(),
                    )),
                }
                if let Some(token) = token {
                    pairs.push(("refresh_token".into(), token.text()));
                }
                if let Some(client) = client {
                    pairs.push((
                        "client_id".into(),
                        String::from_utf8_lossy(client.capped(64)).into_owned(),
                    ));
                }
                pairs.extend(params.iter().cloned());
                let mut form = serde_urlencoded::to_string(&pairs)
                    .expect("pairs of strings encode")
                    .into_bytes();
                let extra = extra.capped(512);
                if !extra.is_empty() {
                    form.push(b'&');
                    form.extend_from_slice(extra);
                }
                form
            }
            BodyChoice::Raw(b) => b.capped(MAX_BODY).to_vec(),
            BodyChoice::Repeat { unit, count } => {
                let unit = unit.capped(64);
                let mut out = Vec::new();
                for _ in 0..*count {
                    if unit.is_empty() || out.len() >= MAX_BODY {
                        break;
                    }
                    out.extend_from_slice(unit);
                }
                out
            }
            BodyChoice::Chunked { chunk, body } if depth < 2 => {
                let (inner, failing, _) = bytes(body, params, depth + 1);
                return (cap(inner), failing, usize::from(*chunk).max(1));
            }
            BodyChoice::Failing { body } if depth < 2 => {
                let (inner, _, chunk) = bytes(body, params, depth + 1);
                return (cap(inner), true, chunk);
            }
            BodyChoice::Chunked { .. } | BodyChoice::Failing { .. } => Vec::new(),
        };
        out.truncate(MAX_BODY);
        (out, false, 0)
    }
    fn cap(mut v: Vec<u8>) -> Vec<u8> {
        v.truncate(MAX_BODY);
        v
    }
    bytes(choice, params, 0)
}

fn header_of(choice: &HeaderChoice, body_len: usize) -> Option<(HeaderName, HeaderValue)> {
    let value = |bytes: &[u8]| HeaderValue::from_bytes(bytes).ok();
    let join = |a: &[u8], b: &[u8]| [a, b].concat();
    Some(match choice {
        HeaderChoice::Authorization(auth) => {
            let v = match auth {
                AuthChoice::Bearer(t) => join(b"Bearer ", &t.bytes()),
                AuthChoice::BearerOddly {
                    lower,
                    spaces,
                    token,
                } => {
                    let scheme: &[u8] = if *lower { b"bearer" } else { b"BEARER" };
                    let spaces = vec![b' '; usize::from(*spaces % 4) + 1];
                    [scheme, &spaces, &token.bytes()].concat()
                }
                AuthChoice::Basic { user, password } => {
                    let credentials = join(user.capped(64), &join(b":", password.capped(64)));
                    format!("Basic {}", STANDARD.encode(credentials)).into_bytes()
                }
                AuthChoice::BasicRaw(b) => join(b"Basic ", b.capped(256)),
                AuthChoice::Garbage(b) => b.capped(256).to_vec(),
            };
            (header::AUTHORIZATION, value(&v)?)
        }
        HeaderChoice::Cookie(cookie) => {
            let v = match cookie {
                CookieChoice::Token(t) => join(b"refresh_token=", &t.bytes()),
                CookieChoice::Among(t) => {
                    [&b"theme=dark; refresh_token="[..], &t.bytes(), b"; lang=en"].concat()
                }
                CookieChoice::Raw(b) => b.capped(256).to_vec(),
            };
            (header::COOKIE, value(&v)?)
        }
        HeaderChoice::ContentType(ct) => {
            let v: &[u8] = match ct {
                ContentTypeChoice::Json => b"application/json",
                ContentTypeChoice::JsonCharset => b"application/json; charset=utf-8",
                ContentTypeChoice::PlusJson => b"application/vnd.api+json",
                ContentTypeChoice::Form => b"application/x-www-form-urlencoded",
                ContentTypeChoice::FormCharset => {
                    b"Application/X-WWW-Form-Urlencoded;charset=UTF-8"
                }
                ContentTypeChoice::Text => b"text/plain",
                ContentTypeChoice::Raw(b) => b.capped(128),
            };
            (header::CONTENT_TYPE, value(v)?)
        }
        HeaderChoice::ContentLength(len) => {
            let v = match len {
                LengthChoice::Actual => body_len.to_string().into_bytes(),
                LengthChoice::Number(n) => n.to_string().into_bytes(),
                LengthChoice::Raw(b) => b.capped(32).to_vec(),
            };
            (header::CONTENT_LENGTH, value(&v)?)
        }
        HeaderChoice::Metadata { bearer, token } => {
            let v = if *bearer {
                join(b"Bearer ", &token.bytes())
            } else {
                token.bytes()
            };
            (METADATA, value(&v)?)
        }
        HeaderChoice::Raw { name, value: v } => {
            let name = match name {
                NameChoice::Authorization => header::AUTHORIZATION,
                NameChoice::Cookie => header::COOKIE,
                NameChoice::ContentType => header::CONTENT_TYPE,
                NameChoice::ContentLength => header::CONTENT_LENGTH,
                NameChoice::RefreshToken => METADATA,
                NameChoice::GrpcStatus => HeaderName::from_static("grpc-status"),
                NameChoice::Other => HeaderName::from_static("x-other"),
            };
            (name, value(v.capped(256))?)
        }
    })
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Json,
    Form,
    Other,
}

fn kind(value: &HeaderValue) -> Kind {
    let Ok(value) = value.to_str() else {
        return Kind::Other;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let lower = essence.to_ascii_lowercase();
    if lower == "application/json" || lower.ends_with("+json") {
        Kind::Json
    } else if lower == "application/x-www-form-urlencoded" {
        Kind::Form
    } else {
        Kind::Other
    }
}

/// What `headers` and `body` (if readable) carry, by the model; `proofs` are the valid DPoP
/// proofs the harness made.
pub fn model(path: &str, headers: &HeaderMap, body: Option<&[u8]>, proofs: &Proofs) -> Seen {
    let mut seen = Seen {
        in_scope: PATHS.contains(&path),
        ..Seen::default()
    };
    let add_token = |seen: &mut Seen, token: &str| {
        if !token.is_empty() {
            seen.tokens.insert(token.to_owned());
        }
    };

    for value in headers.get_all(header::AUTHORIZATION) {
        let Ok(value) = value.to_str() else { continue };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let credentials = rest.trim_start_matches(' ');
        if scheme.eq_ignore_ascii_case("bearer") {
            add_token(&mut seen, credentials);
        } else if scheme.eq_ignore_ascii_case("basic")
            && let Some((user, password)) = basic_user(credentials)
        {
            seen.clients.insert(user);
            seen.credentials.push(Credential::Secret(password));
        }
    }

    let values: Vec<&HeaderValue> = headers.get_all(DPOP).iter().collect();
    seen.proofs = values
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    seen.sender = match values[..] {
        [] => Sender::None,
        [value] => value
            .to_str()
            .ok()
            .and_then(|proof| proofs.thumbprint(proof))
            .map_or(Sender::Invalid, |thumbprint| {
                Sender::Key(thumbprint.to_owned())
            }),
        _ => Sender::Invalid,
    };

    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for piece in value.split(';') {
            let Some((name, value)) = piece.split_once('=') else {
                continue;
            };
            if name.trim() == "refresh_token" {
                add_token(&mut seen, value.trim());
            }
        }
    }

    for value in headers.get_all(METADATA) {
        let Ok(value) = value.to_str() else { continue };
        let value = value.trim();
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim_start(),
            _ => value,
        };
        add_token(&mut seen, token);
    }

    let kinds: BTreeSet<Kind> = headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .map(kind)
        .collect();
    seen.ambiguous_content_type = kinds.len() > 1;
    // The body is read for every content type the request names, not only the first: an
    // inner service may pick any of them (finding F1).
    let reads = |k: Kind| kinds.contains(&k);
    if let Some(body) = body {
        if reads(Kind::Json)
            && let Ok(serde_json::Value::Object(object)) =
                serde_json::from_slice::<serde_json::Value>(body)
        {
            let string = |name: &str| object.get(name).and_then(|v| v.as_str());
            if let Some(token) = string("refresh_token") {
                add_token(&mut seen, token);
            }
            client_params(&mut seen, string);
        }
        if reads(Kind::Form)
            && let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        {
            let grants: Vec<&str> = pairs
                .iter()
                .filter(|(name, _)| name == "grant_type")
                .map(|(_, value)| value.as_str())
                .collect();
            // RFC 6749: the grant type decides what the request is. A form of another grant
            // type is not a refresh, whatever else it carries; its parameters are not a
            // refresh token or a client binding.
            seen.other_grant = grants.len() == 1 && grants[0] != "refresh_token";
            if !seen.other_grant {
                for (name, value) in &pairs {
                    if name == "refresh_token" {
                        add_token(&mut seen, value);
                    }
                }
                let string = |name: &str| {
                    pairs
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.as_str())
                };
                client_params(&mut seen, string);
            }
        }
    }
    seen
}

/// The client parameters of a body (a form's or a JSON object's members, `string` giving
/// a member's string value): `client_id` (non-empty), `client_secret`, and a client
/// assertion if either of its two members is there.
fn client_params<'a>(seen: &mut Seen, string: impl Fn(&str) -> Option<&'a str>) {
    if let Some(id) = string("client_id").filter(|id| !id.is_empty()) {
        seen.clients.insert(id.to_owned());
    }
    if let Some(secret) = string("client_secret") {
        seen.credentials.push(Credential::Secret(secret.to_owned()));
    }
    let kind = string("client_assertion_type");
    let assertion = string("client_assertion");
    if kind.is_some() || assertion.is_some() {
        seen.credentials.push(Credential::Assertion {
            kind: kind.unwrap_or("").to_owned(),
            assertion: assertion.unwrap_or("").to_owned(),
        });
    }
}

/// The user and password of `Basic` credentials, each form-decoded (RFC 6749 §2.3.1); `None`
/// without a user.
fn basic_user(credentials: &str) -> Option<(String, String)> {
    let decoded = STANDARD.decode(credentials).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let decode = |part: &str| -> Option<String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("u={part}")).ok()?;
        Some(pairs.into_iter().next().map(|(_, v)| v).unwrap_or_default())
    };
    let user = decode(user)?;
    (!user.is_empty()).then_some((user, decode(password)?))
}
