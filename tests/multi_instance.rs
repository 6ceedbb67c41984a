//! The layer on several instances of one deployment (issue 5): each instance is its own
//! `RefreshCoalesceLayer::http` stack with the deployment's fingerprint secret, its own store
//! handle (a separate `RedisStore`, with its own connections, on one `redis-server` of the
//! test's own; or a clone of one `MemoryStore`) and its own inner service. The inner services
//! share one ledger of calls, so a test can count calls per token and per instance.
//!
//! Redis does not work under tokio's paused clock, so these tests run on real time with short
//! timeouts. Callers are synchronised by gating the inner service and polling the layers'
//! counters; a real wait appears only where a lease or the breaker's cool-down has to pass.
#![cfg(all(feature = "redis", feature = "jwt"))]

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::redis::RedisServer;
use support::tokens::{self, REFRESH_TYP, SECRET};
use support::{Gate, until};
use tokio::{
    task::JoinHandle,
    time::{Instant, timeout},
};
use tower::{Layer, ServiceExt, service_fn, util::BoxCloneService};
use tower_refresh_coalesce::{
    Fingerprint, Handle, HttpExtract, JwtVerifier, RefreshCoalesceLayer, Stats,
    http::{RequestBody, ResponseBody},
    store::{MemoryStore, RedisStore},
};

type Body = Full<Bytes>;
type Service = BoxCloneService<Request<Body>, Response<ResponseBody<Body>>, Infallible>;

/// The fingerprint secret every instance of the deployment shares.
const DEPLOYMENT_SECRET: &[u8] = b"multi-instance deployment secret";
/// The secret the Redis stores seal values with.
const SEAL_SECRET: &[u8] = b"multi-instance sealing secret, 32B";
/// How long a test waits for counters to reach a state before it fails.
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Instances
// ---------------------------------------------------------------------------------------

/// What the instances coordinate through.
#[derive(Clone)]
enum Shared {
    Memory(MemoryStore),
    Redis(redis::Client),
}

/// The layer settings of one instance.
#[derive(Clone, Copy, Debug)]
struct Config {
    wait_timeout: Duration,
    ttl: Duration,
    hard_cap: Duration,
    breaker: (u32, Duration),
    /// The Redis stores' per-command budget.
    command_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wait_timeout: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
            hard_cap: Duration::from_secs(5),
            breaker: (3, Duration::from_millis(500)),
            command_timeout: Duration::from_millis(100),
        }
    }
}

/// One call of an inner service: which instance made it, for which token.
#[derive(Clone, Debug)]
struct Call {
    instance: usize,
    token: String,
}

/// Every inner call of every instance.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<Vec<Call>>>);

impl Ledger {
    fn record(&self, instance: usize, token: &str) -> usize {
        let mut calls = self.0.lock().unwrap();
        calls.push(Call {
            instance,
            token: token.to_owned(),
        });
        calls.len()
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Calls for `token`, in all.
    fn of(&self, token: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.token == token)
            .count()
    }

    /// Calls for `token`, per instance.
    fn per_instance(&self, token: &str, instances: usize) -> Vec<usize> {
        let mut counts = vec![0; instances];
        for call in self.0.lock().unwrap().iter().filter(|c| c.token == token) {
            counts[call.instance] += 1;
        }
        counts
    }
}

/// A gate the test can close again for a later storm: the inner service waits on the gate
/// that is current when it is called.
#[derive(Clone)]
struct Gates(Arc<Mutex<Gate>>);

impl Gates {
    fn closed() -> Self {
        Self(Arc::new(Mutex::new(Gate::closed())))
    }

    fn open(&self) {
        self.0.lock().unwrap().open();
    }

    /// Replaces the current gate with a closed one (the old one stays as it was).
    fn close(&self) {
        *self.0.lock().unwrap() = Gate::closed();
    }

    fn current(&self) -> Gate {
        self.0.lock().unwrap().clone()
    }
}

struct Instance {
    service: Service,
    handle: Handle,
    /// This instance's own store, when it is a `RedisStore`.
    redis: Option<RedisStore>,
}

impl Instance {
    fn stats(&self) -> Stats {
        self.handle.stats()
    }
}

fn verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .build()
        .expect("verifier")
}

/// The subject of a test token (read without verification: the layer verified it).
fn subject_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("json");
    claims["sub"].as_str().expect("a subject").to_owned()
}

/// The digest a response names its token by.
fn digest(token: &str) -> String {
    Fingerprint::of(token).to_hex()
}

