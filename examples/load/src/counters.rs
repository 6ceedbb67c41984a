//! Counters before and after a load: the servers' `/metrics`, and Redis's
//! `INFO commandstats`.

use std::collections::BTreeMap;

use server::harness::{Client, Counters};

use crate::Error;
use crate::cli::TargetArgs;

/// Every instance's counters.
pub(crate) async fn scrape_all(client: &Client, bases: &[String]) -> Result<Vec<Counters>, Error> {
    let mut all = Vec::with_capacity(bases.len());
    for base in bases {
        all.push(client.counters(base).await?);
    }
    Ok(all)
}

/// Counters of every instance before and after a load.
pub(crate) struct CounterDelta {
    pub(crate) before: Vec<Counters>,
    pub(crate) after: Vec<Counters>,
}

impl CounterDelta {
    pub(crate) fn instance(&self, i: usize) -> Counters {
        self.after[i].since(&self.before[i])
    }

    pub(crate) fn total(&self) -> Counters {
        Counters::sum(&self.after).since(&Counters::sum(&self.before))
    }

    pub(crate) fn line(&self) -> String {
        let (before, after) = (Counters::sum(&self.before), Counters::sum(&self.after));
        let delta = after.since(&before);
        format!(
            "refresh_rotations_total {} -> {} (+{}), refresh_reuse_detected_total {} -> {} (+{}); \
             layer: {}",
            before.rotations,
            after.rotations,
            delta.rotations,
            before.reuse_detected,
            after.reuse_detected,
            delta.reuse_detected,
            delta.outcomes_line()
        )
    }
}

pub(crate) const NO_REDIS_FEATURE: &str =
    "the --redis flags need the `redis` feature: cargo run --release -p load --features redis";

/// Calls per Redis command (`INFO commandstats`), `info` itself left out.
pub(crate) type CommandStats = BTreeMap<String, u64>;

#[cfg(feature = "redis")]
pub(crate) fn parse_command_stats(info: &str) -> CommandStats {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        // The probe's own commands.
        .filter(|(name, _)| name != "info" && name != "cluster|info")
        .collect()
}

pub(crate) fn command_stats_delta(before: &CommandStats, after: &CommandStats) -> CommandStats {
    after
        .iter()
        .map(|(name, calls)| {
            let old = before.get(name).copied().unwrap_or(0);
            (name.clone(), calls.saturating_sub(old))
        })
        .filter(|(_, calls)| *calls > 0)
        .collect()
}

/// Per Redis node (`host:port (role)`), its command counts.
pub(crate) type NodeStats = Vec<(String, CommandStats)>;

/// The differences of two readings of the same nodes.
pub(crate) fn node_stats_delta(before: &NodeStats, after: &NodeStats) -> NodeStats {
    after
        .iter()
        .map(|(node, after)| {
            let before = before
                .iter()
                .find(|(other, _)| other == node)
                .map(|(_, stats)| stats.clone())
                .unwrap_or_default();
            (node.clone(), command_stats_delta(&before, after))
        })
        .collect()
}

/// Connections for `INFO commandstats` to every node of the Redis the instances use, kept
/// open so that their own set-up is not counted. In a cluster it also reads the messages
/// each node sent over the cluster bus (`CLUSTER INFO`): `bus publish` (classic messages,
/// forwarded to every node) and `bus publishshard` (sharded ones, to the shard's replicas).
#[cfg(feature = "redis")]
pub(crate) struct RedisProbe {
    nodes: Vec<(String, redis::aio::MultiplexedConnection)>,
    cluster: bool,
}

#[cfg(feature = "redis")]
impl RedisProbe {
    pub(crate) async fn connect(args: &TargetArgs) -> Result<Option<Self>, Error> {
        let (addresses, cluster) = if let Some(url) = &args.redis {
            (vec![(address_of(url)?, "standalone".to_owned())], false)
        } else if let Some(seed) = args.redis_cluster.first() {
            (cluster_nodes(seed).await?, true)
        } else if let (Some(sentinel), Some(master)) =
            (args.redis_sentinel.first(), &args.redis_master)
        {
            (sentinel_nodes(sentinel, master).await?, false)
        } else {
            return Ok(None);
        };
        let mut nodes = Vec::with_capacity(addresses.len());
        for (address, role) in addresses {
            let client = redis::Client::open(format!("redis://{address}/"))?;
            let connection = client.get_multiplexed_async_connection().await?;
            nodes.push((format!("{address} ({role})"), connection));
        }
        Ok(Some(Self { nodes, cluster }))
    }

