//! The bodies of the HTTP front: [`RequestBody`] (what the inner service reads) and
//! [`ResponseBody`] (what callers receive), and the capped read of a request body.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use ::http::{HeaderMap, header::CONTENT_LENGTH};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;

use crate::error::{BoxError, Rejected, Rejection};

/// The length a message declares in `Content-Length`, if it declares one that parses.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads at most `limit` bytes of `body`; `413` beyond.
pub(super) async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, Rejected>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if declared_length(headers).is_some_and(|len| len > limit as u64) {
        return Err(Rejected::new(Rejection::BodyTooLarge));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(Rejected::new(Rejection::BodyTooLarge)),
        Err(_) => Err(Rejected::new(Rejection::Malformed(
            "request body could not be read",
        ))),
    }
}

pin_project! {
    /// The request body the inner service receives: the bytes the layer read to find the
    /// token, or the original body, untouched, when no body source needed it.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    /// A body of `bytes`, already read.
    pub fn buffered(bytes: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The original body, streaming.
    pub fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            RequestKindProj::Streaming { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Streaming { body } => body.size_hint(),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Buffered { data } => f
                .debug_struct("RequestBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
        }
    }
}

pin_project! {
    /// The body of every response of the HTTP front: a shared, buffered body (with its
    /// trailers), a refusal, or the inner body streaming through.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Streaming { #[pin] body: B },
        Rest { prefix: Option<Bytes>, body: Pin<Box<B>> },
    }
}

impl<B> ResponseBody<B> {
    /// A complete body: `data`, then `trailers` if any.
    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The inner body, streaming through.
    pub fn streaming(body: B) -> Self {
        Self {
            kind: ResponseKind::Streaming { body },
        }
    }

    pub(super) fn rest(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            kind: ResponseKind::Rest {
                prefix: Some(prefix),
                body,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ResponseKindProj::Streaming { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Rest { prefix, body } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => body.as_mut().poll_frame(cx).map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Streaming { body } => body.is_end_stream(),
            ResponseKind::Rest { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact: HTTP/1 drops the trailers of a body sent with a length.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            ResponseKind::Streaming { body } => body.size_hint(),
            ResponseKind::Rest { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ResponseKind::Full { data, trailers } => f
                .debug_struct("ResponseBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            ResponseKind::Streaming { .. } => f.write_str("ResponseBody::Streaming"),
            ResponseKind::Rest { .. } => f.write_str("ResponseBody::Rest"),
        }
    }
}

/// The chunks of a body as one `Bytes` of exactly `len` bytes (a single chunk as it is).
pub(super) fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut joined = Vec::with_capacity(len);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    Bytes::from(joined)
}
