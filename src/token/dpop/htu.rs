//! Matching a proof's `htu` with the request URI (RFC 9449 §4.3).

use std::borrow::Cow;

use http::{
    HeaderValue, Uri,
    uri::{Authority, Scheme},
};

use super::HTU_MISMATCH;

/// Checks the proof's `htu` against the request (see [`DpopVerifier`](super::DpopVerifier)
/// for the order in which the request's origin is found); the error is the reason.
pub(super) fn check(
    htu: &str,
    origin: Option<&Origin>,
    uri: &Uri,
    host: Option<&HeaderValue>,
) -> Result<(), &'static str> {
    let htu = Target::parse_htu(htu).ok_or("invalid htu")?;
    let path = uri.path();
    let request = if let Some(origin) = origin {
        RequestTarget {
            scheme: Some(&origin.scheme),
            authority: Cow::Borrowed(&origin.authority),
            path,
        }
    } else if let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) {
        RequestTarget {
            scheme: Some(scheme),
            authority: Cow::Borrowed(authority),
            path,
        }
    } else if let Some(authority) = host
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .filter(|authority| !authority.as_str().contains('@'))
    {
        RequestTarget {
            scheme: None,
            authority: Cow::Owned(authority),
            path,
        }
    } else {
        return Err("request origin unknown");
    };
    if htu.matches(&request) {
        Ok(())
    } else {
        Err(HTU_MISMATCH)
    }
}

/// The configured external origin, normalized.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    pub(super) fn parse(origin: &str) -> Option<Self> {
        let uri = Uri::try_from(origin).ok()?;
        let scheme = web_scheme(uri.scheme()?)?;
        let authority = uri.authority()?.clone();
        let bare = matches!(uri.path(), "" | "/") && uri.query().is_none();
        (bare && !authority.as_str().contains('@')).then_some(Self { scheme, authority })
    }
}

/// `http` or `https`, as a [`Scheme`] that compares case-insensitively.
fn web_scheme(scheme: &Scheme) -> Option<Scheme> {
    let name = scheme.as_str();
    if name.eq_ignore_ascii_case("https") {
        Some(Scheme::HTTPS)
    } else if name.eq_ignore_ascii_case("http") {
        Some(Scheme::HTTP)
    } else {
        None
    }
}

/// The `htu` of a proof: scheme, authority and path, without query and fragment.
struct Target {
    scheme: Scheme,
    authority: Authority,
    path: String,
}

/// What `htu` is compared with; `scheme` is `None` when only the `Host` header is known.
struct RequestTarget<'a> {
    scheme: Option<&'a Scheme>,
    authority: Cow<'a, Authority>,
    path: &'a str,
}

impl Target {
    fn parse_htu(htu: &str) -> Option<Self> {
        let without_fragment = htu.split('#').next().unwrap_or_default();
        let uri = Uri::try_from(without_fragment).ok()?;
        let scheme = web_scheme(uri.scheme()?)?;
        let authority = uri.authority()?.clone();
        if authority.as_str().contains('@') {
            return None;
        }
        Some(Self {
            scheme,
            authority,
            path: uri.path().to_owned(),
        })
    }

    fn matches(&self, request: &RequestTarget<'_>) -> bool {
        let scheme = match request.scheme {
            Some(scheme) => match web_scheme(scheme) {
                Some(scheme) if scheme == self.scheme => scheme,
                _ => return false,
            },
            None => self.scheme.clone(),
        };
        normalize_authority(&self.authority, &self.scheme)
            == normalize_authority(&request.authority, &scheme)
            && normalize_path(&self.path) == normalize_path(request.path)
    }
}

/// The host in lower case, and the port unless it is the scheme's default.
fn normalize_authority(authority: &Authority, scheme: &Scheme) -> String {
    let host = authority.host().to_ascii_lowercase();
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    match authority.port_u16() {
        Some(port) if port != default => format!("{host}:{port}"),
        _ => host,
    }
}

/// The path with percent-encoding normalized (RFC 3986 §6.2.2.1–2): hex digits upper-cased,
/// unreserved characters decoded; an empty path is `/`.
fn normalize_path(path: &str) -> Cow<'_, str> {
    if path.is_empty() {
        return Cow::Borrowed("/");
    }
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) => {
                out.push(byte);
                i += 3;
            }
            Some(byte) => {
                out.extend_from_slice(format!("%{byte:02X}").as_bytes());
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| path.to_owned()))
}
