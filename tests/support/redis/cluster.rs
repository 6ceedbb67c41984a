//! A Redis Cluster of the test's own: `redis-server --cluster-enabled yes` nodes on free
//! loopback ports, joined by `redis-cli --cluster create`, every process killed on drop.
//!
//! - Each node is a [`RedisServer`] (same binary, log, directory and drop rules) started with
//!   `--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout N` and its
//!   own free `--cluster-port` (the default, port + 10000, can be past 65535).
//! - `redis-cli` is `$REDIS_CLI_BIN`, else `redis-cli` from `PATH`.
//! - Every helper is blocking (redis-rs's sync API, 2 s timeouts) and polls conditions
//!   (bounded: [`SETTLE_TIMEOUT`]); none sleeps for a fixed time. From an async test, call the
//!   slow ones (start, failover, restart) from `tokio::task::spawn_blocking` when other tasks
//!   must keep running meanwhile: [`Killed::wait`] is `Send + 'static` for that.
//! - Nodes are numbered `0..node_count()` in start order; a number stays with its process
//!   across kill and restart (same port, same directory, same `nodes.conf`).

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    ffi::{OsStr, OsString},
    io,
    process::Command,
    time::{Duration, Instant},
};

use super::{RedisServer, process as server};

/// Environment variable naming the `redis-cli` binary.
pub const CLI_ENV: &str = "REDIS_CLI_BIN";

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How long start, failover and restart wait for the cluster to settle.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two probes of the whole cluster (each opens a connection per node).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// The shape of a cluster to start.
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// Masters that share the 16384 slots.
    pub masters: usize,
    /// Replicas of each master.
    pub replicas_per_master: usize,
    /// `--cluster-node-timeout`: a node unreachable this long is failing; a failover takes
    /// about this plus one to two seconds.
    pub node_timeout: Duration,
}

impl ClusterOptions {
    /// Three masters, no replica.
    pub const THREE_MASTERS: Self = Self {
        masters: 3,
        replicas_per_master: 0,
        node_timeout: Duration::from_millis(2000),
    };

    /// Three masters with one replica each.
    pub const THREE_MASTERS_THREE_REPLICAS: Self = Self {
        replicas_per_master: 1,
        ..Self::THREE_MASTERS
    };
}

/// The slot map and replication as every live node reports it (`CLUSTER NODES`), by port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// `(first slot, last slot, master's port)`, in slot order, covering every slot.
    pub slots: Vec<(u16, u16, u16)>,
    /// `(replica's port, its master's port)`, sorted.
    pub replicas: Vec<(u16, u16)>,
    /// Ports of the nodes flagged `fail`, sorted.
    pub failed: Vec<u16>,
}

impl Topology {
    /// The port of the master that serves `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.slots
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, port)| *port)
            .unwrap_or_else(|| panic!("slot {slot} is not in {self:?}"))
    }

    /// The ports of the masters that serve slots, sorted.
    pub fn masters(&self) -> Vec<u16> {
        let masters: BTreeSet<u16> = self.slots.iter().map(|(_, _, port)| *port).collect();
        masters.into_iter().collect()
    }

    /// The ports of `master`'s replicas, sorted.
    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        self.replicas
            .iter()
            .filter(|(_, of)| *of == master)
            .map(|(replica, _)| *replica)
            .collect()
    }
}

/// A master killed by [`RedisCluster::kill_master_of_slot`], until a replica replaces it.
#[derive(Clone, Debug)]
pub struct Killed {
    /// The killed node's number.
    pub node: usize,
    /// The killed node's port.
    pub port: u16,
    /// The slot it was killed for.
    pub slot: u16,
    /// When it was killed.
    pub at: Instant,
    /// The ports of its replicas at that moment.
    replicas: Vec<u16>,
    probe: Probe,
}

