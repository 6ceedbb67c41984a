//! The refresh: what a refresh service receives ([`RefreshRequest`]) and returns
//! ([`Tokens`]), closures as refresh services ([`refresh_fn`]), and the one flight per
//! credentials and generation that every request needing the refresh joins.
//!
//! [`past`] moves the credentials past a generation. It looks the generation up in the
//! credentials' flight table: a running flight is joined; otherwise the request inserts one
//! and spawns its task under the table's shard lock, as the server side's leader does
//! (`leader::spawn`). The task reads the credentials again before it calls anything: if they
//! moved past the generation meanwhile (a flight that just finished, a login), it answers
//! with them. So the refresh service is called at most once per generation, and a refresh
//! token is never presented after it was rotated.
//!
//! The task's result is not replayed: it moves the credentials (or records the failure's
//! back-off) before its entry goes, and every request reads the credentials before it looks
//! for a flight. A panic in the refresh service reaches every waiter as a value
//! ([`LeaderFailed`]), never as a panic, and [`FlightGuard`] removes the entry whatever
//! happens to the task.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures_util::FutureExt;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use super::{
    core::Core,
    credentials::{Session, Snapshot, Tokens},
    error::{NoCredentials, Reason, RefreshError, RefreshErrorKind, RefreshFailed},
    metrics::Trigger,
    remote,
};
use crate::{
    error::{BoxError, Elapsed, Failure as LeaderFailure, LeaderFailed},
    flight::{FlightFuture, FlightGuard, FlightResult, Found, Lead, Lookup, Value},
    key::{Admission, Fingerprint},
};

/// What a refresh service receives: the tokens to renew, and their generation.
///
/// `Debug` never shows a token.
#[derive(Debug, Clone)]
pub struct RefreshRequest {
    generation: u64,
    tokens: Tokens,
}

impl RefreshRequest {
    /// A request to renew `tokens`, of `generation` (for testing refresh services).
    pub fn new(generation: u64, tokens: Tokens) -> Self {
        Self { generation, tokens }
    }

    /// The refresh token to present, if the tokens have one. A refresh service without one
    /// may still obtain new tokens another way (a client credentials grant, say).
    pub fn refresh_token(&self) -> Option<&str> {
        self.tokens.refresh_token()
    }

    /// The tokens being renewed.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Their generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A refresh service made of a closure; see [`refresh_fn`].
#[derive(Clone)]
pub struct RefreshFn<F> {
    f: F,
}

/// A refresh service that calls `f`: any `FnMut(RefreshRequest) -> impl Future<Output =
/// Result<Tokens, E>>`, as `tower::service_fn` makes services of closures.
///
/// ```
/// use tower_refresh_coalesce::client::{RefreshRequest, Tokens, error::RefreshError, refresh_fn};
///
/// let refresh = refresh_fn(|request: RefreshRequest| async move {
///     let Some(refresh_token) = request.refresh_token() else {
///         return Err(RefreshError::rejected("no refresh token"));
///     };
///     // POST it to the token server...
///     # let _ = refresh_token;
///     Tokens::new("new-access-token").map_err(|e| RefreshError::rejected("bad token").with_source(e))
/// });
/// # let _ = refresh;
/// ```
pub fn refresh_fn<F>(f: F) -> RefreshFn<F> {
    RefreshFn { f }
}

impl<F, Fut, E> Service<RefreshRequest> for RefreshFn<F>
where
    F: FnMut(RefreshRequest) -> Fut,
    Fut: Future<Output = Result<Tokens, E>>,
{
    type Response = Tokens;
    type Error = E;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RefreshRequest) -> Fut {
        (self.f)(request)
    }
}

impl<F> fmt::Debug for RefreshFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshFn").finish_non_exhaustive()
    }
}

/// The refresh future, type-erased.
pub(crate) type RefreshFuture = Pin<Box<dyn Future<Output = Result<Tokens, BoxError>> + Send>>;

/// A refresh service behind a trait object, so that neither the layer nor the flight is
/// generic over it.
pub(crate) trait Refresher: Send + Sync {
    fn refresh(&self, request: RefreshRequest) -> RefreshFuture;
}

/// A refresh service `R`, cloned out of its lock for each call (so that `R` need not be
/// `Sync`); the clone is readied before it is called.
pub(crate) struct RefreshWith<R>(pub(crate) Mutex<R>);

impl<R> Refresher for RefreshWith<R>
where
    R: Service<RefreshRequest, Response = Tokens> + Clone + Send + 'static,
    R::Error: Into<BoxError>,
    R::Future: Send + 'static,
{
    fn refresh(&self, request: RefreshRequest) -> RefreshFuture {
        let mut service = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(request).await.map_err(Into::into)
        })
    }
}

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

