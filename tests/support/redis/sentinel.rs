//! Redis Sentinel of the test's own: a master, one replica and three sentinels on free
//! loopback ports, every process killed on drop.
//!
//! - The data nodes are [`RedisServer`]s: node 0 starts as the master, node 1 as its replica
//!   (`--replicaof`). Node numbers stay with their processes across failover and restart.
//! - Each sentinel is a [`RedisServer`] too, run from its own `sentinel.conf` (`sentinel
//!   monitor <name> 127.0.0.1 <port> 2`, small `down-after-milliseconds` and
//!   `failover-timeout`): with `$REDIS_SENTINEL_BIN`, else `redis-sentinel` when it is on
//!   `PATH` (Debian package `redis-sentinel`), else `redis-server <conf> --sentinel`.
//! - Every helper is blocking (redis-rs's sync API, 2 s timeouts) and polls conditions
//!   (bounded: [`SETTLE_TIMEOUT`]); none sleeps for a fixed time. [`Killed::wait`] is
//!   `Send + 'static`, for `tokio::task::spawn_blocking` in an async test.

use std::{
    collections::BTreeMap,
    env,
    ffi::OsString,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use super::{
    RedisServer,
    process::{self as server, TempDir},
};

/// Environment variable naming the `redis-sentinel` binary.
pub const SENTINEL_BIN_ENV: &str = "REDIS_SENTINEL_BIN";

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "rc-master";

/// How many sentinels run; a failover needs a quorum of 2 and a majority of them.
pub const SENTINELS: usize = 3;

/// How long start, failover and restart wait for the sentinels to agree.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two probes of every sentinel.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// The sentinels' timings.
#[derive(Clone, Copy, Debug)]
pub struct SentinelOptions {
    /// `sentinel down-after-milliseconds`: a master unreachable this long is subjectively
    /// down; a failover takes about this plus one to three seconds.
    pub down_after: Duration,
    /// `sentinel failover-timeout`: how long a failover may take, and (twice it) the pause
    /// before a failed one is tried again.
    pub failover_timeout: Duration,
}

impl Default for SentinelOptions {
    fn default() -> Self {
        Self {
            down_after: Duration::from_millis(1000),
            failover_timeout: Duration::from_millis(3000),
        }
    }
}

/// A master killed by [`RedisSentinel::kill_master`], until the sentinels promote the
/// replica.
#[derive(Clone, Debug)]
pub struct Killed {
    /// The killed node's number.
    pub node: usize,
    /// The killed node's port.
    pub port: u16,
    /// When it was killed.
    pub at: Instant,
    /// The port of the replica that should replace it.
    replica: u16,
    sentinels: Vec<u16>,
}

impl Killed {
    /// Waits until every sentinel reports the replica as the master
    /// (`SENTINEL get-master-addr-by-name`) and the replica reports `role:master`. `Err`
    /// says what was still missing after [`SETTLE_TIMEOUT`]. Blocking; `Send + 'static`.
    pub fn wait(self) -> Result<Failover, String> {
        server::poll(SETTLE_TIMEOUT, PROBE_INTERVAL, || {
            for &sentinel in &self.sentinels {
                let (_, port) = master_addr_from(sentinel)?;
                if port != self.replica {
                    return Err(format!(
                        "sentinel {sentinel} reports master {port}, not {}",
                        self.replica
                    ));
                }
            }
            let role = info(self.replica, "replication")?.remove("role");
            if role.as_deref() != Some("master") {
                return Err(format!("{} reports role {role:?}", self.replica));
            }
            Ok(())
        })?;
        Ok(Failover {
            killed: self.node,
            promoted: 1 - self.node,
            took: self.at.elapsed(),
        })
    }
}

/// A completed failover.
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// The killed master's node number.
    pub killed: usize,
    /// The promoted replica's node number, now the master.
    pub promoted: usize,
    /// From the kill until every sentinel reported the new master (observed within one
    /// probe interval, about 25 ms).
    pub took: Duration,
}