impl Killed {
    /// Waits until a replica of the killed master serves `slot`, every live node reports
    /// `cluster_state:ok`, flags the killed node `fail` and agrees on the slot map.
    /// `Err` says what was still missing after [`SETTLE_TIMEOUT`]. Blocking; `Send + 'static`
    /// so that an async test can run it in `spawn_blocking` while its flights go on.
    pub fn wait(self) -> Result<Failover, String> {
        let topology = self.probe.settle(|topology| {
            let owner = topology.owner(self.slot);
            if !self.replicas.contains(&owner) {
                return Err(format!(
                    "slot {} is still served by {owner}, not by a replica of {} ({:?})",
                    self.slot, self.port, self.replicas
                ));
            }
            if !topology.failed.contains(&self.port) {
                return Err(format!("{} is not flagged fail yet", self.port));
            }
            Ok(())
        })?;
        let promoted = topology.owner(self.slot);
        Ok(Failover {
            slot: self.slot,
            killed: self.node,
            promoted: self.probe.index(promoted),
            took: self.at.elapsed(),
            topology,
        })
    }
}

/// A completed failover.
#[derive(Clone, Debug)]
pub struct Failover {
    /// The slot whose master was killed.
    pub slot: u16,
    /// The killed master's node number.
    pub killed: usize,
    /// The promoted replica's node number, now the slot's master.
    pub promoted: usize,
    /// From the kill until the cluster had settled with the replica promoted (observed
    /// within one probe interval, about 25 ms).
    pub took: Duration,
    /// The settled topology.
    pub topology: Topology,
}

/// A cluster of `redis-server` nodes on 127.0.0.1, killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    options: ClusterOptions,
    started_in: Duration,
}

impl RedisCluster {
    /// Three masters sharing the slots, no replica.
    pub fn three_masters() -> Self {
        Self::start(ClusterOptions::THREE_MASTERS)
    }

    /// Three masters with one replica each (six nodes).
    pub fn three_masters_three_replicas() -> Self {
        Self::start(ClusterOptions::THREE_MASTERS_THREE_REPLICAS)
    }

    /// Starts `masters × (1 + replicas_per_master)` nodes, joins them with `redis-cli
    /// --cluster create`, and waits until every node reports `cluster_state:ok`, every node
    /// agrees on the slot map and the replicas, and every replica's link to its master is up.
    ///
    /// # Panics
    ///
    /// If a binary is missing (the message says how to install it), `redis-cli` fails, or
    /// the cluster has not settled within [`SETTLE_TIMEOUT`] (the message carries what was
    /// missing and every node's log).
    pub fn start(options: ClusterOptions) -> Self {
        assert!(
            options.masters >= 3,
            "a Redis Cluster needs 3 masters or more"
        );
        let begin = Instant::now();
        let count = options.masters * (1 + options.replicas_per_master);
        let timeout_ms = options.node_timeout.as_millis().to_string();
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                let bus_port = server::free_port().to_string();
                RedisServer::start_with_args(
                    server::binary(),
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &timeout_ms,
                        "--cluster-port",
                        &bus_port,
                        // A replica's first sync starts at once instead of 5 s later.
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            })
            .collect();
        let mut cluster = Self {
            nodes,
            options,
            started_in: Duration::ZERO,
        };

        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        create.extend([
            "--cluster-replicas".into(),
            options.replicas_per_master.to_string(),
            "--cluster-yes".into(),
        ]);
        let (ok, output) = redis_cli(&create);
        if !ok {
            panic!(
                "`redis-cli {}` failed:\n{output}\n{}",
                create.join(" "),
                cluster.logs()
            );
        }

