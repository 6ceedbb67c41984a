//! A load generator for the reference server (`examples/server`).
//!
//! ```text
//! cargo run --release --example load -- storm --requests 1000 --refresh-delay-ms 50 --compare --runs 3 --svg docs/storm.svg
//! cargo run --release --example load -- steady --rate 500 --duration 20 --tokens 10 --ttl 2
//! cargo run --release --example load -- replay --concurrency 64 --duration 5 --runs 3
//! cargo run --release --features redis --example load -- multi --instances 3 --redis redis://127.0.0.1:6390/
//! cargo run --release --example load -- storm --target http://127.0.0.1:3000
//! ```
//!
//! Modes:
//!
//! - `storm`: N concurrent `POST /auth/refresh` of one token, for each of M tokens (M logins
//!   of user `demo`, so M token families), one HTTP/1.1 connection per request in flight
//!   (opened by the request, or before the storm with `--warm`). `--compare` runs it against
//!   a server without and one with the layer, `--svg` draws that comparison.
//! - `steady`: R refreshes per second for D seconds over K tokens, open loop (requests are
//!   sent on a schedule, not when earlier ones complete; latency counts from the scheduled
//!   time). The client follows rotation: once a response to its current token carries a new
//!   pair, later requests of that family present the new refresh token.
//! - `replay`: closed-loop throughput of refreshes hitting a live replay (a token refreshed
//!   once and replayed once), against the `/healthz` ceiling measured with the same client,
//!   connections and concurrency.
//! - `multi`: the storm spread round-robin over several instances: in process they share one
//!   SQLite file and, with `--redis`, one Redis; or several `--target`s. Per instance it
//!   reports latency and counters, and compares the p99 on the instance that rotated the
//!   token (the leader's) with the p99 on the others (waiters on a second instance).
//!
//! Every run reports throughput, p50/p90/p99/max latency (hdrhistogram), answers by status,
//! and the servers' `refresh_rotations_total`, `refresh_reuse_detected_total` and layer
//! counters before and after (from `/metrics`, summed over instances). Storms also measure a
//! `/healthz` storm of the same shape as a ceiling. With `--redis URL` (and `--features
//! redis`) the Redis server's `INFO commandstats` is read before and after each storm.
//! `--runs N` repeats the measurement and ends with medians and min–max.
//!
//! By default the servers run in this process on free ports (the flags `--ttl`,
//! `--wait-timeout`, `--refresh-delay-ms`, `--no-coalesce` and `--redis` mirror the server's);
//! `--target URL` (repeatable) drives servers started elsewhere instead.

// `pub` so the app's API counts as reachable, as in `examples/demo.rs`.
#[path = "server/app/mod.rs"]
pub mod app;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser as _;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tower_refresh_coalesce::Outcome;

type Error = Box<dyn std::error::Error + Send + Sync>;
type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Pause after a load before the counters are read, so that work finishing after the last
/// answer (a leader releasing its Redis lock) is counted.
const SETTLE: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// Load generator for the reference server: refresh storms, steady refresh traffic,
/// replayed-refresh throughput against /healthz, and storms over several instances
#[derive(Debug, clap::Parser)]
#[command(name = "load", long_about = None)]
struct Cli {
    /// Repeat the measurement this many times and end with medians and min–max
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive, global = true)]
    runs: usize,

    #[command(flatten)]
    target: TargetArgs,

    #[command(subcommand)]
    mode: Mode,
}

/// The servers to drive; all but `--target` configure the servers started in process.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Servers")]
struct TargetArgs {
    /// Drive a server started elsewhere (repeatable) instead of starting servers in process
    #[arg(long = "target", value_name = "URL", global = true)]
    targets: Vec<String>,

    /// Seconds a refresh response is replayed (server's --ttl)
    #[arg(long, value_name = "SECS", default_value_t = 30.0, global = true)]
    ttl: f64,

    /// Seconds a coalesced caller waits before it gets 429 (server's --wait-timeout)
    #[arg(long, value_name = "SECS", default_value_t = 10.0, global = true)]
    wait_timeout: f64,

    /// Simulated slow upstream of the refresh handler (server's --refresh-delay-ms)
    #[arg(long, value_name = "MS", default_value_t = 0, global = true)]
    refresh_delay_ms: u64,

    /// Serve /auth/refresh without the coalescing layer (server's --no-coalesce)
    #[arg(long, global = true)]
    no_coalesce: bool,

    /// Redis URL: in-process servers coordinate through it, and its INFO commandstats are
    /// reported for each storm (needs --features redis)
    #[arg(long, value_name = "URL", global = true)]
    redis: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// N concurrent refreshes of one token, for each of M tokens
    Storm(StormArgs),
    /// R refreshes per second for D seconds over K tokens, open loop, following rotation
    Steady(SteadyArgs),
    /// Refreshes hitting a live replay vs. /healthz (the ceiling), closed loop
    Replay(ReplayArgs),
    /// The storm spread over several instances (one SQLite file, and Redis with --redis)
    Multi(MultiArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct StormShape {
    /// Concurrent refreshes of each token
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive)]
    requests: usize,

    /// Tokens stormed at once (M logins of user demo: M token families)
    #[arg(long, value_name = "M", default_value_t = 1, value_parser = positive)]
    tokens: usize,

    /// Requests in flight at once, one HTTP/1.1 connection each [default: N × M]
    #[arg(long, value_name = "C", value_parser = positive)]
    concurrency: Option<usize>,

    /// Open the connections before the storm (kept alive), so that latency leaves out TCP
    /// connection set-up [default: every request opens its own]
    #[arg(long)]
    warm: bool,
}

impl StormShape {
    fn total(&self) -> usize {
        self.requests * self.tokens
    }

    fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(usize::MAX).min(self.total())
    }
}

#[derive(Debug, Clone, clap::Args)]
struct StormArgs {
    #[command(flatten)]
    shape: StormShape,

    /// Run the storm against an in-process server without the layer and one with it
    #[arg(long)]
    compare: bool,

    /// Write the comparison as an SVG bar chart to PATH (implies --compare)
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct MultiArgs {
    #[command(flatten)]
    shape: StormShape,

    /// In-process instances sharing one SQLite file (ignored with --target)
    #[arg(long, value_name = "I", default_value_t = 3, value_parser = positive)]
    instances: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct SteadyArgs {
    /// Requests per second, sent on schedule
    #[arg(long, value_name = "R", default_value_t = 500, value_parser = positive)]
    rate: usize,

    /// Seconds to send for
    #[arg(long, value_name = "SECS", default_value_t = 20.0, value_parser = positive_secs)]
    duration: f64,

    /// Token families the requests cycle over
    #[arg(long, value_name = "K", default_value_t = 10, value_parser = positive)]
    tokens: usize,

    /// Keep presenting a refresh token this long after adopting it, although a newer one
    /// came back (a client whose access token lives that long); 0 adopts the new one at once
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = secs)]
    hold: f64,
}

#[derive(Debug, Clone, clap::Args)]
struct ReplayArgs {
    /// Requests in flight at once, one kept-alive HTTP/1.1 connection each
    #[arg(long, value_name = "C", default_value_t = 64, value_parser = positive)]
    concurrency: usize,

