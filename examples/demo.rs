//! A refresh-token storm against the reference server, without and with the layer.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --requests 5000 --concurrency 500 --refresh-delay-ms 20
//! ```
//!
//! The demo starts the reference server (`examples/server`) twice in this process, on free
//! ports: once with `--no-coalesce`, once with the coalescing layer. Against each it logs
//! in as `demo`/`demo`, then sends `--requests` concurrent `POST /auth/refresh`, all with
//! the same refresh token, as the requests of one client do when its access token expires.
//! They travel over real sockets (HTTP/1.1, one connection per request in flight) and
//! present the token in the four forms the server accepts: JSON body, RFC 6749 form,
//! cookie and `Authorization: Bearer`.
//!
//! Refresh tokens are single-use and a used one presented again revokes its family (reuse
//! detection, RFC 9700 §4.14.2). Without the layer one refresh wins, the others look like
//! theft, and the user is logged out. With it, the token rotates once and every caller gets
//! the same new pair. The counters come from each server's `/metrics`.
//!
//! The demo exits with status 1 if the layered run did not rotate exactly once and answer
//! every request with `200`.

// `pub` so the app's API counts as reachable: a private include would trip the crate's
// `unreachable_pub` lint (and `dead_code` for the parts the demo does not call). The same
// holds where `tests/server_e2e.rs` includes this file.
#[path = "server/app/mod.rs"]
pub mod app;

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Any error of the demo's own machinery (not an answer of the server).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Refresh requests per run, all with the same refresh token.
    pub requests: usize,
    /// Requests in flight at once (one HTTP/1.1 connection each); capped at `requests`.
    pub concurrency: usize,
    /// The servers' simulated slow upstream, so that the storm really overlaps.
    pub refresh_delay_ms: u64,
}

/// The two runs, side by side.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options the runs used (`concurrency` capped at `requests`).
    pub options: Options,
    /// The server with `no_coalesce: true`.
    pub without: Run,
    /// The server with the coalescing layer (default configuration).
    pub with: Run,
}

/// One storm against one server.
#[derive(Debug, Clone)]
pub struct Run {
    /// Requests sent.
    pub requests: usize,
    /// `200` answers carrying a token pair.
    pub ok: usize,
    /// `invalid_grant` answers.
    pub invalid_grant: usize,
    /// Every other answer, transport errors included (see `other_kinds`).
    pub other: usize,
    /// What the `other` answers were (`"503 temporarily_unavailable"`, `"transport: ..."`),
    /// with their counts.
    pub other_kinds: BTreeMap<String, usize>,
    /// Rotations the refresh handler committed during the storm (`refresh_rotations_total`).
    pub rotations: u64,
    /// Reuses the handler detected during the storm, each revoking the family
    /// (`refresh_reuse_detected_total`).
    pub reuse_detected: u64,
    /// Distinct refresh tokens in the `200` answers.
    pub distinct_refresh_tokens: usize,
    /// Whether the refresh token handed out by the storm still works afterwards (refreshed
    /// once more after the counters were read): `false` means the user was logged out.
    pub session_survives: bool,
    /// Median latency of one request, connection set-up included.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Slowest request.
    pub max: Duration,
    /// From the first request sent to the last answer read.
    pub wall: Duration,
    /// The layer's own counters during the storm; `None` without the layer.
    pub layer: Option<LayerCounts>,
}

/// `refresh_coalesce_requests_total{outcome=...}` during one storm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounts {
    /// Requests that started a flight (one per rotation in one process; with Redis, each
    /// instance counts its own flight, and only the elected one calls the handler).
    pub leader: u64,
    /// Requests that joined a refresh in flight.
    pub joined: u64,
    /// Requests answered from the replay of a finished refresh.
    pub replayed: u64,
    /// Requests refused by the layer (rejected, timed out, overloaded, leader failed).
    pub refused: u64,
}

impl Report {
    /// Whether the layered run did what the layer promises: one rotation, every request
    /// answered `200` with the same pair.
    pub fn layer_kept_its_promise(&self) -> bool {
        let with = &self.with;
        with.rotations == 1
            && with.ok == with.requests
            && with.distinct_refresh_tokens == 1
            && with.reuse_detected == 0
    }

