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
    "--redis needs the `redis` feature: cargo run --release -p load --features redis";

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
        .filter(|(name, _)| name != "info")
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

/// A connection for `INFO commandstats`, kept open so that its own set-up is not counted.
#[cfg(feature = "redis")]
pub(crate) struct RedisProbe(redis::aio::MultiplexedConnection);

#[cfg(feature = "redis")]
impl RedisProbe {
    pub(crate) async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url)?;
        Ok(Self(client.get_multiplexed_async_connection().await?))
    }

    pub(crate) async fn command_stats(&mut self) -> Result<CommandStats, Error> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.0)
            .await?;
        Ok(parse_command_stats(&info))
    }
}

#[cfg(not(feature = "redis"))]
pub(crate) enum RedisProbe {}

#[cfg(not(feature = "redis"))]
impl RedisProbe {
    pub(crate) async fn connect(_url: &str) -> Result<Self, Error> {
        Err(NO_REDIS_FEATURE.into())
    }

    pub(crate) async fn command_stats(&mut self) -> Result<CommandStats, Error> {
        match *self {}
    }
}

pub(crate) async fn redis_probe(args: &TargetArgs) -> Result<Option<RedisProbe>, Error> {
    match &args.redis {
        Some(url) => Ok(Some(RedisProbe::connect(url).await?)),
        None => Ok(None),
    }
}

pub(crate) async fn command_stats(
    probe: &mut Option<RedisProbe>,
) -> Result<Option<CommandStats>, Error> {
    match probe {
        Some(probe) => Ok(Some(probe.command_stats().await?)),
        None => Ok(None),
    }
}
