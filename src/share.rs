//! How one result of the inner service is shared by every caller of a flight.
//!
//! The leader's task hands the inner service's result to [`Share::share`] once; the value it
//! produces is stored behind an `Arc` and turned into a response for every caller of the
//! flight, and for every replay, by [`Share::respond`]. The core's default, [`CloneResponse`],
//! clones `Clone` responses; the HTTP front buffers `http::Response`s and rebuilds them.

use std::{
    fmt,
    future::{Future, Ready, ready},
};

use crate::{
    error::{self, BoxError},
    outcome::Outcome,
};

/// How a caller was served; the HTTP front can report it in a response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Served {
    /// The caller's request started the flight.
    Leader,
    /// The caller joined a flight another request started.
    Joined,
    /// The caller received a stored result without waiting.
    Replayed,
}

impl Served {
    /// `"leader"`, `"joined"` or `"replayed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Leader => "leader",
            Served::Joined => "joined",
            Served::Replayed => "replayed",
        }
    }
}

impl Served {
    /// The outcome a caller served this way is counted as.
    pub fn outcome(self) -> Outcome {
        match self {
            Served::Leader => Outcome::Leader,
            Served::Joined => Outcome::Joined,
            Served::Replayed => Outcome::Replayed,
        }
    }
}

impl fmt::Display for Served {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the result of one inner call is stored, replayed and answered.
///
/// `R` and `E` are the inner service's response and error types.
pub trait Share<R, E>: Send + Sync + 'static {
    /// The stored form of one result, shared by every caller of the flight.
    type Value: Send + Sync + 'static;
    /// The response every caller receives.
    type Response;
    /// The error every caller may receive.
    type Error;
    /// The future returned by [`share`](Share::share); it runs inside the leader's task,
    /// under the hard cap.
    type Future: Future<Output = Self::Value> + Send + 'static;

    /// Turns the inner service's result into the stored value (buffering a body, say).
    fn share(&self, result: Result<R, E>) -> Self::Future;

    /// Whether `value` is kept as a replay for the TTL. Values that are not reach the current
    /// callers of their flight only.
    fn is_replayable(&self, value: &Self::Value) -> bool;

    /// Builds the response of one caller from the stored value.
    fn respond(&self, value: &Self::Value, served: Served) -> Result<Self::Response, Self::Error>;

    /// Answers a request the layer turned away, with one of the errors of
    /// [`error`](crate::error).
    fn reject(&self, error: BoxError) -> Result<Self::Response, Self::Error>;

    /// Answers a request that was not coalesced, with the inner service's own result.
    fn pass(&self, result: Result<R, E>) -> Result<Self::Response, Self::Error>;

    /// Converts an error of the inner service's `poll_ready`.
    fn ready_error(&self, error: E) -> Self::Error;

    /// Encodes `value` for a [`Store`](crate::store::Store) shared with other instances.
    /// `None` (the default) keeps the value in this process: with a store configured, the
    /// flight then still runs one election, but other instances cannot receive its result.
    fn encode(&self, value: &Self::Value) -> Option<Vec<u8>> {
        let _ = value;
        None
    }

    /// Decodes what [`encode`](Share::encode) produced, on another instance; `None` if the
    /// bytes are not a value of this policy.
    fn decode(&self, bytes: &[u8]) -> Option<Self::Value> {
        let _ = bytes;
        None
    }
}

/// The core's sharing policy: every caller gets a clone of the inner service's response.
///
/// Errors of the inner service are shared as [`error::Shared`] and never replayed. Which
/// responses are replayed is decided by a predicate, by default every one.
///
/// ```
/// use tower_refresh_coalesce::CloneResponse;
///
/// // Replay only responses that carry a token.
/// let policy = CloneResponse::replay_if(|response: &Option<String>| response.is_some());
/// # let _ = policy;
/// ```
pub struct CloneResponse<F = ReplayAll> {
    replay_if: F,
}

/// The default replay predicate of [`CloneResponse`]: replay every successful response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayAll;

impl CloneResponse {
    /// Clones and replays every successful response.
    pub fn new() -> Self {
        Self {
            replay_if: ReplayAll,
        }
    }
}

impl Default for CloneResponse {
    fn default() -> Self {
        Self::new()
    }
}

impl<F> CloneResponse<F> {
    /// Replays only the successful responses for which `predicate` returns `true`.
    pub fn replay_if<R>(predicate: F) -> Self
    where
        F: Fn(&R) -> bool,
    {
        Self {
            replay_if: predicate,
        }
    }
}

impl<F> fmt::Debug for CloneResponse<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloneResponse").finish_non_exhaustive()
    }
}

/// Decides whether a successful response is replayed.
pub trait ReplayPredicate<R> {
    /// `true` to keep `response` as a replay.
    fn replay(&self, response: &R) -> bool;
}

impl<R> ReplayPredicate<R> for ReplayAll {
    fn replay(&self, _response: &R) -> bool {
        true
    }
}

impl<R, F: Fn(&R) -> bool> ReplayPredicate<R> for F {
    fn replay(&self, response: &R) -> bool {
        self(response)
    }
}

impl<R, E, F> Share<R, E> for CloneResponse<F>
where
    R: Clone + Send + Sync + 'static,
    E: Into<BoxError>,
    F: ReplayPredicate<R> + Send + Sync + 'static,
{
    type Value = Result<R, error::Shared>;
    type Response = R;
    type Error = BoxError;
    type Future = Ready<Self::Value>;

    fn share(&self, result: Result<R, E>) -> Self::Future {
        ready(result.map_err(|e| error::Shared::new(e.into())))
    }

    fn is_replayable(&self, value: &Self::Value) -> bool {
        value
            .as_ref()
            .is_ok_and(|response| self.replay_if.replay(response))
    }

    fn respond(&self, value: &Self::Value, _served: Served) -> Result<R, BoxError> {
        value.clone().map_err(Into::into)
    }

    fn reject(&self, error: BoxError) -> Result<R, BoxError> {
        Err(error)
    }

    fn pass(&self, result: Result<R, E>) -> Result<R, BoxError> {
        result.map_err(Into::into)
    }

    fn ready_error(&self, error: E) -> BoxError {
        error.into()
    }
}
