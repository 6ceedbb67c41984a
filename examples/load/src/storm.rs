//! `storm` and `multi`: concurrent refreshes of one token per family, on one instance or
//! spread over several.

use std::fmt::Write as _;
use std::time::Duration;

use server::harness::Client;

use crate::cli::{StormShape, TargetArgs};
use crate::cluster::{Cluster, loadavg, plural};
use crate::counters::{
    CounterDelta, NodeStats, RedisProbe, command_stats, node_stats_delta, redis_probe, scrape_all,
};
use crate::fire::{Fired, fire, list, storm_shots, warm_up};
use crate::requests::{Call, logins};
use crate::stats::{Figures, Summary, Unit, format_value, median, millis, ms};
use crate::{Error, SETTLE};

/// One storm against a cluster, and its `/healthz` ceiling.
pub(crate) struct StormRun {
    pub(crate) fired: Fired,
    pub(crate) counters: CounterDelta,
    pub(crate) redis: Option<NodeStats>,
    pub(crate) ceiling: Fired,
}

pub(crate) async fn storm_run(
    cluster: &Cluster,
    shape: &StormShape,
    probe: &mut Option<RedisProbe>,
) -> Result<StormRun, Error> {
    let setup = Client::new();
    let tokens = logins(&setup, &cluster.bases[0], shape.tokens).await?;
    let calls: Vec<Call> = tokens.into_iter().map(Call::Refresh).collect();
    let before = scrape_all(&setup, &cluster.bases).await?;
    let redis_before = command_stats(probe).await?;

    let shots = storm_shots(&calls, shape.requests, cluster.len());
    let client = storm_client(cluster, shape).await?;
    let fired = fire(
        &client,
        &cluster.bases,
        shape.concurrency(),
        list(shots),
        true,
    )
    .await?;
    // Closes the storm's connections before the ceiling opens its own.
    drop(client);
    tokio::time::sleep(SETTLE).await;

    let after = scrape_all(&setup, &cluster.bases).await?;
    let redis_after = command_stats(probe).await?;
    let redis = redis_before
        .zip(redis_after)
        .map(|(before, after)| node_stats_delta(&before, &after));

    let healthz = storm_shots(&[Call::Healthz], shape.total(), cluster.len());
    let client = storm_client(cluster, shape).await?;
    let ceiling = fire(
        &client,
        &cluster.bases,
        shape.concurrency(),
        list(healthz),
        false,
    )
    .await?;
    Ok(StormRun {
        fired,
        counters: CounterDelta { before, after },
        redis,
        ceiling,
    })
}

/// A fresh client for one storm: every request opens its own connection, as the requests of
/// many clients would; with `--warm`, those connections are opened (by a `/healthz` storm of
/// the same shape) and kept alive before the storm.
pub(crate) async fn storm_client(cluster: &Cluster, shape: &StormShape) -> Result<Client, Error> {
    let client = Client::new();
    if shape.warm {
        let shots = storm_shots(&[Call::Healthz], shape.total(), cluster.len());
        fire(
            &client,
            &cluster.bases,
            shape.concurrency(),
            list(shots),
            false,
        )
        .await?;
    }
    Ok(client)
}

