//! The client layer: its cost per request, and a storm next to what is written by hand.
//!
//! The inner "API" answers `200` at once when the request carries the current access token
//! and `401` otherwise; the "token server" takes `REFRESH_LATENCY` per refresh and counts its
//! calls. Groups:
//!
//! 1. `client_overhead`: one request with a valid token, ns per request (a spawned task on a
//!    current-thread runtime): the bare inner service (`bare`), the same behind
//!    `BearerAuth` with an empty body (`layer`), and with a 4 KiB body kept for a retry
//!    (`layer_4k_body`; `bare_4k_body` is its floor).
//! 2. `client_storm`: `STORM` concurrent requests whose access token has expired (known
//!    ahead: its expiry has passed), on a 2-worker runtime; wall time per storm, and the
//!    mean refreshes per storm over every storm criterion ran, printed:
//!    - `layer`: `BearerAuth` (one refresh, every request waits for it);
//!    - `rwlock`: hand-written code around a `tokio::sync::RwLock`, as yup-oauth2 does:
//!      read the token, refresh without a lock when it expired, write the result;
//!    - `serialised`: gcp_auth's pattern: a mutex serialises the fetches, but a caller that
//!      gets the mutex fetches again without looking whether the one before it already
//!      did.
//!
//! `cargo bench --bench client`; `cargo bench --bench client -- --quick` for a short run.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::Full;
use tokio::runtime::{Builder, Runtime};
use tower::{Service, ServiceExt, service_fn};
use tower_refresh_coalesce::client::{
    BearerAuthLayer, ClientBody, Credentials, RefreshRequest, Tokens, refresh_fn,
};

/// Concurrent requests in a storm.
const STORM: usize = 1_000;
/// How long the token server takes to refresh.
const REFRESH_LATENCY: Duration = Duration::from_millis(1);

/// The token server: issues `access-N` after `REFRESH_LATENCY`, counting its calls; the
/// API accepts the last one issued.
#[derive(Clone, Default)]
struct TokenServer {
    issued: Arc<AtomicU64>,
}

impl TokenServer {
    async fn refresh(&self) -> String {
        tokio::time::sleep(REFRESH_LATENCY).await;
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        format!("access-{n}")
    }

    fn calls(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    fn valid(&self) -> String {
        format!("Bearer access-{}", self.calls())
    }
}

/// The API's answer.
type Answer = Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The API: `200` for the current token, `401` otherwise, for requests with `B` bodies.
fn api<B>(
    server: TokenServer,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
+ Clone
+ Send
+ 'static {
    service_fn(move |request: Request<B>| {
        let valid = request
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|a| a.as_bytes() == server.valid().as_bytes());
        let mut response = Response::new(Full::default());
        if !valid {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        ready(Ok(response))
    })
}

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn two_workers() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("http://api.example/me")
        .body(Full::new(body.clone()))
        .unwrap()
}

fn overhead(c: &mut Criterion) {
    let rt = current_thread();
    let mut group = c.benchmark_group("client_overhead");
    for (name, size) in [("", 0usize), ("_4k_body", 4096)] {
        let body = Bytes::from(vec![b'x'; size]);
        let server = TokenServer::default();
        let token = server.valid();
        // The floor: the API with the header already set.
        let bare = api::<Full<Bytes>>(server.clone());
        group.bench_function(format!("bare{name}"), |b| {
            b.to_async(&rt).iter(|| {
                let (bare, mut request) = (bare.clone(), request(&body));
                request
                    .headers_mut()
                    .insert(AUTHORIZATION, token.parse().unwrap());
                async move { tokio::spawn(bare.oneshot(request)).await.unwrap().unwrap() }
            })
        });
        let credentials = Credentials::from_tokens(Tokens::new("access-0").unwrap());
        let refresh = refresh_fn(|_: RefreshRequest| async {
            Ok::<_, Infallible>(Tokens::new("never").unwrap())
        });
        let layered = tower::ServiceBuilder::new()
            .layer(BearerAuthLayer::new(credentials, refresh))
            .service(api::<ClientBody<Full<Bytes>>>(server.clone()));
        group.bench_function(format!("layer{name}"), |b| {
            b.to_async(&rt).iter(|| {
                let (layered, request) = (layered.clone(), request(&body));
                async move {
                    let response = tokio::spawn(layered.oneshot(request))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response
                }
            })
        });
    }
    group.finish();
}