/// The refresh handler of instance `index`: records the call, waits for the gate current at
/// the call, and answers a new pair that names the call, the subject and the token's digest
/// (`401 invalid_grant` for the subject `revoked`).
fn refresh_handler(
    index: usize,
    ledger: Ledger,
    gates: Gates,
) -> impl tower::Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: Request<RequestBody<Body>>| {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .expect("a bearer token")
            .to_owned();
        let n = ledger.record(index, &token);
        let open = gates.current().wait();
        async move {
            open.await;
            let sub = subject_of(&token);
            if sub == "revoked" {
                let body = json!({"error": "invalid_grant", "call": n}).to_string();
                return Ok(Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("response"));
            }
            let body = json!({
                "access_token": format!("access-{n}"),
                "refresh_token": format!("refresh-{n}"),
                "token_type": "Bearer",
                "expires_in": 900,
                "sub": sub,
                "for": digest(&token),
            });
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store")
                .header(
                    header::SET_COOKIE,
                    format!("refresh_token=refresh-{n}; HttpOnly; Path=/auth"),
                )
                .header(header::SET_COOKIE, format!("session={sub}; HttpOnly"))
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("response"))
        }
    })
}

/// A fleet of instances sharing one store backend, one ledger and (by default) one gate.
struct Fleet {
    instances: Vec<Instance>,
    ledger: Ledger,
    gates: Gates,
    shared: Shared,
}

impl Fleet {
    fn new(shared: &Shared) -> Self {
        Self {
            instances: Vec::new(),
            ledger: Ledger::default(),
            gates: Gates::closed(),
            shared: shared.clone(),
        }
    }

    /// Adds an instance with `config` whose inner service waits on `gates`.
    fn add_with(&mut self, config: Config, gates: &Gates) -> &mut Self {
        let index = self.instances.len();
        let extract = HttpExtract::new(verifier()).secret(DEPLOYMENT_SECRET);
        let builder = RefreshCoalesceLayer::http(extract)
            .ttl(config.ttl)
            .wait_timeout(config.wait_timeout)
            .hard_cap(config.hard_cap)
            .breaker(config.breaker.0, config.breaker.1);
        let (builder, redis) = match &self.shared {
            Shared::Memory(store) => (builder.store(store.clone()), None),
            Shared::Redis(client) => {
                let store = RedisStore::builder(client.clone(), SEAL_SECRET)
                    .command_timeout(config.command_timeout)
                    .build()
                    .expect("a RedisStore builds without waiting for Redis");
                (builder.store(store.clone()), Some(store))
            }
        };
        let layer = builder.build();
        let handle = layer.handle();
        let inner = refresh_handler(index, self.ledger.clone(), gates.clone());
        self.instances.push(Instance {
            service: BoxCloneService::new(layer.layer(inner)),
            handle,
            redis,
        });
        self
    }

    fn add(&mut self, config: Config) -> &mut Self {
        let gates = self.gates.clone();
        self.add_with(config, &gates)
    }

    fn len(&self) -> usize {
        self.instances.len()
    }

    fn stats(&self) -> Vec<Stats> {
        self.instances.iter().map(Instance::stats).collect()
    }

    /// A counter summed over the instances.
    fn sum(&self, counter: impl Fn(&Stats) -> u64) -> u64 {
        self.instances.iter().map(|i| counter(&i.stats())).sum()
    }

    /// Waits until `condition` holds; fails with every instance's stats after [`SETTLE`].
    async fn within(&self, what: &str, condition: impl FnMut() -> bool) {
        if timeout(SETTLE, until(condition)).await.is_err() {
            panic!("{what}: not within {SETTLE:?}; stats: {:#?}", self.stats());
        }
    }

    /// Waits until every Redis store's pub/sub connection is subscribed (a no-op in memory).
    async fn subscribed(&self) {
        self.within("every RedisStore subscribed", || {
            self.instances
                .iter()
                .filter_map(|i| i.redis.as_ref())
                .all(RedisStore::is_subscribed)
        })
        .await;
    }

    /// Sends `count` requests with `token`, round-robin over the instances from `first` on,
    /// each on its own task. Each resolves to (instance, response, how long it took).
    fn storm(&self, token: &str, count: usize, first: usize) -> Vec<JoinHandle<Answer>> {
        let order: Vec<usize> = (0..self.len()).map(|n| (first + n) % self.len()).collect();
        self.storm_over(token, count, &order)
    }

