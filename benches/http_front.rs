//! The HTTP front: a replayed refresh through the whole layer against the bare handler, and
//! a storm of RS256 followers that skip the signature check.
//!
//! Requests are `POST /oauth/token` with a JSON body
//! `{"grant_type":"refresh_token","refresh_token":"<jwt>"}`; the handler reads the body and
//! answers `200` with a ~600-byte token pair and `Cache-Control: no-store`. Every response
//! body is read to the end. Everything runs on a current-thread runtime, inside a spawned
//! task, so wall time is the CPU time of the request path.
//!
//! - `http_front/replayed_{hs256,rs256}`: the token was refreshed once; each request is
//!   found in the body, keyed (HMAC-SHA256), matched to the live replay and answered with
//!   the rebuilt response. No verification.
//! - `http_front/bare_{hs256,rs256}`: the same requests straight to the handler.
//! - `http_front/verify_{hs256,rs256}`: one `JwtVerifier::verify`, the cost a follower skips.
//! - `http_rs256_storm/leader_alone`: one request on a fresh layer (one verification, one
//!   flight).
//! - `http_rs256_storm/leader_and_1000_followers`: the same plus 1,000 concurrent requests
//!   with the same token, which join the flight (or, if polled after it finished, get its
//!   replay). Per follower:
//!   `(leader_and_1000_followers - leader_alone) / 1000`, against `verify_rs256`.
//!
//! `cargo bench --bench http_front`; add `-- --quick` for a short run.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use criterion::{
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use futures_util::future::join_all;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::dpop;
use support::tokens::{RSA_PRIVATE, RSA_PUBLIC};
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, ServiceExt};
use tower_refresh_coalesce::{
    Handle, HttpExtract, JwtVerifier, RefreshCoalesceLayer, Verified, Verify, error::Rejected,
    token::DpopVerifier,
};

const SECRET: &[u8] = b"bench signing secret, 32 bytes!!";
const REFRESH_TYP: &str = "refresh+jwt";
/// Followers of the storm group.
const FOLLOWERS: usize = 1_000;
/// The client of the client-authentication cases, and its secret.
const CLIENT_ID: &str = "bench-client";
const CLIENT_SECRET: &str = "kV3q9XbT1mZr8LwP0sYd6HcN2fJ5gEuA";
/// The origin clients reach the server at: the `htu` of the proofs is `ORIGIN` + `PATH`.
const ORIGIN: &str = "https://auth.example";
const PATH: &str = "/oauth/token";
const DPOP: HeaderName = HeaderName::from_static("dpop");
/// Remembered `jti`s of the replay case's verifier: more than one case can present within
/// the 60 s window of a proof.
const MAX_JTIS: usize = 1_000_000;
/// Proofs signed for each `dpop_check_*` case, each checked once per verifier.
const POOL: usize = 1_024;

#[derive(Clone, Copy, Debug)]
enum Alg {
    Hs256,
    Rs256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "hs256",
            Alg::Rs256 => "rs256",
        }
    }

    fn verifier(self) -> JwtVerifier {
        let builder = match self {
            Alg::Hs256 => JwtVerifier::hs256(SECRET),
            Alg::Rs256 => JwtVerifier::rs256_pem(RSA_PUBLIC).expect("public key"),
        };
        builder.typ(REFRESH_TYP).build().expect("verifier")
    }

    /// A valid refresh token of a user, as the identity server would have issued it.
    fn token(self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = json!({
            "sub": "user-1842",
            "iat": now,
            "exp": now + 3600,
            "jti": "7f1c1c7e-4d2a-4bb8-9d7a-0c9d8e6f5a41",
        });
        let (alg, key) = match self {
            Alg::Hs256 => (Algorithm::HS256, EncodingKey::from_secret(SECRET)),
            Alg::Rs256 => (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("private key"),
            ),
        };
        let mut header = Header::new(alg);
        header.typ = Some(REFRESH_TYP.to_owned());
        jsonwebtoken::encode(&header, &claims, &key).expect("encode")
    }
}

/// The JSON body of a refresh request carrying `token`.
fn refresh_body(token: &str) -> Bytes {
    json!({"grant_type": "refresh_token", "refresh_token": token})
        .to_string()
        .into()
}

fn refresh_request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(PATH)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Full::new(body.clone()))
        .expect("request")
}

