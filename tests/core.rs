//! The coalescing core, on a plain request type: counts, replays, timeouts, failures, limits.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::join_all;
use support::{Calls, Gated, until};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_refresh_coalesce::{
    Admission, BoxError, Extract, Extracted, Fingerprint, NaturalKey, RefreshCoalesceLayer,
    error::{Elapsed, Failure, LeaderFailed, Limit, Overloaded, Shared},
};

/// A request of these tests: a key and a caller number.
#[derive(Clone, Debug)]
struct Req {
    key: String,
    #[allow(
        dead_code,
        reason = "tells apart the requests of one key when a test fails"
    )]
    caller: usize,
}

impl Req {
    fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            caller: 0,
        }
    }
}

/// The key strategy of these tests.
fn by_key(req: &Req) -> Option<String> {
    Some(req.key.clone())
}

/// The inner service's answer: `"{key}#{call}"`.
async fn key_and_call(req: Req, n: usize) -> Result<String, Infallible> {
    Ok(format!("{}#{n}", req.key))
}

const TTL: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

fn layer() -> RefreshCoalesceLayer<fn(&Req) -> Option<String>> {
    RefreshCoalesceLayer::new(by_key as fn(&Req) -> Option<String>)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_callers_of_one_key_make_one_inner_call() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let tasks: Vec<_> = (0..10_000)
        .map(|caller| {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .oneshot(Req {
                        key: "r1".into(),
                        caller,
                    })
                    .await
            })
        })
        .collect();
    until(|| {
        let stats = handle.stats();
        stats.leader + stats.joined == 10_000
    })
    .await;
    inner.open();

    let responses: Vec<String> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("response"))
        .collect();
    assert_eq!(inner.calls(), 1);
    assert_eq!(responses.len(), 10_000);
    assert!(
        responses.iter().all(|r| r == "r1#1"),
        "every caller gets the leader's response"
    );
    let stats = handle.stats();
    assert_eq!((stats.leader, stats.joined), (1, 9_999));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_ten_thousand_keys_each_get_their_own_keys_result() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let tasks: Vec<_> = (0..100_000)
        .map(|caller| {
            let service = service.clone();
            let key = format!("k{}", caller % 10_000);
            tokio::spawn(async move {
                let response = service
                    .oneshot(Req {
                        key: key.clone(),
                        caller,
                    })
                    .await;
                (key, response)
            })
        })
        .collect();
    until(|| {
        let stats = handle.stats();
        stats.leader + stats.joined == 100_000
    })
    .await;
    assert_eq!(handle.stats().leader, 10_000);
    inner.open();

    let mut per_key = std::collections::HashMap::new();
    for task in join_all(tasks).await {
        let (key, response) = task.expect("task");
        let response = response.expect("response");
        let (prefix, _) = response.split_once('#').expect("key#call");
        assert_eq!(prefix, key, "a caller got another key's result");
        per_key
            .entry(key)
            .or_insert_with(std::collections::HashSet::new)
            .insert(response);
    }
    assert_eq!(inner.calls(), 10_000);
    assert_eq!(per_key.len(), 10_000);
    assert!(per_key.values().all(|responses| responses.len() == 1));
}