    /// Like [`storm`](Self::storm), round-robin over `instances` only.
    fn storm_over(
        &self,
        token: &str,
        count: usize,
        instances: &[usize],
    ) -> Vec<JoinHandle<Answer>> {
        (0..count)
            .map(|n| {
                let index = instances[n % instances.len()];
                let service = self.instances[index].service.clone();
                let token = token.to_owned();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let seen = call(service, &token).await;
                    Answer {
                        instance: index,
                        seen,
                        took: started.elapsed(),
                    }
                })
            })
            .collect()
    }

    /// One request with `token` on instance `index`.
    async fn send(&self, index: usize, token: &str) -> Seen {
        call(self.instances[index].service.clone(), token).await
    }
}

/// Everything a client sees of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: StatusCode,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Debug)]
struct Answer {
    instance: usize,
    seen: Seen,
    took: Duration,
}

async fn call(service: Service, token: &str) -> Seen {
    let request = Request::post("/auth/refresh")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::default())
        .expect("request");
    let response = service
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {});
    let (parts, body) = response.into_parts();
    Seen {
        status: parts.status,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.collect().await.expect("body").to_bytes(),
    }
}

async fn answers(storm: Vec<JoinHandle<Answer>>) -> Vec<Answer> {
    join_all(storm)
        .await
        .into_iter()
        .map(|joined| joined.expect("a request task"))
        .collect()
}

/// Asserts that every answer is byte-identical to the first, and returns it.
#[track_caller]
fn identical(answers: &[Answer]) -> Seen {
    let first = answers[0].seen.clone();
    for answer in answers {
        assert_eq!(
            answer.seen, first,
            "instance {} answered differently",
            answer.instance
        );
    }
    first
}

fn memory() -> Shared {
    Shared::Memory(MemoryStore::new())
}

fn on(server: &RedisServer) -> Shared {
    Shared::Redis(server.client())
}

/// Key names in a dump that end with `suffix`.
fn keys_ending(dump: &[(Vec<u8>, i64, Vec<u8>)], suffix: &str) -> Vec<String> {
    dump.iter()
        .map(|(name, _, _)| String::from_utf8_lossy(name).into_owned())
        .filter(|name| name.ends_with(suffix))
        .collect()
}

/// Stamps out one `#[tokio::test]` per backend for each case.
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::memory(), None).await;
                }
            )*
        }

        mod on_redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let server = super::RedisServer::start();
                    super::$case(super::on(&server), Some(&server)).await;
                }
            )*
        }
    };
}

both_backends!(
    a_storm_of_3000_requests_over_three_instances_makes_exactly_one_inner_call,
    a_result_made_on_one_instance_is_replayed_on_another_until_the_token_is_invalidated,
    invalidating_a_subject_on_one_instance_clears_its_replays_on_every_instance,
    a_refusal_reaches_every_instances_callers_once_and_is_not_replayed,
    a_token_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
    a_subject_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
);

// ---------------------------------------------------------------------------------------
// 1. One storm, three instances
// ---------------------------------------------------------------------------------------

async fn a_storm_of_3000_requests_over_three_instances_makes_exactly_one_inner_call(
    shared: Shared,
    _server: Option<&RedisServer>,
) {
    let mut fleet = Fleet::new(&shared);
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");

    let storm = fleet.storm(&token, 3000, 0);
    fleet
        .within(
            "every request led or joined; one election won, two lost",
            || {
                fleet.sum(|s| s.leader + s.joined) == 3000
                    && fleet.sum(|s| s.store_won) == 1
                    && fleet.sum(|s| s.store_lost) == 2
            },
        )
        .await;
    assert_eq!(fleet.ledger.total(), 1, "only the elected leader calls");
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.total(), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.json()["for"], digest(&token));
    for stats in fleet.stats() {
        assert_eq!((stats.leader, stats.joined), (1, 999), "{stats:?}");
        assert_eq!(stats.store_won + stats.store_lost, 1, "{stats:?}");
        assert_eq!(stats.store_replayed, stats.store_lost, "{stats:?}");
        assert_eq!((stats.store_errors, stats.timed_out), (0, 0), "{stats:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Replays and invalidation across instances
// ---------------------------------------------------------------------------------------

async fn a_result_made_on_one_instance_is_replayed_on_another_until_the_token_is_invalidated(
    shared: Shared,
    server: Option<&RedisServer>,
) {
    let mut fleet = Fleet::new(&shared);
    fleet.add(Config::default()).add(Config::default());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");

    let made = fleet.send(0, &token).await;
    let replayed = fleet.send(1, &token).await;

    assert_eq!(made.status, StatusCode::OK);
    assert_eq!(replayed, made, "B answers with A's result");
    assert_eq!(fleet.ledger.total(), 1, "B made no inner call");
    assert_eq!(b.stats().store_replayed, 1);
    assert_eq!(b.stats().entries, 1, "B keeps the replay locally");

    assert_eq!(a.handle.invalidate_token(&token), 1);

    // The propagation is spawned: B's table is cleaned by its listener.
    fleet
        .within("B's replay invalidated", || b.stats().entries == 0)
        .await;
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(keys_ending(&dump, ":res"), Vec::<String>::new(), "{dump:?}");
    }
    let after = fleet.send(1, &token).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        fleet.ledger.total(),
        2,
        "the next request reaches the inner service"
    );
    assert_eq!(fleet.ledger.per_instance(&token, 2), vec![1, 1]);
    assert_ne!(after, made, "a new pair, not the invalidated one");
}

