//! The coalescing core next to what a user would pick instead, on one workload.
//!
//! Every group runs five contenders on the same inner "refresh" service, which answers with
//! one shared ~600-byte token pair (`Arc<str>`, cloned per caller):
//!
//! - `ours`: [`RefreshCoalesceLayer`] (TTL 30 s, at most 100,000 entries);
//! - `moka`: `moka::future::Cache` with `time_to_live` (30 s), `max_capacity` (100,000) and
//!   `try_get_with` (coalesced init plus TTL);
//! - `singleflight`: `async_singleflight::Group` (no replay: every call after a flight is a
//!   new flight);
//! - `tower_resilience`: `tower_resilience_coalesce::CoalesceLayer` (no replay either);
//! - `passthrough`: the inner service alone, the floor.
//!
//! Keys are 32-byte digests computed before the timed region, so no contender pays for
//! hashing a token. Groups:
//!
//! 1. `hot_hit`: one task, a key already replayed or cached, ns per call (a spawned task on
//!    a current-thread runtime). Three more contenders of ours key by a 32-byte user id the
//!    request carries instead of the digest, hashing it on every call:
//!    `ours_natural_str` (`NaturalKey` over a borrowed `&str`), `ours_natural_string`
//!    (`NaturalKey::owned` over a `String` built per call) and `ours_closure_string` (a plain
//!    closure returning a `String`: `Fingerprint::from`, SHA-256).
//! 2. `hot_hit_contended`: 64 tasks on a 2-worker runtime calling one hot key; calls per
//!    second.
//! 3. `storm_one_key`: 10,000 concurrent callers of one key, the inner call takes 5 ms;
//!    wall time per storm, inner calls per storm printed.
//! 4. `storm_1000_keys`: 1,000 keys x 10 callers, inner 5 ms; wall time and inner calls.
//! 5. `miss`: distinct keys, each once, on a fresh table every 100,000 calls; ns per call
//!    (a spawned task on a current-thread runtime).
//!
//! `cargo bench --bench coalesce`; `cargo bench --bench coalesce -- --quick` for a short run.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_singleflight::Group;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use tokio::{
    runtime::{Builder, Runtime},
    time::Sleep,
};
use tower::{Layer, Service, ServiceExt};
use tower_refresh_coalesce::{
    Extract, Fingerprint, NaturalKey, OwnedKey, RefreshCoalesce, RefreshCoalesceLayer,
};
use tower_resilience_coalesce::{CoalesceLayer, CoalesceService};

/// The shared token pair every contender hands out.
type Pair = Arc<str>;

/// Replay window of the contenders that replay.
const TTL: Duration = Duration::from_secs(30);
/// Entry bound of the contenders that have one (our layer's default).
const CAPACITY: usize = 100_000;
/// How long the inner call of a storm takes.
const STORM_DELAY: Duration = Duration::from_millis(5);
/// Tasks of the contended group.
const TASKS: u64 = 64;
/// Calls on one fresh table in the miss group.
const MISS_BATCH: usize = 100_000;

/// A request: the precomputed digest of its refresh token, and the user it is for.
#[derive(Clone, Copy, Debug)]
struct Req {
    key: [u8; 32],
    /// A natural key of 32 bytes, as long as the digest (the `hot_hit` group's natural-key
    /// contenders key by it).
    user: &'static str,
}

/// The user of every request.
const USER: &str = "user-7f3a9c21d4e8b6a05f1c2e9d7b4";

impl Req {
    fn new(key: [u8; 32]) -> Self {
        Self { key, user: USER }
    }
}

fn digest(i: u64) -> [u8; 32] {
    *Fingerprint::of(i.to_le_bytes()).as_bytes()
}

/// A ~600-byte token response, as an identity server would return it.
fn token_pair() -> Pair {
    let access = "a".repeat(330);
    let refresh = "r".repeat(180);
    let pair = format!(
        r#"{{"access_token":"{access}","refresh_token":"{refresh}","token_type":"Bearer","expires_in":900,"scope":"openid profile offline_access","id_token":null}}"#
    );
    assert!((550..=650).contains(&pair.len()), "{}", pair.len());
    pair.into()
}

