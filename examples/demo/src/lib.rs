//! A refresh-token storm against the reference server, without and with the layer.
//!
//! ```text
//! cargo run --release -p demo
//! cargo run --release -p demo -- --requests 5000 --concurrency 500 --refresh-delay-ms 20
//! ```
//!
//! The demo starts the reference server (the `server` crate) twice in this process, on free
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
//! every request with `200`. This library is the demo; `src/main.rs` is its command line.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use server::harness::{self, Client, Counters, Reply, TestServer, TokenForm};
use tower_refresh_coalesce::Outcome;

/// Any error of the demo's own machinery (not an answer of the server).
pub type Error = harness::Error;

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
    let body = reply.try_json();
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
            if status == server::INVALID_GRANT_STATUS && error == "invalid_grant" =>
        {
            Answer::InvalidGrant
        }
        (status, _, Some(error)) => Answer::Other(format!("{} {error}", status.as_u16())),
        (status, _, None) => Answer::Other(status.as_u16().to_string()),
    }
}

/// The layer's outcomes of `counters`, as the demo reports them.
fn layer_counts(counters: &Counters) -> LayerCounts {
    LayerCounts {
        leader: counters.outcome(Outcome::Leader),
        joined: counters.outcome(Outcome::Joined),
        replayed: counters.outcome(Outcome::Replayed),
        refused: [
            Outcome::Rejected,
            Outcome::TimedOut,
            Outcome::Overloaded,
            Outcome::LeaderFailed,
        ]
        .into_iter()
        .map(|outcome| counters.outcome(outcome))
        .sum(),
    }
}

async fn run_one(options: &Options, no_coalesce: bool) -> Result<Run, Error> {
    let label = if no_coalesce {
        "storm without layer"
    } else {
        "storm with layer"
    };
    let server = TestServer::start(server::Config {
        no_coalesce,
        refresh_delay_ms: options.refresh_delay_ms,
        ..harness::config()
    })
    .await?;
    let client = Client::with_idle_connections(options.concurrency);
    let base = server.base();
    let token = client.login_demo(base).await?;
    let before = client.counters(base).await?;

    let started = Instant::now();
    let answers = storm(label, &client, base, &token, options).await?;
    let wall = started.elapsed();

    let after = client.counters(base).await?.since(&before);
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
            let request = harness::refresh_request(base, next, TokenForm::Json)?;
            matches!(classify(client.send(request).await), Answer::Pair { .. })
        }
        None => false,
    };
    latencies.sort_unstable();
    let layer = (!no_coalesce).then(|| layer_counts(&after));
    Ok(Run {
        requests: options.requests,
        ok,
        invalid_grant,
        other: other_kinds.values().sum(),
        other_kinds,
        rotations: after.rotations,
        reuse_detected: after.reuse_detected,
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
    client: &Client,
    base: &str,
    token: &str,
    options: &Options,
) -> Result<Vec<(Answer, Duration)>, Error> {
    let total = options.requests;
    let done = Arc::new(AtomicUsize::new(0));
    let progress = Progress::start(label, total, Arc::clone(&done));
    let answers =
        harness::refresh_storm(client, base, token, total, options.concurrency, done).await?;
    progress.finish().await;
    Ok(answers
        .into_iter()
        .map(|(reply, latency)| (classify(reply), latency))
        .collect())
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