async fn invalidating_a_subject_on_one_instance_clears_its_replays_on_every_instance(
    shared: Shared,
    server: Option<&RedisServer>,
) {
    let mut fleet = Fleet::new(&shared);
    fleet.add(Config::default()).add(Config::default());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    // Two devices of bob, and carol.
    let bobs = [tokens::refresh("bob"), tokens::refresh("bob")];
    let carols = tokens::refresh("carol");
    for token in bobs.iter().chain([&carols]) {
        let made = fleet.send(0, token).await;
        assert_eq!(made.status, StatusCode::OK);
        assert_eq!(fleet.send(1, token).await, made, "replayed on B");
    }
    assert_eq!(fleet.ledger.total(), 3);
    assert_eq!(b.stats().store_replayed, 3);
    assert_eq!(b.stats().entries, 3);

    assert_eq!(a.handle.invalidate_subject("bob"), 2);

    fleet
        .within("bob's replays invalidated on B", || b.stats().entries == 1)
        .await;
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(
            keys_ending(&dump, ":res").len(),
            1,
            "carol's only: {dump:?}"
        );
        assert_eq!(
            keys_ending(&dump, ":members").len(),
            1 + 3,
            "carol's group, and each token's tag (remembered before the election): {dump:?}"
        );
    }
    fleet.send(1, &bobs[0]).await;
    fleet.send(1, &carols).await;
    assert_eq!(
        fleet.ledger.per_instance(&bobs[0], 2),
        vec![1, 1],
        "bob's reaches the inner service"
    );
    assert_eq!(
        fleet.ledger.per_instance(&carols, 2),
        vec![1, 0],
        "carol's is still replayed"
    );
}