#[tokio::test(start_paused = true)]
async fn results_are_replayed_within_the_ttl_and_refreshed_after_it() {
    let inner = Gated::open_now();
    let layer = layer();
    let handle = layer.handle();
    let mut service = layer.layer(inner.service(key_and_call));

    let first = service
        .ready()
        .await
        .unwrap()
        .call(Req::new("r1"))
        .await
        .unwrap();
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    let replayed = service
        .ready()
        .await
        .unwrap()
        .call(Req::new("r1"))
        .await
        .unwrap();
    assert_eq!((first.as_str(), replayed.as_str()), ("r1#1", "r1#1"));
    assert_eq!(inner.calls(), 1);
    assert_eq!(handle.stats().replayed, 1);

    tokio::time::advance(Duration::from_millis(1)).await;
    let fresh = service
        .ready()
        .await
        .unwrap()
        .call(Req::new("r1"))
        .await
        .unwrap();
    assert_eq!(fresh, "r1#2");
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn waiters_time_out_at_exactly_the_wait_timeout_and_the_flight_goes_on() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let start = Instant::now();
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let result = service.oneshot(Req::new("r1")).await;
                (result, start.elapsed())
            })
        })
        .collect();
    for caller in join_all(callers).await {
        let (result, waited) = caller.unwrap();
        let error = result.expect_err("the gate is closed");
        assert_eq!(error.downcast_ref::<Elapsed>(), Some(&Elapsed::new(WAIT)));
        assert_eq!(
            waited, WAIT,
            "every caller, the leader's included, waits exactly wait_timeout"
        );
    }
    assert_eq!(handle.stats().timed_out, 5);
    assert_eq!(handle.stats().in_flight, 1, "the flight goes on");

    inner.open();
    until(|| handle.stats().in_flight == 0).await;
    let retry = service.clone().oneshot(Req::new("r1")).await.unwrap();
    assert_eq!(retry, "r1#1", "the retry gets the replay");
    assert_eq!(inner.calls(), 1);
    assert_eq!(handle.stats().replayed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_leader_caller_does_not_cancel_the_inner_call() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let leader = tokio::spawn(service.clone().oneshot(Req::new("r1")));
    let joiner = tokio::spawn(service.clone().oneshot(Req::new("r1")));
    until(|| handle.stats().joined == 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());

    inner.open();
    assert_eq!(joiner.await.unwrap().unwrap(), "r1#1");
    let replay = service.clone().oneshot(Req::new("r1")).await.unwrap();
    assert_eq!(replay, "r1#1");
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn when_every_caller_is_gone_the_call_completes_once_and_no_task_is_left() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(service.clone().oneshot(Req::new("r1"))))
        .collect();
    until(|| handle.stats().joined == 2).await;
    for caller in &callers {
        caller.abort();
    }
    for caller in callers {
        assert!(caller.await.unwrap_err().is_cancelled());
    }
    assert_eq!(handle.stats().in_flight, 1, "the inner call still runs");

    inner.open();
    until(|| handle.stats().in_flight == 0).await;
    assert_eq!(inner.calls(), 1);
    let replay = service.clone().oneshot(Req::new("r1")).await.unwrap();
    assert_eq!(replay, "r1#1", "the orphaned result is replayed");

    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(handle.stats().entries, 0);
    assert_eq!(
        alive_tasks(),
        0,
        "neither the flight task nor the sweeper is left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_inner_call_fails_every_waiter_without_panicking_them() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(|req: Req, n| async move {
        if n == 1 {
            panic!("inner service bug");
        }
        Ok::<_, Infallible>(format!("{}#{n}", req.key))
    }));

    let callers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(service.clone().oneshot(Req::new("r1"))))
        .collect();
    until(|| handle.stats().joined == 3).await;
    inner.open();
    for caller in join_all(callers).await {
        let error = caller.expect("no panic reaches a waiter").unwrap_err();
        let failed = error.downcast_ref::<LeaderFailed>().expect("LeaderFailed");
        assert_eq!(failed.failure(), Failure::Panicked);
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.leader_failed, stats.entries, stats.in_flight),
        (4, 0, 0)
    );

    let next = service.clone().oneshot(Req::new("r1")).await.unwrap();
    assert_eq!(next, "r1#2", "the next call leads anew");
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_reaches_its_waiters_and_is_not_replayed() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(|req: Req, n| async move {
        if n == 1 {
            return Err::<String, BoxError>("token store unavailable".into());
        }
        Ok(format!("{}#{n}", req.key))
    }));

    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(service.clone().oneshot(Req::new("r1"))))
        .collect();
    until(|| handle.stats().joined == 2).await;
    inner.open();
    for caller in join_all(callers).await {
        let error = caller.unwrap().unwrap_err();
        let shared = error
            .downcast_ref::<Shared>()
            .expect("the shared inner error");
        assert_eq!(shared.inner().to_string(), "token store unavailable");
        assert!(std::error::Error::source(shared).is_some());
    }
    assert_eq!(handle.stats().entries, 0, "errors are not replayed");

    let next = service.clone().oneshot(Req::new("r1")).await.unwrap();
    assert_eq!(next, "r1#2");
    assert_eq!(inner.calls(), 2);
}

