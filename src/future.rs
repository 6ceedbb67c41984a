//! [`ResponseFuture`]: the life of one request.

use std::{
    any::Any,
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures_util::FutureExt;
use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep};
use tower_service::Service;

use crate::{
    audit::AuditEvent,
    core::Core,
    error::{BoxError, Elapsed, Failure, LeaderFailed, Limit, Overloaded, Rejected, Rejection},
    flight::{Found, Lead, Lookup, Refused, Value, Waiter},
    key::{Extract, Extracted, Fingerprint},
    leader::{self, Flight, Flights, Flown},
    outcome::{Coalesced, Outcome},
    share::{Served, Share},
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
    /// Refused, with the verified subject when there is one (for the audit hook).
    Refuse(BoxError, Outcome, Option<Arc<str>>),
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
        let flights = &*this.core.flights;
        loop {
            match this.state.as_mut().project() {
                StateProj::Extracting { future } => {
                    let step = match ready!(future.poll(cx)) {
                        Err(error) => Step::Refuse(error, Outcome::Rejected, None),
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
                            deadline: sleep(flights.wait_timeout),
                            waiter,
                            served,
                        }),
                        Step::Pass(request) => {
                            flights.counters.record(Outcome::Bypassed);
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
                            return Poll::Ready(answer::<S::Response, S::Error, P>(
                                flights, &value, served,
                            ));
                        }
                        Step::Refuse(error, outcome, subject) => {
                            this.state.set(State::Done);
                            flights.counters.record(outcome);
                            if flights.audit.is_set() {
                                flights.audit.emit(AuditEvent::Refused {
                                    outcome,
                                    reason: Coalesced::of_error(&*error).reason().unwrap_or(""),
                                    subject: subject.as_deref(),
                                });
                            }
                            return Poll::Ready(flights.share.reject(error));
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
                        flights
                            .durations
                            .wait(deadline.deadline(), flights.wait_timeout);
                        this.state.set(State::Done);
                        return Poll::Ready(match result {
                            Ok(value) => {
                                answer::<S::Response, S::Error, P>(flights, &value, served)
                            }
                            Err(failed) => {
                                flights.counters.record(
                                    if failed.failure() == Failure::RemoteTimeout {
                                        Outcome::TimedOut
                                    } else {
                                        Outcome::LeaderFailed
                                    },
                                );
                                flights.share.reject(failed.into())
                            }
                        });
                    }
                    ready!(deadline.poll(cx));
                    // The flight goes on without this caller; its result will be replayed.
                    this.state.set(State::Done);
                    flights.counters.record(Outcome::TimedOut);
                    return Poll::Ready(
                        flights
                            .share
                            .reject(Elapsed::new(flights.wait_timeout).into()),
                    );
                }
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(flights.share.pass(result));
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
    let flights = &*core.flights;
    let replayed =
        |value: &Value| answer::<S::Response, S::Error, P>(flights, value, Served::Replayed);
    let found = match flights.table.find_answer(&key, replayed) {
        Ok(Lookup::Answered(result)) => return Step::Answered(result),
        Ok(Lookup::Found(Found::Vacant)) => {
            let admission = match core.extract.admit(token, &mut request) {
                Ok(admission) => admission,
                Err(error) => return Step::Refuse(error, Outcome::Rejected, None),
            };
            let subject = if flights.audit.is_set() {
                core.extract.subject(&request).map(Arc::<str>::from)
            } else {
                None
            };
            let inner = inner.take().expect("service taken once");
            let flight = Flight::new(key, &admission);
            let started = flights.table.lead(key, admission, |id| {
                leader::spawn(&core.flights, inner, request, flight, id)
            });
            match started {
                Ok((Lead::Started(waiter), reuse)) => {
                    if reuse {
                        flights.counters.reuse_suspected();
                        tracing::warn!(
                            flight = waiter.id,
                            "reuse suspected: another token of this subject has a live entry"
                        );
                        flights.audit.emit(AuditEvent::ReuseSuspected {
                            subject: subject.as_deref(),
                            flight: waiter.id,
                        });
                    }
                    flights.counters.record(Outcome::Leader);
                    return Step::Wait(waiter, Served::Leader);
                }
                Ok((Lead::Found(found), _)) => Ok(found),
                Err(refused) => Err((refused, subject)),
            }
        }
        Ok(Lookup::Found(other)) => Ok(other),
        Err(refused) => Err((refused, None)),
    };
    match found {
        Ok(Found::Replay(value)) => {
            flights.counters.record(Outcome::Replayed);
            Step::Answer(value, Served::Replayed)
        }
        Ok(Found::Join(waiter)) => {
            flights.counters.record(Outcome::Joined);
            leader::link_flight(waiter.span.as_ref());
            tracing::debug!(flight = waiter.id, "joined flight");
            Step::Wait(waiter, Served::Joined)
        }
        Ok(Found::Vacant) => unreachable!("lead never reports a vacant key"),
        // The table's words for a refusal become the layer's errors here.
        Err((Refused::Expired, subject)) => Step::Refuse(
            Rejected::new(Rejection::Expired).into(),
            Outcome::Rejected,
            subject,
        ),
        Err((Refused::Full(limit), subject)) => {
            if limit == Limit::Group {
                flights.audit.emit(AuditEvent::SubjectCapReached {
                    subject: subject.as_deref(),
                });
            }
            Step::Refuse(Overloaded::new(limit).into(), Outcome::Overloaded, subject)
        }
    }
}

/// Builds one caller's response from a flight's value.
fn answer<R, E, P>(
    flights: &Flights<P>,
    value: &Arc<dyn Any + Send + Sync>,
    served: Served,
) -> Result<P::Response, P::Error>
where
    P: Share<R, E>,
{
    // The value itself, or (when the flight's span was recorded) with its replay window.
    if let Some(value) = value.downcast_ref::<P::Value>() {
        return flights.share.respond(value, served);
    }
    match value.downcast_ref::<Flown<P::Value>>() {
        Some(flown) => {
            if served == Served::Replayed {
                flown.link_replay();
            }
            flights.share.respond(&flown.value, served)
        }
        None => {
            flights.counters.record(Outcome::LeaderFailed);
            flights
                .share
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