    pub(crate) async fn command_stats(&mut self) -> Result<NodeStats, Error> {
        let mut all = Vec::with_capacity(self.nodes.len());
        for (node, connection) in &mut self.nodes {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(connection)
                .await?;
            let mut stats = parse_command_stats(&info);
            if self.cluster {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(connection)
                    .await?;
                for line in info.lines() {
                    let Some((name, value)) = line.trim_end().split_once(':') else {
                        continue;
                    };
                    let bus = match name {
                        "cluster_stats_messages_publish_sent" => "bus publish",
                        "cluster_stats_messages_publishshard_sent" => "bus publishshard",
                        _ => continue,
                    };
                    stats.insert(bus.to_owned(), value.parse().unwrap_or(0));
                }
            }
            all.push((node.clone(), stats));
        }
        Ok(all)
    }
}

/// `host:port` of a `redis://` URL.
#[cfg(feature = "redis")]
fn address_of(url: &str) -> Result<String, Error> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Ok(format!("{host}:{port}")),
        other => Err(format!("not a TCP address: {other:?}").into()),
    }
}

/// Every node of the cluster `seed` belongs to, with its role (`CLUSTER NODES`).
#[cfg(feature = "redis")]
async fn cluster_nodes(seed: &str) -> Result<Vec<(String, String)>, Error> {
    let mut connection = redis::Client::open(seed)?
        .get_multiplexed_async_connection()
        .await?;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut connection)
        .await?;
    let mut nodes: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?.split('@').next()?.to_owned();
            let flags = fields.next()?;
            let role = if flags.contains("master") {
                "master"
            } else {
                "replica"
            };
            Some((address, role.to_owned()))
        })
        .collect();
    nodes.sort();
    Ok(nodes)
}

/// The master the sentinel names `master`, and its replicas.
#[cfg(feature = "redis")]
async fn sentinel_nodes(sentinel: &str, master: &str) -> Result<Vec<(String, String)>, Error> {
    let mut connection = redis::Client::open(sentinel)?
        .get_multiplexed_async_connection()
        .await?;
    let (host, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master)
        .query_async(&mut connection)
        .await?;
    let mut nodes = vec![(format!("{host}:{port}"), "master".to_owned())];
    let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
        .arg("replicas")
        .arg(master)
        .query_async(&mut connection)
        .await?;
    for replica in replicas {
        let field = |name: &str| {
            replica
                .chunks(2)
                .find(|pair| pair[0] == name)
                .and_then(|pair| pair.get(1).cloned())
        };
        if let (Some(ip), Some(port)) = (field("ip"), field("port")) {
            nodes.push((format!("{ip}:{port}"), "replica".to_owned()));
        }
    }
    Ok(nodes)
}

#[cfg(not(feature = "redis"))]
pub(crate) enum RedisProbe {}

#[cfg(not(feature = "redis"))]
impl RedisProbe {
    pub(crate) async fn connect(args: &TargetArgs) -> Result<Option<Self>, Error> {
        if args.uses_redis() {
            return Err(NO_REDIS_FEATURE.into());
        }
        Ok(None)
    }

    pub(crate) async fn command_stats(&mut self) -> Result<NodeStats, Error> {
        match *self {}
    }
}

pub(crate) async fn redis_probe(args: &TargetArgs) -> Result<Option<RedisProbe>, Error> {
    RedisProbe::connect(args).await
}

pub(crate) async fn command_stats(
    probe: &mut Option<RedisProbe>,
) -> Result<Option<NodeStats>, Error> {
    match probe {
        Some(probe) => Ok(Some(probe.command_stats().await?)),
        None => Ok(None),
    }
}
