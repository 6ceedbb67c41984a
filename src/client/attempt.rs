//! One attempt at the refresh: a call of the refresh service under its timeout, and what a
//! failure does to the credentials (`invalid_grant` ends them, anything else backs off).
//! Shared by the flight of one process and the one coordinated through a store.

use std::sync::Arc;

use super::{
    core::Core,
    error::{NoCredentials, Reason, RefreshError, RefreshErrorKind, RefreshFailed},
    metrics::Trigger,
    refresher::RefreshRequest,
    session::{Session, Snapshot, Tokens},
};
use crate::error::{BoxError, Elapsed};

/// Why the credentials could not be moved past a generation.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// There are none to move: never set, cleared, or refused by the token server.
    NoCredentials(NoCredentials),
    /// The refresh failed and may succeed later (or the back-off of such a failure runs).
    Failed(RefreshFailed),
}

impl From<Failure> for BoxError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::NoCredentials(error) => error.into(),
            Failure::Failed(error) => error.into(),
        }
    }
}

/// What a flight resolves to: the credentials past its generation, or why not.
pub(crate) type Outcome = Result<Snapshot, Failure>;

/// Calls the refresh service for `tokens`, under the refresh timeout.
pub(crate) async fn call(
    core: &Core,
    generation: u64,
    tokens: &Tokens,
    trigger: Trigger,
) -> Result<Tokens, BoxError> {
    core.credentials.shared.counters.refresh(trigger);
    let request = RefreshRequest::new(generation, tokens.clone());
    match tokio::time::timeout(core.refresh_timeout, core.refresh.refresh(request)).await {
        Ok(result) => result,
        Err(_) => Err(RefreshError::transient(Elapsed::new(core.refresh_timeout)).into()),
    }
}

/// Records a failed refresh of `generation`: `invalid_grant` ends the credentials (through
/// `end`, which stores the ended session), anything else starts a back-off.
pub(crate) fn failed(
    core: &Core,
    generation: u64,
    error: BoxError,
    end: impl FnOnce(Session),
) -> Failure {
    let shared = &core.credentials.shared;
    let kind = RefreshError::kind_of(&error);
    shared.counters.failure(kind);
    let error = Arc::new(error);
    if kind == RefreshErrorKind::InvalidGrant {
        tracing::warn!(
            generation,
            "the token server refused the refresh token: the credentials end"
        );
        end(Session::Ended(Reason::Refused));
        return Failure::NoCredentials(NoCredentials::with_source(Reason::Refused, error));
    }
    let failure = shared.fail(generation, kind, error, &core.backoff);
    tracing::warn!(
        generation,
        retry_after = ?failure.retry_after(),
        error = %crate::client::error_chain(&failure),
        "refreshing the access token failed"
    );
    Failure::Failed(failure)
}