/// A master, its replica and three sentinels on 127.0.0.1, killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct RedisSentinel {
    /// Sentinels first: they are dropped (killed) before the data nodes, so that none starts
    /// a failover while the harness goes away.
    sentinels: Vec<RedisServer>,
    /// Node 0 started as the master, node 1 as its replica.
    data: Vec<RedisServer>,
    options: SentinelOptions,
    started_in: Duration,
    /// Holds the sentinels' configuration files (they rewrite them).
    _conf: TempDir,
}

impl RedisSentinel {
    /// A master, one replica and three sentinels with the default timings.
    pub fn start() -> Self {
        Self::start_with(SentinelOptions::default())
    }

    /// Starts the master, the replica and the sentinels, and waits until every sentinel
    /// reports the master, its one replica and the two other sentinels, and the replica's
    /// link to the master is up.
    ///
    /// # Panics
    ///
    /// If a binary is missing (the message says how to install it) or the set has not
    /// settled within [`SETTLE_TIMEOUT`] (the message carries what was missing and every
    /// process's log).
    pub fn start_with(options: SentinelOptions) -> Self {
        let begin = Instant::now();
        // A replica's first sync starts at once instead of 5 s later (either node may be the
        // master after a failover).
        let no_delay = ["--repl-diskless-sync-delay", "0"];
        let master = RedisServer::start_with_args(server::binary(), no_delay);
        let replica = RedisServer::start_with_args(
            server::binary(),
            no_delay
                .into_iter()
                .chain(["--replicaof", "127.0.0.1", &master.port().to_string()]),
        );
        let conf = TempDir::new();
        let (bin, mode) = sentinel_binary();
        let sentinels = (0..SENTINELS)
            .map(|n| {
                let path = conf.path().join(format!("sentinel-{n}.conf"));
                write_conf(&path, master.port(), options);
                let mut args: Vec<OsString> = vec![path.into_os_string()];
                args.extend(mode.clone());
                RedisServer::start_with_args(bin.clone(), args)
            })
            .collect();
        let mut set = Self {
            sentinels,
            data: vec![master, replica],
            options,
            started_in: Duration::ZERO,
            _conf: conf,
        };
        set.settle("after start", 0);
        set.started_in = begin.elapsed();
        set
    }

    /// How long `start_with` took, from the first process to sentinels that agree.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The timings it was started with.
    pub fn options(&self) -> SentinelOptions {
        self.options
    }

    /// The name the sentinels monitor the master under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// `redis://127.0.0.1:<port>/` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// Sentinel `n` (port, URL, pid, log...).
    pub fn sentinel(&self, n: usize) -> &RedisServer {
        &self.sentinels[n]
    }

    /// Data node `n`: 0 started as the master, 1 as the replica.
    pub fn node(&self, n: usize) -> &RedisServer {
        &self.data[n]
    }

    /// The master's address as the first sentinel reports it
    /// (`SENTINEL get-master-addr-by-name`).
    ///
    /// # Panics
    ///
    /// If the sentinel cannot be reached or does not know the master.
    pub fn master_addr(&self) -> (String, u16) {
        let port = self.sentinels[0].port();
        master_addr_from(port).unwrap_or_else(|e| panic!("sentinel {port}: {e}"))
    }

    /// The number of the data node the sentinels report as the master.
    pub fn master(&self) -> usize {
        let (_, port) = self.master_addr();
        self.index(port)
    }

    /// The number of the other data node.
    pub fn replica(&self) -> usize {
        1 - self.master()
    }

    /// Kills (SIGKILL) the master the sentinels report and returns at once;
    /// [`await_failover`](Self::await_failover) (or [`Killed::wait`]) then waits until they
    /// report the replica as the new master.
    pub fn kill_master(&mut self) -> Killed {
        let node = self.master();
        let replica = self.data[1 - node].port();
        self.data[node].kill();
        Killed {
            node,
            port: self.data[node].port(),
            at: Instant::now(),
            replica,
            sentinels: self.sentinels.iter().map(RedisServer::port).collect(),
        }
    }