/// Sets a flag when dropped: shows that the hard cap drops (aborts) the inner future.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn the_hard_cap_aborts_a_hung_inner_call() {
    let inner = Gated::open_now();
    let dropped = Arc::new(AtomicBool::new(false));
    let layer = RefreshCoalesceLayer::builder(by_key)
        .hard_cap(Duration::from_secs(5))
        .wait_timeout(Duration::from_secs(60))
        .build();
    let handle = layer.handle();
    let service = layer.layer(inner.service({
        let dropped = dropped.clone();
        move |_req: Req, _n| {
            let flag = DropFlag(dropped.clone());
            async move {
                let _flag = flag;
                std::future::pending::<()>().await;
                Ok::<String, Infallible>(String::new())
            }
        }
    }));

    let start = Instant::now();
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(service.clone().oneshot(Req::new("r1"))))
        .collect();
    for caller in join_all(callers).await {
        let error = caller.unwrap().unwrap_err();
        let failed = error.downcast_ref::<LeaderFailed>().expect("LeaderFailed");
        assert_eq!(failed.failure(), Failure::HardCap);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the hung inner future was dropped"
    );
    assert_eq!((handle.stats().entries, handle.stats().in_flight), (0, 0));
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_waiter_cap_answers_overloaded_at_once() {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::builder(by_key).max_waiters(3).build();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let admitted: Vec<_> = (0..3)
        .map(|_| tokio::spawn(service.clone().oneshot(Req::new("r1"))))
        .collect();
    until(|| handle.stats().joined == 2).await;
    let start = Instant::now();
    let error = service.clone().oneshot(Req::new("r1")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "turned away at once");
    assert_eq!(
        error.downcast_ref::<Overloaded>().map(Overloaded::limit),
        Some(Limit::Waiters)
    );
    assert_eq!(handle.stats().overloaded, 1);

    inner.open();
    for caller in join_all(admitted).await {
        assert_eq!(caller.unwrap().unwrap(), "r1#1");
    }
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_entry_cap_answers_overloaded_at_once() {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::builder(by_key).max_entries(2).build();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let a = tokio::spawn(service.clone().oneshot(Req::new("a")));
    let b = tokio::spawn(service.clone().oneshot(Req::new("b")));
    until(|| handle.stats().leader == 2).await;
    let start = Instant::now();
    let error = service.clone().oneshot(Req::new("c")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        error.downcast_ref::<Overloaded>().map(Overloaded::limit),
        Some(Limit::Entries)
    );
    assert_eq!(
        inner.calls(),
        2,
        "the refused key never reached the inner service"
    );

    inner.open();
    assert_eq!(a.await.unwrap().unwrap(), "a#1");
    assert_eq!(b.await.unwrap().unwrap(), "b#2");
    // Expired replays make room again once the background sweep has run.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(service.clone().oneshot(Req::new("c")).await.unwrap(), "c#3");
}

#[tokio::test(start_paused = true)]
async fn invalidation_removes_a_replay() {
    let inner = Gated::open_now();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    assert_eq!(
        service.clone().oneshot(Req::new("r1")).await.unwrap(),
        "r1#1"
    );
    assert!(handle.invalidate(&Fingerprint::from("r1")));
    assert!(!handle.invalidate(&Fingerprint::from("r1")), "already gone");
    assert_eq!(
        service.clone().oneshot(Req::new("r1")).await.unwrap(),
        "r1#2"
    );
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_flight_invalidated_while_running_is_not_replayed() {
    let inner = Gated::closed();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let waiter = tokio::spawn(service.clone().oneshot(Req::new("r1")));
    until(|| handle.stats().leader == 1).await;
    assert!(handle.invalidate(&Fingerprint::from("r1")));
    inner.open();
    // `CloneResponse` rejects with the layer's own error, as a `BoxError`.
    let refused = waiter.await.unwrap().expect_err("its caller is refused");
    assert_eq!(
        refused
            .downcast_ref::<LeaderFailed>()
            .map(LeaderFailed::failure),
        Some(Failure::Revoked),
        "{refused}"
    );
    assert_eq!(
        refused.to_string(),
        "coalesced call was revoked by an invalidation while it ran"
    );
    assert_eq!(inner.calls(), 1);
    until(|| handle.stats().in_flight == 0).await;
    assert_eq!(handle.stats().entries, 0);

    assert_eq!(
        service.clone().oneshot(Req::new("r1")).await.unwrap(),
        "r1#2"
    );
    assert_eq!(handle.stats().replayed, 0);
}

/// Keys by token, groups by user: the shape of the HTTP front, on a plain request.
#[derive(Clone)]
struct ByTokenInGroup;

impl Extract<(String, String)> for ByTokenInGroup {
    type Request = (String, String);
    type Token = String;
    type Future = std::future::Ready<Result<Extracted<String, Self::Request>, BoxError>>;

    fn extract(&self, request: (String, String)) -> Self::Future {
        std::future::ready(Ok(Extracted::Coalesce {
            key: Fingerprint::from(request.1.as_str()),
            token: request.0.clone(),
            request,
        }))
    }

    fn admit(&self, user: String, _request: &mut Self::Request) -> Result<Admission, BoxError> {
        Ok(Admission::new().group(Fingerprint::from(user)))
    }
}

#[tokio::test(start_paused = true)]
async fn invalidating_a_group_removes_each_of_its_entries_and_only_those() {
    let inner = Gated::open_now();
    let layer = RefreshCoalesceLayer::new(ByTokenInGroup);
    let handle = layer.handle();
    let service = layer.layer(
        inner.service(|(user, token): (String, String), n| async move {
            Ok::<_, Infallible>(format!("{user}/{token}#{n}"))
        }),
    );
    let call =
        |user: &str, token: &str| service.clone().oneshot((user.to_owned(), token.to_owned()));

    call("alice", "a1").await.unwrap();
    call("alice", "a2").await.unwrap();
    call("bob", "b1").await.unwrap();
    assert_eq!(
        handle.stats().reuse_suspected,
        1,
        "alice's second token met her first"
    );
    assert_eq!(handle.invalidate_group(&Fingerprint::from("alice")), 2);
    assert_eq!(handle.stats().entries, 1);

    assert_eq!(call("alice", "a1").await.unwrap(), "alice/a1#4");
    assert_eq!(
        call("bob", "b1").await.unwrap(),
        "bob/b1#3",
        "bob's replay stays"
    );
}

#[tokio::test(start_paused = true)]
async fn the_table_is_empty_after_quiescence_and_the_ttl() {
    let inner = Gated::open_now();
    let layer = layer();
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    let callers = (0..1_000).map(|i| service.clone().oneshot(Req::new(format!("k{}", i % 100))));
    for result in join_all(callers).await {
        result.unwrap();
    }
    assert_eq!(inner.calls(), 100);
    assert_eq!((handle.stats().entries, handle.stats().in_flight), (100, 0));

    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(handle.stats().entries, 0);
    assert_eq!(
        alive_tasks(),
        0,
        "the sweeper stops once the table is empty"
    );
}

#[tokio::test(start_paused = true)]
async fn every_service_of_one_layer_and_every_clone_share_one_table() {
    let inner = Gated::open_now();
    let layer = layer();
    let first = layer.layer(inner.service(key_and_call));
    let second = layer.clone().layer(inner.service(key_and_call));

    assert_eq!(first.clone().oneshot(Req::new("r1")).await.unwrap(), "r1#1");
    assert_eq!(
        second.clone().oneshot(Req::new("r1")).await.unwrap(),
        "r1#1"
    );
    assert_eq!(inner.calls(), 1);
    assert_eq!(layer.handle().stats().replayed, 1);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_bypass_the_table() {
    let inner = Gated::open_now();
    let layer =
        RefreshCoalesceLayer::new(|req: &Req| (!req.key.is_empty()).then(|| req.key.clone()));
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));

    assert_eq!(service.clone().oneshot(Req::new("")).await.unwrap(), "#1");
    assert_eq!(service.clone().oneshot(Req::new("")).await.unwrap(), "#2");
    assert_eq!((handle.stats().bypassed, handle.stats().entries), (2, 0));
}

/// A natural key borrowed from the request, hashed under a deployment secret.
fn by_natural_key() -> NaturalKey<impl Fn(&Req) -> Option<&str> + Clone + Send + Sync + 'static> {
    NaturalKey::new(b"a deployment secret of 32 bytes!", |req: &Req| {
        Some(req.key.as_str())
    })
    .expect("a 32-byte secret")
}