    /// The one-line conclusion.
    pub fn verdict(&self) -> String {
        let without = &self.without;
        let before = if without.session_survives {
            format!(
                "without the layer: {} of {} refreshes succeeded, {} rotations, and the session \
                 survived",
                without.ok, without.requests, without.rotations
            )
        } else {
            format!(
                "without the layer: the user was logged out ({} of {} refreshes won, the family \
                 was revoked after {} reuse detection{})",
                without.ok,
                without.requests,
                without.reuse_detected,
                if without.reuse_detected == 1 { "" } else { "s" }
            )
        };
        let after = if self.layer_kept_its_promise() {
            "with it: one rotation, every request got the same new pair".to_owned()
        } else {
            format!(
                "with it: UNEXPECTED: {} rotations, {} of {} answered 200, {} distinct pairs",
                self.with.rotations,
                self.with.ok,
                self.with.requests,
                self.with.distinct_refresh_tokens
            )
        };
        format!("{before}; {after}.")
    }
}

impl std::fmt::Display for Report {
    /// The side-by-side table, the layer's counters and the verdict.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Options {
            requests,
            concurrency,
            refresh_delay_ms,
        } = self.options;
        writeln!(
            f,
            "Refresh storm: {requests} POST /auth/refresh with one refresh token, {concurrency} \
             in flight over HTTP/1.1, simulated upstream delay {refresh_delay_ms} ms"
        )?;
        writeln!(f)?;
        let (a, b) = (&self.without, &self.with);
        let yes_no = |v: bool| if v { "yes" } else { "no" }.to_owned();
        let rows: [(&str, String, String); 12] = [
            ("requests", a.requests.to_string(), b.requests.to_string()),
            ("200 (token pair)", a.ok.to_string(), b.ok.to_string()),
            (
                "invalid_grant",
                a.invalid_grant.to_string(),
                b.invalid_grant.to_string(),
            ),
            ("other statuses", a.other.to_string(), b.other.to_string()),
            (
                "rotations committed",
                a.rotations.to_string(),
                b.rotations.to_string(),
            ),
            (
                "reuse detections (family revoked)",
                a.reuse_detected.to_string(),
                b.reuse_detected.to_string(),
            ),
            (
                "distinct refresh tokens handed out",
                a.distinct_refresh_tokens.to_string(),
                b.distinct_refresh_tokens.to_string(),
            ),
            (
                "new refresh token still works",
                yes_no(a.session_survives),
                yes_no(b.session_survives),
            ),
            ("latency p50", millis(a.p50), millis(b.p50)),
            ("latency p99", millis(a.p99), millis(b.p99)),
            ("latency max", millis(a.max), millis(b.max)),
            ("wall time", millis(a.wall), millis(b.wall)),
        ];
        writeln!(
            f,
            "{:<36}{:>20}{:>18}",
            "", "without the layer", "with the layer"
        )?;
        for (name, without, with) in rows {
            writeln!(f, "{name:<36}{without:>20}{with:>18}")?;
        }
        for (label, run) in [("without the layer", a), ("with the layer", b)] {
            for (kind, count) in &run.other_kinds {
                writeln!(f, "  other ({label}): {count} x {kind}")?;
            }
        }
        if let Some(layer) = b.layer {
            writeln!(f)?;
            writeln!(
                f,
                "layer (refresh_coalesce_requests_total): leader {}, joined {}, replayed {}, \
                 refused {}",
                layer.leader, layer.joined, layer.replayed, layer.refused
            )?;
        }
        writeln!(f)?;
        write!(f, "{}", self.verdict())
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the storm against a server without the layer, then against one with it.
pub async fn run(options: Options) -> Result<Report, Error> {
    if options.requests == 0 || options.concurrency == 0 {
        return Err("requests and concurrency must be at least 1".into());
    }
    let options = Options {
        concurrency: options.concurrency.min(options.requests),
        ..options
    };
    warn_if_too_few_descriptors(options.concurrency);
    let without = run_one(&options, true).await?;
    let with = run_one(&options, false).await?;
    Ok(Report {
        options,
        without,
        with,
    })
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The reference server on a free port of this process, stopped on drop.
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("demo: server stopped: {e}");
            }
        });
        Ok(Self { base, task })
    }
}

/// An HTTP/1.1 client that keeps up to `connections` connections open: each request in
/// flight gets its own (HTTP/2 would multiplex them onto one connection, which the server
/// caps at 200 concurrent streams).
fn http_client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build(connector)
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

