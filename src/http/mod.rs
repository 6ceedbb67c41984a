//! The HTTP front: find and verify the refresh token of an `http::Request`, share whole
//! `http::Response`s, and answer refusals with JSON (or gRPC statuses).
//!
//! [`HttpExtract`] is the [`Extract`](crate::Extract) strategy and [`HttpShare`] the
//! [`Share`](crate::Share) policy;
//! [`RefreshCoalesceLayer::http`](crate::RefreshCoalesceLayer::http) puts them together.
//! The inner service receives `http::Request<RequestBody<B>>` and its responses reach callers
//! as `http::Response<ResponseBody<B>>`; axum, hyper and tonic services accept both.
//!
//! - `extract`: [`HttpExtract`], from a request to a key and, for a leader, a verified
//!   [`RefreshGrant`];
//! - `party`: the parts of a key besides the token (client, credential, sender);
//! - `grant`: [`RefreshGrant`] and the one reading of a request the layer and
//!   [`RefreshGrant::read`] share;
//! - `body`: [`RequestBody`] and [`ResponseBody`], and the capped read of a request body;
//! - `share`: [`HttpShare`], buffering a response once and rebuilding it for every caller;
//! - `wire`: the stored form of a buffered response, for other instances;
//! - `refusal`: refusals as JSON or as gRPC statuses.

use ::http::HeaderName;

mod body;
mod extract;
mod grant;
mod party;
mod refusal;
mod share;
mod wire;

pub use self::{
    body::{RequestBody, ResponseBody},
    extract::{Candidate, ClientAssertion, ExtractFuture, HttpExtract},
    grant::RefreshGrant,
    refusal::Protocol,
    share::{HttpShare, ShareFuture, SharedResponse},
};

/// The request body cap by default: 16 KiB.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
/// The largest response shared by default: 64 KiB.
pub const DEFAULT_MAX_RESPONSE: usize = 64 * 1024;
/// The response header that reports how a caller was served, when enabled.
pub const COALESCED_HEADER: HeaderName = HeaderName::from_static("x-refresh-coalesced");