/// Sends one request per key at once; answers once every caller has led or joined.
async fn two_callers(keys: [&str; 2]) -> (Vec<String>, usize, (u64, u64)) {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::new(by_natural_key());
    let handle = layer.handle();
    let service = layer.layer(inner.service(key_and_call));
    let tasks: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(caller, key)| {
            let request = Req {
                key: (*key).to_owned(),
                caller,
            };
            tokio::spawn(service.clone().oneshot(request))
        })
        .collect();
    until(|| {
        let stats = handle.stats();
        stats.leader + stats.joined == 2
    })
    .await;
    inner.open();
    let responses = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("response"))
        .collect();
    let stats = handle.stats();
    (responses, inner.calls(), (stats.leader, stats.joined))
}

#[tokio::test]
async fn two_callers_of_one_natural_key_make_one_inner_call() {
    let (responses, calls, (leaders, joined)) = two_callers(["alice", "alice"]).await;
    assert_eq!(calls, 1);
    assert_eq!((leaders, joined), (1, 1));
    assert_eq!(responses, ["alice#1", "alice#1"]);
}

#[tokio::test]
async fn callers_of_two_natural_keys_make_two_inner_calls() {
    let (mut responses, calls, (leaders, joined)) = two_callers(["alice", "bob"]).await;
    assert_eq!(calls, 2);
    assert_eq!((leaders, joined), (2, 0));
    responses.sort();
    assert!(
        matches!(responses.as_slice(), [a, b] if a.starts_with("alice#") && b.starts_with("bob#")),
        "{responses:?}"
    );
}

/// A service that panics when called without `poll_ready`, like tower's `ConcurrencyLimit`.
#[derive(Clone)]
struct MustBeReady {
    ready: bool,
    calls: Calls,
}

impl Service<Req> for MustBeReady {
    type Response = String;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<String, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        assert!(std::mem::take(&mut self.ready), "called without poll_ready");
        let n = self.calls.record();
        Box::pin(async move { Ok(format!("{}#{n}", req.key)) })
    }
}

#[tokio::test(start_paused = true)]
async fn the_leader_calls_the_service_it_readied() {
    let calls = Calls::default();
    let mut service = ServiceBuilder::new()
        .layer(layer())
        .concurrency_limit(1)
        .service(MustBeReady {
            ready: false,
            calls: calls.clone(),
        });
    for key in ["a", "b", "a"] {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(Req::new(key))
            .await
            .unwrap();
        assert!(response.starts_with(key));
    }
    assert_eq!(calls.get(), 2);
}