/// The refresh handler: reads the request body, answers with the token pair. It does no
/// verification and no database work, so it is the floor of any refresh endpoint.
#[derive(Clone)]
struct Handler(Arc<HandlerState>);

struct HandlerState {
    pair: Bytes,
    calls: AtomicUsize,
}

impl Handler {
    fn new() -> Self {
        let pair = json!({
            "access_token": "a".repeat(330),
            "refresh_token": "r".repeat(180),
            "token_type": "Bearer",
            "expires_in": 900,
            "scope": "openid profile offline_access",
        })
        .to_string();
        assert!((550..=650).contains(&pair.len()), "{}", pair.len());
        Self(Arc::new(HandlerState {
            pair: pair.into(),
            calls: AtomicUsize::new(0),
        }))
    }

    fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }
}

impl<B> Service<Request<B>> for Handler
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let pair = self.0.pair.clone();
        Box::pin(async move {
            let body = request.into_body().collect().await.expect("body");
            black_box(body.to_bytes());
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store")
                .header(header::PRAGMA, "no-cache")
                .body(Full::new(pair))
                .expect("response");
            Ok(response)
        })
    }
}

/// Calls `service` with `request` and reads the response to the end.
async fn round_trip<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> Bytes
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

fn current_thread() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs a timed loop inside a spawned task (see `benches/coalesce.rs`).
fn in_task(
    timed: impl Future<Output = Duration> + Send + 'static,
) -> impl Future<Output = Duration> {
    let task = tokio::spawn(timed);
    async move { task.await.expect("timed task") }
}

/// `iters` requests with `body`, each built, called and read inside the timed loop.
fn bench_requests<S, B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    service: S,
    body: &Bytes,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (mut service, body) = (service.clone(), body.clone());
            in_task(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(round_trip(&mut service, refresh_request(&body)).await);
                }
                start.elapsed()
            })
        })
    });
}

/// The RFC 6749 form body of a refresh request carrying `token`, with `extra` appended.
fn form_body(token: &str, extra: &str) -> Bytes {
    format!("grant_type=refresh_token&refresh_token={token}{extra}").into()
}

fn form_request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(PATH)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Full::new(body.clone()))
        .expect("request")
}

/// `Authorization: Basic` of the bench client.
fn basic_authorization() -> HeaderValue {
    let credentials = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    HeaderValue::from_str(&format!("Basic {credentials}")).expect("header value")
}

/// The DPoP verifier of the front and of the check cases: the defaults (ES256, ES384,
/// RS256, PS256, EdDSA; 60 s window; proofs up to 4096 bytes) with the origin that path-only
/// requests need, and `max_jtis` remembered proofs.
fn dpop_verifier(max_jtis: usize) -> DpopVerifier {
    DpopVerifier::builder()
        .origin(ORIGIN)
        .max_jtis(max_jtis)
        .build()
        .expect("DPoP verifier")
}

/// Signs DPoP proofs of one key for `POST ORIGIN PATH`, issued now, with distinct `jti`s.
struct ProofSigner {
    key: dpop::TestKey,
    header: serde_json::Value,
    encoding: jsonwebtoken::EncodingKey,
    htu: String,
    next: u64,
}

impl ProofSigner {
    fn new(key: dpop::TestKey) -> Self {
        Self {
            key,
            header: dpop::header(&key),
            encoding: key.encoding_key(),
            htu: format!("{ORIGIN}{PATH}"),
            next: 0,
        }
    }

    fn name(&self) -> &'static str {
        match self.key.alg {
            Algorithm::ES256 => "es256",
            Algorithm::RS256 => "rs256",
            other => panic!("no bench case for {other:?}"),
        }
    }

    /// A proof with a new `jti` (as long as a UUID).
    fn proof(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let jti = format!("bench-{:030}", self.next);
        self.next += 1;
        let claims = dpop::claims("POST", &self.htu, now, &jti);
        dpop::sign_with(&self.header, &claims, &self.encoding, self.key.alg)
    }

    fn proofs(&mut self, n: usize) -> Vec<HeaderValue> {
        (0..n)
            .map(|_| HeaderValue::from_str(&self.proof()).expect("header value"))
            .collect()
    }
}

/// `iters` requests built by `request`, each built, called and read inside the timed loop.
fn bench_requests_with<S, B, R>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    service: S,
    request: R,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
    R: Fn() -> Request<Full<Bytes>> + Clone + Send + 'static,
{
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (mut service, request) = (service.clone(), request.clone());
            in_task(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(round_trip(&mut service, request()).await);
                }
                start.elapsed()
            })
        })
    });
}

