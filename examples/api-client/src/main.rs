//! `api-client storm`: one process of a client fleet that shares one credential through
//! Redis. It loads the credential, says `ready`, waits for a line on its standard input,
//! sends `--requests` concurrent `GET /api/me` through the client layer, and prints what
//! happened as one JSON line.

use std::process::ExitCode;

use clap::Parser as _;

/// One process of a client fleet sharing a credential through Redis
#[derive(Debug, clap::Parser)]
#[command(name = "api-client", long_about = None)]
enum Command {
    /// Wait for a line on stdin, then send N concurrent GET /api/me through the client layer
    Storm(StormArgs),
}

#[derive(Debug, clap::Args)]
struct StormArgs {
    /// The reference server, such as http://127.0.0.1:3000
    #[arg(long, value_name = "URL")]
    base: String,

    /// The Redis that holds the credential (needs --features redis)
    #[arg(long, value_name = "URL")]
    redis: String,

    /// The credential's name in Redis
    #[arg(long, value_name = "NAME", default_value = "api-client")]
    name: String,

    /// The store's sealing secret, at least 32 bytes (or CREDENTIAL_SECRET)
    #[arg(
        long,
        value_name = "SECRET",
        env = "CREDENTIAL_SECRET",
        hide_env_values = true
    )]
    secret: String,

    /// Concurrent requests
    #[arg(long, value_name = "N", default_value_t = 100)]
    requests: usize,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let Command::Storm(args) = Command::parse();
    match storm(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("api-client: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "redis")]
async fn storm(args: StormArgs) -> Result<(), api_client::Error> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tower_refresh_coalesce::{
        client::{Credentials, store::RedisCredentialStore},
        store::RedisStore,
    };

    let store =
        RedisStore::standalone(redis::Client::open(args.redis.as_str())?, &args.secret).build()?;
    let credentials = Credentials::shared(RedisCredentialStore::new(&store, &args.name));
    let client = api_client::layered::client(&args.base, credentials.clone(), args.requests)?;
    let loaded = credentials.load().await?;
    println!("ready {}", loaded.generation);
    let mut go = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut go)
        .await?;

    let url = format!("{}/api/me", args.base);
    let calls: Vec<_> = (0..args.requests)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { api_client::layered::get(&client, &url).await })
        })
        .collect();
    let (mut ok, mut first_failure) = (0, None);
    for call in calls {
        match call.await? {
            Ok(reply) if reply.status == 200 => ok += 1,
            Ok(reply) => {
                first_failure.get_or_insert_with(|| reply.label());
            }
            Err(error) => {
                first_failure.get_or_insert_with(|| server::harness::error_chain(&*error));
            }
        }
    }
    let stats = credentials.stats();
    let line = serde_json::json!({
        "ok": ok,
        "refreshes": stats.refreshes(),
        "adopted": stats.adopted,
        "joined": stats.joined,
        "retried": stats.retried,
        "generation": credentials.generation(),
        "first_failure": first_failure,
    });
    println!("{line}");
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn storm(_: StormArgs) -> Result<(), api_client::Error> {
    Err("build with --features redis to share a credential through Redis".into())
}
