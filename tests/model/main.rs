//! The flight table as a state machine, checked against a reference model with proptest.
//!
//! Each case is a random sequence of operations on a layer with small limits: requests for a
//! few tokens (each a caller task), callers dropped, inner calls completed (`Ok`, `Err`,
//! panic, or never: the hard cap ends those), clock advances and invalidations. It runs on a
//! current-thread runtime with the clock paused, so every interleaving is reproducible, and
//! the test decides when and how each inner call ends.
//!
//! After every operation the layer is compared with the model: which request led (exactly
//! one inner call per leader, none for anything else), what every finished caller received
//! and when, which inner calls run, the counters, and the entry count. At the end every inner
//! call is released, the clock is advanced past the hard cap, the TTL and the sweep, and the
//! table must be empty with no task left.
//!
//! ```text
//! cargo test --all-features --test model                          # 256 cases per property
//! PROPTEST_CASES=10000 cargo test --all-features --test model     # about a minute
//! cargo test -p tower-refresh-coalesce --all-features --test model -- --ignored --nocapture coverage
//! ```
//!
//! Failures are not persisted to a file (`failure_persistence: None`): a shrunk
//! counterexample is printed, and belongs in this file as a scenario. The figures, and the
//! findings behind `mod findings` (all fixed), are in `docs/hardening.md`.

mod findings;
#[cfg(feature = "jwt")]
mod http_front;
mod observe;
mod scenarios;
mod steps;

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex, Once},
    time::Duration,
};

use futures_util::FutureExt;
use proptest::prelude::*;
#[cfg(feature = "jwt")]
use support::tokens;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tower::{Layer, ServiceExt, service_fn, util::BoxCloneService};

use tower_refresh_coalesce::{
    BoxError, Builder, CloneResponse, Fingerprint, Handle, RefreshCoalesceLayer, Stats,
    error::{Elapsed, Failure, LeaderFailed, Limit, Overloaded, Shared},
};

const TTL: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);
const HARD_CAP: Duration = Duration::from_secs(20);
const MAX_WAITERS: usize = 4;

/// The limits every case's layer runs with (the model predicts them), core or HTTP front.
fn limited<X, P>(builder: Builder<X, P>, max_entries: usize) -> Builder<X, P> {
    builder
        .ttl(TTL)
        .wait_timeout(WAIT)
        .hard_cap(HARD_CAP)
        .max_waiters(MAX_WAITERS)
        .max_entries(max_entries)
}
/// The sweeper's period: `ttl / 4` clamped to at most one second.
const SWEEP: Duration = Duration::from_secs(1);
/// Valid tokens; the HTTP front adds a forged one and a request without any.
const VALID: usize = 3;

/// The message every deliberate inner panic starts with (kept off stderr).
const INNER_PANIC: &str = "model: inner call panics";

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// How the test ends an inner call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Ok,
    Err,
    Panic,
}

#[derive(Clone, Debug)]
enum Op {
    /// A new caller for token `t` (a task).
    Request(usize),
    /// Abort caller `i % callers`.
    Abort(usize),
    /// End running inner call `i % running` this way.
    Complete(usize, End),
    /// Advance the paused clock by this many milliseconds, firing timers in order.
    Advance(u64),
    /// Advance the clock to the next instant the model expects a timer to fire (a wait
    /// timeout, a hard cap, a replay's expiry or the sweep one period after it): the
    /// boundaries where off-by-one errors live.
    Tick,
    /// `Handle::invalidate` the key of token `t`.
    Invalidate(usize),
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![3 => Just(End::Ok), 1 => Just(End::Err), 1 => Just(End::Panic)]
}

fn advance_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..40_000,
        1 => Just(1u64),
        1 => Just(1_000u64),
        1 => Just(10_000u64),
        1 => Just(20_000u64),
        1 => Just(30_000u64),
    ]
}

/// Token 0 is the busiest, so that one flight collects enough callers to hit `max_waiters`;
/// the HTTP front also sends a forged token (3) and none at all (4).
fn token(kinds: usize) -> BoxedStrategy<usize> {
    if kinds == VALID {
        prop_oneof![4 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize)].boxed()
    } else {
        prop_oneof![
            4 => Just(0usize),
            2 => Just(1usize),
            1 => Just(2usize),
            1 => Just(3usize),
            1 => Just(4usize),
        ]
        .boxed()
    }
}

fn op(tokens: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => token(tokens).prop_map(Op::Request),
        1 => (0..64usize).prop_map(Op::Abort),
        3 => ((0..8usize), end()).prop_map(|(i, e)| Op::Complete(i, e)),
        2 => advance_ms().prop_map(Op::Advance),
        2 => Just(Op::Tick),
        1 => (0..VALID).prop_map(Op::Invalidate),
    ]
}

fn ops(tokens: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(tokens), 0..=40)
}

/// `max_entries`: 1 and 2 are hit by three tokens; 1,000 never is.
fn max_entries() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(2usize), Just(1_000usize)]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The controlled inner service
// ---------------------------------------------------------------------------------------