    /// Waits for the failover that follows `killed` (see [`Killed::wait`]).
    ///
    /// # Panics
    ///
    /// If it has not happened within [`SETTLE_TIMEOUT`]; the message carries what was
    /// missing and every process's log.
    pub fn await_failover(&self, killed: Killed) -> Failover {
        killed.wait().unwrap_or_else(|missing| {
            panic!(
                "no Sentinel failover within {SETTLE_TIMEOUT:?}: {missing}\n{}",
                self.logs()
            )
        })
    }

    /// Kills the master and waits until the sentinels report the replica as the master.
    pub fn fail_over(&mut self) -> Failover {
        let killed = self.kill_master();
        self.await_failover(killed)
    }

    /// Starts killed data node `n` again (same port, empty dataset) and makes it a replica
    /// of the current master right away (`REPLICAOF`, what the sentinels would do
    /// themselves after seeing it claim to be a master for about 8 s), then waits until
    /// every sentinel reports it as that master's replica with its link up. Returns how
    /// long it took.
    pub fn restart(&mut self, n: usize) -> Duration {
        let begin = Instant::now();
        let master = self.data[self.master()].port();
        assert_ne!(master, self.data[n].port(), "node {n} is the master");
        self.data[n].restart();
        let port = self.data[n].port();
        server::blocking_connection(port)
            .and_then(|mut con| {
                redis::cmd("REPLICAOF")
                    .arg("127.0.0.1")
                    .arg(master)
                    .query::<()>(&mut con)
            })
            .unwrap_or_else(|e| panic!("REPLICAOF 127.0.0.1 {master} on {port}: {e}"));
        self.settle(&format!("after restarting node {n} ({port})"), 1 - n);
        begin.elapsed()
    }

    /// The tail of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let data = self
            .data
            .iter()
            .enumerate()
            .map(|(n, s)| (format!("node {n}"), s));
        let sentinels = self
            .sentinels
            .iter()
            .enumerate()
            .map(|(n, s)| (format!("sentinel {n}"), s));
        data.chain(sentinels)
            .map(|(name, s)| {
                format!(
                    "--- {name} (127.0.0.1:{}) log ---\n{}\n",
                    s.port(),
                    s.log_tail()
                )
            })
            .collect()
    }

    fn index(&self, port: u16) -> usize {
        self.data
            .iter()
            .position(|s| s.port() == port)
            .unwrap_or_else(|| {
                panic!("the sentinels report a master on {port}, not a node of ours")
            })
    }

    /// Waits until every sentinel reports data node `master` as the master, with flags
    /// `master` only, the other data node as its one replica (flags `slave` only), and the
    /// two other sentinels, and the replica reports its link to the master up; panics with
    /// the logs otherwise.
    fn settle(&self, when: &str, master: usize) {
        let master = self.data[master].port();
        let replica = self
            .data
            .iter()
            .map(RedisServer::port)
            .find(|p| *p != master)
            .expect("two data nodes");
        let checked = server::poll(SETTLE_TIMEOUT, PROBE_INTERVAL, || {
            for sentinel in &self.sentinels {
                check_sentinel(sentinel.port(), master, replica)?;
            }
            let info = info(replica, "replication")?;
            let link = info.get("master_link_status").map(String::as_str);
            let of = info.get("master_port").map(String::as_str);
            if link != Some("up") || of != Some(master.to_string().as_str()) {
                return Err(format!(
                    "replica {replica}: master_port {of:?}, master_link_status {link:?} (want {master}, up)"
                ));
            }
            Ok(())
        });
        if let Err(missing) = checked {
            panic!(
                "the sentinels did not settle {when} within {SETTLE_TIMEOUT:?}: {missing}\n{}",
                self.logs()
            );
        }
    }
}