        let want_replicas = options.replicas_per_master;
        cluster.settle("after `redis-cli --cluster create`", |topology| {
            let masters = topology.masters();
            if masters.len() != options.masters {
                return Err(format!("{} masters serve slots", masters.len()));
            }
            match masters
                .iter()
                .find(|m| topology.replicas_of(**m).len() != want_replicas)
            {
                Some(m) => Err(format!("master {m} does not have {want_replicas} replicas")),
                None => Ok(()),
            }
        });
        cluster.started_in = begin.elapsed();
        cluster
    }

    /// How long `start` took, from the first process to a settled cluster.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The options it was started with.
    pub fn options(&self) -> ClusterOptions {
        self.options
    }

    /// The number of nodes, running or killed (a cluster is never empty, hence no `len`).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Node `n` (port, URL, pid, log, async connection...).
    pub fn node(&self, n: usize) -> &RedisServer {
        &self.nodes[n]
    }

    /// The number of the node listening on `port`.
    pub fn index(&self, port: u16) -> usize {
        self.probe().index(port)
    }

    /// The running nodes' numbers.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|n| self.nodes[*n].pid().is_some())
            .collect()
    }

    /// `redis://127.0.0.1:<port>/` of every running node, for a cluster client's seeds.
    pub fn seed_urls(&self) -> Vec<String> {
        self.live()
            .into_iter()
            .map(|n| self.nodes[n].url())
            .collect()
    }

    /// The settled topology (waits as `start` does if it is not settled).
    pub fn topology(&self) -> Topology {
        self.settle("", |_| Ok(()))
    }

    /// The numbers of the masters that serve slots, in order.
    pub fn masters(&self) -> Vec<usize> {
        let topology = self.topology();
        let mut masters: Vec<usize> = topology
            .masters()
            .into_iter()
            .map(|port| self.index(port))
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The numbers of the running replicas, in order.
    pub fn replicas(&self) -> Vec<usize> {
        let topology = self.topology();
        let mut replicas: Vec<usize> = topology
            .replicas
            .iter()
            .map(|(port, _)| self.index(*port))
            .filter(|n| self.nodes[*n].pid().is_some())
            .collect();
        replicas.sort_unstable();
        replicas
    }

    /// The number of the master that serves `slot`.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        self.index(self.topology().owner(slot))
    }

    /// The number of the master that serves `key` (its slot by [`key_slot`]).
    pub fn master_of_key(&self, key: &[u8]) -> usize {
        self.master_of_slot(key_slot(key))
    }

    /// Kills (SIGKILL) the master that serves `slot` and returns at once; [`await_failover`]
    /// (or [`Killed::wait`]) then waits until one of its replicas serves the slot.
    ///
    /// [`await_failover`]: Self::await_failover
    ///
    /// # Panics
    ///
    /// If that master has no running replica (the slot would stay down).
    pub fn kill_master_of_slot(&mut self, slot: u16) -> Killed {
        let topology = self.topology();
        let port = topology.owner(slot);
        let node = self.index(port);
        let replicas: Vec<u16> = topology
            .replicas_of(port)
            .into_iter()
            .filter(|r| self.nodes[self.index(*r)].pid().is_some())
            .collect();
        assert!(
            !replicas.is_empty(),
            "master {port} of slot {slot} has no running replica: a failover cannot happen"
        );
        self.nodes[node].kill();
        Killed {
            node,
            port,
            slot,
            at: Instant::now(),
            replicas,
            probe: self.probe(),
        }
    }

    /// Waits for the failover that follows `killed` (see [`Killed::wait`]).
    ///
    /// # Panics
    ///
    /// If it has not happened within [`SETTLE_TIMEOUT`]; the message carries what was
    /// missing and every node's log.
    pub fn await_failover(&self, killed: Killed) -> Failover {
        let slot = killed.slot;
        killed.wait().unwrap_or_else(|missing| {
            panic!(
                "no failover of slot {slot} within {SETTLE_TIMEOUT:?}: {missing}\n{}",
                self.logs()
            )
        })
    }

    /// Kills the master that serves `slot` and waits until a replica serves it.
    pub fn fail_over_slot(&mut self, slot: u16) -> Failover {
        let killed = self.kill_master_of_slot(slot);
        self.await_failover(killed)
    }

    /// Starts killed node `n` again (same port, directory and `nodes.conf`, empty dataset)
    /// and waits until it has rejoined: every node reports `cluster_state:ok` and agrees, and
    /// `n` is no longer flagged `fail`. A former master whose slots a replica took over comes
    /// back as that replica's replica. Returns how long it took.
    pub fn restart(&mut self, n: usize) -> Duration {
        let begin = Instant::now();
        self.nodes[n].restart();
        let port = self.nodes[n].port();
        self.settle(&format!("after restarting node {n} ({port})"), |topology| {
            if topology.failed.contains(&port) {
                return Err(format!("{port} is still flagged fail"));
            }
            Ok(())
        });
        begin.elapsed()
    }

    /// Runs `cmd` on every running node, in node order.
    ///
    /// # Panics
    ///
    /// If a node cannot be reached or answers with an error.
    pub fn query_each<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<(usize, T)> {
        self.live()
            .into_iter()
            .map(|n| (n, self.query(n, cmd)))
            .collect()
    }

    /// Runs `cmd` on node `n`.
    ///
    /// # Panics
    ///
    /// If the node cannot be reached or answers with an error.
    pub fn query<T: redis::FromRedisValue>(&self, n: usize, cmd: &redis::Cmd) -> T {
        let port = self.nodes[n].port();
        server::blocking_connection(port)
            .and_then(|mut con| cmd.query(&mut con))
            .unwrap_or_else(|e| panic!("node {n} (127.0.0.1:{port}): {e}"))
    }

    /// `INFO <section>` of node `n` as `name -> value`.
    pub fn info(&self, n: usize, section: &str) -> BTreeMap<String, String> {
        let text: String = self.query(n, redis::cmd("INFO").arg(section));
        server::parse_info(&text)
    }

    /// `CLUSTER INFO` of node `n` as `name -> value`.
    pub fn cluster_info(&self, n: usize) -> BTreeMap<String, String> {
        let text: String = self.query(n, redis::cmd("CLUSTER").arg("INFO"));
        server::parse_info(&text)
    }

    /// `INFO commandstats` of every running node as command -> calls (lowercase names, as
    /// Redis reports them: `evalsha`, `cluster|info`). Counts include the harness's own
    /// probes (`cluster|info`, `cluster|nodes`, `info`).
    pub fn command_stats(&self) -> Vec<(usize, BTreeMap<String, u64>)> {
        self.live()
            .into_iter()
            .map(|n| {
                let calls = self
                    .info(n, "commandstats")
                    .into_iter()
                    .filter_map(|(name, fields)| {
                        let name = name.strip_prefix("cmdstat_")?.to_owned();
                        let calls = fields
                            .split(',')
                            .find_map(|field| field.strip_prefix("calls="))?
                            .parse()
                            .ok()?;
                        Some((name, calls))
                    })
                    .collect();
                (n, calls)
            })
            .collect()
    }

    /// `CONFIG RESETSTAT` on every running node: command stats, `INFO stats` counters and
    /// the cluster bus message counters start again from zero.
    pub fn reset_stats(&self) {
        self.query_each::<()>(redis::cmd("CONFIG").arg("RESETSTAT"));
    }

    /// Every key of node `n` with its PTTL in ms (`-1`: no expiry), sorted by key. Not an
    /// atomic snapshot: a key that expires meanwhile is left out.
    pub fn keys_with_ttls(&self, n: usize) -> Vec<(Vec<u8>, i64)> {
        let port = self.nodes[n].port();
        let fail = |e: redis::RedisError| -> ! { panic!("SCAN of node {n} ({port}): {e}") };
        let mut con = server::blocking_connection(port).unwrap_or_else(|e| fail(e));
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
                .unwrap_or_else(|e| fail(e));
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let keys: Vec<Vec<u8>> = keys.into_iter().collect();
        let mut entries = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("PTTL").arg(key);
            }
            let ttls: Vec<i64> = pipe.query(&mut con).unwrap_or_else(|e| fail(e));
            // PTTL -2: expired since the scan.
            entries.extend(
                chunk
                    .iter()
                    .cloned()
                    .zip(ttls)
                    .filter(|(_, ttl)| *ttl != -2),
            );
        }
        entries
    }

    /// `DBSIZE` of every running node, replicas included, as `(node, keys)` in node order.
    pub fn keys_per_node(&self) -> Vec<(usize, u64)> {
        self.query_each(&redis::cmd("DBSIZE"))
    }

    /// `DBSIZE` of every master that serves slots, as `(node, keys)` in node order.
    pub fn keys_per_master(&self) -> Vec<(usize, u64)> {
        self.masters()
            .into_iter()
            .map(|n| (n, self.query(n, &redis::cmd("DBSIZE"))))
            .collect()
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                format!(
                    "--- node {n} (127.0.0.1:{}) log ---\n{}\n",
                    node.port(),
                    node.log_tail()
                )
            })
            .collect()
    }

    /// Waits until the cluster has settled and `want` accepts its topology; panics with the
    /// logs otherwise.
    fn settle(&self, when: &str, want: impl Fn(&Topology) -> Result<(), String>) -> Topology {
        self.probe().settle(want).unwrap_or_else(|missing| {
            panic!(
                "the cluster did not settle {when} within {SETTLE_TIMEOUT:?}: {missing}\n{}",
                self.logs()
            )
        })
    }

    fn probe(&self) -> Probe {
        Probe {
            nodes: self
                .nodes
                .iter()
                .map(|node| (node.port(), node.pid().is_some()))
                .collect(),
        }
    }
}

