//! [`HttpShare`]: buffers an inner response once and rebuilds it for every caller.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use ::http::{HeaderMap, HeaderValue, Response, StatusCode, Version};
use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use super::{
    COALESCED_HEADER, DEFAULT_MAX_RESPONSE,
    body::{ResponseBody, concat, declared_length},
    refusal::{Protocol, Refusal, Unshareable},
    wire,
};
use crate::{
    error::BoxError,
    outcome::{Coalesced, Outcome},
    share::{Served, Share},
};

type ReplayIf = Arc<dyn Fn(StatusCode, &HeaderMap, Option<&HeaderMap>) -> bool + Send + Sync>;

/// Shares whole HTTP responses: buffers the inner response once (status, headers, body,
/// trailers) and rebuilds it byte-identical for every caller, `Set-Cookie` and
/// `Cache-Control` included.
///
/// - Only responses the replay predicate accepts become replays (default: a `2xx` status
///   and, where present, `grpc-status: 0`). Others reach their flight's callers only.
/// - A body over [`max_response`](Self::max_response) (64 KiB) is not shared: one caller
///   receives it streamed, the others `503`.
/// - An error of the inner service reaches one caller as itself (so hyper and tonic see it);
///   the flight's other callers get `503`.
/// - Refusals become JSON responses, or gRPC statuses with [`grpc`](Self::grpc).
#[derive(Clone)]
pub struct HttpShare {
    max_response: usize,
    replay_if: ReplayIf,
    report: bool,
    invalid_grant_status: StatusCode,
    protocol: Protocol,
}

impl HttpShare {
    /// The defaults: 64 KiB responses, `2xx` replayed, JSON refusals, `401 invalid_grant`.
    pub fn new() -> Self {
        Self {
            max_response: DEFAULT_MAX_RESPONSE,
            replay_if: Arc::new(default_replay_if),
            report: false,
            invalid_grant_status: StatusCode::UNAUTHORIZED,
            protocol: Protocol::Json,
        }
    }

    /// The largest response body that is shared and replayed. Default: 64 KiB.
    #[must_use]
    pub fn max_response(mut self, max: usize) -> Self {
        self.max_response = max;
        self
    }