// ---------------------------------------------------------------------------------------
// The inner "refresh" service
// ---------------------------------------------------------------------------------------

/// The inner refresh service: answers with the shared pair, at once or after a delay.
/// Cloning it is one `Arc` increment, like an axum router or a `service_fn` over an `Arc`.
#[derive(Clone)]
struct Refresh(Arc<RefreshState>);

struct RefreshState {
    pair: Pair,
    delay: Option<Duration>,
    count: bool,
    calls: AtomicUsize,
}

impl Refresh {
    /// Answers at once; calls are not counted (no shared counter on the hot path).
    fn instant() -> Self {
        Self::with(None, false)
    }

    /// Answers after `delay`; counts its calls.
    fn slow(delay: Duration) -> Self {
        Self::with(Some(delay), true)
    }

    fn with(delay: Option<Duration>, count: bool) -> Self {
        Self(Arc::new(RefreshState {
            pair: token_pair(),
            delay,
            count,
            calls: AtomicUsize::new(0),
        }))
    }

    fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }
}

impl Service<Req> for Refresh {
    type Response = Pair;
    type Error = Infallible;
    type Future = RefreshFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Req) -> RefreshFuture {
        if self.0.count {
            self.0.calls.fetch_add(1, Ordering::SeqCst);
        }
        RefreshFuture {
            sleep: self
                .0
                .delay
                .map(|delay| Box::pin(tokio::time::sleep(delay))),
            pair: Some(self.0.pair.clone()),
        }
    }
}

struct RefreshFuture {
    sleep: Option<Pin<Box<Sleep>>>,
    pair: Option<Pair>,
}

impl Future for RefreshFuture {
    type Output = Result<Pair, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(sleep) = &mut self.sleep {
            std::task::ready!(sleep.as_mut().poll(cx));
        }
        Poll::Ready(Ok(self.pair.take().expect("polled after completion")))
    }
}

// ---------------------------------------------------------------------------------------
// Contenders
// ---------------------------------------------------------------------------------------

/// One way of putting the inner service behind a coalescing table.
trait Contender: Clone + Send + 'static {
    const NAME: &'static str;

    /// A fresh table in front of `inner`.
    fn build(inner: Refresh) -> Self;

    /// One caller's refresh.
    fn call(&mut self, req: Req) -> impl Future<Output = Pair> + Send;

    /// Lets background maintenance catch up (moka's pending tasks); outside timed regions.
    fn settle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How our layer keys a request: one contender per way.
trait OurKey: Extract<Req, Request = Req> + Clone + Send + Sync + 'static {
    const NAME: &'static str;

    fn make() -> Self;
}

/// The deployment secret of the natural-key contenders.
const SECRET: &[u8] = b"bench deployment secret, 32 byte";

/// The precomputed digest (the `ours` of every group).
type DigestKey = fn(&Req) -> Option<Fingerprint>;

impl OurKey for DigestKey {
    const NAME: &'static str = "ours";

    fn make() -> Self {
        |req| Some(Fingerprint::from_bytes(req.key))
    }
}

/// `NaturalKey` over a `&str` borrowed from the request.
type NaturalStr = NaturalKey<fn(&Req) -> Option<&str>>;

impl OurKey for NaturalStr {
    const NAME: &'static str = "ours_natural_str";

    fn make() -> Self {
        NaturalKey::new(SECRET, (|req| Some(req.user)) as fn(&Req) -> Option<&str>)
            .expect("a 32-byte secret")
    }
}

/// `NaturalKey` over a `String` the closure builds.
type NaturalString = NaturalKey<OwnedKey<fn(&Req) -> Option<String>>>;

impl OurKey for NaturalString {
    const NAME: &'static str = "ours_natural_string";

