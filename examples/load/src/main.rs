//! A load generator for the reference server (the `server` crate).
//!
//! ```text
//! cargo run --release -p load -- storm --requests 1000 --refresh-delay-ms 50 --compare --runs 3 --svg docs/storm.svg
//! cargo run --release -p load -- steady --rate 500 --duration 20 --tokens 10 --ttl 2
//! cargo run --release -p load -- replay --concurrency 64 --duration 5 --runs 3
//! cargo run --release -p load --features redis -- multi --instances 3 --redis redis://127.0.0.1:6390/
//! cargo run --release -p load -- storm --target http://127.0.0.1:3000
//! cargo run --release -p load -- clients --requests 1000 --refresh-delay-ms 50 --runs 3 --svg docs/storm.svg
//! cargo run --release -p load -- trace --joined 8 --replayed 3 --refresh-delay-ms 50 --svg docs/trace.svg
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
//! - `clients`: the demo's storm from both ends (`api-client`): `GET /api/me` with an
//!   expired access token from a client without and with the client layer, against a server
//!   without and with its layer; `--svg` draws the four runs.
//! - `trace`: one storm in process under a recording tracing subscriber, drawn as a
//!   waterfall: the leader's request, the flight (its child), the callers who joined (linked
//!   to the flight), the replay window and the late retries (linked to it).
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
//!
//! Modules: `cli` (the command line), `cluster` (the servers driven), `requests` and `fire`
//! (sending requests, recording answers), `counters` (`/metrics` and Redis before and
//! after), `stats` (figures and their summary over runs), one module per mode (`storm`
//! with `multi`, `steady`, `replay`, `clients`, `trace`), and `chart` (the SVG).

mod chart;
mod cli;
mod clients;
mod cluster;
mod counters;
mod fire;
mod replay;
mod requests;
mod stats;
mod steady;
mod storm;
mod trace;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

use cli::{Cli, Mode, StormArgs};

/// Any error of the load tool.
type Error = server::harness::Error;

/// Pause after a load before the counters are read, so that work finishing after the last
/// answer (a leader releasing its Redis lock) is counted.
const SETTLE: Duration = Duration::from_millis(200);

async fn run(cli: &Cli) -> Result<(), Error> {
    let (target, runs) = (&cli.target, cli.runs);
    if cfg!(not(feature = "redis")) && target.uses_redis() {
        return Err(counters::NO_REDIS_FEATURE.into());
    }
    if let Mode::Trace(args) = &cli.mode {
        return trace::trace_mode(args, target.refresh_delay_ms).await;
    }
    let summary = match &cli.mode {
        Mode::Storm(args) => {
            let compare = args.compare || args.svg.is_some();
            storm::storm_mode(target, runs, &args.shape, 1, compare).await?
        }
        Mode::Multi(args) => {
            storm::storm_mode(target, runs, &args.shape, args.instances, false).await?
        }
        Mode::Steady(args) => steady::steady_mode(target, runs, args).await?,
        Mode::Replay(args) => replay::replay_mode(target, runs, args).await?,
        Mode::Clients(args) => clients::clients_mode(target, runs, args).await?,
        Mode::Trace(_) => unreachable!("answered above"),
    };
    println!();
    print!("{summary}");
    if let Mode::Storm(StormArgs {
        svg: Some(path),
        shape,
        ..
    }) = &cli.mode
    {
        let svg = chart::storm_svg(&summary, shape, target.refresh_delay_ms, path)?;
        chart::write_file(path, &svg)?;
        println!("wrote {}", path.display());
    }
    if let Mode::Clients(cli::ClientsArgs {
        svg: Some(path),
        requests,
    }) = &cli.mode
    {
        let svg = chart::clients_svg(&summary, *requests, target.refresh_delay_ms, path)?;
        chart::write_file(path, &svg)?;
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
            eprintln!("load: {}", server::harness::error_chain(&*e));
            ExitCode::from(2)
        }
    }
}