async fn a_refusal_reaches_every_instances_callers_once_and_is_not_replayed(
    shared: Shared,
    _server: Option<&RedisServer>,
) {
    let mut fleet = Fleet::new(&shared);
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("revoked");

    let storm = fleet.storm(&token, 30, 0);
    fleet
        .within("every request led or joined; one election won", || {
            fleet.sum(|s| s.leader + s.joined) == 30
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fleet.ledger.total(), 1);
    for index in 0..3 {
        fleet
            .within("the flight's entry is gone", || {
                fleet.instances[index].stats().entries == 0
            })
            .await;
    }
    let retry = fleet.send(1, &token).await;
    assert_eq!(retry.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fleet.ledger.total(), 2, "a refusal is never replayed");
}

// ---------------------------------------------------------------------------------------
// 2b. Invalidation while another instance's flight runs
// ---------------------------------------------------------------------------------------

/// How a test revokes alice's token on instance A.
#[derive(Clone, Copy)]
enum Revoke {
    Token,
    Subject,
}

/// B leads a refresh of alice's token (its inner service gated); A revokes it meanwhile.
/// B's caller gets the revoked refusal, and no later request on A or B gets that flight's
/// pair: the first leads a new inner call, the second answers with that new pair.
async fn revoked_while_another_instance_leads(
    shared: Shared,
    server: Option<&RedisServer>,
    revoke: Revoke,
) {
    let mut fleet = Fleet::new(&shared);
    let (open, gated) = (Gates::closed(), Gates::closed());
    open.open();
    fleet
        .add_with(Config::default(), &open)
        .add_with(Config::default(), &gated);
    fleet.subscribed().await;
    let token = tokens::refresh("alice");

    let on_b = fleet.storm_over(&token, 1, &[1]);
    fleet
        .within("B leads and calls its inner service", || {
            fleet.instances[1].stats().store_won == 1 && fleet.ledger.total() == 1
        })
        .await;
    let a = &fleet.instances[0];
    match revoke {
        Revoke::Token => {
            a.handle.invalidate_token(&token);
        }
        Revoke::Subject => {
            a.handle.invalidate_subject("alice");
        }
    }
    // The store propagates the invalidation: B's listener removes its running flight.
    fleet
        .within("B heard the invalidation", || {
            fleet.instances[1].stats().entries == 0
        })
        .await;
    gated.open();
    let refused = answers(on_b).await.remove(0).seen;

    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(refused.json()["error"], "invalid_grant");
    if let Some(server) = server {
        let dump = server.dump().await;
        assert_eq!(keys_ending(&dump, ":res"), Vec::<String>::new(), "{dump:?}");
    }
    let first = match revoke {
        Revoke::Token => 0,
        Revoke::Subject => 1,
    };
    let led = fleet.send(first, &token).await;
    assert_eq!(led.status, StatusCode::OK);
    assert_eq!(fleet.ledger.total(), 2, "the next request leads a new call");
    assert_eq!(
        led.json()["refresh_token"],
        "refresh-2",
        "not the revoked pair"
    );
    let other = fleet.send(1 - first, &token).await;
    assert_eq!(other, led, "the other instance answers with the new pair");
    assert_eq!(fleet.ledger.total(), 2);
}

async fn a_token_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed(
    shared: Shared,
    server: Option<&RedisServer>,
) {
    revoked_while_another_instance_leads(shared, server, Revoke::Token).await;
}

async fn a_subject_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed(
    shared: Shared,
    server: Option<&RedisServer>,
) {
    revoked_while_another_instance_leads(shared, server, Revoke::Subject).await;
}

#[tokio::test(start_paused = true)]
async fn a_replay_from_the_store_is_not_served_after_the_tokens_exp() {
    let mut fleet = Fleet::new(&memory());
    let config = Config {
        ttl: Duration::from_secs(30),
        ..Config::default()
    };
    fleet.add(config).add(config);
    fleet.gates.open();
    // Expires within the second after next, plus the verifier's 5 s leeway: at most 7 s.
    let mut claims = tokens::claims("alice");
    claims["exp"] = json!(tokens::now() + 1);
    let token = tokens::hs256(&claims);

    let made = fleet.send(0, &token).await;
    assert_eq!(fleet.send(1, &token).await, made, "B replays A's pair");
    assert_eq!(fleet.ledger.total(), 1);

    // The paused clock moves past the token's exp (the wall clock, which verifies, does not).
    tokio::time::advance(Duration::from_secs(8)).await;

    let after = fleet.send(1, &token).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        fleet.ledger.total(),
        2,
        "neither B's table nor the store replays"
    );
    assert_ne!(after, made);
    let on_a = fleet.send(0, &token).await;
    assert_ne!(on_a, made, "nor A's table");
}

// ---------------------------------------------------------------------------------------
// 3. Lost wake-up
// ---------------------------------------------------------------------------------------

/// Allows or denies (P)SUBSCRIBE to every client of `server` (all use the default user).
async fn subscriptions(server: &RedisServer, allowed: bool) {
    let rule = if allowed {
        ["+subscribe", "+psubscribe"]
    } else {
        ["-subscribe", "-psubscribe"]
    };
    let mut con = server.connection().await;
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(&rule[..])
        .query_async::<()>(&mut con)
        .await
        .expect("ACL SETUSER");
}

