//! The stored form of a buffered response, for other instances: a version byte, then
//! status, HTTP version, headers, body and trailers, each length-prefixed. The bytes are
//! sealed by the store; decoding still checks every length and refuses anything left over.

use ::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use bytes::Bytes;

const FORMAT: u8 = 1;

fn version_code(version: Version) -> u8 {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

fn code_version(code: u8) -> Option<Version> {
    Some(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    })
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        put(out, name.as_str().as_bytes());
        put(out, value.as_bytes());
    }
}

/// Headers packed in one allocation: their count, then each name and value
/// length-prefixed (the layout of [`encode`]'s header sections).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Packed(Bytes);

impl Packed {
    pub(super) fn pack(headers: &HeaderMap) -> Self {
        let (all, _) = pack_with(headers, &[]);
        Self(Bytes::from(all))
    }

    /// The headers packed at the front of `all`, up to `end`.
    pub(super) fn front(all: &Bytes, end: usize) -> Self {
        Self(all.slice(..end))
    }

    /// The headers again. Values share the packed bytes; nothing is copied but names
    /// outside the standard set.
    pub(super) fn unpack(&self) -> HeaderMap {
        self.try_unpack().unwrap_or_default()
    }

    fn try_unpack(&self) -> Option<HeaderMap> {
        let mut reader = Reader(&self.0);
        let count = reader.u32()?;
        let mut headers = HeaderMap::with_capacity(count);
        for _ in 0..count {
            let name = HeaderName::from_bytes(reader.chunk()?).ok()?;
            let value = HeaderValue::from_maybe_shared(self.0.slice_ref(reader.chunk()?)).ok()?;
            headers.append(name, value);
        }
        Some(headers)
    }
}

/// Packs `headers` and appends `tail`, in one buffer of exactly their size; returns it and
/// where the tail starts.
pub(super) fn pack_with(headers: &HeaderMap, tail: &[Bytes]) -> (Vec<u8>, usize) {
    let len = headers
        .iter()
        .map(|(name, value)| 8 + name.as_str().len() + value.len())
        .sum::<usize>();
    let tail_len = tail.iter().map(Bytes::len).sum::<usize>();
    let mut out = Vec::with_capacity(4 + len + tail_len);
    put_headers(&mut out, headers);
    let split = out.len();
    for chunk in tail {
        out.extend_from_slice(chunk);
    }
    (out, split)
}

/// The stored form of one response, its headers and trailers already packed.
pub(super) fn encode(
    status: StatusCode,
    version: Version,
    headers: &[u8],
    body: &[u8],
    trailers: Option<&Packed>,
) -> Vec<u8> {
    let trailers_len = trailers.map_or(0, |t| t.0.len());
    let mut out = Vec::with_capacity(16 + headers.len() + body.len() + trailers_len);
    out.push(FORMAT);
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    out.push(version_code(version));
    out.extend_from_slice(headers);
    put(&mut out, body);
    match trailers {
        Some(trailers) => {
            out.push(1);
            out.extend_from_slice(&trailers.0);
        }
        None => out.push(0),
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<usize> {
        let bytes: [u8; 4] = self.take(4)?.try_into().ok()?;
        usize::try_from(u32::from_be_bytes(bytes)).ok()
    }

    fn chunk(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.take(len)
    }

    fn headers(&mut self) -> Option<HeaderMap> {
        let count = self.u32()?;
        // Every entry takes at least 8 bytes: a hostile count cannot allocate much.
        let mut headers = HeaderMap::with_capacity(count.min(self.0.len() / 8));
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.chunk()?).ok()?;
            let value = HeaderValue::from_bytes(self.chunk()?).ok()?;
            headers.append(name, value);
        }
        Some(headers)
    }
}

type Decoded = (StatusCode, Version, HeaderMap, Bytes, Option<HeaderMap>);

pub(super) fn decode(bytes: &[u8]) -> Option<Decoded> {
    let mut reader = Reader(bytes);
    if reader.byte()? != FORMAT {
        return None;
    }
    let status = u16::from_be_bytes(reader.take(2)?.try_into().ok()?);
    let status = StatusCode::from_u16(status).ok()?;
    let version = code_version(reader.byte()?)?;
    let headers = reader.headers()?;
    let body = Bytes::copy_from_slice(reader.chunk()?);
    let trailers = match reader.byte()? {
        0 => None,
        1 => Some(reader.headers()?),
        _ => return None,
    };
    reader
        .0
        .is_empty()
        .then_some((status, version, headers, body, trailers))
}
