//! The servers a measurement drives: in process, or started elsewhere.

use std::sync::Arc;

use std::time::Duration;

use server::harness::{self, Client, ServerProcess, TempDir, TestServer};

use crate::Error;
use crate::cli::TargetArgs;

/// The servers a measurement drives: started in process, or the `--target`s.
pub(crate) struct Cluster {
    pub(crate) bases: Arc<[String]>,
    pub(crate) description: String,
    pub(crate) in_process: bool,
    pub(crate) _servers: Vec<TestServer>,
    pub(crate) _processes: Vec<ServerProcess>,
    pub(crate) _dir: Option<TempDir>,
}

impl Cluster {
    /// The `--target`s if any, else `instances` servers in process (sharing one SQLite file
    /// when there are several).
    pub(crate) async fn start(
        args: &TargetArgs,
        instances: usize,
        no_coalesce: bool,
    ) -> Result<Self, Error> {
        if !args.targets.is_empty() {
            let bases: Vec<String> = args
                .targets
                .iter()
                .map(|t| t.trim_end_matches('/').to_owned())
                .collect();
            return Ok(Self {
                description: format!("targets {}", bases.join(", ")),
                bases: bases.into(),
                in_process: false,
                _servers: Vec::new(),
                _processes: Vec::new(),
                _dir: None,
            });
        }
        if args.processes {
            return Self::spawn(args, instances, no_coalesce).await;
        }
        let dir = (instances > 1).then(|| TempDir::new("load")).transpose()?;
        let db = dir.as_ref().map(|dir| dir.join("tokens.db"));
        let mut servers = Vec::with_capacity(instances);
        // One after the other: the first one creates the secret the others read.
        for _ in 0..instances {
            let config = server::Config {
                db: db.clone(),
                ttl: args.ttl,
                wait_timeout: args.wait_timeout,
                refresh_delay_ms: args.refresh_delay_ms,
                no_coalesce,
                redis: args.redis.clone(),
                redis_cluster: args.redis_cluster.clone(),
                redis_sentinel: args.redis_sentinel.clone(),
                redis_master: args.redis_master.clone(),
                redis_min_replicas: args.redis_min_replicas,
                ..harness::config()
            };
            servers.push(TestServer::start(config).await?);
        }
        let description = format!(
            "{instances} in-process instance{} ({}, ttl {} s, wait-timeout {} s, refresh delay \
             {} ms, SQLite {}{})",
            plural(instances),
            if no_coalesce { "no layer" } else { "layer on" },
            args.ttl,
            args.wait_timeout,
            args.refresh_delay_ms,
            if db.is_some() {
                "file shared"
            } else {
                "in memory"
            },
            redis_description(args),
        );
        Ok(Self {
            bases: servers.iter().map(|s| s.base().to_owned()).collect(),
            description,
            in_process: true,
            _servers: servers,
            _processes: Vec::new(),
            _dir: dir,
        })
    }

    /// `instances` server processes sharing one SQLite file, started as an operator starts
    /// them, with the same settings as in-process servers.
    async fn spawn(args: &TargetArgs, instances: usize, no_coalesce: bool) -> Result<Self, Error> {
        let binary = match &args.server_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()?.with_file_name("server"),
        };
        let dir = TempDir::new("load")?;
        let mut flags = vec![
            "--db".to_owned(),
            dir.join("tokens.db").display().to_string(),
            "--ttl".to_owned(),
            args.ttl.to_string(),
            "--wait-timeout".to_owned(),
            args.wait_timeout.to_string(),
            "--refresh-delay-ms".to_owned(),
            args.refresh_delay_ms.to_string(),
            "--secret".to_owned(),
            "load tool deployment secret, shared by every process".to_owned(),
        ];
        if no_coalesce {
            flags.push("--no-coalesce".to_owned());
        }
        flags.extend(args.redis_flags());
        let client = Client::new();
        let mut processes = Vec::with_capacity(instances);
        // One after the other: the first one creates the schema the others find.
        for _ in 0..instances {
            let process = ServerProcess::spawn(&binary, &flags).map_err(|error| {
                format!("cannot start {} (--server-bin): {error}", binary.display())
            })?;
            process.ready(&client, Duration::from_secs(30)).await?;
            processes.push(process);
        }
        let description = format!(
            "{instances} server process{} ({}, ttl {} s, wait-timeout {} s, refresh delay {} ms, \
             SQLite file shared{})",
            if instances == 1 { "" } else { "es" },
            if no_coalesce { "no layer" } else { "layer on" },
            args.ttl,
            args.wait_timeout,
            args.refresh_delay_ms,
            redis_description(args),
        );
        Ok(Self {
            bases: processes.iter().map(ServerProcess::base).collect(),
            description,
            in_process: false,
            _servers: Vec::new(),
            _processes: processes,
            _dir: Some(dir),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.bases.len()
    }

    /// Warns when `connections` sockets would exceed the open-file limit (two descriptors
    /// per connection when the server runs in this process).
    pub(crate) fn check_descriptors(&self, connections: usize) {
        let per_connection = if self.in_process { 2 } else { 1 };
        let needed = per_connection * connections + 100;
        if let Some(limit) = open_file_limit().filter(|&limit| needed > limit) {
            eprintln!(
                "load: warning: {connections} connections need about {needed} open files, the \
                 limit is {limit}: expect connection errors (lower --concurrency or raise ulimit -n)"
            );
        }
    }
}

/// How the instances coordinate, for a run's description.
fn redis_description(args: &TargetArgs) -> String {
    if let Some(url) = &args.redis {
        format!(", Redis {url}")
    } else if !args.redis_cluster.is_empty() {
        format!(", Redis Cluster {}", args.redis_cluster.join(" "))
    } else if let Some(master) = &args.redis_master {
        format!(
            ", Redis Sentinel {} master {master}",
            args.redis_sentinel.join(" ")
        )
    } else {
        String::new()
    }
}

pub(crate) fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The 1, 5 and 15 minute load averages, to note what else ran.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