/// The hand-written contenders: a token cell and how each refreshes it.
#[derive(Clone)]
struct Cell {
    token: Arc<tokio::sync::RwLock<(String, bool)>>,
    fetch: Arc<tokio::sync::Mutex<()>>,
    server: TokenServer,
}

impl Cell {
    fn expired(server: &TokenServer) -> Self {
        Self {
            token: Arc::new(tokio::sync::RwLock::new(("access-0".into(), true))),
            fetch: Arc::default(),
            server: server.clone(),
        }
    }

    /// yup-oauth2's way: no lock around the refresh.
    async fn rwlock(&self) -> String {
        let (token, expired) = self.token.read().await.clone();
        if !expired {
            return token;
        }
        let token = self.server.refresh().await;
        *self.token.write().await = (token.clone(), false);
        token
    }

    /// gcp_auth's way: serialised fetches, no second look once the mutex is held.
    async fn serialised(&self) -> String {
        let (token, expired) = self.token.read().await.clone();
        if !expired {
            return token;
        }
        let _fetching = self.fetch.lock().await;
        let token = self.server.refresh().await;
        *self.token.write().await = (token.clone(), false);
        token
    }
}

fn storm(c: &mut Criterion) {
    let rt = two_workers();
    let mut group = c.benchmark_group("client_storm");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);

    let layer_storm = || async {
        let server = TokenServer::default();
        // Expired a second ago: the first request refreshes before it is sent.
        let expired = tokio::time::Instant::now() - Duration::from_secs(1);
        let credentials =
            Credentials::from_tokens(Tokens::new("access-0").unwrap().expiring_at(expired));
        let refresh_server = server.clone();
        let refresh = refresh_fn(move |_: RefreshRequest| {
            let server = refresh_server.clone();
            async move { Tokens::new(server.refresh().await) }
        });
        let client = tower::ServiceBuilder::new()
            .layer(BearerAuthLayer::new(credentials, refresh))
            .service(api::<ClientBody<Full<Bytes>>>(server.clone()));
        let calls: Vec<_> = (0..STORM)
            .map(|_| tokio::spawn(client.clone().oneshot(request(&Bytes::new()))))
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        server.calls()
    };
    let hand_storm = |serialised: bool| async move {
        let server = TokenServer::default();
        let cell = Cell::expired(&server);
        let calls: Vec<_> = (0..STORM)
            .map(|_| {
                let cell = cell.clone();
                tokio::spawn(async move {
                    let token = if serialised {
                        cell.serialised().await
                    } else {
                        cell.rwlock().await
                    };
                    let mut request = request(&Bytes::new());
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
                    api::<Full<Bytes>>(cell.server.clone())
                        .oneshot(request)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        server.calls()
    };

    // Every storm criterion runs adds its refreshes here: the mean per storm is printed
    // after each contender.
    let tally = |name: &str, storms: &AtomicU64, refreshes: &AtomicU64| {
        let storms = storms.load(Ordering::Relaxed).max(1);
        let refreshes = refreshes.load(Ordering::Relaxed);
        println!(
            "client_storm/{name}: {:.1} refreshes per storm of {STORM} (mean of {storms} storms)",
            refreshes as f64 / storms as f64
        );
    };
    let (storms, refreshes) = (AtomicU64::new(0), AtomicU64::new(0));
    group.bench_function("layer", |b| {
        b.to_async(&rt).iter(|| async {
            refreshes.fetch_add(layer_storm().await, Ordering::Relaxed);
            storms.fetch_add(1, Ordering::Relaxed);
        })
    });
    tally("layer", &storms, &refreshes);
    for (name, serialised) in [("rwlock", false), ("serialised", true)] {
        let (storms, refreshes) = (AtomicU64::new(0), AtomicU64::new(0));
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                refreshes.fetch_add(hand_storm(serialised).await, Ordering::Relaxed);
                storms.fetch_add(1, Ordering::Relaxed);
            })
        });
        tally(name, &storms, &refreshes);
    }
    group.finish();
}

criterion_group!(benches, overhead, storm);
criterion_main!(benches);