fn http_front(c: &mut Criterion) {
    let rt = current_thread();
    let mut group = c.benchmark_group("http_front");
    for alg in [Alg::Hs256, Alg::Rs256] {
        let body = refresh_body(&alg.token());
        let handler = Handler::new();
        let layer = RefreshCoalesceLayer::http(HttpExtract::new(alg.verifier())).build();
        let handle = layer.handle();
        let mut front = layer.layer(handler.clone());
        // The first request leads and is verified; every later one is a replay.
        rt.block_on(round_trip(&mut front, refresh_request(&body)));
        bench_requests(
            &mut group,
            &rt,
            &format!("replayed_{}", alg.name()),
            front,
            &body,
        );
        let stats = handle.stats();
        assert_eq!((stats.leader, handler.calls()), (1, 1), "one inner call");
        println!(
            "http_front/replayed_{}: leader {}, replayed {}, inner calls {}",
            alg.name(),
            stats.leader,
            stats.replayed,
            handler.calls()
        );
        bench_requests(
            &mut group,
            &rt,
            &format!("bare_{}", alg.name()),
            Handler::new(),
            &body,
        );
        let token = alg.token();
        let verifier = alg.verifier();
        group.bench_function(format!("verify_{}", alg.name()), |b| {
            b.iter(|| black_box(verifier.verify(black_box(&token)).expect("valid")))
        });
    }
    client_authentication(&mut group, &rt);
    dpop_replayed(&mut group, &rt);
    for key in [dpop::ES256_A, dpop::RS256] {
        dpop_check(&mut group, key);
    }
    group.finish();
}

/// Checks that `handler` was called once, by the leader, and reports the replays.
fn one_inner_call(name: &str, handle: &Handle, handler: &Handler) {
    let stats = handle.stats();
    assert_eq!(
        (stats.leader, handler.calls()),
        (1, 1),
        "{name}: one inner call"
    );
    println!(
        "http_front/{name}: leader {}, replayed {}, inner calls {}",
        stats.leader,
        stats.replayed,
        handler.calls()
    );
}

/// Builds one request of a case.
type MakeRequest = Arc<dyn Fn() -> Request<Full<Bytes>> + Send + Sync>;

/// Replays keyed with the client's credentials: `Authorization: Basic`, and the form's
/// `client_id` and `client_secret` next to a form without them.
fn client_authentication(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    let token = Alg::Hs256.token();
    let json = refresh_body(&token);
    let authorization = basic_authorization();
    let basic = move || {
        let mut request = refresh_request(&json);
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, authorization.clone());
        request
    };
    let plain = form_body(&token, "");
    let form = move || form_request(&plain);
    let secret = form_body(
        &token,
        &format!("&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"),
    );
    let form_secret = move || form_request(&secret);
    let cases: [(&str, MakeRequest); 3] = [
        ("replayed_hs256_basic", Arc::new(basic)),
        ("replayed_hs256_form", Arc::new(form)),
        ("replayed_hs256_form_secret", Arc::new(form_secret)),
    ];
    for (name, request) in cases {
        let handler = Handler::new();
        let layer = RefreshCoalesceLayer::http(HttpExtract::new(Alg::Hs256.verifier())).build();
        let handle = layer.handle();
        let mut front = layer.layer(handler.clone());
        rt.block_on(round_trip(&mut front, request()));
        bench_requests_with(group, rt, name, front, move || request());
        one_inner_call(name, &handle, &handler);
    }
}

/// Replays of a DPoP-bound client: every request carries a fresh ES256 proof.
fn dpop_replayed(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    let name = "replayed_hs256_dpop_es256";
    let body = refresh_body(&Alg::Hs256.token());
    let handler = Handler::new();
    let extract = HttpExtract::new(Alg::Hs256.verifier()).dpop(dpop_verifier(MAX_JTIS));
    let layer = RefreshCoalesceLayer::http(extract).build();
    let handle = layer.handle();
    let mut front = layer.layer(handler.clone());
    let mut signer = ProofSigner::new(dpop::ES256_A);
    let with_proof = |body: &Bytes, proof: HeaderValue| {
        let mut request = refresh_request(body);
        request.headers_mut().insert(DPOP, proof);
        request
    };
    let lead = signer.proofs(1).remove(0);
    rt.block_on(round_trip(&mut front, with_proof(&body, lead)));
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            // Signed before the timed loop, each presented once.
            let proofs = signer.proofs(usize::try_from(iters).expect("iterations fit"));
            let (mut front, body) = (front.clone(), body.clone());
            in_task(async move {
                let start = Instant::now();
                for proof in proofs {
                    black_box(round_trip(&mut front, with_proof(&body, proof)).await);
                }
                start.elapsed()
            })
        })
    });
    one_inner_call(name, &handle, &handler);
}