/// One call of the inner service, as the inner service saw it.
struct InnerCall {
    token: usize,
    caller: usize,
    started: Instant,
    tx: Option<oneshot::Sender<End>>,
    ended: bool,
}

/// Every inner call so far, in order; call `n` (1-based) is `calls[n - 1]`.
#[derive(Clone, Default)]
struct Registry {
    calls: Arc<Mutex<Vec<InnerCall>>>,
    /// Inner calls with a request the layer should never have let through.
    violations: Arc<Mutex<Vec<String>>>,
}

/// Marks its call ended when the inner future completes, panics or is dropped (hard cap).
struct Ended(Registry, usize);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.lock()[self.1].ended = true;
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<InnerCall>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn violation(&self, what: String) {
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// Registers a call and returns the future of its result, `"t{token}#{n}"` or
    /// `"error t{token}#{n}"`, decided by the test.
    fn call(
        &self,
        token: usize,
        caller: usize,
    ) -> impl Future<Output = Result<String, String>> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        let n = {
            let mut calls = self.lock();
            calls.push(InnerCall {
                token,
                caller,
                started: Instant::now(),
                tx: Some(tx),
                ended: false,
            });
            calls.len()
        };
        let ended = Ended(self.clone(), n - 1);
        async move {
            let _ended = ended;
            let name = format!("t{token}#{n}");
            match rx.await {
                Ok(End::Ok) => Ok(name),
                Ok(End::Err) => Err(format!("error {name}")),
                Ok(End::Panic) => panic!("{INNER_PANIC}: {name}"),
                // Never answered: the hard cap drops this future.
                Err(_) => std::future::pending().await,
            }
        }
    }

    fn release(&self, index: usize, end: End) {
        let tx = self.lock()[index].tx.take().expect("released once");
        tx.send(end).expect("the inner call is waiting");
    }
}

fn quiet_inner_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !message.starts_with(INNER_PANIC) {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------
// Fronts: the core layer on a plain request, and the HTTP front
// ---------------------------------------------------------------------------------------

/// What a caller received, in the model's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The shared response, `"t{token}#{call}"`.
    Ok(String),
    /// The inner service's error (core) or its non-2xx response (HTTP), `"error t…#…"`.
    InnerErr(String),
    Panicked,
    HardCap,
    Elapsed,
    OverWaiters,
    OverEntries,
    /// Refused before coalescing (HTTP: invalid or missing token).
    Rejected,
    /// The flight was invalidated while it ran: its result reaches no caller.
    Revoked,
    /// The caller task was aborted before it had a result.
    Cancelled,
    Other(String),
}

trait Front {
    /// How many token kinds requests use (the valid ones first).
    fn kinds(&self) -> usize;
    fn valid(&self, token: usize) -> bool {
        token < VALID
    }
    fn spawn(&self, token: usize, caller: usize) -> JoinHandle<Outcome>;
    fn invalidate(&self, token: usize) -> bool;
    fn handle(&self) -> &Handle;
}

#[derive(Clone, Debug)]
struct Req {
    token: String,
    caller: usize,
}

struct CoreFront {
    service: BoxCloneService<Req, String, BoxError>,
    handle: Handle,
}

impl CoreFront {
    fn new(registry: &Registry, max_entries: usize) -> Self {
        let layer = limited(
            RefreshCoalesceLayer::builder(|req: &Req| Some(req.token.clone()))
                .share(CloneResponse::new()),
            max_entries,
        )
        .build();
        let handle = layer.handle();
        let registry = registry.clone();
        let inner = service_fn(move |req: Req| {
            let token = match req.token.strip_prefix('t').and_then(|t| t.parse().ok()) {
                Some(token) if token < VALID => token,
                _ => {
                    registry.violation(format!("inner call for unknown key {:?}", req.token));
                    usize::MAX
                }
            };
            let result = registry.call(token, req.caller);
            async move { result.await.map_err(BoxError::from) }
        });
        Self {
            service: BoxCloneService::new(layer.layer(inner)),
            handle,
        }
    }
}

fn classify_error(error: &BoxError) -> Outcome {
    if error.is::<Elapsed>() {
        return Outcome::Elapsed;
    }
    if let Some(overloaded) = error.downcast_ref::<Overloaded>() {
        return match overloaded.limit() {
            Limit::Waiters => Outcome::OverWaiters,
            Limit::Entries => Outcome::OverEntries,
            other => Outcome::Other(format!("overloaded: {other:?}")),
        };
    }
    if let Some(failed) = error.downcast_ref::<LeaderFailed>() {
        return match failed.failure() {
            Failure::Panicked => Outcome::Panicked,
            Failure::HardCap => Outcome::HardCap,
            Failure::Revoked => Outcome::Revoked,
            other => Outcome::Other(format!("leader failed: {other:?}")),
        };
    }
    if let Some(shared) = error.downcast_ref::<Shared>() {
        return Outcome::InnerErr(shared.inner().to_string());
    }
    Outcome::Other(error.to_string())
}

impl Front for CoreFront {
    fn kinds(&self) -> usize {
        VALID
    }

