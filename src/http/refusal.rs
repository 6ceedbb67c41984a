//! Refusals: every error of the layer as a JSON response, or as a trailers-only gRPC status.

use std::fmt;

use ::http::{
    HeaderValue, Response, StatusCode,
    header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
};
use bytes::Bytes;

use super::body::ResponseBody;
use crate::error::{Elapsed, Failure, LeaderFailed, Overloaded, Rejected, Rejection};

/// How refusals are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// JSON bodies `{"error": ..., "error_description": ...}` with an HTTP status, as RFC
    /// 6749 §5.2 does for token endpoints.
    #[default]
    Json,
    /// Trailers-only gRPC statuses (`grpc-status`, `grpc-message`), for tonic services.
    Grpc,
}

/// The stand-in error for callers of a flight whose response could not be shared.
#[derive(Debug)]
pub(super) struct Unshareable;

impl fmt::Display for Unshareable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the refresh response could not be shared")
    }
}

impl std::error::Error for Unshareable {}

/// The OAuth error code of a refused DPoP proof (RFC 9449 §5).
const INVALID_DPOP_PROOF: &str = "invalid_dpop_proof";

/// A refusal, before it is written as JSON or as a gRPC status.
pub(super) struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
    retry_after: bool,
    grpc: u8,
    /// Sent before the request body was read: close the HTTP/1 connection.
    closes: bool,
}

impl Refusal {
    pub(super) fn of(error: &(dyn std::error::Error + 'static), invalid_grant: StatusCode) -> Self {
        const INVALID_ARGUMENT: u8 = 3;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const UNAVAILABLE: u8 = 14;
        const UNAUTHENTICATED: u8 = 16;
        let description = error.to_string();
        let refusal = |status, error, retry_after, grpc| Refusal {
            status,
            error,
            description: description.clone(),
            retry_after,
            grpc,
            closes: false,
        };
        if let Some(rejected) = error.downcast_ref::<Rejected>() {
            let refusal = |status, error, retry_after, grpc| Refusal {
                closes: rejected.closes_connection(),
                ..refusal(status, error, retry_after, grpc)
            };
            return match rejected.rejection() {
                Rejection::MissingToken => refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    false,
                    UNAUTHENTICATED,
                ),
                Rejection::BodyTooLarge => refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    false,
                    RESOURCE_EXHAUSTED,
                ),
                Rejection::InvalidToken(_) | Rejection::Expired => {
                    refusal(invalid_grant, "invalid_grant", false, UNAUTHENTICATED)
                }
                Rejection::InvalidDpopProof(_) => refusal(
                    StatusCode::BAD_REQUEST,
                    INVALID_DPOP_PROOF,
                    false,
                    UNAUTHENTICATED,
                ),
                // Like `Overloaded`: a bounded cache is full, a retry soon may pass.
                Rejection::Unavailable(_) => refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    true,
                    RESOURCE_EXHAUSTED,
                ),
                _ => refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    false,
                    INVALID_ARGUMENT,
                ),
            };
        }
        // The flight was invalidated (logout, password change) while it ran: its result is
        // revoked, which to its callers is what the token server would say of the token.
        if error
            .downcast_ref::<LeaderFailed>()
            .is_some_and(|failed| failed.failure() == Failure::Revoked)
        {
            return refusal(invalid_grant, "invalid_grant", false, UNAUTHENTICATED);
        }
        // A follower's flight gave up on another instance's leader: to its callers, that is
        // the wait timing out, whenever they joined.
        let remote_timeout = error
            .downcast_ref::<LeaderFailed>()
            .is_some_and(|failed| failed.failure() == Failure::RemoteTimeout);
        if error.is::<Elapsed>() || remote_timeout {
            return refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                true,
                UNAVAILABLE,
            );
        }
        if error.is::<Overloaded>() {
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                true,
                RESOURCE_EXHAUSTED,
            );
        }
        if !error.is::<LeaderFailed>() && !error.is::<Unshareable>() {
            tracing::error!(error = %description, "unexpected error in the coalescing layer");
        }
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            true,
            UNAVAILABLE,
        )
    }

    pub(super) fn json<B>(self) -> Response<ResponseBody<B>> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            error_description: &'a str,
        }
        let body = serde_json::to_vec(&Body {
            error: self.error,
            error_description: &self.description,
        })
        .expect("a struct of strings serializes");
        let mut response = Response::new(ResponseBody::full(Bytes::from(body), None));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.closes {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if self.error == INVALID_DPOP_PROOF {
            // RFC 9449 §7.1's challenge, so that a client can tell a DPoP failure apart.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"DPoP error="invalid_dpop_proof""#),
            );
        } else if self.status == StatusCode::UNAUTHORIZED {
            // RFC 7235 §3.1: a 401 carries a challenge; RFC 6750 §3 gives its form.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        response
    }

    pub(super) fn grpc<B>(self) -> Response<ResponseBody<B>> {
        // Trailers-only: the status travels in the headers and the body is empty.
        let mut response = Response::new(ResponseBody::full(Bytes::new(), None));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(self.grpc)));
        // grpc-message is percent-encoded; our descriptions are printable ASCII without '%'.
        if let Ok(message) = HeaderValue::from_str(&self.description) {
            headers.insert("grpc-message", message);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(rejection: Rejection) -> Refusal {
        let error = Rejected::new(rejection);
        Refusal::of(&error, StatusCode::UNAUTHORIZED)
    }

    #[test]
    fn an_invalid_dpop_proof_is_a_400_with_a_dpop_challenge() {
        let refusal = refusal(Rejection::InvalidDpopProof("wrong typ"));
        assert_eq!(refusal.grpc, 16);
        let response = refusal.json::<()>();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            r#"DPoP error="invalid_dpop_proof""#
        );
    }

    #[test]
    fn a_full_dpop_replay_cache_is_a_503_to_retry() {
        let refusal = refusal(Rejection::Unavailable("dpop replay cache is full"));
        assert_eq!(refusal.error, "temporarily_unavailable");
        let response = refusal.json::<()>();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert!(response.headers().get(WWW_AUTHENTICATE).is_none());
    }

    #[test]
    fn a_revoked_flight_is_refused_as_invalid_grant_and_unauthenticated() {
        let revoked = LeaderFailed::new(Failure::Revoked);
        let refusal = Refusal::of(&revoked, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.error, "invalid_grant");
        assert_eq!(refusal.grpc, 16, "UNAUTHENTICATED");
        assert!(!refusal.retry_after);
        assert_eq!(
            refusal.description,
            "coalesced call was revoked by an invalidation while it ran"
        );
        let configured = Refusal::of(&revoked, StatusCode::BAD_REQUEST);
        assert_eq!(
            configured.status,
            StatusCode::BAD_REQUEST,
            "the configured status"
        );
    }
}