    fn make() -> Self {
        NaturalKey::owned(
            SECRET,
            (|req| Some(req.user.to_owned())) as fn(&Req) -> Option<String>,
        )
        .expect("a 32-byte secret")
    }
}

/// A plain closure returning a `String`: `Fingerprint::from(String)`, SHA-256.
type ClosureString = fn(&Req) -> Option<String>;

impl OurKey for ClosureString {
    const NAME: &'static str = "ours_closure_string";

    fn make() -> Self {
        |req| Some(req.user.to_owned())
    }
}

/// Our layer, called through `tower::Service` like any middleware; keyed by `K`.
#[derive(Clone)]
struct Ours<K = DigestKey>(RefreshCoalesce<Refresh, K>);

impl<K: OurKey> Contender for Ours<K> {
    const NAME: &'static str = K::NAME;

    fn build(inner: Refresh) -> Self {
        let layer = RefreshCoalesceLayer::builder(K::make())
            .ttl(TTL)
            .max_entries(CAPACITY)
            .build();
        Self(layer.layer(inner))
    }

    async fn call(&mut self, req: Req) -> Pair {
        let service = self.0.ready().await.expect("always ready");
        service.call(req).await.expect("ours: refresh failed")
    }
}

/// `moka::future::Cache` with a TTL, filled through `try_get_with`.
#[derive(Clone)]
struct Moka {
    cache: moka::future::Cache<[u8; 32], Pair>,
    inner: Refresh,
}

impl Contender for Moka {
    const NAME: &'static str = "moka";

    fn build(inner: Refresh) -> Self {
        let cache = moka::future::Cache::builder()
            .time_to_live(TTL)
            .max_capacity(CAPACITY as u64)
            .build();
        Self { cache, inner }
    }

    async fn call(&mut self, req: Req) -> Pair {
        let inner = &mut self.inner;
        let init = async move { inner.ready().await?.call(req).await };
        self.cache
            .try_get_with(req.key, init)
            .await
            .expect("moka: refresh failed")
    }

    async fn settle(&self) {
        self.cache.run_pending_tasks().await;
    }
}

/// `async_singleflight`: coalesces running calls, keeps nothing once they finish.
#[derive(Clone)]
struct Singleflight {
    group: Arc<Group<[u8; 32], Pair, Infallible>>,
    inner: Refresh,
}

impl Contender for Singleflight {
    const NAME: &'static str = "singleflight";

    fn build(inner: Refresh) -> Self {
        Self {
            group: Arc::new(Group::new()),
            inner,
        }
    }

    async fn call(&mut self, req: Req) -> Pair {
        let inner = &mut self.inner;
        let work = async move { inner.ready().await?.call(req).await };
        self.group
            .work(&req.key, work)
            .await
            .expect("singleflight: refresh failed")
    }
}

type ResilienceKeyFn = fn(&Req) -> [u8; 32];

fn resilience_key(req: &Req) -> [u8; 32] {
    req.key
}

/// `tower-resilience-coalesce`: a tower layer that coalesces running calls, no replay.
#[derive(Clone)]
struct TowerResilience(CoalesceService<Refresh, [u8; 32], Req, ResilienceKeyFn>);

impl Contender for TowerResilience {
    const NAME: &'static str = "tower_resilience";

    fn build(inner: Refresh) -> Self {
        Self(CoalesceLayer::new(resilience_key as ResilienceKeyFn).layer(inner))
    }

    async fn call(&mut self, req: Req) -> Pair {
        let service = self.0.ready().await.expect("always ready");
        let result = service.call(req).await;
        result.unwrap_or_else(|error| panic!("tower_resilience: {error}"))
    }
}

/// The inner service alone: no coalescing, the floor.
#[derive(Clone)]
struct Passthrough(Refresh);

impl Contender for Passthrough {
    const NAME: &'static str = "passthrough";

    fn build(inner: Refresh) -> Self {
        Self(inner)
    }

