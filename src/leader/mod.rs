//! The flight task: one inner call per key per process, and its side of the protocol
//! with other instances (the store, its breaker), as tower's `buffer/worker.rs` is the
//! buffer's task.
//!
//! [`spawn`] starts the task under the table's shard lock; the task runs [`run`] under the
//! hard cap, lets the share policy store the result, and finishes its table entry (replay or
//! removal) before its join handle resolves. With a store, [`Remote`] elects one leader
//! across instances: a follower waits for the leader's result and never calls the inner
//! service.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    audit::Audit,
    durations::Durations,
    error::{Failure, LeaderFailed},
    flight::{FlightGuard, FlightResult, Launched, Table, Value},
    key::{Admission, Fingerprint},
    metrics::{Counters, StoreCounters},
    share::Share,
    store::Keep,
};

mod breaker;
mod remote;

/// What every flight task of one layer reads: the share policy, the table, the counters,
/// the store and the timings. The layer's [`Core`](crate::core::Core) holds it in an `Arc`,
/// which each task clones.
pub(crate) struct Flights<P> {
    pub(crate) share: P,
    pub(crate) table: Arc<Table>,
    /// Every outcome and store event of the layer, counted once.
    pub(crate) counters: Arc<Counters>,
    /// The store shared with other instances, if any.
    pub(crate) remote: Option<Arc<Remote>>,
    pub(crate) wait_timeout: Duration,
    pub(crate) hard_cap: Duration,
    /// The audit hook, if any.
    pub(crate) audit: Audit,
    /// Where the wait and the inner call are timed.
    pub(crate) durations: Durations,
}

pub(crate) use self::{
    breaker::Breaker,
    remote::{Finished, Followed, Plan, Remote},
};

#[cfg(feature = "metrics")]
impl<P> Flights<P> {
    /// Sets the `metrics` gauges, as a flight starts and ends.
    fn set_gauges(&self) {
        let breaker_open = self.remote.as_ref().is_some_and(|r| r.breaker_open());
        crate::metrics::set_gauges(self.table.gauges(), breaker_open);
    }
}

/// What the flight task needs to know of its key.
#[derive(Clone, Copy)]
pub(crate) struct Flight {
    key: Fingerprint,
    seal: [u8; 32],
    group: Option<Fingerprint>,
    /// The entry's second name (the HTTP front's token tag), remembered in the store.
    tag: Option<Fingerprint>,
    /// When the presented token expires: no replay of its flight outlives it.
    expires: Option<SystemTime>,
}

impl Flight {
    /// The flight of `key`, as its leader was admitted.
    pub(crate) fn new(key: Fingerprint, admission: &Admission) -> Self {
        Self {
            key,
            // Without a token-derived secret, values are sealed by the store's own.
            seal: admission.seal_key().copied().unwrap_or(*key.as_bytes()),
            group: admission.group_key().copied(),
            tag: admission.tag_key().copied(),
            expires: admission.expires(),
        }
    }
}

/// Spawns the inner call of flight `id` and returns the future its callers share.
///
/// Called under the table's shard lock: it only spawns. The task runs the flight (asking
/// the store first, if there is one), lets the share policy store the result, and finishes
/// the entry (replay or removal) before its join handle resolves, all under the hard cap.
/// Its [`FlightGuard`] removes the entry if it panics or is cancelled.
pub(crate) fn spawn<P, S, R>(
    flights: &Arc<Flights<P>>,
    inner: S,
    request: R,
    flight: Flight,
    id: u64,
) -> Launched
where
    S: Service<R> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
    P: Share<S::Response, S::Error>,
{
    let flights = flights.clone();
    // A child of the leader's request span; callers who join link to it.
    let span = tracing::info_span!("refresh_coalesce_flight", flight = id);
    let task_span = span.clone();
    let task = async move {
        let guard = FlightGuard::new(flights.table.clone(), flight.key, id);
        let run = run(&flights, inner, request, flight);
        #[cfg(feature = "metrics")]
        flights.set_gauges();
        let result = tokio::time::timeout(flights.hard_cap, run).await;
        let outcome = match result {
            Ok(Ok((value, replay))) => {
                let value = Flown::erase(value, id, replay.is_some());
                // An invalidation removed the entry while the flight ran (here, or on another
                // instance through the store's listener): the result is revoked for every
                // caller, not only for the next request.
                if guard.complete(&value, replay) {
                    Ok(value)
                } else {
                    Err(LeaderFailed::new(Failure::Revoked))
                }
            }
            Ok(Err(failure)) => {
                drop(guard);
                Err(LeaderFailed::new(failure))
            }
            Err(_) => {
                drop(guard);
                tracing::warn!(
                    flight = id,
                    "inner call exceeded the hard cap and was aborted"
                );
                Err(LeaderFailed::new(Failure::HardCap))
            }
        };
        #[cfg(feature = "metrics")]
        flights.set_gauges();
        outcome
    };
    let handle = tokio::spawn(task.instrument(task_span));
    let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
        Box::pin(handle.map(join_result));
    Launched {
        future: future.shared(),
        span,
    }
}

