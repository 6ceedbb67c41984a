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

mod across;
mod dump;
mod faults;
mod natural;
mod topologies;

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::redis::{RedisCluster, RedisSentinel, RedisServer, cluster::key_slot};
use support::tokens::{self, REFRESH_TYP, SECRET};
use support::{Calls, Gate, until};
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
    /// The seed URLs of a cluster, and how many replicas must acknowledge an election.
    Cluster(Vec<String>, u32),
    /// The sentinels' URLs and the master's name.
    Sentinel(Vec<String>, &'static str),
}

/// The Redis processes a case runs on: a standalone server, a Sentinel set or a cluster.
enum Deployment {
    Standalone(RedisServer),
    Sentinel(RedisSentinel),
    Cluster(RedisCluster),
}

impl Deployment {
    /// How the instances reach it.
    fn shared(&self) -> Shared {
        match self {
            Deployment::Standalone(server) => Shared::Redis(server.client()),
            Deployment::Sentinel(sentinel) => {
                Shared::Sentinel(sentinel.sentinel_urls(), sentinel.master_name())
            }
            Deployment::Cluster(cluster) => {
                let replicas = u32::from(!cluster.replicas().is_empty());
                Shared::Cluster(cluster.seed_urls(), replicas)
            }
        }
    }

    /// The servers that are masters now.
    fn masters(&self) -> Vec<&RedisServer> {
        match self {
            Deployment::Standalone(server) => vec![server],
            Deployment::Sentinel(sentinel) => vec![sentinel.node(sentinel.master())],
            Deployment::Cluster(cluster) => cluster
                .masters()
                .into_iter()
                .map(|n| cluster.node(n))
                .collect(),
        }
    }

    /// Every key on every master: name, TTL in ms (-1: none), value.
    async fn dump(&self) -> Vec<(Vec<u8>, i64, Vec<u8>)> {
        let mut all = Vec::new();
        for master in self.masters() {
            all.extend(master.dump().await);
        }
        all
    }

    /// Kills (SIGKILL) the master that holds `key`; the returned wait blocks until a replica
    /// has replaced it, and says how long that took from the kill.
    fn kill_master_of(
        &mut self,
        key: &str,
    ) -> impl FnOnce() -> Result<Duration, String> + Send + 'static {
        let killed = match self {
            Deployment::Cluster(cluster) => {
                let killed = cluster.kill_master_of_slot(key_slot(key.as_bytes()));
                Box::new(move || killed.wait().map(|failover| failover.took))
                    as Box<dyn FnOnce() -> Result<Duration, String> + Send>
            }
            Deployment::Sentinel(sentinel) => {
                let killed = sentinel.kill_master();
                Box::new(move || killed.wait().map(|failover| failover.took))
            }
            Deployment::Standalone(_) => panic!("a standalone server has no replica"),
        };
        move || killed()
    }

    /// How many keys each master holds, by its port.
    async fn keys_per_master(&self) -> Vec<(usize, usize)> {
        let mut counts = Vec::new();
        for master in self.masters() {
            counts.push((usize::from(master.port()), master.dump().await.len()));
        }
        counts
    }
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
    /// Refuse rather than refresh alone while the store is unreachable.
    require_store: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wait_timeout: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
            hard_cap: Duration::from_secs(5),
            breaker: (3, Duration::from_millis(500)),
            command_timeout: Duration::from_millis(100),
            require_store: false,
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

    /// Calls per token.
    fn per_token(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for call in self.0.lock().unwrap().iter() {
            *counts.entry(call.token.clone()).or_default() += 1;
        }
        counts
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
            .breaker(config.breaker.0, config.breaker.1)
            .require_store(config.require_store);
        let (builder, redis) = match &self.shared {
            Shared::Memory(store) => (builder.store(store.clone()), None),
            shared => {
                let store = match shared {
                    Shared::Redis(client) => RedisStore::standalone(client.clone(), SEAL_SECRET),
                    Shared::Cluster(seeds, replicas) => {
                        RedisStore::cluster(seeds.iter().map(String::as_str), SEAL_SECRET)
                            .min_replicas(*replicas)
                    }
                    Shared::Sentinel(sentinels, master) => RedisStore::sentinel(
                        sentinels.iter().map(String::as_str),
                        *master,
                        SEAL_SECRET,
                    ),
                    Shared::Memory(_) => unreachable!("matched above"),
                };
                let store = store
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
    respond(service, request).await
}

/// What a client sees of `service`'s answer to `request`.
async fn respond(service: Service, request: Request<Body>) -> Seen {
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

/// The instances' way to a standalone server that a fault case kills, pauses or restarts.
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

use across::{
    a_refusal_reaches_every_instances_callers_once_and_is_not_replayed,
    a_result_made_on_one_instance_is_replayed_on_another_until_the_token_is_invalidated,
    a_storm_of_3000_requests_over_three_instances_makes_exactly_one_inner_call,
    a_subject_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
    a_token_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
    invalidating_a_subject_on_one_instance_clears_its_replays_on_every_instance,
};

/// Stamps out one `#[tokio::test]` per backend for each case: in memory, on a standalone
/// server, on a Sentinel set and on a 3-master cluster.
macro_rules! every_backend {
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
                    let redis = super::Deployment::Standalone(super::RedisServer::start());
                    super::$case(redis.shared(), Some(&redis)).await;
                }
            )*
        }

        mod on_sentinel {
            $(
                #[tokio::test]
                async fn $case() {
                    let redis = super::Deployment::Sentinel(super::RedisSentinel::start());
                    super::$case(redis.shared(), Some(&redis)).await;
                }
            )*
        }

        mod on_cluster {
            $(
                #[tokio::test]
                async fn $case() {
                    let redis = super::Deployment::Cluster(super::RedisCluster::three_masters());
                    super::$case(redis.shared(), Some(&redis)).await;
                }
            )*
        }
    };
}

every_backend!(
    a_storm_of_3000_requests_over_three_instances_makes_exactly_one_inner_call,
    a_result_made_on_one_instance_is_replayed_on_another_until_the_token_is_invalidated,
    invalidating_a_subject_on_one_instance_clears_its_replays_on_every_instance,
    a_refusal_reaches_every_instances_callers_once_and_is_not_replayed,
    a_token_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
    a_subject_invalidated_on_one_instance_while_another_leads_its_refresh_is_never_replayed,
);