    async fn call(&mut self, req: Req) -> Pair {
        let service = self.0.ready().await.expect("always ready");
        let Ok(pair) = service.call(req).await;
        pair
    }
}

/// Runs `$bench::<C>(args..)` for every contender, in a fixed order.
macro_rules! each_contender {
    ($bench:ident($($arg:expr),* $(,)?)) => {
        $bench::<Ours>($($arg),*);
        $bench::<Moka>($($arg),*);
        $bench::<Singleflight>($($arg),*);
        $bench::<TowerResilience>($($arg),*);
        $bench::<Passthrough>($($arg),*);
    };
}

fn current_thread() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn two_workers() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs a timed loop inside a spawned task, as a server runs each connection: the timing
/// is taken inside the task, and the runtime's `block_on` only waits for it. (Driving the
/// loop from `block_on` itself would make every wake-up of the caller a driver unpark, an
/// `eventfd` write plus an `epoll_wait`, which no request handler of a server pays.)
fn in_task(
    timed: impl Future<Output = Duration> + Send + 'static,
) -> impl Future<Output = Duration> {
    let task = tokio::spawn(timed);
    async move { task.await.expect("timed task") }
}

/// A contender with `key` already replayed or cached.
fn primed<C: Contender>(rt: &Runtime, key: [u8; 32]) -> C {
    let mut contender = C::build(Refresh::instant());
    rt.block_on(async {
        contender.call(Req::new(key)).await;
        contender.settle().await;
    });
    contender
}

// ---------------------------------------------------------------------------------------
// 1. Hot replay hit, one task
// ---------------------------------------------------------------------------------------

fn hot_hit_one<C: Contender>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    let req = Req::new(digest(0));
    let contender = primed::<C>(rt, req.key);
    group.bench_function(C::NAME, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut contender = contender.clone();
            in_task(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(contender.call(black_box(req)).await);
                }
                start.elapsed()
            })
        })
    });
}

fn hot_hit(c: &mut Criterion) {
    let rt = current_thread();
    let mut group = c.benchmark_group("hot_hit");
    group.throughput(Throughput::Elements(1));
    each_contender!(hot_hit_one(&mut group, &rt));
    // Keys the request carries, next to the precomputed digest of `ours`.
    assert_eq!(USER.len(), 32);
    hot_hit_one::<Ours<NaturalStr>>(&mut group, &rt);
    hot_hit_one::<Ours<NaturalString>>(&mut group, &rt);
    hot_hit_one::<Ours<ClosureString>>(&mut group, &rt);
    group.finish();
}

// ---------------------------------------------------------------------------------------
// 2. Hot replay hit, 64 tasks on 2 workers
// ---------------------------------------------------------------------------------------

fn contended_one<C: Contender>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    let req = Req::new(digest(0));
    let contender = primed::<C>(rt, req.key);
    group.bench_function(C::NAME, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let contender = contender.clone();
            // The driver runs on a worker, so the callers are spawned onto the workers' own
            // queues; `iters` calls are shared out over the tasks exactly.
            in_task(async move {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|task| {
                        let mut contender = contender.clone();
                        let calls = iters / TASKS + u64::from(task < iters % TASKS);
                        tokio::spawn(async move {
                            for _ in 0..calls {
                                black_box(contender.call(black_box(req)).await);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("caller task");
                }
                start.elapsed()
            })
        })
    });
}

fn hot_hit_contended(c: &mut Criterion) {
    let rt = two_workers();
    let mut group = c.benchmark_group("hot_hit_contended");
    group.throughput(Throughput::Elements(1));
    each_contender!(contended_one(&mut group, &rt));
    group.finish();
}

// ---------------------------------------------------------------------------------------
// 3 and 4. Storms
// ---------------------------------------------------------------------------------------