    /// Seconds of each kind (/healthz, replayed refresh), run in halves: A B B A
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = positive_secs)]
    duration: f64,
}

fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{text}` is not a positive whole number")),
    }
}

fn secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Ok(secs),
        _ => Err(format!("`{text}` is not a number of seconds")),
    }
}

fn positive_secs(text: &str) -> Result<f64, String> {
    secs(text).and_then(|secs| {
        if secs > 0.0 {
            Ok(secs)
        } else {
            Err("must be more than 0 seconds".into())
        }
    })
}

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

/// A reference server running in this process on a free port.
struct Server {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(config: app::Config) -> Result<Self, Error> {
        // `app` blocks (SQLite, password hashing).
        let app::App { router, state: _ } =
            tokio::task::spawn_blocking(move || app::app(config)).await??;
        // A backlog for storms of thousands of simultaneous connects (tokio's default is
        // 1024; overflowing it costs a SYN retry of a second).
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, 1], 0).into())?;
        let listener = socket.listen(4096)?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("load: server stopped: {e}");
            }
        });
        Ok(Self { base, task })
    }
}

/// A directory removed on drop, for the SQLite file the instances share.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("load-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The servers a measurement drives: started in process, or the `--target`s.
struct Cluster {
    bases: Arc<[String]>,
    description: String,
    in_process: bool,
    _servers: Vec<Server>,
    _dir: Option<TempDir>,
}

impl Cluster {
    /// The `--target`s if any, else `instances` servers in process (sharing one SQLite file
    /// when there are several).
    async fn start(args: &TargetArgs, instances: usize, no_coalesce: bool) -> Result<Self, Error> {
        if !args.targets.is_empty() {
            let bases: Vec<String> = args
                .targets
                .iter()
                .map(|t| t.trim_end_matches('/').to_owned())
                .collect();
            return Ok(Self {
                description: format!("targets {}", bases.join(", ")),
                bases: bases.into(),
                in_process: false,
                _servers: Vec::new(),
                _dir: None,
            });
        }
        let dir = (instances > 1).then(TempDir::new).transpose()?;
        let db = dir.as_ref().map(|dir| dir.0.join("tokens.db"));
        let mut servers = Vec::with_capacity(instances);
        // One after the other: the first one creates the secret the others read.
        for _ in 0..instances {
            let config = app::Config {
                addr: ([127, 0, 0, 1], 0).into(),
                db: db.clone(),
                ttl: args.ttl,
                wait_timeout: args.wait_timeout,
                refresh_delay_ms: args.refresh_delay_ms,
                no_coalesce,
                redis: args.redis.clone(),
                ..app::Config::default()
            };
            servers.push(Server::start(config).await?);
        }
        let description = format!(
            "{instances} in-process instance{} ({}, ttl {} s, wait-timeout {} s, refresh delay \
             {} ms, SQLite {}{})",
            plural(instances),
            if no_coalesce { "no layer" } else { "layer on" },
            args.ttl,
            args.wait_timeout,
            args.refresh_delay_ms,
            if db.is_some() {
                "file shared"
            } else {
                "in memory"
            },
            args.redis
                .as_deref()
                .map_or(String::new(), |url| format!(", Redis {url}")),
        );
        Ok(Self {
            bases: servers.iter().map(|s| s.base.clone()).collect(),
            description,
            in_process: true,
            _servers: servers,
            _dir: dir,
        })
    }

    fn len(&self) -> usize {
        self.bases.len()
    }

    /// Warns when `connections` sockets would exceed the open-file limit (two descriptors
    /// per connection when the server runs in this process).
    fn check_descriptors(&self, connections: usize) {
        let per_connection = if self.in_process { 2 } else { 1 };
        let needed = per_connection * connections + 100;
        if let Some(limit) = open_file_limit().filter(|&limit| needed > limit) {
            eprintln!(
                "load: warning: {connections} connections need about {needed} open files, the \
                 limit is {limit}: expect connection errors (lower --concurrency or raise ulimit -n)"
            );
        }
    }
}

fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The 1, 5 and 15 minute load averages, to note what else ran.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// An HTTP/1.1 client: each request in flight gets a connection of its own (HTTP/2 would
/// multiplex them onto one connection, which hyper's server caps at 200 streams).
fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// What one request asks for.
#[derive(Debug, Clone)]
enum Call {
    Healthz,
    Refresh(Arc<str>),
}

impl Call {
    fn request(&self, base: &str) -> Result<Request<Full<Bytes>>, Error> {
        let request = match self {
            Call::Healthz => Request::get(format!("{base}/healthz")).body(Full::default()),
            Call::Refresh(token) => Request::post(format!("{base}{}", app::REFRESH_PATH))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(json!({ "refresh_token": &**token }).to_string())),
        };
        Ok(request?)
    }
}

/// A response, fully read.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `200`, or the status with the JSON error code: `400 invalid_grant`.
    fn label(&self) -> String {
        let code = self.status.as_u16();
        if self.status.is_success() {
            return code.to_string();
        }
        match self.json().as_ref().and_then(|b| b["error"].as_str()) {
            Some(error) => format!("{code} {error}"),
            None => code.to_string(),
        }
    }

    /// The refresh token of a `200` token pair.
    fn refresh_token(&self) -> Option<String> {
        if self.status != StatusCode::OK {
            return None;
        }
        self.json()?["refresh_token"].as_str().map(str::to_owned)
    }
}

async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Result<Reply, Error> {
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        body,
    })
}

/// An error with its sources: "client error (Connect): tcp connect error: ...".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        // Many errors repeat their source's message in their own.
        let message = e.to_string();
        if !text.contains(&message) {
            let _ = write!(text, ": {message}");
        }
        source = e.source();
    }
    text
}

/// Logs in as `demo` `n` times: `n` token families.
async fn logins(client: &HttpClient, base: &str, n: usize) -> Result<Vec<Arc<str>>, Error> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let body = json!({ "username": app::DEMO_USER, "password": app::DEMO_PASSWORD });
        let request = Request::post(format!("{base}/auth/login"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))?;
        let reply = send(client, request).await?;
        let token = reply.refresh_token().ok_or_else(|| {
            format!(
                "login at {base} failed: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )
        })?;
        tokens.push(token.into());
    }
    Ok(tokens)
}

async fn login(client: &HttpClient, base: &str) -> Result<Arc<str>, Error> {
    Ok(logins(client, base, 1).await?.remove(0))
}

/// One refresh, expected to answer 200.
async fn refresh(client: &HttpClient, base: &str, token: &Arc<str>) -> Result<Reply, Error> {
    let reply = send(client, Call::Refresh(Arc::clone(token)).request(base)?).await?;
    if reply.status != StatusCode::OK {
        return Err(format!("refresh at {base} answered {}", reply.label()).into());
    }
    Ok(reply)
}

// ---------------------------------------------------------------------------------------
// Counters on /metrics and in Redis
// ---------------------------------------------------------------------------------------

/// The server counters a run reports, from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    rotations: u64,
    reuse_detected: u64,
    /// `refresh_coalesce_requests_total{outcome}` in the order of [`Outcome::ALL`].
    outcomes: [u64; Outcome::ALL.len()],
}

impl Counters {
    fn parse(text: &str) -> Result<Self, Error> {
        let required = |series: &str| {
            sample(text, series).ok_or_else(|| format!("no sample `{series}` on /metrics"))
        };
        let outcomes = Outcome::ALL.map(|outcome| {
            let series = format!(
                "refresh_coalesce_requests_total{{outcome=\"{}\"}}",
                outcome.as_str()
            );
            sample(text, &series).unwrap_or(0)
        });
        Ok(Self {
            rotations: required("refresh_rotations_total")?,
            reuse_detected: required("refresh_reuse_detected_total")?,
            outcomes,
        })
    }

    fn sum(all: &[Counters]) -> Counters {
        all.iter().fold(Counters::default(), |mut sum, c| {
            sum.rotations += c.rotations;
            sum.reuse_detected += c.reuse_detected;
            for (total, n) in sum.outcomes.iter_mut().zip(c.outcomes) {
                *total += n;
            }
            sum
        })
    }

    fn since(&self, before: &Counters) -> Counters {
        let mut outcomes = self.outcomes;
        for (n, old) in outcomes.iter_mut().zip(before.outcomes) {
            *n = n.saturating_sub(old);
        }
        Counters {
            rotations: self.rotations.saturating_sub(before.rotations),
            reuse_detected: self.reuse_detected.saturating_sub(before.reuse_detected),
            outcomes,
        }
    }

    /// The non-zero layer outcomes: `leader +1, joined +600`.
    fn outcomes_line(&self) -> String {
        let parts: Vec<String> = Outcome::ALL
            .iter()
            .zip(self.outcomes)
            .filter(|(_, n)| *n > 0)
            .map(|(outcome, n)| format!("{} +{n}", outcome.as_str()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The value of `series` (name and labels exactly as written) in an OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .map(|value| value as u64)
}

async fn scrape(client: &HttpClient, base: &str) -> Result<Counters, Error> {
    let request = Request::get(format!("{base}/metrics")).body(Full::default())?;
    let reply = send(client, request).await?;
    if reply.status != StatusCode::OK {
        return Err(format!("GET {base}/metrics answered {}", reply.status).into());
    }
    Counters::parse(std::str::from_utf8(&reply.body)?)
}

/// Every instance's counters.
async fn scrape_all(client: &HttpClient, bases: &[String]) -> Result<Vec<Counters>, Error> {
    let mut all = Vec::with_capacity(bases.len());
    for base in bases {
        all.push(scrape(client, base).await?);
    }
    Ok(all)
}

/// Counters of every instance before and after a load.
struct CounterDelta {
    before: Vec<Counters>,
    after: Vec<Counters>,
}

impl CounterDelta {
    fn instance(&self, i: usize) -> Counters {
        self.after[i].since(&self.before[i])
    }

    fn total(&self) -> Counters {
        Counters::sum(&self.after).since(&Counters::sum(&self.before))
    }

    fn line(&self) -> String {
        let (before, after) = (Counters::sum(&self.before), Counters::sum(&self.after));
        let delta = after.since(&before);
        format!(
            "refresh_rotations_total {} -> {} (+{}), refresh_reuse_detected_total {} -> {} (+{}); \
             layer: {}",
            before.rotations,
            after.rotations,
            delta.rotations,
            before.reuse_detected,
            after.reuse_detected,
            delta.reuse_detected,
            delta.outcomes_line()
        )
    }
}

const NO_REDIS_FEATURE: &str =
    "--redis needs the `redis` feature: cargo run --release --features redis --example load";

/// Calls per Redis command (`INFO commandstats`), `info` itself left out.
type CommandStats = BTreeMap<String, u64>;

#[cfg(feature = "redis")]
fn parse_command_stats(info: &str) -> CommandStats {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

fn command_stats_delta(before: &CommandStats, after: &CommandStats) -> CommandStats {
    after
        .iter()
        .map(|(name, calls)| {
            let old = before.get(name).copied().unwrap_or(0);
            (name.clone(), calls.saturating_sub(old))
        })
        .filter(|(_, calls)| *calls > 0)
        .collect()
}

/// A connection for `INFO commandstats`, kept open so that its own set-up is not counted.
#[cfg(feature = "redis")]
struct RedisProbe(redis::aio::MultiplexedConnection);

#[cfg(feature = "redis")]
impl RedisProbe {
    async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url)?;
        Ok(Self(client.get_multiplexed_async_connection().await?))
    }

    async fn command_stats(&mut self) -> Result<CommandStats, Error> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.0)
            .await?;
        Ok(parse_command_stats(&info))
    }
}

#[cfg(not(feature = "redis"))]
enum RedisProbe {}

#[cfg(not(feature = "redis"))]
impl RedisProbe {
    async fn connect(_url: &str) -> Result<Self, Error> {
        Err(NO_REDIS_FEATURE.into())
    }

    async fn command_stats(&mut self) -> Result<CommandStats, Error> {
        match *self {}
    }
}

async fn redis_probe(args: &TargetArgs) -> Result<Option<RedisProbe>, Error> {
    match &args.redis {
        Some(url) => Ok(Some(RedisProbe::connect(url).await?)),
        None => Ok(None),
    }
}

async fn command_stats(probe: &mut Option<RedisProbe>) -> Result<Option<CommandStats>, Error> {
    match probe {
        Some(probe) => Ok(Some(probe.command_stats().await?)),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------
// Firing requests and recording answers
// ---------------------------------------------------------------------------------------

/// One request: which instance, what call.
#[derive(Debug, Clone)]
struct Shot {
    instance: usize,
    call: Call,
}

/// The `i`-th request of a load, or `None` when the load is over.
type Plan = Arc<dyn Fn(usize) -> Option<Shot> + Send + Sync>;

/// A fixed list of requests.
fn list(shots: Vec<Shot>) -> Plan {
    Arc::new(move |i| shots.get(i).cloned())
}

/// The same request over and over until `deadline`.
fn until(deadline: Instant, shot: Shot) -> Plan {
    Arc::new(move |_| (Instant::now() < deadline).then(|| shot.clone()))
}

/// `per_call` requests of each call, the calls interleaved, each call's requests spread
/// round-robin over `instances`.
fn storm_shots(calls: &[Call], per_call: usize, instances: usize) -> Vec<Shot> {
    (0..per_call * calls.len())
        .map(|i| Shot {
            instance: (i / calls.len()) % instances,
            call: calls[i % calls.len()].clone(),
        })
        .collect()
}

/// How one request was answered.
struct Sample {
    instance: usize,
    status: String,
    latency: Duration,
    /// The refresh token of a `200` pair, when the load keeps them.
    issued: Option<String>,
}

impl Sample {
    fn new(
        instance: usize,
        result: Result<Reply, Error>,
        latency: Duration,
        keep_issued: bool,
    ) -> Self {
        let (status, issued) = match result {
            Ok(reply) => (
                reply.label(),
                keep_issued.then(|| reply.refresh_token()).flatten(),
            ),
            Err(e) => (format!("transport error: {}", error_chain(&*e)), None),
        };
        Self {
            instance,
            status,
            latency,
            issued,
        }
    }
}

/// Latencies (µs, hdrhistogram) and answers by status of a set of requests.
#[derive(Clone)]
struct Tally {
    latency: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs to 10 min, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
        }
    }

    fn record(&mut self, status: &str, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
        *self.statuses.entry(status.to_owned()).or_default() += 1;
    }

    fn merge(&mut self, other: &Tally) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
        for (status, n) in &other.statuses {
            *self.statuses.entry(status.clone()).or_default() += n;
        }
    }

    fn count(&self) -> u64 {
        self.latency.len()
    }

    fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    fn max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    fn latency_line(&self) -> String {
        format!(
            "p50 {}, p90 {}, p99 {}, max {}",
            millis(self.quantile(0.50)),
            millis(self.quantile(0.90)),
            millis(self.quantile(0.99)),
            millis(self.max())
        )
    }

    fn statuses_line(&self) -> String {
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status} ×{n}"))
            .collect();
        parts.join(", ")
    }
}

/// The answers of a load, by instance.
struct Fired {
    per_instance: Vec<Tally>,
    /// Distinct refresh tokens handed out in `200` answers (when kept).
    issued: HashSet<String>,
    wall: Duration,
}

impl Fired {
    fn new(instances: usize, samples: Vec<Sample>, wall: Duration) -> Self {
        let mut per_instance = vec![Tally::new(); instances];
        let mut issued = HashSet::new();
        for sample in samples {
            per_instance[sample.instance].record(&sample.status, sample.latency);
            issued.extend(sample.issued);
        }
        Self {
            per_instance,
            issued,
            wall,
        }
    }

    fn merge(&mut self, other: Fired) {
        for (tally, more) in self.per_instance.iter_mut().zip(&other.per_instance) {
            tally.merge(more);
        }
        self.issued.extend(other.issued);
        self.wall += other.wall;
    }

    fn total(&self) -> Tally {
        let mut total = Tally::new();
        for tally in &self.per_instance {
            total.merge(tally);
        }
        total
    }

    fn throughput(&self) -> f64 {
        self.total().count() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// "1000 requests in 212.3 ms: 4710 req/s; p50 ...; 200 ×1000".
    fn line(&self) -> String {
        let total = self.total();
        format!(
            "{} requests in {}: {:.0} req/s; {}; {}",
            total.count(),
            millis(self.wall),
            self.throughput(),
            total.latency_line(),
            total.statuses_line()
        )
    }
}

/// Runs `plan` with `concurrency` requests in flight (closed loop: each worker sends its
/// next request when the previous one is answered). Latency is from send to full body.
async fn fire(
    client: &HttpClient,
    bases: &Arc<[String]>,
    concurrency: usize,
    plan: Plan,
    keep_issued: bool,
) -> Result<Fired, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (client, bases, plan, next) = (
            client.clone(),
            Arc::clone(bases),
            Arc::clone(&plan),
            Arc::clone(&next),
        );
        workers.spawn(async move {
            let mut samples = Vec::new();
            while let Some(shot) = plan(next.fetch_add(1, Ordering::Relaxed)) {
                let request = shot.call.request(&bases[shot.instance])?;
                let sent = Instant::now();
                let result = send(&client, request).await;
                samples.push(Sample::new(
                    shot.instance,
                    result,
                    sent.elapsed(),
                    keep_issued,
                ));
            }
            Ok::<_, Error>(samples)
        });
    }
    let mut samples = Vec::new();
    while let Some(worker) = workers.join_next().await {
        samples.extend(worker??);
    }
    Ok(Fired::new(bases.len(), samples, started.elapsed()))
}

/// A small storm on a token of its own before anything is measured, so that connections
/// (Redis included), Lua scripts and SQLite pages are warm.
async fn warm_up(cluster: &Cluster) -> Result<(), Error> {
    let client = http_client();
    let token = login(&client, &cluster.bases[0]).await?;
    let calls = [Call::Refresh(token), Call::Healthz];
    let shots = storm_shots(&calls, 4 * cluster.len(), cluster.len());
    fire(&client, &cluster.bases, shots.len(), list(shots), false).await?;
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Figures and their summary over runs
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Count,
    Millis,
    PerSec,
    Percent,
}

fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Count if value.fract() == 0.0 => format!("{value:.0}"),
        Unit::Count => format!("{value:.1}"),
        Unit::Millis if value < 10.0 => format!("{value:.2} ms"),
        Unit::Millis => format!("{value:.1} ms"),
        Unit::PerSec => format!("{value:.0} req/s"),
        Unit::Percent => format!("{value:.1} %"),
    }
}

fn millis(d: Duration) -> String {
    format_value(d.as_secs_f64() * 1e3, Unit::Millis)
}

/// The headline numbers of one run, by name.
#[derive(Debug, Default)]
struct Figures(Vec<(String, f64, Unit)>);

impl Figures {
    fn add(&mut self, name: impl Into<String>, value: f64, unit: Unit) {
        self.0.push((name.into(), value, unit));
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, ..)| n == name).map(|(_, v, _)| *v)
    }

    /// Throughput, latency percentiles and answers by status.
    fn load(&mut self, prefix: &str, fired: &Fired) {
        let total = fired.total();
        self.add(
            format!("{prefix}throughput"),
            fired.throughput(),
            Unit::PerSec,
        );
        self.latency(prefix, &total);
        for (status, n) in &total.statuses {
            self.add(format!("{prefix}status {status}"), *n as f64, Unit::Count);
        }
    }

    fn latency(&mut self, prefix: &str, tally: &Tally) {
        for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
            self.add(
                format!("{prefix}{name}"),
                ms(tally.quantile(q)),
                Unit::Millis,
            );
        }
        self.add(format!("{prefix}max"), ms(tally.max()), Unit::Millis);
    }

    fn counters(&mut self, prefix: &str, delta: &Counters) {
        self.add(
            format!("{prefix}rotations"),
            delta.rotations as f64,
            Unit::Count,
        );
        self.add(
            format!("{prefix}reuse detections"),
            delta.reuse_detected as f64,
            Unit::Count,
        );
        for (outcome, n) in Outcome::ALL.iter().zip(delta.outcomes) {
            if n > 0 {
                self.add(
                    format!("{prefix}layer {}", outcome.as_str()),
                    n as f64,
                    Unit::Count,
                );
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and range of each figure over the runs.
#[derive(Debug, Default)]
struct Summary {
    runs: Vec<Figures>,
}

struct Row {
    name: String,
    unit: Unit,
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    /// Every figure in order of first appearance; a figure missing from a run (a status
    /// that did not occur) counts as 0 there.
    fn rows(&self) -> Vec<Row> {
        let mut names: Vec<(&str, Unit)> = Vec::new();
        for (name, _, unit) in self.runs.iter().flat_map(|figures| &figures.0) {
            if !names.iter().any(|(n, _)| n == name) {
                names.push((name, *unit));
            }
        }
        names
            .into_iter()
            .map(|(name, unit)| {
                let values: Vec<f64> = self
                    .runs
                    .iter()
                    .map(|figures| figures.get(name).unwrap_or(0.0))
                    .collect();
                let (min, max) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                Row {
                    name: name.to_owned(),
                    unit,
                    median: median(values),
                    min,
                    max,
                }
            })
            .collect()
    }

    fn median(&self, name: &str) -> f64 {
        median(
            self.runs
                .iter()
                .map(|figures| figures.get(name).unwrap_or(0.0))
                .collect(),
        )
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let runs = self.runs.len();
        if runs > 1 {
            writeln!(f, "summary over {runs} runs: median [min – max]")?;
        } else {
            writeln!(f, "summary of 1 run:")?;
        }
        let rows = self.rows();
        let width = rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(0);
        for row in rows {
            write!(
                f,
                "  {:<width$}  {:>14}",
                row.name,
                format_value(row.median, row.unit)
            )?;
            if runs > 1 {
                write!(
                    f,
                    "  [{} – {}]",
                    format_value(row.min, row.unit),
                    format_value(row.max, row.unit)
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// storm and multi
// ---------------------------------------------------------------------------------------

/// One storm against a cluster, and its `/healthz` ceiling.
struct StormRun {
    fired: Fired,
    counters: CounterDelta,
    redis: Option<CommandStats>,
    ceiling: Fired,
}

async fn storm_run(
    cluster: &Cluster,
    shape: &StormShape,
    probe: &mut Option<RedisProbe>,
) -> Result<StormRun, Error> {
    let setup = http_client();
    let tokens = logins(&setup, &cluster.bases[0], shape.tokens).await?;
    let calls: Vec<Call> = tokens.into_iter().map(Call::Refresh).collect();
    let before = scrape_all(&setup, &cluster.bases).await?;
    let redis_before = command_stats(probe).await?;

    let shots = storm_shots(&calls, shape.requests, cluster.len());
    let client = storm_client(cluster, shape).await?;
    let fired = fire(
        &client,
        &cluster.bases,
        shape.concurrency(),
        list(shots),
        true,
    )
    .await?;
    // Closes the storm's connections before the ceiling opens its own.
    drop(client);
    tokio::time::sleep(SETTLE).await;

    let after = scrape_all(&setup, &cluster.bases).await?;
    let redis_after = command_stats(probe).await?;
    let redis = redis_before
        .zip(redis_after)
        .map(|(before, after)| command_stats_delta(&before, &after));

    let healthz = storm_shots(&[Call::Healthz], shape.total(), cluster.len());
    let client = storm_client(cluster, shape).await?;
    let ceiling = fire(
        &client,
        &cluster.bases,
        shape.concurrency(),
        list(healthz),
        false,
    )
    .await?;
    Ok(StormRun {
        fired,
        counters: CounterDelta { before, after },
        redis,
        ceiling,
    })
}

/// A fresh client for one storm: every request opens its own connection, as the requests of
/// many clients would; with `--warm`, those connections are opened (by a `/healthz` storm of
/// the same shape) and kept alive before the storm.
async fn storm_client(cluster: &Cluster, shape: &StormShape) -> Result<HttpClient, Error> {
    let client = http_client();
    if shape.warm {
        let shots = storm_shots(&[Call::Healthz], shape.total(), cluster.len());
        fire(
            &client,
            &cluster.bases,
            shape.concurrency(),
            list(shots),
            false,
        )
        .await?;
    }
    Ok(client)
}

impl StormRun {
    fn report(&self, cluster: &Cluster, shape: &StormShape) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "  refresh storm: {}", self.fired.line());
        let _ = writeln!(
            text,
            "  distinct refresh tokens handed out: {} (tokens stormed: {})",
            self.fired.issued.len(),
            shape.tokens
        );
        let _ = writeln!(text, "  counters: {}", self.counters.line());
        let _ = writeln!(
            text,
            "  /healthz storm of the same shape (ceiling): {}; refresh storm = {:.1} % of it",
            self.ceiling.line(),
            self.percent_of_ceiling()
        );
        if cluster.len() > 1 {
            for (i, base) in cluster.bases.iter().enumerate() {
                let tally = &self.fired.per_instance[i];
                let delta = self.counters.instance(i);
                let _ = writeln!(
                    text,
                    "  instance {i} ({base}): {} requests, {}; rotations +{}, reuse +{}; layer: {}",
                    tally.count(),
                    tally.latency_line(),
                    delta.rotations,
                    delta.reuse_detected,
                    delta.outcomes_line()
                );
            }
            match self.waiters(shape) {
                Ok(w) => {
                    let _ = writeln!(
                        text,
                        "  leader's instance {}: p99 {}; other instances: p99 {} (median); added \
                         p99 of a waiter on another instance: {}",
                        w.leader,
                        millis(w.leader_p99),
                        millis(w.others_p99),
                        format_value(w.added_ms(), Unit::Millis)
                    );
                }
                Err(why) => {
                    let _ = writeln!(text, "  waiter latency by instance: not computed: {why}");
                }
            }
        }
        if let Some(redis) = &self.redis {
            let total: u64 = redis.values().sum();
            let per_command: Vec<String> = redis
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let _ = writeln!(
                text,
                "  redis commands during the storm (INFO commandstats, all clients): {}; total {}, \
                 {:.1} per instance",
                per_command.join(", "),
                total,
                total as f64 / cluster.len() as f64
            );
        }
        text
    }

    fn percent_of_ceiling(&self) -> f64 {
        100.0 * self.fired.throughput() / self.ceiling.throughput().max(1e-9)
    }

    /// The latency of requests on the leader's instance against the others'.
    fn waiters(&self, shape: &StormShape) -> Result<Waiters, String> {
        if shape.tokens != 1 {
            return Err("needs --tokens 1 (the leader's instance differs per token)".into());
        }
        if self.counters.total().reuse_detected > 0 {
            return Err("reuse was detected: the other instances did not wait for a leader".into());
        }
        let rotating: Vec<usize> = (0..self.fired.per_instance.len())
            .filter(|&i| self.counters.instance(i).rotations > 0)
            .collect();
        let &[leader] = rotating.as_slice() else {
            return Err(format!(
                "{} instances rotated the token, expected exactly one",
                rotating.len()
            ));
        };
        let others: Vec<f64> = (0..self.fired.per_instance.len())
            .filter(|&i| i != leader)
            .map(|i| ms(self.fired.per_instance[i].quantile(0.99)))
            .collect();
        Ok(Waiters {
            leader,
            leader_p99: self.fired.per_instance[leader].quantile(0.99),
            others_p99: Duration::from_secs_f64(median(others) / 1e3),
        })
    }

    fn figures(&self, figures: &mut Figures, prefix: &str, shape: &StormShape, instances: usize) {
        figures.load(prefix, &self.fired);
        figures.counters(prefix, &self.counters.total());
        figures.add(
            format!("{prefix}distinct refresh tokens"),
            self.fired.issued.len() as f64,
            Unit::Count,
        );
        figures.add(
            format!("{prefix}/healthz storm"),
            self.ceiling.throughput(),
            Unit::PerSec,
        );
        figures.add(
            format!("{prefix}storm vs /healthz storm"),
            self.percent_of_ceiling(),
            Unit::Percent,
        );
        if let Some(w) = self.waiters(shape).ok().filter(|_| instances > 1) {
            figures.add(
                format!("{prefix}leader's instance p99"),
                ms(w.leader_p99),
                Unit::Millis,
            );
            figures.add(
                format!("{prefix}other instances p99"),
                ms(w.others_p99),
                Unit::Millis,
            );
            figures.add(
                format!("{prefix}added waiter p99 (other instance)"),
                w.added_ms(),
                Unit::Millis,
            );
        }
        if let Some(redis) = &self.redis {
            let total: u64 = redis.values().sum();
            for (name, n) in redis {
                figures.add(format!("{prefix}redis {name}"), *n as f64, Unit::Count);
            }
            figures.add(format!("{prefix}redis commands"), total as f64, Unit::Count);
            figures.add(
                format!("{prefix}redis commands per instance"),
                total as f64 / instances as f64,
                Unit::Count,
            );
        }
    }
}

/// Storm latency on the leader's instance against the other instances.
struct Waiters {
    leader: usize,
    leader_p99: Duration,
    /// Median of the other instances' p99.
    others_p99: Duration,
}

impl Waiters {
    fn added_ms(&self) -> f64 {
        ms(self.others_p99) - ms(self.leader_p99)
    }
}

const WITHOUT_LAYER: &str = "without layer";
const WITH_LAYER: &str = "with layer";

/// `storm` (one instance unless several `--target`s, optionally compared without and with
/// the layer) and `multi` (`instances` instances).
async fn storm_mode(
    target: &TargetArgs,
    runs: usize,
    shape: &StormShape,
    instances: usize,
    compare: bool,
) -> Result<Summary, Error> {
    if compare && !target.targets.is_empty() {
        return Err("--compare and --svg start their own servers: drop --target".into());
    }
    let variants: Vec<(&str, bool)> = if compare {
        vec![(WITHOUT_LAYER, true), (WITH_LAYER, false)]
    } else {
        vec![("", target.no_coalesce)]
    };
    let mut clusters = Vec::with_capacity(variants.len());
    for (label, no_coalesce) in variants {
        let cluster = Cluster::start(target, instances, no_coalesce).await?;
        cluster.check_descriptors(shape.concurrency());
        warm_up(&cluster).await?;
        clusters.push((label, cluster));
    }
    println!(
        "storm: {} concurrent refreshes of each of {} token{} ({} requests, {} in flight over \
         HTTP/1.1, one {} connection each), spread over {} instance{}",
        shape.requests,
        shape.tokens,
        plural(shape.tokens),
        shape.total(),
        shape.concurrency(),
        if shape.warm { "kept-alive" } else { "new" },
        clusters[0].1.len(),
        plural(clusters[0].1.len()),
    );
    if clusters[0].1.len() > 1 && target.redis.is_none() && target.targets.is_empty() {
        println!(
            "note: several instances without --redis each refresh the token: expect reuse detection"
        );
    }
    let mut probe = redis_probe(target).await?;
    let mut summary = Summary::default();
    for run in 1..=runs {
        let mut figures = Figures::default();
        for (label, cluster) in &clusters {
            let prefix = if label.is_empty() {
                String::new()
            } else {
                format!("{label}: ")
            };
            let result = storm_run(cluster, shape, &mut probe).await?;
            println!(
                "run {run}/{runs}{}{} [{}; load average {}]",
                if label.is_empty() { "" } else { ", " },
                label,
                cluster.description,
                loadavg()
            );
            print!("{}", result.report(cluster, shape));
            result.figures(&mut figures, &prefix, shape, cluster.len());
        }
        summary.runs.push(figures);
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------------------
// steady
// ---------------------------------------------------------------------------------------

/// A client's view of one token family: the refresh token it presents, and the successor
/// a response handed it.
struct Family {
    current: Arc<str>,
    adopted: Instant,
    successor: Option<Arc<str>>,
    followed: u64,
}

impl Family {
    fn new(token: Arc<str>) -> Self {
        Self {
            current: token,
            adopted: Instant::now(),
            successor: None,
            followed: 0,
        }
    }

    /// The token to present now: the successor, once the current token has been presented
    /// for `hold`.
    fn present(&mut self, hold: Duration) -> Arc<str> {
        let held = self.adopted.elapsed() >= hold;
        if let Some(next) = self.successor.take_if(|_| held) {
            self.current = next;
            self.adopted = Instant::now();
            self.followed += 1;
        }
        Arc::clone(&self.current)
    }

    /// A request that presented `presented` got a pair with refresh token `issued`. Answers
    /// to older tokens (replays of a pair already followed) are ignored.
    fn observe(&mut self, presented: &str, issued: &str) {
        if self.successor.is_none() && *self.current == *presented && presented != issued {
            self.successor = Some(issued.into());
        }
    }
}

fn lock(family: &Mutex<Family>) -> std::sync::MutexGuard<'_, Family> {
    family
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One steady run: what was answered, and how far the sender fell behind its schedule.
struct SteadyRun {
    fired: Fired,
    sent: usize,
    max_lag: Duration,
    followed: u64,
    counters: CounterDelta,
}

async fn steady_run(cluster: &Cluster, args: &SteadyArgs) -> Result<SteadyRun, Error> {
    let setup = http_client();
    let families: Arc<[Mutex<Family>]> = logins(&setup, &cluster.bases[0], args.tokens)
        .await?
        .into_iter()
        .map(|token| Mutex::new(Family::new(token)))
        .collect();
    let before = scrape_all(&setup, &cluster.bases).await?;

    let client = http_client();
    let hold = Duration::from_secs_f64(args.hold);
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = (args.rate as f64 * args.duration).round() as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = JoinSet::new();
    let mut max_lag = Duration::ZERO;
    for i in 0..total {
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        max_lag = max_lag.max(due.elapsed());
        let (family, instance) = (i % args.tokens, (i / args.tokens) % cluster.len());
        let token = lock(&families[family]).present(hold);
        let request = Call::Refresh(Arc::clone(&token)).request(&cluster.bases[instance])?;
        let (client, families) = (client.clone(), Arc::clone(&families));
        tasks.spawn(async move {
            let result = send(&client, request).await;
            // From the scheduled time: a sender that falls behind does not hide latency.
            let latency = due.elapsed();
            let sample = Sample::new(instance, result, latency, true);
            if let Some(issued) = &sample.issued {
                lock(&families[family]).observe(&token, issued);
            }
            sample
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(sample) = tasks.join_next().await {
        samples.push(sample?);
    }
    let wall = start.elapsed();
    tokio::time::sleep(SETTLE).await;
    let after = scrape_all(&setup, &cluster.bases).await?;
    let followed = families.iter().map(|f| lock(f).followed).sum();
    Ok(SteadyRun {
        fired: Fired::new(cluster.len(), samples, wall),
        sent: total,
        max_lag,
        followed,
        counters: CounterDelta { before, after },
    })
}

impl SteadyRun {
    fn report(&self) -> String {
        format!(
            "  {}\n  sender: {} requests on schedule, max lag behind schedule {}; rotations \
             followed by the client: {}\n  counters: {}\n",
            self.fired.line(),
            self.sent,
            millis(self.max_lag),
            self.followed,
            self.counters.line()
        )
    }

    fn figures(&self) -> Figures {
        let mut figures = Figures::default();
        figures.add("sent", self.sent as f64, Unit::Count);
        figures.load("", &self.fired);
        figures.counters("", &self.counters.total());
        figures.add(
            "rotations followed by the client",
            self.followed as f64,
            Unit::Count,
        );
        figures.add("max sender lag", ms(self.max_lag), Unit::Millis);
        figures
    }
}

async fn steady_mode(
    target: &TargetArgs,
    runs: usize,
    args: &SteadyArgs,
) -> Result<Summary, Error> {
    let cluster = Cluster::start(target, 1, target.no_coalesce).await?;
    warm_up(&cluster).await?;
    println!(
        "steady: {} refreshes/s for {} s over {} token famil{} (open loop, latency from the \
         scheduled time), following rotation{}; ttl {} s",
        args.rate,
        args.duration,
        args.tokens,
        if args.tokens == 1 { "y" } else { "ies" },
        if args.hold > 0.0 {
            format!(" after holding each token {} s", args.hold)
        } else {
            " at once".into()
        },
        target.ttl
    );
    let mut summary = Summary::default();
    for run in 1..=runs {
        let result = steady_run(&cluster, args).await?;
        println!(
            "run {run}/{runs} [{}; load average {}]",
            cluster.description,
            loadavg()
        );
        print!("{}", result.report());
        summary.runs.push(result.figures());
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------------------

/// A token with a live replay: refreshed once (rotating it) and presented again (replayed).
async fn live_replay(client: &HttpClient, base: &str) -> Result<Arc<str>, Error> {
    let token = login(client, base).await?;
    let first = refresh(client, base, &token).await?;
    let again = refresh(client, base, &token).await?;
    if first.body != again.body {
        return Err("the second refresh was not a replay of the first (is the layer on?)".into());
    }
    Ok(token)
}

/// The requests of one kind in a replay run, and the CPU time this process spent on them.
struct Phase {
    fired: Fired,
    cpu: Option<Duration>,
}

impl Phase {
    fn merge(&mut self, other: Phase) {
        self.fired.merge(other.fired);
        self.cpu = self.cpu.zip(other.cpu).map(|(a, b)| a + b);
    }

    /// CPU time of this process (client, and the server when in process) per request.
    fn cpu_per_request(&self) -> Option<Duration> {
        let count = u32::try_from(self.fired.total().count()).ok()?.max(1);
        Some(self.cpu? / count)
    }
}

/// One replay run: `/healthz` and replayed refreshes, in the order A B B A so that a linear
/// drift in machine load favours neither.
struct ReplayRun {
    healthz: Phase,
    replay: Phase,
    counters: CounterDelta,
}

async fn replay_run(
    client: &HttpClient,
    bases: &Arc<[String]>,
    args: &ReplayArgs,
) -> Result<ReplayRun, Error> {
    let token = live_replay(client, &bases[0]).await?;
    let before = scrape_all(client, bases).await?;
    let slot = Duration::from_secs_f64(args.duration / 2.0);
    let phase = |call: Call| async move {
        let shot = Shot { instance: 0, call };
        let cpu = process_cpu();
        let plan = until(Instant::now() + slot, shot);
        let fired = fire(client, bases, args.concurrency, plan, false).await?;
        let cpu = process_cpu()
            .zip(cpu)
            .map(|(after, before)| after.saturating_sub(before));
        Ok::<_, Error>(Phase { fired, cpu })
    };
    let mut healthz = phase(Call::Healthz).await?;
    let mut replay = phase(Call::Refresh(Arc::clone(&token))).await?;
    replay.merge(phase(Call::Refresh(token)).await?);
    healthz.merge(phase(Call::Healthz).await?);
    tokio::time::sleep(SETTLE).await;
    let after = scrape_all(client, bases).await?;
    Ok(ReplayRun {
        healthz,
        replay,
        counters: CounterDelta { before, after },
    })
}

impl ReplayRun {
    fn percent(&self) -> f64 {
        100.0 * self.replay.fired.throughput() / self.healthz.fired.throughput().max(1e-9)
    }

    /// `/healthz` CPU per request over replay CPU per request: the throughput ratio a
    /// CPU-bound machine would show, insensitive to CPU taken by other processes.
    fn cpu_percent(&self) -> Option<f64> {
        let (healthz, replay) = (
            self.healthz.cpu_per_request()?,
            self.replay.cpu_per_request()?,
        );
        Some(100.0 * healthz.as_secs_f64() / replay.as_secs_f64().max(1e-12))
    }

    fn report(&self) -> String {
        let cpu = |phase: &Phase| {
            phase
                .cpu_per_request()
                .map_or("?".into(), |d| format!("{:.1} µs", d.as_secs_f64() * 1e6))
        };
        format!(
            "  /healthz: {}
  replayed refresh: {}
  replayed refresh = {:.1} % of /healthz \
             throughput; CPU of this process per request: /healthz {}, replay {} (ratio {})\n  \
             counters: {}\n",
            self.healthz.fired.line(),
            self.replay.fired.line(),
            self.percent(),
            cpu(&self.healthz),
            cpu(&self.replay),
            self.cpu_percent()
                .map_or("?".into(), |p| format_value(p, Unit::Percent)),
            self.counters.line()
        )
    }

    fn figures(&self) -> Figures {
        let mut figures = Figures::default();
        figures.load("/healthz ", &self.healthz.fired);
        figures.load("replay ", &self.replay.fired);
        figures.add(
            "replay vs /healthz (throughput)",
            self.percent(),
            Unit::Percent,
        );
        if let Some(percent) = self.cpu_percent() {
            figures.add(
                "replay vs /healthz (CPU per request)",
                percent,
                Unit::Percent,
            );
        }
        figures.counters("", &self.counters.total());
        figures
    }
}

/// User and system CPU time of this process, from `/proc/self/stat` (Linux; 100 ticks/s).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

async fn replay_mode(
    target: &TargetArgs,
    runs: usize,
    args: &ReplayArgs,
) -> Result<Summary, Error> {
    let cluster = Cluster::start(target, 1, target.no_coalesce).await?;
    cluster.check_descriptors(args.concurrency);
    warm_up(&cluster).await?;
    if cluster.len() > 1 {
        println!("note: replay drives the first target only");
    }
    if target.targets.is_empty() && target.ttl < args.duration + 1.0 {
        println!(
            "note: --ttl {} s is shorter than a run: the replay expires mid-run",
            target.ttl
        );
    }
    println!(
        "replay: {} requests in flight over kept-alive HTTP/1.1 connections, {} s per kind in \
         the order /healthz, replay, replay, /healthz: GET /healthz (the ceiling) and POST \
         /auth/refresh of a token with a live replay",
        args.concurrency, args.duration
    );
    let bases: Arc<[String]> = Arc::from(&cluster.bases[..1]);
    // One client for both kinds, its connections opened before anything is measured.
    let client = http_client();
    let warm = storm_shots(&[Call::Healthz], args.concurrency, 1);
    fire(&client, &bases, args.concurrency, list(warm), false).await?;

    let mut summary = Summary::default();
    for run in 1..=runs {
        let result = replay_run(&client, &bases, args).await?;
        println!(
            "run {run}/{runs} [{}; load average {}]",
            cluster.description,
            loadavg()
        );
        print!("{}", result.report());
        summary.runs.push(result.figures());
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------------------
// The SVG chart
// ---------------------------------------------------------------------------------------

const SVG_RED: &str = "#c0392b";
const SVG_BLUE: &str = "#1f6fb2";
const SVG_WIDTH: f64 = 960.0;
const SVG_HEIGHT: f64 = 460.0;
/// The bars' baseline and the top of the tallest bar.
const SVG_BASE: f64 = 340.0;
const SVG_TOP: f64 = 140.0;

/// How a piece of text is drawn.
#[derive(Clone, Copy)]
struct Style {
    size: u32,
    anchor: &'static str,
    bold: bool,
    fill: &'static str,
}

const TITLE: Style = Style {
    size: 21,
    anchor: "middle",
    bold: true,
    fill: "#111",
};
const CAPTION: Style = Style {
    size: 14,
    anchor: "middle",
    bold: false,
    fill: "#555",
};
const LEGEND: Style = Style {
    size: 15,
    anchor: "start",
    bold: false,
    fill: "#111",
};
const VALUE: Style = Style {
    size: 15,
    anchor: "middle",
    bold: true,
    fill: "#111",
};
const LABEL: Style = Style {
    size: 16,
    anchor: "middle",
    bold: false,
    fill: "#111",
};
const NOTE: Style = Style {
    size: 12,
    anchor: "middle",
    bold: false,
    fill: "#555",
};

/// One measure of the chart: its label, a note under it, and the figure it shows.
struct Panel {
    label: &'static str,
    note: &'static str,
    figure: String,
    unit: Unit,
}

/// A hand-written SVG document.
struct Svg(String);

impl Svg {
    fn new() -> Self {
        let mut svg = Svg(String::new());
        let _ = writeln!(
            svg.0,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" viewBox="0 0 {SVG_WIDTH} {SVG_HEIGHT}" font-family="Helvetica, Arial, sans-serif">"#
        );
        svg.rect(0.0, 0.0, SVG_WIDTH, SVG_HEIGHT, "white");
        svg
    }

    fn rect(&mut self, x: f64, y: f64, width: f64, height: f64, fill: &str) {
        let _ = writeln!(
            self.0,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{height:.1}" fill="{fill}"/>"#
        );
    }

    fn line(&mut self, x1: f64, x2: f64, y: f64) {
        let _ = writeln!(
            self.0,
            r##"<line x1="{x1:.1}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}" stroke="#333" stroke-width="1"/>"##
        );
    }

    fn text(&mut self, x: f64, y: f64, style: Style, content: &str) {
        let escaped = content
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let Style {
            size,
            anchor,
            bold,
            fill,
        } = style;
        let weight = if bold { "bold" } else { "normal" };
        let _ = writeln!(
            self.0,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" fill="{fill}">{escaped}</text>"#
        );
    }

    /// Two bars (without, with) on the panel's own scale, with their values.
    fn panel(&mut self, x0: f64, panel: &Panel, values: [f64; 2]) {
        let max = values.iter().copied().fold(0.0, f64::max);
        self.line(x0 + 20.0, x0 + 166.0, SVG_BASE);
        for (j, (value, color)) in values.into_iter().zip([SVG_RED, SVG_BLUE]).enumerate() {
            // A zero still shows as a sliver, so that "0" sits on something.
            let height = if max > 0.0 {
                (value / max * (SVG_BASE - SVG_TOP)).max(2.0)
            } else {
                2.0
            };
            let x = x0 + 30.0 + 66.0 * j as f64;
            self.rect(x, SVG_BASE - height, 56.0, height, color);
            let shown = match panel.unit {
                Unit::Millis => format!("{value:.0} ms"),
                _ => thousands(value.round() as usize),
            };
            self.text(x + 28.0, SVG_BASE - height - 7.0, VALUE, &shown);
        }
        self.text(x0 + 93.0, SVG_BASE + 26.0, LABEL, panel.label);
        self.text(x0 + 93.0, SVG_BASE + 45.0, NOTE, panel.note);
    }

    fn finish(mut self) -> String {
        self.0.push_str("</svg>\n");
        self.0
    }
}

/// A bar chart of the storm without and with the layer (medians over the runs): one panel
/// per measure, each on its own scale.
fn storm_svg(summary: &Summary, shape: &StormShape, delay_ms: u64, path: &Path) -> String {
    let panel = |label, note, figure: &str, unit| Panel {
        label,
        note,
        figure: figure.to_owned(),
        unit,
    };
    let invalid_grant = format!(
        "status {} invalid_grant",
        app::INVALID_GRANT_STATUS.as_u16()
    );
    let panels = [
        panel(
            "answered 200",
            "with a token pair",
            "status 200",
            Unit::Count,
        ),
        panel(
            "invalid_grant",
            "refused as reuse",
            &invalid_grant,
            Unit::Count,
        ),
        panel("rotations", "refreshes committed", "rotations", Unit::Count),
        panel(
            "reuse detections",
            "family revoked: logged out",
            "reuse detections",
            Unit::Count,
        ),
        panel("p99 latency", "per request", "p99", Unit::Millis),
    ];
    let runs = summary.runs.len();
    let mut svg = Svg::new();
    let title = format!(
        "Refresh storm: {} concurrent refreshes of one token",
        thousands(shape.requests)
    );
    svg.text(SVG_WIDTH / 2.0, 34.0, TITLE, &title);
    let caption = format!(
        "reference server (axum + SQLite) in process, one HTTP/1.1 connection per request, \
         simulated upstream {delay_ms} ms; median of {runs} run{}",
        plural(runs)
    );
    svg.text(SVG_WIDTH / 2.0, 58.0, CAPTION, &caption);
    for (i, (label, color)) in [
        ("without the layer", SVG_RED),
        ("with RefreshCoalesceLayer", SVG_BLUE),
    ]
    .into_iter()
    .enumerate()
    {
        let x = 300.0 + 200.0 * i as f64;
        svg.rect(x, 78.0, 16.0, 16.0, color);
        svg.text(x + 22.0, 91.0, LEGEND, label);
    }
    for (k, panel) in panels.iter().enumerate() {
        let values = [WITHOUT_LAYER, WITH_LAYER]
            .map(|variant| summary.median(&format!("{variant}: {}", panel.figure)));
        svg.panel(20.0 + 186.0 * k as f64, panel, values);
    }
    let footer = format!(
        "Each panel has its own scale. cargo run --release --example load -- storm --requests {} \
         --refresh-delay-ms {delay_ms} --runs {runs} --svg {}",
        shape.requests,
        path.display()
    );
    svg.text(SVG_WIDTH / 2.0, SVG_HEIGHT - 22.0, NOTE, &footer);
    svg.finish()
}

/// Writes `contents` to `path`, creating its directory.
fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    parent
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, contents))
        .map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

/// 1000 -> "1,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

async fn run(cli: &Cli) -> Result<(), Error> {
    let (target, runs) = (&cli.target, cli.runs);
    if cfg!(not(feature = "redis")) && target.redis.is_some() {
        return Err(NO_REDIS_FEATURE.into());
    }
    let summary = match &cli.mode {
        Mode::Storm(args) => {
            let compare = args.compare || args.svg.is_some();
            storm_mode(target, runs, &args.shape, 1, compare).await?
        }
        Mode::Multi(args) => storm_mode(target, runs, &args.shape, args.instances, false).await?,
        Mode::Steady(args) => steady_mode(target, runs, args).await?,
        Mode::Replay(args) => replay_mode(target, runs, args).await?,
    };
    println!();
    print!("{summary}");
    if let Mode::Storm(StormArgs {
        svg: Some(path),
        shape,
        ..
    }) = &cli.mode
    {
        write_file(
            path,
            &storm_svg(&summary, shape, target.refresh_delay_ms, path),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {}", error_chain(&*e));
            ExitCode::from(2)
        }
    }
}