#[tokio::test]
async fn followers_whose_wake_up_is_lost_still_resolve_by_polling_with_one_inner_call() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    for _ in 0..3 {
        fleet.add(Config::default());
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");
    let storm = fleet.storm(&token, 30, 0);
    fleet
        .within("one election won, two lost", || {
            fleet.sum(|s| s.leader + s.joined) == 30
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;

    // Between election and completion: every subscriber connection is killed, and none can
    // come back (subscribing is denied), so the completion message reaches nobody.
    subscriptions(&server, false).await;
    assert_eq!(
        server.kill_pubsub_clients().await,
        3,
        "one pub/sub connection per instance, none per request"
    );
    fleet
        .within("every subscriber gone", || {
            fleet
                .instances
                .iter()
                .all(|i| !i.redis.as_ref().unwrap().is_subscribed())
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.total(), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(fleet.sum(|s| s.store_replayed), 2, "{:#?}", fleet.stats());
    assert_eq!(fleet.sum(|s| s.timed_out), 0);
    let slowest = answers.iter().map(|a| a.took).max().unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    subscriptions(&server, true).await;
}

// ---------------------------------------------------------------------------------------
// 4 and 5. Redis killed or paused mid-storm
// ---------------------------------------------------------------------------------------

/// The settings of the fault tests: short waits, a short cool-down.
fn fault_config() -> Config {
    Config {
        wait_timeout: Duration::from_secs(1),
        breaker: (3, Duration::from_millis(500)),
        ..Config::default()
    }
}

enum Fault {
    Kill,
    Pause,
}

/// A storm on one token is elected through Redis; then Redis fails (`fault`), the leader's
/// gate opens, and more storms (the same token, fresh tokens) hit every instance while Redis
/// is away. Then Redis comes back.
async fn storm_through_a_fault(fault: Fault) {
    let mut server = RedisServer::start();
    let config = fault_config();
    let mut fleet = Fleet::new(&on(&server));
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.subscribed().await;
    let token = tokens::refresh("alice");
    let first = fleet.storm(&token, 300, 0);
    fleet
        .within("one election won, two lost", || {
            fleet.sum(|s| s.leader + s.joined) == 300
                && fleet.sum(|s| s.store_won) == 1
                && fleet.sum(|s| s.store_lost) == 2
        })
        .await;
    let leader = (0..3)
        .find(|&i| fleet.instances[i].stats().store_won == 1)
        .unwrap();

    match fault {
        Fault::Kill => server.kill(),
        Fault::Pause => server.pause(),
    }
    fleet.gates.open();
    let fresh: Vec<String> = (0..3)
        .map(|n| tokens::refresh(&format!("fresh-{n}")))
        .collect();
    let mut during = fleet.storm(&token, 30, 0);
    for (n, fresh) in fresh.iter().enumerate() {
        during.extend(fleet.storm(fresh, 30, n));
    }
    let mut all = answers(first).await;
    all.extend(answers(during).await);

    let limit = config.wait_timeout + Duration::from_secs(1);
    for answer in &all {
        assert!(
            answer.took <= limit,
            "a request on instance {} waited {:?}",
            answer.instance,
            answer.took
        );
    }
    assert_eq!(
        fleet.ledger.of(&token),
        1,
        "followers never refresh themselves"
    );
    for fresh in &fresh {
        let per_instance = fleet.ledger.per_instance(fresh, 3);
        assert!(
            per_instance.iter().all(|&calls| calls <= 1),
            "more than one call on an instance: {per_instance:?}"
        );
    }
    for answer in all.iter().filter(|a| a.instance == leader) {
        assert_eq!(
            answer.seen.status,
            StatusCode::OK,
            "the leader's instance answers"
        );
    }
    for answer in &all {
        let status = answer.seen.status;
        if status == StatusCode::OK {
            let json = answer.seen.json();
            let fresh_token = fresh.iter().find(|t| json["for"] == digest(t));
            assert!(json["for"] == digest(&token) || fresh_token.is_some());
        } else {
            assert!(
                [
                    StatusCode::TOO_MANY_REQUESTS,
                    StatusCode::SERVICE_UNAVAILABLE
                ]
                .contains(&status),
                "{status}"
            );
        }
    }
    assert!(
        fleet.stats().iter().any(|s| s.breaker_opened >= 1),
        "{:#?}",
        fleet.stats()
    );

    // Redis comes back.
    match fault {
        Fault::Kill => server.restart(),
        Fault::Pause => server.resume(),
    }
    fleet.subscribed().await;
    // A real wait: the breakers' cool-down has to pass.
    tokio::time::sleep(config.breaker.1 + Duration::from_millis(100)).await;
    let before = fleet.stats();
    let (won, lost) = (fleet.sum(|s| s.store_won), fleet.sum(|s| s.store_lost));
    fleet.gates.close();
    let again = tokens::refresh("after the fault");
    let storm = fleet.storm(&again, 300, 0);
    fleet
        .within("one election won, two lost, after the fault", || {
            let now = fleet.stats();
            let joined: u64 = now
                .iter()
                .zip(&before)
                .map(|(n, b)| n.leader + n.joined - b.leader - b.joined)
                .sum();
            joined == 300
                && fleet.sum(|s| s.store_won) == won + 1
                && fleet.sum(|s| s.store_lost) == lost + 2
        })
        .await;
    fleet.gates.open();
    let answers = answers(storm).await;

    assert_eq!(fleet.ledger.of(&again), 1);
    let seen = identical(&answers);
    assert_eq!(seen.status, StatusCode::OK);
}

#[tokio::test]
async fn redis_killed_mid_storm_bounds_every_wait_and_the_layer_uses_redis_again_after_a_restart() {
    storm_through_a_fault(Fault::Kill).await;
}

#[tokio::test]
async fn redis_paused_mid_storm_bounds_every_wait_and_the_layer_uses_redis_again_once_resumed() {
    storm_through_a_fault(Fault::Pause).await;
}

#[tokio::test]
async fn a_follower_timing_out_while_redis_is_down_leaves_the_breaker_open() {
    let mut server = RedisServer::start();
    let config = Config {
        wait_timeout: Duration::from_millis(500),
        breaker: (3, Duration::from_secs(30)),
        ..Config::default()
    };
    let mut fleet = Fleet::new(&on(&server));
    let open = Gates::closed();
    open.open();
    fleet.add(config).add_with(config, &open);
    fleet.subscribed().await;
    let (leader, follower) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");
    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || {
            leader.stats().in_flight == 1 && fleet.ledger.total() == 1
        })
        .await;
    let followed = fleet.storm(&token, 1, 1);
    fleet
        .within("B follows", || follower.stats().store_lost == 1)
        .await;

    server.kill();
    // A fresh token on B: load, election and completion fail, and the breaker opens.
    let fresh = fleet.send(1, &tokens::refresh("bob")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(follower.stats().breaker_opened, 1);
    assert_eq!(follower.stats().breaker_open, 1);
    // B's follower flight gives up (its caller gets 429) while Redis is still down.
    let followed = answers(followed).await;
    assert_eq!(followed[0].seen.status, StatusCode::TOO_MANY_REQUESTS);
    fleet
        .within("B's follower flight ended", || {
            follower.stats().in_flight == 0 && follower.stats().entries == 1
        })
        .await;

    let errors = follower.stats().store_errors;
    assert_eq!(
        follower.stats().breaker_open,
        1,
        "a wait that never reached Redis is no sign that Redis is back: {:?}",
        follower.stats()
    );
    let later = fleet.send(1, &tokens::refresh("carol")).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(
        follower.stats().store_errors,
        errors,
        "an open breaker skips Redis: {:?}",
        follower.stats()
    );
    fleet.gates.open();
    drop(answers(led).await);
}

#[tokio::test]
async fn a_request_that_joins_a_follower_flight_late_also_gets_429() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    // A leads and never answers; B follows.
    let stuck = Gates::closed();
    fleet.add_with(fault_config(), &stuck).add(fault_config());
    fleet.gates.open();
    fleet.subscribed().await;
    let (a, b) = (&fleet.instances[0], &fleet.instances[1]);
    let token = tokens::refresh("alice");
    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || {
            a.stats().in_flight == 1 && fleet.ledger.total() == 1
        })
        .await;
    let early = fleet.storm(&token, 1, 1);
    fleet
        .within("B follows", || b.stats().store_lost == 1)
        .await;

    // A real wait: the second request must join B's flight when part of its wait is over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = fleet.storm(&token, 1, 1);
    let early = answers(early).await;
    let late = answers(late).await;

    let wait_timeout = fault_config().wait_timeout;
    assert_eq!(early[0].seen.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b.stats().joined, 1, "the late request joined B's flight");
    assert_eq!(
        late[0].seen.status,
        StatusCode::TOO_MANY_REQUESTS,
        "after {:?} (its wait timeout is {wait_timeout:?}): {}",
        late[0].took,
        String::from_utf8_lossy(&late[0].seen.body)
    );
    assert_eq!(
        fleet.ledger.of(&token),
        1,
        "B never refreshes A's token itself"
    );
    stuck.open();
    drop(answers(led).await);
}

// ---------------------------------------------------------------------------------------
// 6. The leader disappears while holding the lock
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn followers_of_a_leader_that_disappeared_get_429_and_a_retry_after_the_lease_gets_200() {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    // A's inner call never returns, and A gives up on it at its hard cap without storing or
    // releasing anything: to the other instances, A is gone while it holds the lock.
    let stuck = Gates::closed();
    let leader_config = Config {
        hard_cap: Duration::from_millis(300),
        ..fault_config()
    };
    fleet.add_with(leader_config, &stuck);
    fleet.gates.open();
    fleet.add(fault_config()).add(fault_config());
    fleet.subscribed().await;
    let (token, other) = (tokens::refresh("alice"), tokens::refresh("bob"));

    let led = fleet.storm(&token, 1, 0);
    fleet
        .within("A leads", || fleet.instances[0].stats().store_won == 1)
        .await;
    let won_before = fleet.sum(|s| s.store_won);
    let mut followed = fleet.storm_over(&token, 20, &[1, 2]);
    followed.extend(fleet.storm_over(&other, 20, &[1, 2]));
    let led = answers(led).await;
    let followed = answers(followed).await;

    assert_eq!(
        led[0].seen.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "A hit its hard cap"
    );
    let wait_timeout = fault_config().wait_timeout;
    for answer in &followed {
        let json = answer.seen.json();
        if json.get("for") == Some(&Value::from(digest(&other))) {
            assert_eq!(answer.seen.status, StatusCode::OK);
            continue;
        }
        assert_eq!(
            answer.seen.status,
            StatusCode::TOO_MANY_REQUESTS,
            "a follower of A's token got {json}"
        );
        assert!(
            answer.took >= wait_timeout && answer.took < wait_timeout + Duration::from_millis(500),
            "answered after {:?}",
            answer.took
        );
    }
    let others = followed
        .iter()
        .filter(|a| a.seen.status == StatusCode::OK)
        .count();
    assert_eq!(
        others, 20,
        "every request with the other token got its own result"
    );
    assert_eq!(fleet.ledger.of(&token), 1, "only A called for the token");
    assert_eq!(fleet.ledger.of(&other), 1);

    let dump = server.dump().await;
    let locks: Vec<_> = dump
        .iter()
        .filter(|(name, _, _)| name.ends_with(b":lock"))
        .collect();
    assert_eq!(locks.len(), 1, "A's lock is still held: {dump:?}");
    let lease_left = Duration::from_millis(u64::try_from(locks[0].1).expect("a live lease"));
    // A real wait: A's lease has to pass.
    tokio::time::sleep(lease_left + Duration::from_millis(100)).await;

    let retry = fleet.send(1, &token).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.json()["for"], digest(&token));
    assert_eq!(fleet.ledger.per_instance(&token, 3), vec![1, 1, 0]);
    assert_eq!(
        fleet.sum(|s| s.store_won),
        won_before + 2,
        "the other token's leader and the retry's were elected"
    );
}

// ---------------------------------------------------------------------------------------
// 7. What a dump of Redis reveals after 1,000 tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn after_a_storm_over_1000_tokens_redis_holds_no_subject_or_token_bytes_and_every_key_expires()
 {
    let server = RedisServer::start();
    let mut fleet = Fleet::new(&on(&server));
    // A generous command budget: with a hundred flights at once, all tests of this file in
    // parallel and a debug build on two cores, a command can wait for the runtime longer
    // than the default 100 ms, and a failed command is not what this test is about.
    let config = Config {
        command_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    for _ in 0..3 {
        fleet.add(config);
    }
    fleet.gates.open();
    fleet.subscribed().await;
    let subjects: Vec<String> = (0..1000)
        .map(|n| format!("user-{n:04}@example.test"))
        .collect();
    let tokens: Vec<String> = subjects.iter().map(|s| tokens::refresh(s)).collect();

    // Waves of 100 tokens, each token once and the first two of a wave twice more on other
    // instances.
    let mut answered = Vec::new();
    for (wave, tokens) in tokens.chunks(100).enumerate() {
        let mut storm = Vec::new();
        for (n, token) in tokens.iter().enumerate() {
            storm.extend(fleet.storm(token, 1, wave + n));
        }
        for (n, token) in tokens.iter().take(2).enumerate() {
            storm.extend(fleet.storm(token, 2, wave + n + 1));
        }
        answered.extend(answers(storm).await);
    }

    assert_eq!(answered.len(), 1040);
    assert!(answered.iter().all(|a| a.seen.status == StatusCode::OK));
    assert_eq!(fleet.sum(|s| s.store_errors), 0, "{:#?}", fleet.stats());
    assert_eq!(
        fleet.ledger.total(),
        1000,
        "one call per token, repeats replayed"
    );
    assert_eq!(fleet.sum(|s| s.store_won), 1000);
    // Leaders release their locks in the background once their callers are answered.
    let released_by = std::time::Instant::now() + Duration::from_secs(5);
    let dump = loop {
        let dump = server.dump().await;
        if keys_ending(&dump, ":lock").is_empty() || std::time::Instant::now() > released_by {
            break dump;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(keys_ending(&dump, ":res").len(), 1000);
    assert_eq!(
        keys_ending(&dump, ":members").len(),
        2000,
        "each subject's group and each token's tag"
    );
    assert_eq!(keys_ending(&dump, ":lock").len(), 0, "every lock released");
    assert_eq!(dump.len(), 3000, "nothing else");

    // Any 16 bytes of a subject or of a token (its header, payload and signature alike).
    const WINDOW: usize = 16;
    let mut secrets: HashSet<&[u8]> = HashSet::new();
    for text in subjects.iter().chain(&tokens) {
        secrets.extend(text.as_bytes().windows(WINDOW));
    }
    for (name, pttl, value) in &dump {
        let shown = String::from_utf8_lossy(name);
        assert!(*pttl > 0, "{shown} has no TTL ({pttl})");
        for bytes in [name, value] {
            let leak = bytes.windows(WINDOW).find(|w| secrets.contains(w));
            assert!(
                leak.is_none(),
                "{shown} reveals {:?}",
                String::from_utf8_lossy(leak.unwrap())
            );
        }
    }
}