/// One `DpopVerifier::check` of a fresh proof by `key`.
fn dpop_check(group: &mut BenchmarkGroup<'_, WallTime>, key: dpop::TestKey) {
    let mut signer = ProofSigner::new(key);
    let (method, uri) = (Method::POST, Uri::from_static(PATH));
    group.bench_function(format!("dpop_check_{}", signer.name()), |b| {
        // Signed once the case is selected, within the window of their `iat`.
        let pool: Vec<String> = (0..POOL).map(|_| signer.proof()).collect();
        b.iter_custom(|iters| {
            let iters = usize::try_from(iters).expect("iterations fit");
            let verifiers: Vec<_> = (0..iters.div_ceil(POOL))
                .map(|_| dpop_verifier(POOL))
                .collect();
            let start = Instant::now();
            for i in 0..iters {
                let checked = verifiers[i / POOL]
                    .check(black_box(&pool[i % POOL]), &method, &uri, SystemTime::now())
                    .expect("a valid proof");
                black_box(checked);
            }
            start.elapsed()
        })
    });
}

/// A verifier that counts its verifications.
fn counting(
    verifier: JwtVerifier,
    count: Arc<AtomicUsize>,
) -> impl Fn(&str) -> Result<Verified, Rejected> + Send + Sync + 'static {
    move |token: &str| {
        count.fetch_add(1, Ordering::SeqCst);
        verifier.verify(token)
    }
}

/// One storm on a fresh layer: a leader and `followers` requests with the same RS256
/// token, polled together. Followers polled before the flight's task runs join it; any
/// polled after it finished get its replay (tokio's cooperative budget can make the polling
/// task yield in between). Requests are built before the timed region. Returns the wall
/// time and checks that the token was verified once and the handler called once.
async fn rs256_storm(body: Bytes, followers: usize) -> Duration {
    let verifications = Arc::new(AtomicUsize::new(0));
    let extract = HttpExtract::new(counting(Alg::Rs256.verifier(), verifications.clone()));
    let layer = RefreshCoalesceLayer::http(extract).build();
    let handle = layer.handle();
    let handler = Handler::new();
    let front = layer.layer(handler.clone());
    let requests: Vec<_> = (0..=followers)
        .map(|_| (front.clone(), refresh_request(&body)))
        .collect();
    let start = Instant::now();
    let bodies = join_all(
        requests
            .into_iter()
            .map(|(mut front, request)| async move { round_trip(&mut front, request).await }),
    )
    .await;
    let elapsed = start.elapsed();
    black_box(bodies);
    let stats = handle.stats();
    assert_eq!(verifications.load(Ordering::SeqCst), 1, "one verification");
    assert_eq!(handler.calls(), 1, "one inner call");
    assert_eq!(stats.leader, 1);
    assert_eq!(stats.joined + stats.replayed, followers as u64);
    JOINED.fetch_add(stats.joined as usize, Ordering::Relaxed);
    REPLAYED.fetch_add(stats.replayed as usize, Ordering::Relaxed);
    elapsed
}

/// Followers that joined a flight and that were answered from its replay, over all storms.
static JOINED: AtomicUsize = AtomicUsize::new(0);
static REPLAYED: AtomicUsize = AtomicUsize::new(0);

fn http_rs256_storm(c: &mut Criterion) {
    let rt = current_thread();
    let body = refresh_body(&Alg::Rs256.token());
    let mut group = c.benchmark_group("http_rs256_storm");
    group.sample_size(20);
    for (name, followers) in [
        ("leader_alone", 0),
        ("leader_and_1000_followers", FOLLOWERS),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let body = body.clone();
                in_task(async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += rs256_storm(body.clone(), followers).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
    println!(
        "http_rs256_storm: every storm verified the token once and called the handler once; \
         followers joined: {}, replayed: {}",
        JOINED.load(Ordering::Relaxed),
        REPLAYED.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, http_front, http_rs256_storm);
criterion_main!(benches);
