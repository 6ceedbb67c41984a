//! [`ClientBody`]: the request body the client layer hands its inner service, and the
//! buffering that lets a rejected request be sent again byte for byte.
//!
//! A body is kept (and the request may be retried) when it is known to fit the cap: its
//! size hint says at most `max_body` bytes, and it is read to its end before the request is
//! sent. A body of unknown length is read only as far as its frames are ready at once, so
//! that a stream the caller is still producing (a gRPC client stream) never stalls the
//! request: if it ends within the cap, it is kept; otherwise what was read goes first and
//! the rest streams on, and the request is not retried. A body known to exceed the cap is
//! never read by the layer.

use std::{
    collections::VecDeque,
    fmt,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;

/// The request body [`BearerAuth`](super::BearerAuth) hands its inner service: the caller's
/// body, either kept in memory (so that the request can be sent again) or streaming through.
///
/// An inner service that takes a body type of its own gets one with `Request::map`: for a
/// tonic `Channel`, `request.map(tonic::body::Body::new)`. Other crates' clients accept it
/// as it is: hyper-util's `Client<C, ClientBody<B>>`.
///
/// It also builds request bodies from bytes (`From<Bytes>`, `From<Vec<u8>>`,
/// `From<String>`, `From<&'static str>`), so that one hyper-util client type serves the
/// layer and a refresh service.
pub struct ClientBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Kept {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Streaming {
        /// Frames read before the body was found too long to keep.
        read: VecDeque<Frame<Bytes>>,
        rest: Pin<Box<B>>,
    },
}

impl<B> ClientBody<B> {
    /// A body of `data`, then `trailers`.
    pub(crate) fn kept(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Kept {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// `body` as it is.
    pub(crate) fn streaming(body: B) -> Self {
        Self {
            kind: Kind::Streaming {
                read: VecDeque::new(),
                rest: Box::pin(body),
            },
        }
    }

    /// Whether the body is kept in memory (and its request could be sent again).
    pub fn is_kept(&self) -> bool {
        matches!(self.kind, Kind::Kept { .. })
    }
}

impl<B> Default for ClientBody<B> {
    fn default() -> Self {
        Self::kept(Bytes::new(), None)
    }
}

impl<B> From<Bytes> for ClientBody<B> {
    fn from(data: Bytes) -> Self {
        Self::kept(data, None)
    }
}

impl<B> From<Vec<u8>> for ClientBody<B> {
    fn from(data: Vec<u8>) -> Self {
        Self::kept(data.into(), None)
    }
}

impl<B> From<String> for ClientBody<B> {
    fn from(data: String) -> Self {
        Self::kept(data.into(), None)
    }
}

impl<B> From<&'static str> for ClientBody<B> {
    fn from(data: &'static str) -> Self {
        Self::kept(Bytes::from_static(data.as_bytes()), None)
    }
}

impl<B> fmt::Debug for ClientBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Kept { data, trailers } => f
                .debug_struct("ClientBody::Kept")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Streaming { read, .. } => f
                .debug_struct("ClientBody::Streaming")
                .field("frames_read", &read.len())
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for ClientBody<B>
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
        // `ClientBody` is `Unpin`: the caller's body is pinned in its own box.
        match &mut self.get_mut().kind {
            Kind::Kept { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Streaming { read, rest } => {
                if let Some(frame) = read.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                rest.as_mut()
                    .poll_frame(cx)
                    .map(|frame| frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Kept { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Streaming { read, rest } => read.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Kept { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Streaming { read, rest } => {
                let read: u64 = read
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
        }
    }
}

/// A request body after the layer looked at it.
pub(crate) enum Prepared<B> {
    /// Read to its end within the cap: the request can be sent again.
    Kept {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Too long, or not ready: sent once.
    Once(ClientBody<B>),
}

impl<B> Prepared<B> {
    /// The body to send, and what to send again if the request is rejected (`None`: it
    /// cannot be).
    pub(crate) fn split(self) -> (ClientBody<B>, Option<(Bytes, Option<HeaderMap>)>) {
        match self {
            Prepared::Kept { data, trailers } => (
                ClientBody::kept(data.clone(), trailers.clone()),
                Some((data, trailers)),
            ),
            Prepared::Once(body) => (body, None),
        }
    }
}

/// Reads `body` as far as the module docs say: to its end if its size hint fits `cap`,
/// else as far as its frames are ready at once. A body that fails while read fails the
/// request, with its own error.
pub(crate) async fn prepare<B>(body: B, cap: usize) -> Result<Prepared<B>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(Prepared::Kept {
            data: Bytes::new(),
            trailers: None,
        });
    }
    let hint = body.size_hint();
    let cap = cap as u64;
    if hint.lower() > cap {
        return Ok(Prepared::Once(ClientBody::streaming(body)));
    }
    // Known to fit: worth waiting for. Of unknown length: read only what is ready now.
    let wait = hint.upper().is_some_and(|upper| upper <= cap);
    let mut rest = Box::pin(body);
    let mut read = VecDeque::new();
    let mut len = 0u64;
    let mut trailers = None;
    loop {
        let frame = if wait {
            std::future::poll_fn(|cx| rest.as_mut().poll_frame(cx)).await
        } else {
            match rest
                .as_mut()
                .poll_frame(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(frame) => frame,
                // Not ready: the caller is still producing it. Whoever polls the body next
                // (the inner service) registers a real waker.
                Poll::Pending => break,
            }
        };
        let frame = match frame {
            None => {
                return Ok(Prepared::Kept {
                    data: concat(read),
                    trailers,
                });
            }
            Some(frame) => frame.map_err(Into::into)?,
        };
        match frame.into_data() {
            Ok(data) => {
                len += data.len() as u64;
                read.push_back(Frame::data(data));
                if len > cap {
                    break;
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    if let Some(trailers) = trailers {
        read.push_back(Frame::trailers(trailers));
    }
    Ok(Prepared::Once(ClientBody {
        kind: Kind::Streaming { read, rest },
    }))
}

fn concat(frames: VecDeque<Frame<Bytes>>) -> Bytes {
    let mut data: Vec<Bytes> = frames
        .into_iter()
        .filter_map(|f| f.into_data().ok())
        .collect();
    match data.len() {
        0 => Bytes::new(),
        1 => data.pop().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(data.iter().map(Bytes::len).sum());
            for chunk in data {
                all.extend_from_slice(&chunk);
            }
            all.into()
        }
    }
}

/// Reads whatever of a response body is ready at once, up to its end, so that an HTTP/1
/// connection whose small rejection was read to its end goes back to its pool; then drops
/// it.
pub(crate) fn drain_ready<T: Body>(body: T) {
    let mut body = std::pin::pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..16 {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            _ => break,
        }
    }
}