impl StormRun {
    pub(crate) fn report(&self, cluster: &Cluster, shape: &StormShape) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "  refresh storm: {}", self.fired.line());
        let _ = writeln!(
            text,
            "  distinct refresh tokens handed out: {} (tokens stormed: {})",
            self.fired.issued.len(),
            shape.tokens
        );
        let _ = writeln!(text, "  counters: {}", self.counters.line());
        let _ = writeln!(
            text,
            "  /healthz storm of the same shape (ceiling): {}; refresh storm = {:.1} % of it",
            self.ceiling.line(),
            self.percent_of_ceiling()
        );
        if cluster.len() > 1 {
            for (i, base) in cluster.bases.iter().enumerate() {
                let tally = &self.fired.per_instance[i];
                let delta = self.counters.instance(i);
                let _ = writeln!(
                    text,
                    "  instance {i} ({base}): {} requests, {}; rotations +{}, reuse +{}; layer: {}",
                    tally.count(),
                    tally.latency_line(),
                    delta.rotations,
                    delta.reuse_detected,
                    delta.outcomes_line()
                );
            }
            match self.waiters(shape) {
                Ok(w) => {
                    let _ = writeln!(
                        text,
                        "  leader's instance {}: p99 {}; other instances: p99 {} (median); added \
                         p99 of a waiter on another instance: {}",
                        w.leader,
                        millis(w.leader_p99),
                        millis(w.others_p99),
                        format_value(w.added_ms(), Unit::Millis)
                    );
                }
                Err(why) => {
                    let _ = writeln!(text, "  waiter latency by instance: not computed: {why}");
                }
            }
        }
        if let Some(redis) = &self.redis {
            let total = redis_total(redis);
            for (node, stats) in redis {
                let per_command: Vec<String> = stats
                    .iter()
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect();
                let _ = writeln!(
                    text,
                    "  redis {node} during the storm (INFO commandstats, all clients): {}",
                    if per_command.is_empty() {
                        "nothing".to_owned()
                    } else {
                        per_command.join(", ")
                    }
                );
            }
            let _ = writeln!(
                text,
                "  redis commands during the storm, every node: {}, {:.1} per instance",
                total,
                total as f64 / cluster.len() as f64
            );
        }
        text
    }

    pub(crate) fn percent_of_ceiling(&self) -> f64 {
        100.0 * self.fired.throughput() / self.ceiling.throughput().max(1e-9)
    }

    /// The latency of requests on the leader's instance against the others'.
    pub(crate) fn waiters(&self, shape: &StormShape) -> Result<Waiters, String> {
        if shape.tokens != 1 {
            return Err("needs --tokens 1 (the leader's instance differs per token)".into());
        }
        if self.counters.total().reuse_detected > 0 {
            return Err("reuse was detected: the other instances did not wait for a leader".into());
        }
        let rotating: Vec<usize> = (0..self.fired.per_instance.len())
            .filter(|&i| self.counters.instance(i).rotations > 0)
            .collect();
        let &[leader] = rotating.as_slice() else {
            return Err(format!(
                "{} instances rotated the token, expected exactly one",
                rotating.len()
            ));
        };
        let others: Vec<f64> = (0..self.fired.per_instance.len())
            .filter(|&i| i != leader)
            .map(|i| ms(self.fired.per_instance[i].quantile(0.99)))
            .collect();
        Ok(Waiters {
            leader,
            leader_p99: self.fired.per_instance[leader].quantile(0.99),
            others_p99: Duration::from_secs_f64(median(others) / 1e3),
        })
    }

    pub(crate) fn figures(
        &self,
        figures: &mut Figures,
        prefix: &str,
        shape: &StormShape,
        instances: usize,
    ) {
        figures.load(prefix, &self.fired);
        figures.counters(prefix, &self.counters.total());
        figures.add(
            format!("{prefix}distinct refresh tokens"),
            self.fired.issued.len() as f64,
            Unit::Count,
        );
        figures.add(
            format!("{prefix}/healthz storm"),
            self.ceiling.throughput(),
            Unit::PerSec,
        );
        figures.add(
            format!("{prefix}storm vs /healthz storm"),
            self.percent_of_ceiling(),
            Unit::Percent,
        );
        if let Some(w) = self.waiters(shape).ok().filter(|_| instances > 1) {
            figures.add(
                format!("{prefix}leader's instance p99"),
                ms(w.leader_p99),
                Unit::Millis,
            );
            figures.add(
                format!("{prefix}other instances p99"),
                ms(w.others_p99),
                Unit::Millis,
            );
            figures.add(
                format!("{prefix}added waiter p99 (other instance)"),
                w.added_ms(),
                Unit::Millis,
            );
        }
        if let Some(redis) = &self.redis {
            let total = redis_total(redis);
            let mut by_name = std::collections::BTreeMap::<&str, u64>::new();
            for (node, stats) in redis {
                let commands: u64 = commands_of(stats).map(|(_, n)| n).sum();
                figures.add(
                    format!("{prefix}redis commands on {node}"),
                    commands as f64,
                    Unit::Count,
                );
                for (name, n) in stats {
                    *by_name.entry(name).or_default() += n;
                }
            }
            for (name, n) in by_name {
                figures.add(format!("{prefix}redis {name}"), n as f64, Unit::Count);
            }
            figures.add(format!("{prefix}redis commands"), total as f64, Unit::Count);
            figures.add(
                format!("{prefix}redis commands per instance"),
                total as f64 / instances as f64,
                Unit::Count,
            );
        }
    }
}

