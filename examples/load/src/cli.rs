//! The command line: modes and the servers they drive.

use std::path::PathBuf;

/// Load generator for the reference server: refresh storms, steady refresh traffic,
/// replayed-refresh throughput against /healthz, and storms over several instances
#[derive(Debug, clap::Parser)]
#[command(name = "load", long_about = None)]
pub(crate) struct Cli {
    /// Repeat the measurement this many times and end with medians and min–max
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive, global = true)]
    pub(crate) runs: usize,

    #[command(flatten)]
    pub(crate) target: TargetArgs,

    #[command(subcommand)]
    pub(crate) mode: Mode,
}

/// The servers to drive; all but `--target` configure the servers started in process.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Servers")]
pub(crate) struct TargetArgs {
    /// Drive a server started elsewhere (repeatable) instead of starting servers in process
    #[arg(long = "target", value_name = "URL", global = true)]
    pub(crate) targets: Vec<String>,

    /// Seconds a refresh response is replayed (server's --ttl)
    #[arg(long, value_name = "SECS", default_value_t = 30.0, global = true)]
    pub(crate) ttl: f64,

    /// Seconds a coalesced caller waits before it gets 429 (server's --wait-timeout)
    #[arg(long, value_name = "SECS", default_value_t = 10.0, global = true)]
    pub(crate) wait_timeout: f64,

    /// Simulated slow upstream of the refresh handler (server's --refresh-delay-ms)
    #[arg(long, value_name = "MS", default_value_t = 0, global = true)]
    pub(crate) refresh_delay_ms: u64,

    /// Serve /auth/refresh without the coalescing layer (server's --no-coalesce)
    #[arg(long, global = true)]
    pub(crate) no_coalesce: bool,

    /// Redis URL: in-process servers coordinate through it, and its INFO commandstats are
    /// reported for each storm (needs --features redis)
    #[arg(long, value_name = "URL", global = true)]
    pub(crate) redis: Option<String>,

    /// A seed node of a Redis Cluster to coordinate through instead (repeatable); every
    /// node's INFO commandstats and cluster-bus messages are reported
    #[arg(long = "redis-cluster", value_name = "URL", global = true)]
    pub(crate) redis_cluster: Vec<String>,

    /// A Redis Sentinel to find the master through instead (repeatable; with
    /// --redis-master); the master's and replicas' INFO commandstats are reported
    #[arg(long = "redis-sentinel", value_name = "URL", global = true)]
    pub(crate) redis_sentinel: Vec<String>,

    /// The name the sentinels know the master by
    #[arg(long = "redis-master", value_name = "NAME", global = true)]
    pub(crate) redis_master: Option<String>,

    /// Replicas that must acknowledge an election (server's --redis-min-replicas)
    #[arg(long = "redis-min-replicas", value_name = "N", global = true)]
    pub(crate) redis_min_replicas: Option<u32>,

    /// Start the instances as `server` processes (the binary next to this one, or
    /// --server-bin) instead of in this process
    #[arg(long, global = true)]
    pub(crate) processes: bool,

    /// The `server` binary for --processes [default: next to this binary]
    #[arg(long, value_name = "PATH", global = true)]
    pub(crate) server_bin: Option<PathBuf>,
}

impl TargetArgs {
    /// Whether the instances coordinate through a Redis of any topology.
    pub(crate) fn uses_redis(&self) -> bool {
        self.redis.is_some() || !self.redis_cluster.is_empty() || !self.redis_sentinel.is_empty()
    }

