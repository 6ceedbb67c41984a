//! What the layer did with one request: its [`Outcome`], and [`Coalesced`], the record of it
//! that the HTTP front puts in the extensions of every response it answers.

use std::{error::Error, fmt};

use crate::error::{Elapsed, Failure, LeaderFailed, Limit, Overloaded, Rejected, Rejection};

/// How a request ended, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// It started a flight.
    Leader,
    /// It joined a running flight.
    Joined,
    /// It was answered from a replay.
    Replayed,
    /// It was refused before any coalescing (no token, invalid token, body too large).
    Rejected,
    /// It waited `wait_timeout` and gave up.
    TimedOut,
    /// A limit turned it away.
    Overloaded,
    /// Its flight's inner call panicked, was aborted or cancelled.
    LeaderFailed,
    /// It was not coalesced and went straight to the inner service.
    Bypassed,
}

impl Outcome {
    /// Every outcome, in a fixed order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Leader,
        Outcome::Joined,
        Outcome::Replayed,
        Outcome::Rejected,
        Outcome::TimedOut,
        Outcome::Overloaded,
        Outcome::LeaderFailed,
        Outcome::Bypassed,
    ];

    /// The outcome's name in snake case, as used for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Leader => "leader",
            Outcome::Joined => "joined",
            Outcome::Replayed => "replayed",
            Outcome::Rejected => "rejected",
            Outcome::TimedOut => "timed_out",
            Outcome::Overloaded => "overloaded",
            Outcome::LeaderFailed => "leader_failed",
            Outcome::Bypassed => "bypassed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the layer did with a request, in the extensions of the response the HTTP front
/// answers it with: every response, whether served from a flight, refused by the layer, or
/// passed through from the inner service.
///
/// An outer layer or handler labels with it: a `TraceLayer` records it on the request span,
/// a metrics layer adds it as a label, so that the layer does not count what an HTTP metrics
/// layer counts already.
///
/// ```
/// use axum::{Router, middleware::{self, Next}, extract::Request, response::Response};
/// use tower_refresh_coalesce::{Coalesced, Outcome};
///
/// // Outside the coalescing layer: log refusals with their reason.
/// async fn label(request: Request, next: Next) -> Response {
///     let response = next.run(request).await;
///     if let Some(coalesced) = response.extensions().get::<Coalesced>() {
///         if coalesced.outcome() != Outcome::Replayed {
///             tracing::info!(outcome = %coalesced.outcome(), reason = coalesced.reason(), "refresh");
///         }
///     }
///     response
/// }
/// let app: Router = Router::new().layer(middleware::from_fn(label));
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coalesced {
    outcome: Outcome,
    reason: Option<&'static str>,
}

impl Coalesced {
    /// A record of `outcome` without a reason.
    pub fn new(outcome: Outcome) -> Self {
        Self {
            outcome,
            reason: None,
        }
    }

    /// The record of a request the layer answered with `error`, one of the errors of
    /// [`error`](crate::error): the outcome it was counted as, and the reason.
    pub fn of_error(error: &(dyn Error + 'static)) -> Self {
        let (outcome, reason) = if let Some(rejected) = error.downcast_ref::<Rejected>() {
            (Outcome::Rejected, rejection(rejected.rejection()))
        } else if let Some(overloaded) = error.downcast_ref::<Overloaded>() {
            (Outcome::Overloaded, limit(overloaded.limit()))
        } else if error.downcast_ref::<Elapsed>().is_some() {
            (Outcome::TimedOut, "wait_timeout")
        } else if let Some(failed) = error.downcast_ref::<LeaderFailed>() {
            let outcome = match failed.failure() {
                Failure::RemoteTimeout => Outcome::TimedOut,
                _ => Outcome::LeaderFailed,
            };
            (outcome, failure(failed.failure()))
        } else {
            (Outcome::LeaderFailed, "unshareable")
        };
        Self {
            outcome,
            reason: Some(reason),
        }
    }

    /// The same record with `reason`.
    #[must_use]
    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// How the request ended.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Why it was refused, timed out or failed, in snake case: a rejection (`missing_token`,
    /// `malformed`, `body_too_large`, `invalid_token`, `expired`, `invalid_dpop_proof`,
    /// `unavailable`), a limit (`entries`, `waiters`, `group`), a failure of the flight
    /// (`panicked`, `hard_cap`, `cancelled`, `incompatible`, `remote_timeout`, `revoked`,
    /// `store_unavailable`), `wait_timeout`, or `unshareable` (the response could not be
    /// shared). `None` for requests served or passed through. Never contains the token.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason
    }
}

/// The snake-case name of a rejection.
fn rejection(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::MissingToken => "missing_token",
        Rejection::Malformed(_) => "malformed",
        Rejection::BodyTooLarge => "body_too_large",
        Rejection::InvalidToken(_) => "invalid_token",
        Rejection::Expired => "expired",
        Rejection::InvalidDpopProof(_) => "invalid_dpop_proof",
        Rejection::Unavailable(_) => "unavailable",
    }
}

/// The snake-case name of a limit.
fn limit(limit: Limit) -> &'static str {
    match limit {
        Limit::Entries => "entries",
        Limit::Waiters => "waiters",
        Limit::Group => "group",
    }
}

/// The snake-case name of a failure.
fn failure(failure: Failure) -> &'static str {
    match failure {
        Failure::Panicked => "panicked",
        Failure::HardCap => "hard_cap",
        Failure::Cancelled => "cancelled",
        Failure::Incompatible => "incompatible",
        Failure::RemoteTimeout => "remote_timeout",
        Failure::Revoked => "revoked",
        Failure::StoreUnavailable => "store_unavailable",
    }
}