/// Moves the credentials past `generation`: joins the flight that does it, or starts it.
pub(crate) async fn past(core: &Arc<Core>, generation: u64, trigger: Trigger) -> Outcome {
    let shared = &core.credentials.shared;
    let key = Fingerprint::from(generation);
    let found = match shared.table.find_answer(&key, Value::clone) {
        Ok(Lookup::Answered(value)) => Found::Replay(value),
        Ok(Lookup::Found(found)) => found,
        Err(refused) => return Err(refused_by_table(refused)),
    };
    let waiter = match found {
        Found::Join(waiter) => {
            shared.counters.joined();
            waiter
        }
        Found::Replay(value) => return decode(&value),
        Found::Vacant => {
            let start = |id| spawn(core, generation, trigger, id);
            match shared.table.lead(key, Admission::new(), start) {
                Ok((Lead::Started(waiter), _)) => waiter,
                Ok((Lead::Found(Found::Join(waiter)), _)) => {
                    shared.counters.joined();
                    waiter
                }
                Ok((Lead::Found(Found::Replay(value)), _)) => return decode(&value),
                // `lead` starts a flight when it finds the key vacant.
                Ok((Lead::Found(Found::Vacant), _)) => {
                    return Err(refused_by_table(crate::flight::Refused::Full(
                        crate::error::Limit::Entries,
                    )));
                }
                Err(refused) => return Err(refused_by_table(refused)),
            }
        }
    };
    match waiter.future.clone().await {
        Ok(value) => decode(&value),
        // The task panicked or was cancelled before it recorded anything: no back-off.
        Err(failed) => Err(Failure::Failed(RefreshFailed::new(
            RefreshErrorKind::Transient,
            std::time::Duration::ZERO,
            failed.into(),
        ))),
    }
}

/// The table turned the flight away: more generations in flight than it holds at once,
/// which only a flood of `set` calls during refreshes can cause. Treated as transient.
fn refused_by_table(refused: crate::flight::Refused) -> Failure {
    let error: BoxError = match refused {
        crate::flight::Refused::Full(limit) => crate::error::Overloaded::new(limit).into(),
        crate::flight::Refused::Expired => "the refresh's table entry expired".into(),
    };
    Failure::Failed(RefreshFailed::new(
        RefreshErrorKind::Transient,
        std::time::Duration::ZERO,
        error,
    ))
}

fn decode(value: &Value) -> Outcome {
    match value.downcast_ref::<Outcome>() {
        Some(outcome) => outcome.clone(),
        // Every flight of this table is one of ours.
        None => Err(Failure::Failed(RefreshFailed::new(
            RefreshErrorKind::Transient,
            std::time::Duration::ZERO,
            LeaderFailed::new(LeaderFailure::Incompatible).into(),
        ))),
    }
}

/// Spawns the flight of `generation` and returns the future its callers share.
///
/// Called under the table's shard lock: it only spawns.
fn spawn(core: &Arc<Core>, generation: u64, trigger: Trigger, id: u64) -> FlightFuture {
    let core = core.clone();
    let span = tracing::debug_span!(
        "refresh_client_flight",
        generation,
        trigger = trigger.as_str()
    );
    let task = async move {
        let shared = &core.credentials.shared;
        let guard = FlightGuard::new(shared.table.clone(), Fingerprint::from(generation), id);
        let outcome: Outcome = match &shared.store {
            Some(store) => remote::run(&core, store.as_ref(), generation, trigger).await,
            None => run(&core, generation, trigger).await,
        };
        let value: Value = Arc::new(outcome);
        // Not replayed: the credentials moved (or hold the back-off) already. Nothing
        // invalidates this table, so the entry is still the flight's own.
        guard.complete(&value, None);
        Ok(value)
    };
    let handle = tokio::spawn(task.instrument(span));
    let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
        Box::pin(handle.map(|joined| match joined {
            Ok(result) => result,
            Err(error) if error.is_panic() => Err(LeaderFailed::new(LeaderFailure::Panicked)),
            Err(_) => Err(LeaderFailed::new(LeaderFailure::Cancelled)),
        }));
    future.shared()
}

/// The flight of `generation` in this process alone.
async fn run(core: &Core, generation: u64, trigger: Trigger) -> Outcome {
    let shared = &core.credentials.shared;
    let (snapshot, backoff) = shared.view();
    if snapshot.generation != generation {
        // Moved meanwhile: a flight of this generation finished, or a login.
        return Ok(snapshot);
    }
    let tokens = snapshot.tokens().map_err(Failure::NoCredentials)?.clone();
    if let Some(backoff) = backoff
        && backoff.until > Instant::now()
    {
        return Err(Failure::Failed(backoff.failure));
    }
    let result = call(core, generation, &tokens, trigger).await;
    match result {
        Ok(new) => Ok(shared.advance(
            generation,
            Session::Active(new.keeping_refresh_token(&tokens)),
        )),
        Err(error) => Err(failed(core, generation, error, |session| {
            shared.advance(generation, session);
        })),
    }
}

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
    let (initial, max) = core.backoff;
    let failure = shared.fail(generation, kind, error, initial, max);
    tracing::warn!(
        generation,
        retry_after = ?failure.retry_after(),
        error = %crate::client::error_chain(&failure),
        "refreshing the access token failed"
    );
    Failure::Failed(failure)
}