/// A flight's value with the span of its replay window, as the table keeps it when a
/// subscriber records the flight's span; otherwise the table keeps the value alone (see
/// [`Flown::erase`]), so that a replay costs nothing more without tracing.
pub(crate) struct Flown<V> {
    pub(crate) value: V,
    /// A span that lives as long as the value is replayed, linked to the flight's span, so
    /// that replayed requests link into the storm. A root of its own rather than a child of
    /// the flight: a subscriber keeps a span open while it has children, and the flight's
    /// span (and the leader's request span above it) must close when the flight does. Only
    /// when a subscriber records the flight's span; boxed, so that it costs one word
    /// otherwise.
    replay: Option<Box<tracing::Span>>,
}

impl<V: Send + Sync + 'static> Flown<V> {
    /// The value as the table keeps it: a `Flown` when the flight's span (the current one:
    /// called inside it) is recorded and the value is replayed, else the value itself.
    fn erase(value: V, flight: u64, replayed: bool) -> Value {
        let current = tracing::Span::current();
        if !replayed || current.is_disabled() {
            return Arc::new(value);
        }
        let replay = tracing::info_span!(parent: None, "refresh_coalesce_replay", flight);
        replay.follows_from(&current);
        Arc::new(Self {
            value,
            replay: Some(Box::new(replay)),
        })
    }
}

impl<V> Flown<V> {
    /// Links the current span (a replayed request's) to the replay window's span.
    pub(crate) fn link_replay(&self) {
        if let Some(id) = self.replay.as_deref().and_then(tracing::Span::id) {
            tracing::Span::current().follows_from(id);
        }
    }
}

/// Links the current span (a joined request's) to the span of the flight it joined.
pub(crate) fn link_flight(flight: Option<&tracing::Span>) {
    if let Some(id) = flight.and_then(tracing::Span::id) {
        tracing::Span::current().follows_from(id);
    }
}

