//! `cargo run --release -p demo`: the refresh-storm demo (see the library's docs).

use std::process::ExitCode;

use clap::Parser as _;

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
    let options = demo::Options {
        requests: to_usize(args.requests),
        concurrency: to_usize(args.concurrency.unwrap_or(args.requests)),
        refresh_delay_ms: args.refresh_delay_ms,
    };
    match demo::run(options).await {
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
