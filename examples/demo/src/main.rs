//! `cargo run --release -p demo`: the refresh-storm demo (see the library's docs).

use std::process::ExitCode;

use clap::Parser as _;

/// A refresh storm from both ends: a client with and without the client layer, against a
/// token server with and without its layer
#[derive(Debug, clap::Parser)]
#[command(name = "demo", long_about = None)]
struct Args {
    /// Concurrent GET /api/me per run, all with the same expired access token
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    requests: u64,

    /// The servers' simulated slow refresh upstream, so that the storm really overlaps
    #[arg(long, value_name = "MS", default_value_t = 50)]
    refresh_delay_ms: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let options = demo::Options {
        requests: usize::try_from(args.requests).unwrap_or(usize::MAX),
        refresh_delay_ms: args.refresh_delay_ms,
    };
    match demo::run(options).await {
        Ok(matrix) => {
            println!("{matrix}");
            if matrix.layers_kept_their_promises() {
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
