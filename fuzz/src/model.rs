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

use crate::input::{
    AuthChoice, BodyChoice, ContentTypeChoice, CookieChoice, GrantChoice, HeaderChoice,
    LengthChoice, MAX_BODY, MethodChoice, NameChoice, PathChoice, Req,
};

/// The paths the layer coalesces; any other passes through.
pub const PATHS: [&str; 2] = ["/auth/refresh", "/auth.v1.TokenService/Refresh"];
/// The metadata source's header.
pub const METADATA: HeaderName = HeaderName::from_static("x-refresh-token");
/// The header that numbers each request of a run, echoed by the inner service.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-fuzz-request");

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
    /// Distinct client ids (Basic user, form `client_id`).
    pub clients: BTreeSet<String>,
    /// A form whose single `grant_type` is not `refresh_token` (its `refresh_token` and
    /// `client_id` parameters are then not counted above).
    pub other_grant: bool,
    /// More than one `Content-Type` value, and they disagree on JSON, form or other.
    pub ambiguous_content_type: bool,
}

impl Seen {
    /// The one token and client, if the request has exactly one token and at most one
    /// client: the request's identity as the layer keys it.
    pub fn identity(&self) -> Option<(String, Option<String>)> {
        if self.tokens.len() != 1 || self.clients.len() > 1 {
            return None;
        }
        let token = self.tokens.iter().next().cloned()?;
        Some((token, self.clients.iter().next().cloned()))
    }
}

pub fn build(req: &Req, id: usize) -> Built {
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

    let (body_bytes, failing, chunk) = body_of(&req.body);
    let body_bytes = Bytes::from(body_bytes);

    let mut headers = HeaderMap::new();
    for choice in req.headers.iter().take(8) {
        if let Some((name, value)) = header_of(choice, body_bytes.len()) {
            headers.append(name, value);
        }
    }
    headers.insert(REQUEST_ID, HeaderValue::from(id));

    // The model reads the body only when the layer could (a body that fails is unreadable
    // to both).
    let readable = (!failing).then_some(&body_bytes[..]);
    let seen = model(uri.path(), &headers, readable);

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
fn body_of(choice: &BodyChoice) -> (Vec<u8>, bool, usize) {
    fn bytes(choice: &BodyChoice, depth: u8) -> (Vec<u8>, bool, usize) {
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
                let extra = extra.capped(512);
                if !extra.is_empty() {
                    json.pop(); // the closing brace
                    if !object.is_empty() {
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
                let (inner, failing, _) = bytes(body, depth + 1);
                return (cap(inner), failing, usize::from(*chunk).max(1));
            }
            BodyChoice::Failing { body } if depth < 2 => {
                let (inner, _, chunk) = bytes(body, depth + 1);
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
    bytes(choice, 0)
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

/// What `headers` and `body` (if readable) carry, by the model.
pub fn model(path: &str, headers: &HeaderMap, body: Option<&[u8]>) -> Seen {
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
            && let Some(user) = basic_user(credentials)
        {
            seen.clients.insert(user);
        }
    }

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
            && let Some(serde_json::Value::String(token)) = object.get("refresh_token")
        {
            add_token(&mut seen, token);
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
                    match name.as_str() {
                        "refresh_token" => add_token(&mut seen, value),
                        "client_id" if !value.is_empty() => {
                            seen.clients.insert(value.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    seen
}

/// The user of `Basic` credentials, form-decoded (RFC 6749 §2.3.1).
fn basic_user(credentials: &str) -> Option<String> {
    let decoded = STANDARD.decode(credentials).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, _) = decoded.split_once(':')?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("u={user}")).ok()?;
    let (_, user) = pairs.into_iter().next()?;
    (!user.is_empty()).then_some(user)
}