/// What sentinel `port` reports of the master (`SENTINEL MASTER`) and its replicas
/// (`SENTINEL REPLICAS`), checked against the expected master and replica.
fn check_sentinel(port: u16, master: u16, replica: u16) -> Result<(), String> {
    let mut con = server::blocking_connection(port).map_err(|e| format!("sentinel {port}: {e}"))?;
    let fields: Vec<String> = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MASTER_NAME)
        .query(&mut con)
        .map_err(|e| format!("SENTINEL MASTER on {port}: {e}"))?;
    let state = pairs(fields);
    let expect = [
        ("port", master.to_string()),
        ("flags", "master".to_owned()),
        ("num-slaves", "1".to_owned()),
        ("num-other-sentinels", (SENTINELS - 1).to_string()),
    ];
    for (field, want) in expect {
        let got = state.get(field);
        if got != Some(&want) {
            return Err(format!(
                "sentinel {port}: master {field} {got:?}, want {want}"
            ));
        }
    }
    let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
        .arg("REPLICAS")
        .arg(MASTER_NAME)
        .query(&mut con)
        .map_err(|e| format!("SENTINEL REPLICAS on {port}: {e}"))?;
    let replicas: Vec<BTreeMap<String, String>> = replicas.into_iter().map(pairs).collect();
    // The flags (`s_down` cleared) follow each ping, every second; `master-link-status`
    // follows the sentinel's INFO of the replica, every 10 s: the replica's own INFO is
    // checked instead.
    let up = replicas.iter().any(|r| {
        r.get("port") == Some(&replica.to_string())
            && r.get("flags").map(String::as_str) == Some("slave")
    });
    if !up {
        return Err(format!(
            "sentinel {port}: replica {replica} is not up in {replicas:?}"
        ));
    }
    Ok(())
}

/// `SENTINEL get-master-addr-by-name` on sentinel `port`.
fn master_addr_from(port: u16) -> Result<(String, u16), String> {
    let mut con = server::blocking_connection(port).map_err(|e| format!("sentinel {port}: {e}"))?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(MASTER_NAME)
        .query(&mut con)
        .map_err(|e| format!("SENTINEL get-master-addr-by-name on {port}: {e}"))?;
    addr.ok_or_else(|| format!("sentinel {port} does not know {MASTER_NAME}"))
}

/// `INFO <section>` of the server on `port`.
fn info(port: u16, section: &str) -> Result<BTreeMap<String, String>, String> {
    let text: String = server::blocking_connection(port)
        .and_then(|mut con| redis::cmd("INFO").arg(section).query(&mut con))
        .map_err(|e| format!("INFO {section} of {port}: {e}"))?;
    Ok(server::parse_info(&text))
}

/// A flat `[field, value, field, value, ...]` reply as a map.
fn pairs(flat: Vec<String>) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut items = flat.into_iter();
    while let (Some(field), Some(value)) = (items.next(), items.next()) {
        map.insert(field, value);
    }
    map
}

fn write_conf(path: &Path, master: u16, options: SentinelOptions) {
    let down_after = options.down_after.as_millis();
    let failover_timeout = options.failover_timeout.as_millis();
    let text = format!(
        "sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
         sentinel down-after-milliseconds {MASTER_NAME} {down_after}\n\
         sentinel failover-timeout {MASTER_NAME} {failover_timeout}\n\
         sentinel parallel-syncs {MASTER_NAME} 1\n"
    );
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The sentinel binary and the arguments that follow its configuration file:
/// `$REDIS_SENTINEL_BIN`, else `redis-sentinel` from `PATH`, else the `redis-server` binary
/// with `--sentinel`.
fn sentinel_binary() -> (OsString, Vec<OsString>) {
    if let Some(bin) = env::var_os(SENTINEL_BIN_ENV).filter(|bin| !bin.is_empty()) {
        return (bin, Vec::new());
    }
    let on_path = env::var_os("PATH").is_some_and(|path| {
        env::split_paths(&path).any(|dir| dir.join("redis-sentinel").is_file())
    });
    if on_path {
        ("redis-sentinel".into(), Vec::new())
    } else {
        (server::binary(), vec!["--sentinel".into()])
    }
}