/// The body of a flight: its value, and how long to replay it (`None`: not at all).
///
/// Without a store, the inner service is called. With one: a result another instance
/// stored answers the flight; otherwise the election decides whether this flight calls the
/// inner service (and stores the result) or waits for the instance that does. A flight
/// invalidated while it ran (its generations moved in the store) fails with
/// [`Failure::Revoked`]. No replay outlives the presented token's own expiry.
async fn run<P, S, R>(
    flights: &Flights<P>,
    inner: S,
    request: R,
    flight: Flight,
) -> Result<(P::Value, Option<Duration>), Failure>
where
    S: Service<R>,
    P: Share<S::Response, S::Error>,
{
    let Flight {
        key,
        seal,
        group,
        tag,
        expires,
    } = flight;
    let life = |ttl: Duration| match expires {
        Some(at) => ttl.min(at.duration_since(SystemTime::now()).unwrap_or_default()),
        None => ttl,
    };
    let replay_for = |value: &P::Value, ttl: Duration| {
        let ttl = life(ttl);
        (flights.share.is_replayable(value) && !ttl.is_zero()).then_some(ttl)
    };
    let ttl = flights.table.ttl();
    let Some(remote) = &flights.remote else {
        let value = call(flights, inner, request).await;
        let replay = replay_for(&value, ttl);
        return Ok((value, replay));
    };
    let counters = &flights.counters.store;
    if let Some(stored) = remote.load(&key, &seal, group.as_ref(), counters).await
        && let Some(value) = flights.share.decode(&stored.value)
    {
        StoreCounters::add(&counters.replayed, "replayed");
        let replay = replay_for(&value, stored.ttl.min(ttl));
        return Ok((value, replay));
    }
    let generation_life = remote.generation_life(ttl);
    let plan = remote
        .elect(
            &key,
            &seal,
            group.as_ref(),
            tag.as_ref(),
            generation_life,
            counters,
        )
        .await;
    match plan {
        // The store cannot be reached: refuse if the layer requires it, else call the inner
        // service on this instance alone (at most one call per instance for the key).
        Plan::Local | Plan::Unreachable(_) if remote.required => {
            if let Plan::Unreachable(fence) = &plan {
                remote.release_later(&key, fence);
            }
            Err(Failure::StoreUnavailable)
        }
        Plan::Local => {
            let value = call(flights, inner, request).await;
            let replay = replay_for(&value, ttl);
            Ok((value, replay))
        }
        Plan::Unreachable(fence) => {
            let value = call(flights, inner, request).await;
            let replay = replay_for(&value, ttl);
            remote.release_later(&key, &fence);
            Ok((value, replay))
        }
        Plan::Replay(stored) => {
            let value = flights
                .share
                .decode(&stored.value)
                .ok_or(Failure::Incompatible)?;
            StoreCounters::add(&counters.replayed, "replayed");
            let replay = replay_for(&value, stored.ttl.min(ttl));
            Ok((value, replay))
        }
        Plan::Follow(leader, started) => {
            // A little longer than the callers wait, so that they get their own timeout.
            let deadline = Instant::now() + flights.wait_timeout + Duration::from_millis(500);
            let stored = match remote
                .follow(&key, &leader, &seal, &started, deadline, counters)
                .await
            {
                Followed::Arrived(stored) => stored,
                Followed::Revoked => return Err(Failure::Revoked),
                Followed::Elapsed => return Err(Failure::RemoteTimeout),
            };
            let value = flights
                .share
                .decode(&stored.value)
                .ok_or(Failure::Incompatible)?;
            let replay = if stored.replay {
                replay_for(&value, stored.ttl.min(ttl))
            } else {
                None
            };
            Ok((value, replay))
        }
        Plan::Lead(fence, started) => {
            let value = call(flights, inner, request).await;
            let replay = replay_for(&value, ttl);
            let keep = match replay {
                Some(ttl) => Keep::Replay { ttl },
                // Not a replay, but the followers of this flight must still receive it.
                None => Keep::Flight {
                    ttl: flights.wait_timeout + Duration::from_secs(1),
                },
            };
            let encoded = flights.share.encode(&value).map(|bytes| (bytes, keep));
            let finished = remote
                .finish(&key, &fence, &seal, encoded, started.as_ref(), counters)
                .await;
            match finished {
                Finished::Own => Ok((value, replay)),
                Finished::Revoked => Err(Failure::Revoked),
                // A late leader: another result was stored first. Every caller everywhere
                // gets that one, so all of them see the same tokens.
                Finished::Existing(winner) => match flights.share.decode(&winner.value) {
                    Some(stored) => {
                        tracing::warn!(
                            "a result was stored before this flight's: answering with it"
                        );
                        let replay = replay_for(&stored, winner.ttl.min(ttl));
                        Ok((stored, replay))
                    }
                    None => Ok((value, replay)),
                },
            }
        }
    }
}

/// Calls the inner service and lets the share policy store the result.
async fn call<P, S, R>(flights: &Flights<P>, mut inner: S, request: R) -> P::Value
where
    S: Service<R>,
    P: Share<S::Response, S::Error>,
{
    let durations = &flights.durations;
    let started = durations.start();
    let result = inner.call(request).await;
    let value = flights.share.share(result).await;
    durations.inner(started);
    value
}

/// Maps the leader task's join result to a flight result.
fn join_result(result: Result<FlightResult, tokio::task::JoinError>) -> FlightResult {
    match result {
        Ok(result) => result,
        Err(error) if error.is_panic() => Err(LeaderFailed::new(Failure::Panicked)),
        Err(_) => Err(LeaderFailed::new(Failure::Cancelled)),
    }
}