async fn login(client: &HttpClient, base: &str) -> Result<String, Error> {
    let body = json!({ "username": app::DEMO_USER, "password": app::DEMO_PASSWORD });
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/auth/login"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::from(body.to_string()))?;
    let reply = send(client, request).await?;
    match reply.json() {
        Some(body) if reply.status == StatusCode::OK => body["refresh_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "login answer without refresh_token".into()),
        _ => Err(format!(
            "login failed: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )
        .into()),
    }
}

/// The four ways a client presents a refresh token, taken in turn by the storm.
#[derive(Debug, Clone, Copy)]
enum TokenForm {
    Json,
    Form,
    Cookie,
    Bearer,
}

const FORMS: [TokenForm; 4] = [
    TokenForm::Json,
    TokenForm::Form,
    TokenForm::Cookie,
    TokenForm::Bearer,
];

fn refresh_request(
    base: &str,
    token: &str,
    form: TokenForm,
) -> Result<Request<Full<Bytes>>, Error> {
    let builder = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}{}", app::REFRESH_PATH));
    let request = match form {
        TokenForm::Json => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(json!({ "refresh_token": token }).to_string())),
        // JWTs are base64url and dots: nothing to escape in a form.
        TokenForm::Form => builder
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::from(format!(
                "grant_type=refresh_token&refresh_token={token}"
            ))),
        TokenForm::Cookie => builder
            .header(
                header::COOKIE,
                HeaderValue::from_str(&format!("{}={token}", app::REFRESH_COOKIE))?,
            )
            .body(Full::default()),
        TokenForm::Bearer => builder
            .header(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            )
            .body(Full::default()),
    };
    Ok(request?)
}

/// How one storm request was answered.
enum Answer {
    Pair { refresh_token: String },
    InvalidGrant,
    Other(String),
}

fn classify(reply: Result<Reply, Error>) -> Answer {
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => return Answer::Other(format!("transport: {e}")),
    };
    let body = reply.json();
    let error = body
        .as_ref()
        .and_then(|b| b["error"].as_str())
        .map(str::to_owned);
    let refresh_token = body
        .as_ref()
        .and_then(|b| b["refresh_token"].as_str())
        .map(str::to_owned);
    match (reply.status, refresh_token, error) {
        (StatusCode::OK, Some(refresh_token), _) => Answer::Pair { refresh_token },
        (status, _, Some(error))
            if status == app::INVALID_GRANT_STATUS && error == "invalid_grant" =>
        {
            Answer::InvalidGrant
        }
        (status, _, Some(error)) => Answer::Other(format!("{} {error}", status.as_u16())),
        (status, _, None) => Answer::Other(status.as_u16().to_string()),
    }
}

/// The server's counters, read from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    rotations: u64,
    reuse_detected: u64,
    layer: LayerCounts,
}