    fn spawn(&self, token: usize, caller: usize) -> JoinHandle<Outcome> {
        let service = self.service.clone();
        let req = Req {
            token: format!("t{token}"),
            caller,
        };
        tokio::spawn(async move {
            match service.oneshot(req).await {
                Ok(response) => Outcome::Ok(response),
                Err(error) => classify_error(&error),
            }
        })
    }

    fn invalidate(&self, token: usize) -> bool {
        self.handle
            .invalidate(&Fingerprint::from(format!("t{token}").as_str()))
    }

    fn handle(&self) -> &Handle {
        &self.handle
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// What the table holds for one valid token, as far as the model knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Vacant,
    /// The entry is flight `f` (an index into `flights`).
    Flight(usize),
    /// A replay of flight `f`'s result, live while `now < until`. An expired one may still
    /// be in the table until looked up, invalidated or swept (within one sweep period).
    Replay {
        flight: usize,
        until: Instant,
    },
}

/// One inner call, as the model sees it.
#[derive(Debug)]
struct Flight {
    token: usize,
    start: Instant,
    /// Invalidated while it ran: its result is not replayed, and reaches no caller.
    invalidated: bool,
    /// When and how it ended; `true` if by the hard cap (a timer, which may fire in either
    /// order with a caller's wait timer of the same instant).
    resolution: Option<(Instant, Outcome, bool)>,
}

#[derive(Debug)]
enum Plan {
    /// Answered at once (a replay, a refusal).
    Now(Outcome),
    /// Waiting on flight `f` until `deadline`.
    Wait { flight: usize, deadline: Instant },
}

struct Caller {
    token: usize,
    start: Instant,
    plan: Plan,
    handle: JoinHandle<Outcome>,
    aborted: bool,
    result: Option<Outcome>,
}

/// What the leader decision is, before the request runs.
#[derive(Debug)]
enum Expect {
    Answer(Plan),
    Lead,
    /// Lead, or the table is full of expired replays not yet swept.
    LeadOrFull,
}

#[derive(Default, Debug)]
struct Counts {
    leader: u64,
    joined: u64,
    replayed: u64,
    overloaded: u64,
    rejected: u64,
}

struct Harness<F> {
    front: F,
    registry: Registry,
    max_entries: usize,
    callers: Vec<Caller>,
    flights: Vec<Flight>,
    slots: [Slot; VALID],
    counts: Counts,
    trace: Vec<String>,
}

fn name(flights: &[Flight], f: usize) -> String {
    format!("t{}#{}", flights[f].token, f + 1)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Runs `ops` on a fresh layer made by `front`, checking the model after each, then
/// quiesces. Returns the layer's final counters, for the scenarios that look at them.
fn run<F: Front>(
    max_entries: usize,
    front: impl FnOnce(&Registry, usize) -> F,
    ops: &[Op],
) -> Stats {
    quiet_inner_panics();
    runtime().block_on(async {
        let registry = Registry::default();
        let front = front(&registry, max_entries);
        let mut harness = Harness::new(front, registry, max_entries);
        for op in ops {
            harness.apply(op).await;
        }
        harness.quiesce().await;
        harness.front.handle().stats()
    })
}

/// What the cases exercised, for `coverage`.
static COVERAGE: Mutex<std::collections::BTreeMap<&'static str, u64>> =
    Mutex::new(std::collections::BTreeMap::new());

fn cover(event: &'static str) {
    *COVERAGE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(event)
        .or_default() += 1;
}

/// Prints what the generated cases exercise (how often each path of the model was taken):
/// `cargo test -p tower-refresh-coalesce --all-features --test model -- --ignored --nocapture coverage`.
#[test]
#[ignore = "a report, not a check"]
fn coverage() {
    use proptest::test_runner::TestRunner;
    TestRunner::new(config())
        .run(&(max_entries(), ops(VALID)), |(max_entries, ops)| {
            core(&ops, max_entries);
            Ok(())
        })
        .expect("the core model holds");
    #[cfg(feature = "jwt")]
    TestRunner::new(config())
        .run(&(max_entries(), ops(VALID + 2)), |(max_entries, ops)| {
            run(max_entries, http_front::HttpFront::new, &ops);
            Ok(())
        })
        .expect("the HTTP model holds");
    let coverage = COVERAGE.lock().unwrap();
    println!("{} cases per front", config().cases);
    for (event, count) in coverage.iter() {
        println!("{count:>9}  {event}");
    }
}

fn core(ops: &[Op], max_entries: usize) -> Stats {
    run(max_entries, CoreFront::new, ops)
}

proptest! {
    #![proptest_config(config())]

    /// The core layer (`CloneResponse`, plain requests) against the model.
    #[test]
    fn the_core_layer_follows_the_model(max_entries in max_entries(), ops in ops(VALID)) {
        core(&ops, max_entries);
    }

    /// The HTTP front (HS256 JWTs, keyed fingerprints, buffered responses, JSON refusals,
    /// plus forged and missing tokens) against the same model.
    #[cfg(feature = "jwt")]
    #[test]
    fn the_http_front_follows_the_model(max_entries in max_entries(), ops in ops(VALID + 2)) {
        run(max_entries, http_front::HttpFront::new, &ops);
    }
}
