//! The refresh flight: one per credentials and generation, which every request needing the
//! refresh joins.
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

use std::{future::Future, pin::Pin, sync::Arc};

use futures_util::FutureExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    attempt::{Failure, Outcome, call, failed},
    core::Core,
    error::{RefreshErrorKind, RefreshFailed},
    metrics::Trigger,
    remote,
    session::Session,
};
use crate::{
    error::{BoxError, Failure as LeaderFailure, LeaderFailed},
    flight::{FlightFuture, FlightGuard, FlightResult, Found, Lead, Lookup, Value},
    key::{Admission, Fingerprint},
};

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
