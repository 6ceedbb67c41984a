//! [`ResponseFuture`]: the life of one request.

use std::{
    any::Any,
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep};
use tower_service::Service;
use tracing::Instrument;

use crate::{
    error::{BoxError, Elapsed, Failure, LeaderFailed, Overloaded},
    flight::{
        FlightFuture, FlightGuard, FlightResult, Found, Lead, Lookup, Value, Waiter, join_result,
    },
    key::{Extract, Extracted, Fingerprint},
    layer::Core,
    metrics::{Outcome, StoreCounters},
    share::{Served, Share},
    store::{Finished, Followed, Keep, Plan},
};

pin_project! {
    /// The response future of [`RefreshCoalesce`](crate::RefreshCoalesce).
    ///
    /// Its steps, in order:
    ///
    /// 1. **Extract**: the [`Extract`] strategy finds the key (reading the body if it has to).
    /// 2. **Look up** the key. A live replay is answered at once; a running flight is joined.
    /// 3. **Admit** (verify) the request if nothing was found, then **lead**: insert a flight
    ///    and spawn the inner call on the service this request readied. If another request
    ///    inserted one meanwhile, join or replay that instead.
    /// 4. **Wait** for the flight, at most `wait_timeout`.
    ///
    /// Dropping this future at any step is safe. A spawned inner call runs to completion (or
    /// to the hard cap) whoever waits for it, and its task alone finishes the table entry,
    /// so a refresh never runs twice for one key because a caller went away.
    pub struct ResponseFuture<Req, S, X, P>
    where
        X: Extract<Req>,
        S: Service<X::Request>,
    {
        #[pin]
        state: State<X::Future, S::Future>,
        inner: Option<S>,
        core: Arc<Core<X, P>>,
        _request: PhantomData<fn(Req)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<XF, SF> {
        Extracting { #[pin] future: XF },
        Waiting { #[pin] deadline: Sleep, waiter: Waiter, served: Served },
        Calling { #[pin] future: SF },
        Done,
    }
}

/// What a request does once its key is known.
enum Step<T, A> {
    Wait(Waiter, Served),
    Answer(Value, Served),
    /// A replay answered under the shard lock.
    Answered(A),
    Refuse(BoxError, Outcome),
    Pass(T),
}

impl<Req, S, X, P> ResponseFuture<Req, S, X, P>
where
    X: Extract<Req>,
    S: Service<X::Request>,
{
    pub(crate) fn new(future: X::Future, inner: S, core: Arc<Core<X, P>>) -> Self {
        Self {
            state: State::Extracting { future },
            inner: Some(inner),
            core,
            _request: PhantomData,
        }
    }
}

impl<Req, S, X, P> Future for ResponseFuture<Req, S, X, P>
where
    X: Extract<Req> + Send + Sync + 'static,
    S: Service<X::Request> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    P: Share<S::Response, S::Error>,
{
    type Output = Result<P::Response, P::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let core = &**this.core;
        loop {
            match this.state.as_mut().project() {
                StateProj::Extracting { future } => {
                    let step = match ready!(future.poll(cx)) {
                        Err(error) => Step::Refuse(error, Outcome::Rejected),
                        Ok(Extracted::Bypass(request)) => Step::Pass(request),
                        Ok(Extracted::Coalesce {
                            key,
                            token,
                            request,
                        }) => begin(&*this.core, this.inner, key, token, request),
                    };
                    if !matches!(step, Step::Pass(_)) {
                        // Only a leader (which took it already) or a bypass calls the inner
                        // service: release whatever capacity the readied service reserved
                        // (a `ConcurrencyLimit` permit, a `Buffer` slot) before waiting.
                        drop(this.inner.take());
                    }
                    match step {
                        Step::Wait(waiter, served) => this.state.set(State::Waiting {
                            deadline: sleep(core.wait_timeout),
                            waiter,
                            served,
                        }),
                        Step::Pass(request) => {
                            core.table.counters.record(Outcome::Bypassed);
                            let mut inner = this.inner.take().expect("service taken once");
                            this.state.set(State::Calling {
                                future: inner.call(request),
                            });
                        }
                        Step::Answered(result) => {
                            this.state.set(State::Done);
                            return Poll::Ready(result);
                        }
                        Step::Answer(value, served) => {
                            this.state.set(State::Done);
                            return Poll::Ready(answer::<S::Response, S::Error, X, P>(
                                core, &value, served,
                            ));
                        }
                        Step::Refuse(error, outcome) => {
                            this.state.set(State::Done);
                            core.table.counters.record(outcome);
                            return Poll::Ready(core.share.reject(error));
                        }
                    }
                }
                StateProj::Waiting {
                    deadline,
                    waiter,
                    served,
                } => {
                    if let Poll::Ready(result) = waiter.future.poll_unpin(cx) {
                        let served = *served;
                        #[cfg(feature = "metrics")]
                        crate::metrics::record_wait(deadline.deadline(), core.wait_timeout);
                        this.state.set(State::Done);
                        return Poll::Ready(match result {
                            Ok(value) => {
                                answer::<S::Response, S::Error, X, P>(core, &value, served)
                            }
                            Err(failed) => {
                                core.table.counters.record(
                                    if failed.failure() == Failure::RemoteTimeout {
                                        Outcome::TimedOut
                                    } else {
                                        Outcome::LeaderFailed
                                    },
                                );
                                core.share.reject(failed.into())
                            }
                        });
                    }
                    ready!(deadline.poll(cx));
                    // The flight goes on without this caller; its result will be replayed.
                    this.state.set(State::Done);
                    core.table.counters.record(Outcome::TimedOut);
                    return Poll::Ready(core.share.reject(Elapsed::new(core.wait_timeout).into()));
                }
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(core.share.pass(result));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Steps 2 and 3: look the key up, or admit the request and lead a flight.
fn begin<Req, S, X, P>(
    core: &Arc<Core<X, P>>,
    inner: &mut Option<S>,
    key: Fingerprint,
    token: X::Token,
    mut request: X::Request,
) -> Step<X::Request, Result<P::Response, P::Error>>
where
    X: Extract<Req> + Send + Sync + 'static,
    S: Service<X::Request> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    P: Share<S::Response, S::Error>,
{
    let replayed =
        |value: &Value| answer::<S::Response, S::Error, X, P>(core, value, Served::Replayed);
    let found = match core.table.find_answer(&key, replayed) {
        Ok(Lookup::Answered(result)) => return Step::Answered(result),
        Ok(Lookup::Found(Found::Vacant)) => {
            let admission = match core.extract.admit(token, &mut request) {
                Ok(admission) => admission,
                Err(error) => return Step::Refuse(error, Outcome::Rejected),
            };
            let inner = inner.take().expect("service taken once");
            let flight = Flight {
                key,
                // Without a token-derived secret, values are sealed by the store's own.
                seal: admission.seal_key().copied().unwrap_or(*key.as_bytes()),
                group: admission.group_key().copied(),
                tag: admission.tag_key().copied(),
                expires: admission.expires(),
            };
            let started = core.table.lead(key, admission, |id| {
                spawn_flight(core, inner, request, flight, id)
            });
            match started {
                Ok((Lead::Started(waiter), reuse)) => {
                    if reuse {
                        core.table.counters.reuse_suspected();
                        tracing::warn!(
                            flight = waiter.id,
                            "reuse suspected: another token of this subject has a live entry"
                        );
                    }
                    core.table.counters.record(Outcome::Leader);
                    return Step::Wait(waiter, Served::Leader);
                }
                Ok((Lead::Found(found), _)) => Ok(found),
                Err(error) => Err(error),
            }
        }
        Ok(Lookup::Found(other)) => Ok(other),
        Err(error) => Err(error),
    };
    match found {
        Ok(Found::Replay(value)) => {
            core.table.counters.record(Outcome::Replayed);
            Step::Answer(value, Served::Replayed)
        }
        Ok(Found::Join(waiter)) => {
            core.table.counters.record(Outcome::Joined);
            tracing::debug!(flight = waiter.id, "joined flight");
            Step::Wait(waiter, Served::Joined)
        }
        Ok(Found::Vacant) => unreachable!("lead never reports a vacant key"),
        Err(error) => {
            let outcome = if error.is::<Overloaded>() {
                Outcome::Overloaded
            } else {
                Outcome::Rejected
            };
            Step::Refuse(error, outcome)
        }
    }
}

/// What the flight task needs to know of its key.
#[derive(Clone, Copy)]
struct Flight {
    key: Fingerprint,
    seal: [u8; 32],
    group: Option<Fingerprint>,
    /// The entry's second name (the HTTP front's token tag), remembered in the store.
    tag: Option<Fingerprint>,
    /// When the presented token expires: no replay of its flight outlives it.
    expires: Option<SystemTime>,
}

/// Spawns the inner call of flight `id` and returns the future its callers share.
///
/// Called under the table's shard lock: it only spawns. The task runs the flight (asking
/// the store first, if there is one), lets the share policy store the result, and finishes
/// the entry (replay or removal) before its join handle resolves, all under the hard cap.
/// Its [`FlightGuard`] removes the entry if it panics or is cancelled.
fn spawn_flight<X, P, S, R>(
    core: &Arc<Core<X, P>>,
    inner: S,
    request: R,
    flight: Flight,
    id: u64,
) -> FlightFuture
where
    X: Send + Sync + 'static,
    S: Service<R> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
    P: Share<S::Response, S::Error>,
{
    let core = core.clone();
    let span = tracing::debug_span!("refresh_coalesce_flight", flight = id);
    let task = async move {
        let guard = FlightGuard::new(core.table.clone(), flight.key, id);
        let run = run_flight(&core, inner, request, flight);
        match tokio::time::timeout(core.hard_cap, run).await {
            Ok(Ok((value, replay))) => {
                let value: Value = Arc::new(value);
                // An invalidation removed the entry while the flight ran (here, or on another
                // instance through the store's listener): the result is revoked for every
                // caller, not only for the next request.
                if guard.complete(&value, replay) {
                    Ok(value)
                } else {
                    Err(LeaderFailed::new(Failure::Revoked))
                }
            }
            Ok(Err(failure)) => Err(LeaderFailed::new(failure)),
            Err(_) => {
                tracing::warn!(
                    flight = id,
                    "inner call exceeded the hard cap and was aborted"
                );
                Err(LeaderFailed::new(Failure::HardCap))
            }
        }
    };
    let handle = tokio::spawn(task.instrument(span));
    let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
        Box::pin(handle.map(join_result));
    future.shared()
}

/// The body of a flight: its value, and how long to replay it (`None`: not at all).
///
/// Without a store, the inner service is called. With one: a result another instance
/// stored answers the flight; otherwise the election decides whether this flight calls the
/// inner service (and stores the result) or waits for the instance that does. A flight
/// invalidated while it ran (its generations moved in the store) fails with
/// [`Failure::Revoked`]. No replay outlives the presented token's own expiry.
async fn run_flight<X, P, S, R>(
    core: &Core<X, P>,
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
        (core.share.is_replayable(value) && !ttl.is_zero()).then_some(ttl)
    };
    let ttl = core.table.ttl();
    let Some(remote) = &core.remote else {
        let value = call(core, inner, request).await;
        let replay = replay_for(&value, ttl);
        return Ok((value, replay));
    };
    let counters = &core.table.counters.store;
    if let Some(stored) = remote.load(&key, &seal, group.as_ref(), counters).await
        && let Some(value) = core.share.decode(&stored.value)
    {
        StoreCounters::add(&counters.replayed, "replayed");
        let replay = replay_for(&value, stored.ttl.min(ttl));
        return Ok((value, replay));
    }
    let generation_life = remote.generation_life(ttl);
    match remote
        .elect(
            &key,
            group.as_ref(),
            tag.as_ref(),
            generation_life,
            counters,
        )
        .await
    {
        Plan::Local => {
            let value = call(core, inner, request).await;
            let replay = replay_for(&value, ttl);
            Ok((value, replay))
        }
        Plan::Follow(leader, started) => {
            // A little longer than the callers wait, so that they get their own timeout.
            let deadline = Instant::now() + core.wait_timeout + Duration::from_millis(500);
            let stored = match remote
                .follow(&key, &leader, &seal, &started, deadline, counters)
                .await
            {
                Followed::Arrived(stored) => stored,
                Followed::Revoked => return Err(Failure::Revoked),
                Followed::Elapsed => return Err(Failure::RemoteTimeout),
            };
            let value = core
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
            let value = call(core, inner, request).await;
            let replay = replay_for(&value, ttl);
            let keep = match replay {
                Some(ttl) => Keep::Replay { ttl },
                // Not a replay, but the followers of this flight must still receive it.
                None => Keep::Flight {
                    ttl: core.wait_timeout + Duration::from_secs(1),
                },
            };
            let encoded = core.share.encode(&value).map(|bytes| (bytes, keep));
            let finished = remote
                .finish(&key, &fence, &seal, encoded, started.as_ref(), counters)
                .await;
            match finished {
                Finished::Own => Ok((value, replay)),
                Finished::Revoked => Err(Failure::Revoked),
                // A late leader: another result was stored first. Every caller everywhere
                // gets that one, so all of them see the same tokens.
                Finished::Existing(winner) => match core.share.decode(&winner.value) {
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
async fn call<X, P, S, R>(core: &Core<X, P>, mut inner: S, request: R) -> P::Value
where
    S: Service<R>,
    P: Share<S::Response, S::Error>,
{
    let result = inner.call(request).await;
    core.share.share(result).await
}

/// Builds one caller's response from a flight's value.
fn answer<R, E, X, P>(
    core: &Core<X, P>,
    value: &Arc<dyn Any + Send + Sync>,
    served: Served,
) -> Result<P::Response, P::Error>
where
    P: Share<R, E>,
{
    match value.downcast_ref::<P::Value>() {
        Some(value) => core.share.respond(value, served),
        None => {
            core.table.counters.record(Outcome::LeaderFailed);
            core.share
                .reject(LeaderFailed::new(Failure::Incompatible).into())
        }
    }
}

impl<Req, S, X, P> fmt::Debug for ResponseFuture<Req, S, X, P>
where
    X: Extract<Req>,
    S: Service<X::Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Extracting { .. } => "extracting",
            State::Waiting { served, .. } => served.as_str(),
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
