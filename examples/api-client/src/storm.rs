//! One storm: `N` concurrent `GET /api/me` with an expired access token, through one of
//! the two clients, against a reference server with or without its layer.

use std::{
    fmt,
    time::{Duration, Instant},
};

use server::harness::{self, Client, Metrics, Reply, TestServer};
use tokio::task::JoinSet;
use tower_refresh_coalesce::{
    Outcome,
    client::{ClientStats, Credentials, Tokens},
};

use crate::{Error, Login, expired_access_token, layered, naive::Naive};

/// Which client sends the storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Refreshes on every `401` by hand ([`Naive`]).
    Naive,
    /// Behind the client layer ([`layered`]).
    Layer,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent requests, all with the same expired access token.
    pub requests: usize,
    /// The server's simulated slow refresh upstream.
    pub refresh_delay_ms: u64,
    /// Whether the server runs its coalescing layer.
    pub server_layer: bool,
    /// Which client sends them.
    pub client: ClientKind,
}

/// What one storm did, as the token server and the client saw it.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options it ran with.
    pub options: Options,
    /// `200` answers.
    pub ok: usize,
    /// `401` answers.
    pub unauthorized: usize,
    /// Other answers and transport errors, with their counts.
    pub other: Vec<(String, usize)>,
    /// `POST /auth/refresh` requests that reached the token server (its layer's and its
    /// handler's counters).
    pub refreshes: u64,
    /// Rotations the refresh handler committed (`refresh_rotations_total`).
    pub rotations: u64,
    /// Reuses the handler detected, each revoking the family.
    pub reuse_detected: u64,
    /// Whether the login's token family is still valid afterwards: the user stays logged in.
    pub logged_in: bool,
    /// Latencies of the requests, from sending to the whole answer read, sorted.
    pub latencies: Vec<Duration>,
    /// From the first request sent to the last answer read.
    pub wall: Duration,
    /// The client layer's counters (the layered client only).
    pub client_stats: Option<ClientStats>,
}

impl Report {
    /// The `p`-quantile latency (nearest rank).
    pub fn latency(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = (p * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

/// `POST /auth/refresh` requests the server received: every one its handler answered, and
/// every one its layer answered without the handler.
pub fn refresh_requests(metrics: &Metrics) -> u64 {
    let handler: f64 = metrics
        .samples()
        .iter()
        .filter(|(series, _)| series.starts_with("refresh_requests_total{"))
        .map(|(_, value)| value)
        .sum();
    let layer = |outcome| {
        metrics
            .get(&Metrics::outcome_series(outcome))
            .unwrap_or(0.0)
    };
    // Leaders and bypassed requests reach the handler, which counted them already.
    let answered_by_layer: f64 = Outcome::ALL
        .iter()
        .filter(|o| !matches!(o, Outcome::Leader | Outcome::Bypassed))
        .map(|o| layer(*o))
        .sum();
    (handler + answered_by_layer) as u64
}

/// Runs one storm against a reference server started in this process.
pub async fn run(options: Options) -> Result<Report, Error> {
    if options.requests == 0 {
        return Err("a storm needs at least one request".into());
    }
    let server = TestServer::start(server::Config {
        no_coalesce: !options.server_layer,
        refresh_delay_ms: options.refresh_delay_ms,
        ..harness::config()
    })
    .await?;
    let http = Client::with_idle_connections(options.requests);
    let base = server.base().to_owned();
    let login = Login::demo(&http, &base).await?;
    let expired = expired_access_token(server.state())?;
    let url = format!("{base}/api/me");
    let before = http.metrics(&base).await?;

    let mut calls = JoinSet::new();
    let started = Instant::now();
    let stats = match options.client {
        ClientKind::Layer => {
            // No known expiry: the access token is found expired by the server's `401`.
            let tokens = Tokens::new(expired)?.with_refresh_token(login.refresh_token.as_str());
            let credentials = Credentials::from_tokens(tokens);
            let client = layered::client(&base, credentials.clone(), options.requests)?;
            for _ in 0..options.requests {
                let (client, url) = (client.clone(), url.clone());
                calls.spawn(async move { timed(layered::get(&client, &url)).await });
            }
            Some(credentials)
        }
        ClientKind::Naive => {
            let client = Naive::new(http.clone(), &base, &expired, &login.refresh_token);
            for _ in 0..options.requests {
                let client = client.clone();
                calls.spawn(async move { timed(client.get("/api/me")).await });
            }
            None
        }
    };
    let mut answers = Vec::with_capacity(options.requests);
    while let Some(answer) = calls.join_next().await {
        answers.push(answer?);
    }
    let wall = started.elapsed();

    let after = http.metrics(&base).await?;
    let counters =
        harness::Counters::from_metrics(&after)?.since(&harness::Counters::from_metrics(&before)?);
    let (mut ok, mut unauthorized) = (0, 0);
    let mut other = std::collections::BTreeMap::<String, usize>::new();
    let mut latencies = Vec::with_capacity(answers.len());
    for (reply, latency) in answers {
        latencies.push(latency);
        match reply {
            Ok(reply) if reply.status == 200 => ok += 1,
            Ok(reply) if reply.status == 401 => unauthorized += 1,
            Ok(reply) => *other.entry(reply.label()).or_default() += 1,
            Err(error) => *other.entry(format!("error: {error}")).or_default() += 1,
        }
    }
    latencies.sort_unstable();
    Ok(Report {
        options,
        ok,
        unauthorized,
        other: other.into_iter().collect(),
        refreshes: refresh_requests(&after) - refresh_requests(&before),
        rotations: counters.rotations,
        reuse_detected: counters.reuse_detected,
        logged_in: !server.family_revoked(&login.refresh_token).await,
        latencies,
        wall,
        client_stats: stats.map(|credentials| credentials.stats()),
    })
}

async fn timed(
    request: impl Future<Output = Result<Reply, Error>>,
) -> (Result<Reply, Error>, Duration) {
    let started = Instant::now();
    let reply = request.await;
    (reply, started.elapsed())
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientKind::Naive => "refresh on every 401 (by hand)",
            ClientKind::Layer => "client layer",
        })
    }
}