/// What the settle check needs of the cluster: each node's port and whether it runs.
#[derive(Clone, Debug)]
struct Probe {
    nodes: Vec<(u16, bool)>,
}

impl Probe {
    fn index(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|(p, _)| *p == port)
            .unwrap_or_else(|| panic!("no node of this cluster listens on {port}"))
    }

    /// Polls [`Probe::check`] until it passes, for at most [`SETTLE_TIMEOUT`].
    fn settle(&self, want: impl Fn(&Topology) -> Result<(), String>) -> Result<Topology, String> {
        server::poll(SETTLE_TIMEOUT, PROBE_INTERVAL, || {
            let topology = self.check()?;
            want(&topology)?;
            Ok(topology)
        })
    }

    /// The topology, if the cluster has settled: every running node reports
    /// `cluster_state:ok` and knows every node; every running node reports the same
    /// topology with no node in a transitional state (`fail?`, `handshake`, `noaddr`);
    /// exactly the killed nodes are flagged `fail`; every running replica's link is up.
    fn check(&self) -> Result<Topology, String> {
        let mut agreed: Option<(u16, Topology)> = None;
        for &(port, running) in &self.nodes {
            if !running {
                continue;
            }
            let mut con = server::blocking_connection(port).map_err(|e| format!("{port}: {e}"))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut con)
                .map_err(|e| format!("CLUSTER INFO of {port}: {e}"))?;
            let info = server::parse_info(&info);
            let state = info.get("cluster_state").map(String::as_str);
            if state != Some("ok") {
                return Err(format!("{port} reports cluster_state:{state:?}"));
            }
            let known = info.get("cluster_known_nodes").map(String::as_str);
            if known != Some(self.nodes.len().to_string().as_str()) {
                return Err(format!(
                    "{port} knows {known:?} nodes of {}",
                    self.nodes.len()
                ));
            }
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut con)
                .map_err(|e| format!("CLUSTER NODES of {port}: {e}"))?;
            let topology = view(&text).map_err(|e| format!("{port}'s view: {e}"))?;
            match &agreed {
                None => agreed = Some((port, topology)),
                Some((first, seen)) if *seen != topology => {
                    return Err(format!(
                        "{first} and {port} disagree: {seen:?} vs {topology:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        let (_, topology) = agreed.ok_or("no node is running")?;
        let dead: Vec<u16> = self
            .nodes
            .iter()
            .filter(|(_, running)| !running)
            .map(|(port, _)| *port)
            .collect();
        if topology.failed != dead {
            return Err(format!(
                "nodes flagged fail {:?}, killed {dead:?}",
                topology.failed
            ));
        }
        for &(replica, master) in &topology.replicas {
            if dead.contains(&replica) {
                continue;
            }
            let mut con =
                server::blocking_connection(replica).map_err(|e| format!("{replica}: {e}"))?;
            let text: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut con)
                .map_err(|e| format!("INFO replication of {replica}: {e}"))?;
            let info = server::parse_info(&text);
            let link = info.get("master_link_status").map(String::as_str);
            let of = info.get("master_port").map(String::as_str);
            if link != Some("up") || of != Some(master.to_string().as_str()) {
                return Err(format!(
                    "replica {replica}: master_port {of:?}, master_link_status {link:?} (want {master}, up)"
                ));
            }
        }
        Ok(topology)
    }
}

/// The topology in one node's `CLUSTER NODES` reply:
/// `<id> <ip:port@cport[,hostname]> <flags> <master id|-> <ping> <pong> <epoch> <link> <slots>...`
fn view(text: &str) -> Result<Topology, String> {
    struct Line<'a> {
        id: &'a str,
        port: u16,
        flags: Vec<&'a str>,
        master: &'a str,
        slots: Vec<(u16, u16)>,
    }
    let mut lines = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [
            id,
            addr,
            flags,
            master,
            _ping,
            _pong,
            _epoch,
            _link,
            slots @ ..,
        ] = &fields[..]
        else {
            return Err(format!("short line {line:?}"));
        };
        let port = addr
            .split(['@', ','])
            .next()
            .and_then(|host_port| host_port.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .ok_or_else(|| format!("no port in {addr:?}"))?;
        let flags: Vec<&str> = flags.split(',').collect();
        if let Some(flag) = flags
            .iter()
            .find(|f| ["fail?", "handshake", "noaddr"].contains(f))
        {
            return Err(format!("{port} is flagged {flag}"));
        }
        let mut ranges = Vec::new();
        for slot in slots.iter().filter(|s| !s.starts_with('[')) {
            let (first, last) = slot.split_once('-').unwrap_or((slot, slot));
            let parse = |s: &str| s.parse::<u16>().map_err(|e| format!("slot {slot:?}: {e}"));
            ranges.push((parse(first)?, parse(last)?));
        }
        lines.push(Line {
            id,
            port,
            flags,
            master,
            slots: ranges,
        });
    }

    let mut slots: Vec<(u16, u16, u16)> = lines
        .iter()
        .flat_map(|line| {
            line.slots
                .iter()
                .map(|(first, last)| (*first, *last, line.port))
        })
        .collect();
    slots.sort_unstable();
    let mut next = 0u16;
    for &(first, last, _) in &slots {
        if first != next {
            return Err(format!("slots {next}..{first} have no master"));
        }
        next = last + 1;
    }
    if next != SLOTS {
        return Err(format!("slots {next}.. have no master"));
    }
    let mut replicas = Vec::new();
    for line in lines.iter().filter(|line| line.flags.contains(&"slave")) {
        let master = lines
            .iter()
            .find(|m| m.id == line.master)
            .ok_or_else(|| format!("replica {} of unknown master {}", line.port, line.master))?;
        replicas.push((line.port, master.port));
    }
    replicas.sort_unstable();
    let mut failed: Vec<u16> = lines
        .iter()
        .filter(|line| line.flags.contains(&"fail"))
        .map(|line| line.port)
        .collect();
    failed.sort_unstable();
    Ok(Topology {
        slots,
        replicas,
        failed,
    })
}

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the key, or of its hash
/// tag (the bytes between the first `{` and the next `}`, if not empty), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as in Redis's `crc16.c`.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, byte| {
        (0..8).fold(crc ^ (u16::from(*byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    })
}

/// `redis-cli <args>`: whether it succeeded, and its output (stdout then stderr).
///
/// # Panics
///
/// If the binary is missing; the message says how to install it.
pub fn redis_cli<S: AsRef<OsStr>>(args: &[S]) -> (bool, String) {
    let bin = env::var_os(CLI_ENV)
        .filter(|bin| !bin.is_empty())
        .unwrap_or_else(|| OsString::from("redis-cli"));
    redis_cli_with(&bin, args)
}

/// Like [`redis_cli`], with an explicit binary (a path, or a name looked up in `PATH`).
pub fn redis_cli_with<S: AsRef<OsStr>>(bin: &OsStr, args: &[S]) -> (bool, String) {
    let output = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => panic!(
                "cannot run `{}`: binary not found. The cluster tests join their nodes with \
                 redis-cli: install it (`apt-get install redis-tools`, which redis-server \
                 depends on, on Debian/Ubuntu; `brew install redis` on macOS) or set {CLI_ENV} \
                 to the path of a redis-cli binary.",
                bin.to_string_lossy()
            ),
            _ => panic!("cannot run `{}`: {e}", bin.to_string_lossy()),
        });
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}
