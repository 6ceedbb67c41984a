//! `cargo run -p grpc`: the token service and a client storm against it (see the library's
//! docs).

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use grpc::{BoxError, DEFAULT_ADDR, TokenServer, client, refresh_token_verifier, serve};
use tokio::net::TcpListener;

/// A tonic token service behind the refresh-coalescing layer. Without a subcommand: the
/// server on a free port and a client storm against it, in one process.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the token service.
    Server {
        /// The address to listen on.
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: SocketAddr,
    },
    /// Fires concurrent Refresh calls with one token and reports what came back.
    Client {
        /// The address of the token service.
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: SocketAddr,
        /// The number of concurrent calls.
        #[arg(long, default_value_t = 500)]
        calls: usize,
        /// The refresh token to send; by default one is minted with the example's secret.
        #[arg(long)]
        token: Option<String>,
    },
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let service = TokenServer::new(refresh_token_verifier()?);
    match Cli::parse().command {
        Some(Command::Server { addr }) => {
            let listener = TcpListener::bind(addr).await?;
            println!("token service on {}", listener.local_addr()?);
            serve(listener, service).await
        }
        Some(Command::Client { addr, calls, token }) => client(addr, calls, token).await,
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            println!("token service on {addr}");
            tokio::spawn(async move {
                if let Err(error) = serve(listener, service).await {
                    eprintln!("server failed: {error}");
                }
            });
            client(addr, 500, None).await
        }
    }
}