    /// Which responses are replayed, from status, headers and trailers. Default: a `2xx`
    /// status and, where a `grpc-status` is present, `0`.
    #[must_use]
    pub fn replay_if(
        mut self,
        predicate: impl Fn(StatusCode, &HeaderMap, Option<&HeaderMap>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.replay_if = Arc::new(predicate);
        self
    }

    /// Adds `x-refresh-coalesced: leader|joined|replayed` to shared responses. Default: off.
    #[must_use]
    pub fn report_coalescing(mut self, report: bool) -> Self {
        self.report = report;
        self
    }

    /// The status of `invalid_grant` refusals. Default: `401` (RFC 6749 §5.2 prefers `400`).
    #[must_use]
    pub fn invalid_grant_status(mut self, status: StatusCode) -> Self {
        self.invalid_grant_status = status;
        self
    }

    /// Writes refusals as trailers-only gRPC statuses, for a tonic server. Default: JSON.
    #[must_use]
    pub fn grpc(mut self) -> Self {
        self.protocol = Protocol::Grpc;
        self
    }

    /// Builds the refusal for one of the errors of [`error`](crate::error).
    pub fn refusal<B>(
        &self,
        error: &(dyn std::error::Error + 'static),
    ) -> Response<ResponseBody<B>> {
        let refusal = Refusal::of(error, self.invalid_grant_status);
        match self.protocol {
            Protocol::Json => refusal.json(),
            Protocol::Grpc => refusal.grpc(),
        }
    }
}

impl Default for HttpShare {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HttpShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpShare")
            .field("max_response", &self.max_response)
            .field("report", &self.report)
            .field("invalid_grant_status", &self.invalid_grant_status)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

fn default_replay_if(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> bool {
    const GRPC_STATUS: &str = "grpc-status";
    let grpc_ok = trailers
        .and_then(|t| t.get(GRPC_STATUS))
        .or_else(|| headers.get(GRPC_STATUS))
        .is_none_or(|s| s == "0");
    status.is_success() && grpc_ok
}

/// Whether a response asks for a (new) DPoP nonce: an error carrying `DPoP-Nonce`.
fn is_nonce_challenge(status: StatusCode, headers: &HeaderMap) -> bool {
    !status.is_success() && headers.contains_key("dpop-nonce")
}

/// A response read to its end and kept compact, as it lives for the whole replay window:
/// headers and body packed in one reference-counted allocation of exactly their size,
/// trailers in another.
struct Buffered {
    status: StatusCode,
    version: Version,
    /// What the replay predicate said when the response was buffered.
    replayable: bool,
    /// The packed headers, then the body. An `Arc<[u8]>` rather than `Bytes`: `Bytes` would
    /// put its reference count in an allocation of its own the first time it is shared,
    /// which stays for the replay window; each rebuilt response borrows this one instead.
    packed: Arc<[u8]>,
    /// Where the body starts in `packed`.
    body_at: usize,
    /// Boxed: only gRPC responses have trailers.
    trailers: Option<Box<wire::Packed>>,
}

impl Buffered {
    fn new(
        status: StatusCode,
        version: Version,
        headers: &HeaderMap,
        body: &[Bytes],
        trailers: Option<&HeaderMap>,
        replay_if: &ReplayIf,
    ) -> Self {
        let (packed, body_at) = wire::pack_with(headers, body);
        Self {
            status,
            version,
            // RFC 9449 §8: a nonce challenge answers one proof; replaying it would hand a
            // stale nonce to the next one, whatever the policy says.
            replayable: replay_if(status, headers, trailers)
                && !is_nonce_challenge(status, headers),
            packed: packed.into(),
            body_at,
            trailers: trailers.map(|trailers| Box::new(wire::Packed::pack(trailers))),
        }
    }

    /// The headers and the body, sharing `packed` (one reference and one small allocation
    /// per response, freed with it).
    fn unpack(&self) -> (HeaderMap, Bytes) {
        let all = Bytes::from_owner(self.packed.clone());
        let headers = wire::Packed::front(&all, self.body_at).unpack();
        (headers, all.slice(self.body_at..))
    }

    /// Its stored form, for other instances.
    fn encode(&self) -> Vec<u8> {
        let (headers, body) = self.packed.split_at(self.body_at);
        wire::encode(
            self.status,
            self.version,
            headers,
            body,
            self.trailers.as_deref(),
        )
    }
}

/// One inner response, stored once and shared by every caller of its flight. Opaque.
pub struct SharedResponse<B, E> {
    kind: SharedKind<B, E>,
}

enum SharedKind<B, E> {
    Buffered(Buffered),
    /// Too large to share: the first caller to ask takes it.
    /// (Boxed, as the next variant: they are rare and large, and a replay lives long.)
    Streamed(Box<Mutex<Option<Response<ResponseBody<B>>>>>),
    /// The inner service failed: the first caller to ask takes the error.
    Failed(Box<Mutex<Option<E>>>),
    /// The response body failed while it was buffered.
    BodyFailed,
}

impl<B, E> fmt::Debug for SharedResponse<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            SharedKind::Buffered(buffered) => {
                return write!(f, "SharedResponse({})", buffered.status);
            }
            SharedKind::Streamed(_) => "streamed",
            SharedKind::Failed(_) => "failed",
            SharedKind::BodyFailed => "body failed",
        };
        write!(f, "SharedResponse({kind})")
    }
}

/// The future of [`HttpShare`]'s `share`: buffers the inner response.
pub struct ShareFuture<B, E> {
    inner: Pin<Box<dyn Future<Output = SharedResponse<B, E>> + Send>>,
}

impl<B, E> Future for ShareFuture<B, E> {
    type Output = SharedResponse<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ShareFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareFuture")
    }
}