async fn counters(client: &HttpClient, base: &str) -> Result<Counters, Error> {
    let request = Request::builder()
        .uri(format!("{base}/metrics"))
        .body(Full::default())?;
    let reply = send(client, request).await?;
    if reply.status != StatusCode::OK {
        return Err(format!("GET /metrics answered {}", reply.status).into());
    }
    let text = String::from_utf8(reply.body.to_vec())?;
    let required = |series: &str| {
        sample(&text, series).ok_or_else(|| format!("no sample `{series}` on /metrics"))
    };
    let layer_outcome = |outcome: &str| {
        sample(
            &text,
            &format!("refresh_coalesce_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let refused = ["rejected", "timed_out", "overloaded", "leader_failed"]
        .into_iter()
        .filter_map(layer_outcome)
        .sum();
    Ok(Counters {
        rotations: required("refresh_rotations_total")?,
        reuse_detected: required("refresh_reuse_detected_total")?,
        layer: LayerCounts {
            leader: layer_outcome("leader").unwrap_or(0),
            joined: layer_outcome("joined").unwrap_or(0),
            replayed: layer_outcome("replayed").unwrap_or(0),
            refused,
        },
    })
}

/// The value of the sample `series` (name and labels, exactly as written) in an
/// OpenMetrics text; counters are whole numbers.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .map(|value| value as u64)
}

async fn run_one(options: &Options, no_coalesce: bool) -> Result<Run, Error> {
    let label = if no_coalesce {
        "storm without layer"
    } else {
        "storm with layer"
    };
    let server = Server::start(app::Config {
        addr: ([127, 0, 0, 1], 0).into(),
        no_coalesce,
        refresh_delay_ms: options.refresh_delay_ms,
        ..app::Config::default()
    })
    .await?;
    let client = http_client(options.concurrency);
    let base = server.base.as_str();
    let token = login(&client, base).await?;
    let before = counters(&client, base).await?;

    let started = Instant::now();
    let answers = storm(label, &client, base, &token, options).await?;
    let wall = started.elapsed();

    let after = counters(&client, base).await?;
    let mut latencies = Vec::with_capacity(answers.len());
    let (mut ok, mut invalid_grant) = (0, 0);
    let mut other_kinds = BTreeMap::<String, usize>::new();
    let mut refresh_tokens = HashSet::new();
    for (answer, latency) in answers {
        latencies.push(latency);
        match answer {
            Answer::Pair { refresh_token } => {
                ok += 1;
                refresh_tokens.insert(refresh_token);
            }
            Answer::InvalidGrant => invalid_grant += 1,
            Answer::Other(kind) => *other_kinds.entry(kind).or_default() += 1,
        }
    }
    // After the counters were read: does the session go on with the pair the storm got?
    let session_survives = match refresh_tokens.iter().next() {
        Some(next) => {
            let request = refresh_request(base, next, TokenForm::Json)?;
            matches!(classify(send(&client, request).await), Answer::Pair { .. })
        }
        None => false,
    };
    latencies.sort_unstable();
    let layer = (!no_coalesce).then(|| LayerCounts {
        leader: after.layer.leader - before.layer.leader,
        joined: after.layer.joined - before.layer.joined,
        replayed: after.layer.replayed - before.layer.replayed,
        refused: after.layer.refused - before.layer.refused,
    });
    Ok(Run {
        requests: options.requests,
        ok,
        invalid_grant,
        other: other_kinds.values().sum(),
        other_kinds,
        rotations: after.rotations - before.rotations,
        reuse_detected: after.reuse_detected - before.reuse_detected,
        distinct_refresh_tokens: refresh_tokens.len(),
        session_survives,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        wall,
        layer,
    })
}

/// Nearest-rank percentile of sorted latencies.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sends `options.requests` refreshes with `token`, `options.concurrency` at a time,
/// cycling through the token forms, with a progress line on stderr.
async fn storm(
    label: &'static str,
    client: &HttpClient,
    base: &str,
    token: &str,
    options: &Options,
) -> Result<Vec<(Answer, Duration)>, Error> {
    let total = options.requests;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = Progress::start(label, total, Arc::clone(&done));
    let mut workers = JoinSet::new();
    for _ in 0..options.concurrency {
        let (client, next, done) = (client.clone(), Arc::clone(&next), Arc::clone(&done));
        let (base, token) = (base.to_owned(), token.to_owned());
        workers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let request = refresh_request(&base, &token, FORMS[i % FORMS.len()])?;
                let started = Instant::now();
                let answer = classify(send(&client, request).await);
                answers.push((answer, started.elapsed()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(answers)
        });
    }
    let mut answers = Vec::with_capacity(total);
    while let Some(worker) = workers.join_next().await {
        answers.extend(worker??);
    }
    progress.finish().await;
    Ok(answers)
}

/// "storm with layer: 734/1000" on stderr: rewritten in place on a terminal, printed once
/// at the end otherwise (logs and captured output stay readable).
struct Progress {
    label: &'static str,
    total: usize,
    done: Arc<AtomicUsize>,
    started: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(label: &'static str, total: usize, done: Arc<AtomicUsize>) -> Self {
        let ticker = std::io::stderr().is_terminal().then(|| {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let n = done.load(Ordering::Relaxed);
                    eprint!("\r{label}: {n}/{total}");
                    let _ = std::io::stderr().flush();
                }
            })
        });
        Self {
            label,
            total,
            done,
            started: Instant::now(),
            ticker,
        }
    }

    async fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
            let _ = ticker.await;
        }
        eprintln!(
            "\r{}: {}/{} in {}",
            self.label,
            self.done.load(Ordering::Relaxed),
            self.total,
            millis(self.started.elapsed())
        );
    }
}

/// Each connection in flight costs two descriptors here (client and server end).
fn warn_if_too_few_descriptors(concurrency: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok());
    if let Some(soft) = soft {
        let needed = 2 * concurrency + 64;
        if needed > soft {
            eprintln!(
                "demo: warning: {concurrency} connections need about {needed} open files, the \
                 limit is {soft}; expect connection errors (lower --concurrency or raise ulimit -n)"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// A refresh-token storm against the reference server, without and with the coalescing layer
#[derive(Debug, clap::Parser)]
#[command(name = "demo", long_about = None)]
struct Args {
    /// Refresh requests per run, all with the same refresh token
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    requests: u64,

    /// Requests in flight at once, one HTTP/1.1 connection each [default: REQUESTS]
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: Option<u64>,

    /// The servers' simulated slow upstream, so that the storm really overlaps
    #[arg(long, value_name = "MS", default_value_t = 50)]
    refresh_delay_ms: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let options = Options {
        requests: to_usize(args.requests),
        concurrency: to_usize(args.concurrency.unwrap_or(args.requests)),
        refresh_delay_ms: args.refresh_delay_ms,
    };
    match run(options).await {
        Ok(report) => {
            println!("{report}");
            if report.layer_kept_its_promise() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::from(2)
        }
    }
}