    /// The server's command-line flags for the Redis options.
    pub(crate) fn redis_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(url) = &self.redis {
            flags.extend(["--redis".to_owned(), url.clone()]);
        }
        for seed in &self.redis_cluster {
            flags.extend(["--redis-cluster".to_owned(), seed.clone()]);
        }
        for sentinel in &self.redis_sentinel {
            flags.extend(["--redis-sentinel".to_owned(), sentinel.clone()]);
        }
        if let Some(master) = &self.redis_master {
            flags.extend(["--redis-master".to_owned(), master.clone()]);
        }
        if let Some(replicas) = self.redis_min_replicas {
            flags.extend(["--redis-min-replicas".to_owned(), replicas.to_string()]);
        }
        flags
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Mode {
    /// N concurrent refreshes of one token, for each of M tokens
    Storm(StormArgs),
    /// R refreshes per second for D seconds over K tokens, open loop, following rotation
    Steady(SteadyArgs),
    /// Refreshes hitting a live replay vs. /healthz (the ceiling), closed loop
    Replay(ReplayArgs),
    /// The storm spread over several instances (one SQLite file, and Redis with --redis)
    Multi(MultiArgs),
    /// The storm from both ends: N concurrent GET /api/me with an expired access token, from
    /// a client without and with the client layer, against a server without and with its layer
    Clients(ClientsArgs),
    /// One storm in process, traced: a waterfall SVG of its spans and their links
    Trace(TraceArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TraceArgs {
    /// Callers who join the leader's flight while its refresh runs
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = positive)]
    pub(crate) joined: usize,

    /// Late retries, answered from the replay
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = positive)]
    pub(crate) replayed: usize,

    /// Write the waterfall to PATH
    #[arg(long, value_name = "PATH")]
    pub(crate) svg: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ClientsArgs {
    /// Concurrent requests per run, one HTTP/1.1 connection each
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive)]
    pub(crate) requests: usize,

    /// Write the four runs as an SVG bar chart to PATH
    #[arg(long, value_name = "PATH")]
    pub(crate) svg: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StormShape {
    /// Concurrent refreshes of each token
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive)]
    pub(crate) requests: usize,

    /// Tokens stormed at once (M logins of user demo: M token families)
    #[arg(long, value_name = "M", default_value_t = 1, value_parser = positive)]
    pub(crate) tokens: usize,

    /// Requests in flight at once, one HTTP/1.1 connection each [default: N × M]
    #[arg(long, value_name = "C", value_parser = positive)]
    pub(crate) concurrency: Option<usize>,

    /// Open the connections before the storm (kept alive), so that latency leaves out TCP
    /// connection set-up [default: every request opens its own]
    #[arg(long)]
    pub(crate) warm: bool,
}

impl StormShape {
    pub(crate) fn total(&self) -> usize {
        self.requests * self.tokens
    }

    pub(crate) fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(usize::MAX).min(self.total())
    }
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StormArgs {
    #[command(flatten)]
    pub(crate) shape: StormShape,

    /// Run the storm against an in-process server without the layer and one with it
    #[arg(long)]
    pub(crate) compare: bool,

    /// Write the comparison as an SVG bar chart to PATH (implies --compare)
    #[arg(long, value_name = "PATH")]
    pub(crate) svg: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MultiArgs {
    #[command(flatten)]
    pub(crate) shape: StormShape,

    /// In-process instances sharing one SQLite file (ignored with --target)
    #[arg(long, value_name = "I", default_value_t = 3, value_parser = positive)]
    pub(crate) instances: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SteadyArgs {
    /// Requests per second, sent on schedule
    #[arg(long, value_name = "R", default_value_t = 500, value_parser = positive)]
    pub(crate) rate: usize,

    /// Seconds to send for
    #[arg(long, value_name = "SECS", default_value_t = 20.0, value_parser = positive_secs)]
    pub(crate) duration: f64,

    /// Token families the requests cycle over
    #[arg(long, value_name = "K", default_value_t = 10, value_parser = positive)]
    pub(crate) tokens: usize,

    /// Keep presenting a refresh token this long after adopting it, although a newer one
    /// came back (a client whose access token lives that long); 0 adopts the new one at once
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = secs)]
    pub(crate) hold: f64,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReplayArgs {
    /// Requests in flight at once, one kept-alive HTTP/1.1 connection each
    #[arg(long, value_name = "C", default_value_t = 64, value_parser = positive)]
    pub(crate) concurrency: usize,

    /// Seconds of each kind (/healthz, replayed refresh), run in halves: A B B A
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = positive_secs)]
    pub(crate) duration: f64,
}

pub(crate) fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{text}` is not a positive whole number")),
    }
}

pub(crate) fn secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Ok(secs),
        _ => Err(format!("`{text}` is not a number of seconds")),
    }
}

pub(crate) fn positive_secs(text: &str) -> Result<f64, String> {
    secs(text).and_then(|secs| {
        if secs > 0.0 {
            Ok(secs)
        } else {
            Err("must be more than 0 seconds".into())
        }
    })
}