impl<B, E> Share<Response<B>, E> for HttpShare
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    type Value = SharedResponse<B, E>;
    type Response = Response<ResponseBody<B>>;
    type Error = E;
    type Future = ShareFuture<B, E>;

    fn share(&self, result: Result<Response<B>, E>) -> Self::Future {
        let max = self.max_response;
        let replay_if = self.replay_if.clone();
        ShareFuture {
            inner: Box::pin(async move {
                let kind = match result {
                    Ok(response) => buffer(response, max, &replay_if).await,
                    Err(error) => SharedKind::Failed(Box::new(Mutex::new(Some(error)))),
                };
                SharedResponse { kind }
            }),
        }
    }

    fn is_replayable(&self, value: &Self::Value) -> bool {
        matches!(&value.kind, SharedKind::Buffered(buffered) if buffered.replayable)
    }

    fn respond(&self, value: &Self::Value, served: Served) -> Result<Self::Response, E> {
        let outcome = Coalesced::new(served.outcome());
        let unshareable = || {
            with_outcome(
                self.refusal(&Unshareable),
                outcome.with_reason("unshareable"),
            )
        };
        let mut response = match &value.kind {
            SharedKind::Buffered(buffered) => {
                let trailers = buffered.trailers.as_ref().map(|trailers| trailers.unpack());
                let (headers, body) = buffered.unpack();
                let mut response = Response::new(ResponseBody::full(body, trailers));
                *response.status_mut() = buffered.status;
                *response.version_mut() = buffered.version;
                *response.headers_mut() = headers;
                response
            }
            SharedKind::Streamed(slot) => match take(slot) {
                Some(response) => response,
                None => return Ok(unshareable()),
            },
            SharedKind::Failed(slot) => match take(slot) {
                Some(error) => return Err(error),
                None => return Ok(unshareable()),
            },
            SharedKind::BodyFailed => return Ok(unshareable()),
        };
        if self.report {
            response
                .headers_mut()
                .insert(COALESCED_HEADER, HeaderValue::from_static(served.as_str()));
        }
        Ok(with_outcome(response, outcome))
    }

    fn reject(&self, error: BoxError) -> Result<Self::Response, E> {
        Ok(with_outcome(
            self.refusal(&*error),
            Coalesced::of_error(&*error),
        ))
    }

    fn pass(&self, result: Result<Response<B>, E>) -> Result<Self::Response, E> {
        result.map(|response| {
            with_outcome(
                response.map(ResponseBody::streaming),
                Coalesced::new(Outcome::Bypassed),
            )
        })
    }

    fn ready_error(&self, error: E) -> E {
        error
    }

    fn encode(&self, value: &Self::Value) -> Option<Vec<u8>> {
        match &value.kind {
            SharedKind::Buffered(buffered) => Some(buffered.encode()),
            // Too large, or an error of the inner service: nothing another instance can use.
            _ => None,
        }
    }

    fn decode(&self, bytes: &[u8]) -> Option<Self::Value> {
        let (status, version, headers, body, trailers) = wire::decode(bytes)?;
        let buffered = Buffered::new(
            status,
            version,
            &headers,
            &[body],
            trailers.as_ref(),
            &self.replay_if,
        );
        Some(SharedResponse {
            kind: SharedKind::Buffered(buffered),
        })
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Buffers `response` if its body fits in `max` bytes; otherwise keeps it for one caller,
/// with whatever was read already in front of the rest.
async fn buffer<B, E>(response: Response<B>, max: usize, replay_if: &ReplayIf) -> SharedKind<B, E>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    if declared_length(&parts.headers).is_some_and(|len| len > max as u64) {
        let response = Response::from_parts(parts, ResponseBody::streaming(body));
        return SharedKind::Streamed(Box::new(Mutex::new(Some(response))));
    }
    let mut body = Box::pin(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            tracing::warn!("inner response body failed while it was buffered");
            return SharedKind::BodyFailed;
        };
        match frame.into_data() {
            Ok(chunk) => {
                len += chunk.len();
                chunks.push(chunk);
                if len > max {
                    let rest = ResponseBody::rest(concat(chunks, len), body);
                    let response = Response::from_parts(parts, rest);
                    return SharedKind::Streamed(Box::new(Mutex::new(Some(response))));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    SharedKind::Buffered(Buffered::new(
        parts.status,
        parts.version,
        &parts.headers,
        &chunks,
        trailers.as_ref(),
        replay_if,
    ))
}

/// Records what the layer did with the request in the response's extensions.
fn with_outcome<B>(mut response: Response<B>, outcome: Coalesced) -> Response<B> {
    response.extensions_mut().insert(outcome);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_survives_the_round_trip_with_repeated_headers_and_trailers() {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.append("cache-control", HeaderValue::from_static("no-store"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Bytes::from_static(b"{\"refresh_token\":\"r2\"}");
        let replay_if: ReplayIf = Arc::new(default_replay_if);
        let buffered = Buffered::new(
            StatusCode::OK,
            Version::HTTP_2,
            &headers,
            std::slice::from_ref(&body),
            Some(&trailers),
            &replay_if,
        );
        assert!(buffered.replayable);
        assert_eq!(
            buffered.unpack(),
            (headers.clone(), body.clone()),
            "packed headers and body unpack as they were"
        );
        assert_eq!(
            buffered.packed.len(),
            4 + (8 + 10 + 3) * 2 + (8 + 13 + 8) + body.len(),
            "one allocation of exactly the packed size"
        );
        let bytes = buffered.encode();
        let decoded = wire::decode(&bytes).expect("decodes");
        assert_eq!(
            decoded,
            (
                StatusCode::OK,
                Version::HTTP_2,
                headers,
                body,
                Some(trailers)
            )
        );
        for cut in 0..bytes.len() {
            assert_eq!(wire::decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(wire::decode(&longer), None, "trailing bytes");
    }
}
