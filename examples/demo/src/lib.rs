//! The refresh storm from both ends: a client with or without tower-refresh-coalesce's
//! client layer, against a token server with or without its server layer.
//!
//! ```text
//! cargo run --release -p demo
//! cargo run --release -p demo -- --requests 500 --refresh-delay-ms 20
//! ```
//!
//! Each of the four runs starts the reference server (the `server` crate) in this process
//! on a free port, with or without its coalescing layer, logs in as `demo`/`demo`, and gives
//! a client an access token that has expired and the login's refresh token. The client
//! then sends `--requests` concurrent `GET /api/me` over real sockets (HTTP/1.1, one
//! connection per request in flight), as the requests of one client are in flight when its
//! access token expires. Every one is rejected with `401`, and the client refreshes:
//!
//! - **without the client layer**, the way it is often written by hand: each rejected
//!   request refreshes with the refresh token it was sent with, then is sent again
//!   ([`api_client::naive`]);
//! - **with the client layer** ([`api_client::layered`]: hyper-util behind
//!   `BearerAuthLayer`, refreshing through the `oauth2` crate): one refresh, every request
//!   sent again once with the new token.
//!
//! Refresh tokens are single-use and a used one presented again revokes its family (reuse
//! detection, RFC 9700 §4.14.2). The counters come from each server's `/metrics`; whether
//! the user stays logged in is whether the login's token family survived.
//!
//! The demo exits with status 1 if a layer did not keep its promise: with the client layer,
//! one refresh reaches the server; with either layer, every request is answered `200`, no
//! reuse is detected and the user stays logged in. This library is the demo; `src/main.rs`
//! is its command line.

use std::fmt;
use std::time::Duration;

use api_client::storm::{self, ClientKind, Report};

/// Any error of the demo's own machinery (not an answer of the server).
pub type Error = api_client::Error;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent `GET /api/me` per run, all with the same expired access token.
    pub requests: usize,
    /// The servers' simulated slow refresh upstream, so that the storm really overlaps.
    pub refresh_delay_ms: u64,
}

/// The four runs.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// The options the runs used.
    pub options: Options,
    /// `[client without the layer, client with it]`, each `[server without, server with]`.
    pub cells: [[Report; 2]; 2],
}

impl Matrix {
    /// The run of `client` against a server with (`true`) or without its layer.
    pub fn cell(&self, client: ClientKind, server_layer: bool) -> &Report {
        &self.cells[usize::from(client == ClientKind::Layer)][usize::from(server_layer)]
    }

    /// Whether each layer kept its promise (see the module docs).
    pub fn layers_kept_their_promises(&self) -> bool {
        let requests = self.options.requests;
        let mut kept = true;
        for client in [ClientKind::Naive, ClientKind::Layer] {
            for server_layer in [false, true] {
                let cell = self.cell(client, server_layer);
                if client == ClientKind::Layer {
                    kept &= cell.refreshes == 1;
                }
                if client == ClientKind::Layer || server_layer {
                    kept &= cell.ok == requests && cell.reuse_detected == 0 && cell.logged_in;
                }
            }
        }
        kept
    }

    /// The one-paragraph conclusion.
    pub fn verdict(&self) -> String {
        let n = self.options.requests;
        let alone = self.cell(ClientKind::Naive, false);
        let before = if alone.logged_in {
            format!(
                "without either layer {} refreshes reached the server and the session survived",
                alone.refreshes
            )
        } else {
            format!(
                "without either layer {} refreshes reached the server, {} of {n} requests were \
                 answered 200, and the user was logged out",
                alone.refreshes, alone.ok
            )
        };
        if !self.layers_kept_their_promises() {
            return format!("{before}; UNEXPECTED: a layer did not keep its promise.");
        }
        let server_only = self.cell(ClientKind::Naive, true);
        format!(
            "{before}. The server layer alone keeps the user logged in ({} refreshes still reach \
             it, {} rotation); the client layer keeps the storm at the client: 1 refresh, every \
             request answered, with or without the server layer.",
            server_only.refreshes, server_only.rotations
        )
    }
}

impl fmt::Display for Matrix {
    /// The 2×2 table and the verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Options {
            requests,
            refresh_delay_ms,
        } = self.options;
        writeln!(
            f,
            "Refresh storm from both ends: an access token expires with {requests} GET /api/me \
             in flight (HTTP/1.1, one connection each); the token server's refresh takes \
             {refresh_delay_ms} ms"
        )?;
        writeln!(f)?;
        const LEFT: usize = 26;
        const CELL: usize = 40;
        let head = format!(
            "{:LEFT$}{:<CELL$}{}",
            "", "server without its layer", "server with its layer"
        );
        writeln!(f, "{}", head.trim_end())?;
        for (client, label) in [
            (
                ClientKind::Naive,
                ["client without the layer", "(refresh on every 401)"],
            ),
            (
                ClientKind::Layer,
                ["client with the layer", "(BearerAuthLayer)"],
            ),
        ] {
            let lines =
                [false, true].map(|server_layer| cell_lines(self.cell(client, server_layer)));
            writeln!(f, "{}", "-".repeat(LEFT + 2 * CELL - 4))?;
            let [without, with] = lines;
            for (row, (without, with)) in without.iter().zip(&with).enumerate() {
                let left = label.get(row).copied().unwrap_or("");
                let line = format!("{left:LEFT$}{without:<CELL$}{with}");
                writeln!(f, "{}", line.trim_end())?;
            }
        }
        writeln!(f)?;
        for client in [ClientKind::Naive, ClientKind::Layer] {
            for server_layer in [false, true] {
                for (kind, count) in &self.cell(client, server_layer).other {
                    writeln!(
                        f,
                        "  other answers ({client}, server layer {}): {count} x {kind}",
                        if server_layer { "on" } else { "off" }
                    )?;
                }
            }
        }
        write!(f, "{}", self.verdict())
    }
}

/// The lines of one cell of the table.
fn cell_lines(cell: &Report) -> [String; 6] {
    let requests = cell.options.requests;
    [
        format!("refreshes sent      {:>6}", cell.refreshes),
        format!("200 answers         {:>6} of {requests}", cell.ok),
        format!("reuse detections    {:>6}", cell.reuse_detected),
        format!(
            "user stays logged in{:>6}",
            if cell.logged_in { "yes" } else { "NO" }
        ),
        format!(
            "latency p50 / p99   {:>6} / {} ms",
            millis(cell.latency(0.50)),
            millis(cell.latency(0.99))
        ),
        format!("wall time           {:>6} ms", millis(cell.wall)),
    ]
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Runs the four storms, one after the other.
pub async fn run(options: Options) -> Result<Matrix, Error> {
    if options.requests == 0 {
        return Err("requests must be at least 1".into());
    }
    warn_if_too_few_descriptors(options.requests);
    let run = |client, server_layer| {
        let options = storm::Options {
            requests: options.requests,
            refresh_delay_ms: options.refresh_delay_ms,
            server_layer,
            client,
        };
        async move {
            eprintln!(
                "storm: {client}, server layer {}",
                if server_layer { "on" } else { "off" }
            );
            storm::run(options).await
        }
    };
    let cells = [
        [
            run(ClientKind::Naive, false).await?,
            run(ClientKind::Naive, true).await?,
        ],
        [
            run(ClientKind::Layer, false).await?,
            run(ClientKind::Layer, true).await?,
        ],
    ];
    Ok(Matrix { options, cells })
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
                 limit is {soft}; expect connection errors (lower --requests or raise ulimit -n)"
            );
        }
    }
}