/// One storm on a fresh table: `callers` requests for each key, all spawned at once; the
/// inner call takes [`STORM_DELAY`]. Returns the wall time from the first spawn until the
/// last caller has its pair, and the number of inner calls.
async fn storm_once<C: Contender>(keys: Arc<[[u8; 32]]>, callers: usize) -> (Duration, usize) {
    let inner = Refresh::slow(STORM_DELAY);
    let contender = C::build(inner.clone());
    let expected = inner.0.pair.clone();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(keys.len() * callers);
    for _ in 0..callers {
        for &key in keys.iter() {
            let mut contender = contender.clone();
            tasks.push(tokio::spawn(
                async move { contender.call(Req::new(key)).await },
            ));
        }
    }
    for task in tasks {
        let pair = task.await.expect("caller task");
        assert!(Arc::ptr_eq(&pair, &expected), "{}: wrong pair", C::NAME);
    }
    let elapsed = start.elapsed();
    drop(contender);
    (elapsed, inner.calls())
}

/// Inner calls per storm, per contender, for the summary printed after each group.
type CallLog = Arc<Mutex<Vec<usize>>>;

fn storm_one<C: Contender>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    keys: &Arc<[[u8; 32]]>,
    callers: usize,
    log: &mut Vec<(&'static str, CallLog)>,
) {
    let calls: CallLog = Arc::default();
    log.push((C::NAME, calls.clone()));
    group.bench_function(C::NAME, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (keys, calls) = (keys.clone(), calls.clone());
            in_task(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (elapsed, inner_calls) = storm_once::<C>(keys.clone(), callers).await;
                    total += elapsed;
                    calls.lock().expect("log").push(inner_calls);
                }
                total
            })
        })
    });
}

fn print_calls(group: &str, expected: usize, log: &[(&'static str, CallLog)]) {
    for (name, calls) in log {
        let mut calls = calls.lock().expect("log").clone();
        calls.sort_unstable();
        if calls.is_empty() {
            continue;
        }
        let exact = calls.iter().filter(|&&n| n == expected).count();
        println!(
            "inner calls {group}/{name}: storms {}, min {}, median {}, max {}, exactly {expected}: {exact}/{}",
            calls.len(),
            calls[0],
            calls[calls.len() / 2],
            calls[calls.len() - 1],
            calls.len(),
        );
    }
}

fn storm_group(c: &mut Criterion, name: &str, keys: usize, callers: usize) {
    let rt = two_workers();
    let keys: Arc<[[u8; 32]]> = (0..keys as u64).map(digest).collect();
    let mut log = Vec::new();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    each_contender!(storm_one(&mut group, &rt, &keys, callers, &mut log));
    group.finish();
    print_calls(name, keys.len(), &log);
}

fn storm_one_key(c: &mut Criterion) {
    storm_group(c, "storm_one_key", 1, 10_000);
}

fn storm_1000_keys(c: &mut Criterion) {
    storm_group(c, "storm_1000_keys", 1_000, 10);
}

// ---------------------------------------------------------------------------------------
// 5. Miss path
// ---------------------------------------------------------------------------------------

fn miss_one<C: Contender>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    keys: &Arc<[[u8; 32]]>,
) {
    group.bench_function(C::NAME, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let keys = keys.clone();
            in_task(async move {
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let batch = left.min(MISS_BATCH);
                    let mut contender = C::build(Refresh::instant());
                    let start = Instant::now();
                    for &key in &keys[..batch] {
                        black_box(contender.call(Req::new(key)).await);
                    }
                    total += start.elapsed();
                    // The full table is dropped outside the timed region.
                    drop(contender);
                    left -= batch;
                }
                total
            })
        })
    });
}

fn miss(c: &mut Criterion) {
    let rt = current_thread();
    let keys: Arc<[[u8; 32]]> = (0..MISS_BATCH as u64).map(digest).collect();
    let mut group = c.benchmark_group("miss");
    group.throughput(Throughput::Elements(1));
    each_contender!(miss_one(&mut group, &rt, &keys));
    group.finish();
}

criterion_group!(
    benches,
    hot_hit,
    hot_hit_contended,
    storm_one_key,
    storm_1000_keys,
    miss
);
criterion_main!(benches);