/// The commands of one node's counts (the cluster-bus messages are not commands).
fn commands_of(stats: &crate::counters::CommandStats) -> impl Iterator<Item = (&str, u64)> {
    stats
        .iter()
        .filter(|(name, _)| !name.starts_with("bus "))
        .map(|(name, n)| (name.as_str(), *n))
}

/// Every node's commands, summed.
fn redis_total(redis: &NodeStats) -> u64 {
    redis
        .iter()
        .map(|(_, stats)| commands_of(stats).map(|(_, n)| n).sum::<u64>())
        .sum()
}

/// Storm latency on the leader's instance against the other instances.
pub(crate) struct Waiters {
    pub(crate) leader: usize,
    pub(crate) leader_p99: Duration,
    /// Median of the other instances' p99.
    pub(crate) others_p99: Duration,
}

impl Waiters {
    pub(crate) fn added_ms(&self) -> f64 {
        ms(self.others_p99) - ms(self.leader_p99)
    }
}

pub(crate) const WITHOUT_LAYER: &str = "without layer";
pub(crate) const WITH_LAYER: &str = "with layer";

/// `storm` (one instance unless several `--target`s, optionally compared without and with
/// the layer) and `multi` (`instances` instances).
pub(crate) async fn storm_mode(
    target: &TargetArgs,
    runs: usize,
    shape: &StormShape,
    instances: usize,
    compare: bool,
) -> Result<Summary, Error> {
    if compare && !target.targets.is_empty() {
        return Err("--compare and --svg start their own servers: drop --target".into());
    }
    let variants: Vec<(&str, bool)> = if compare {
        vec![(WITHOUT_LAYER, true), (WITH_LAYER, false)]
    } else {
        vec![("", target.no_coalesce)]
    };
    let mut clusters = Vec::with_capacity(variants.len());
    for (label, no_coalesce) in variants {
        let cluster = Cluster::start(target, instances, no_coalesce).await?;
        cluster.check_descriptors(shape.concurrency());
        warm_up(&cluster).await?;
        clusters.push((label, cluster));
    }
    println!(
        "storm: {} concurrent refreshes of each of {} token{} ({} requests, {} in flight over \
         HTTP/1.1, one {} connection each), spread over {} instance{}",
        shape.requests,
        shape.tokens,
        plural(shape.tokens),
        shape.total(),
        shape.concurrency(),
        if shape.warm { "kept-alive" } else { "new" },
        clusters[0].1.len(),
        plural(clusters[0].1.len()),
    );
    if clusters[0].1.len() > 1 && !target.uses_redis() && target.targets.is_empty() {
        println!(
            "note: several instances without --redis each refresh the token: expect reuse detection"
        );
    }
    let mut probe = redis_probe(target).await?;
    let mut summary = Summary::default();
    for run in 1..=runs {
        let mut figures = Figures::default();
        for (label, cluster) in &clusters {
            let prefix = if label.is_empty() {
                String::new()
            } else {
                format!("{label}: ")
            };
            let result = storm_run(cluster, shape, &mut probe).await?;
            println!(
                "run {run}/{runs}{}{} [{}; load average {}]",
                if label.is_empty() { "" } else { ", " },
                label,
                cluster.description,
                loadavg()
            );
            print!("{}", result.report(cluster, shape));
            result.figures(&mut figures, &prefix, shape, cluster.len());
        }
        summary.runs.push(figures);
    }
    Ok(summary)
}
