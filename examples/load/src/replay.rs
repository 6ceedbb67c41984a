//! `replay`: throughput of refreshes answered from a live replay, against `/healthz`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use server::harness::Client;

use crate::cli::{ReplayArgs, TargetArgs};
use crate::cluster::{Cluster, loadavg};
use crate::counters::{CounterDelta, scrape_all};
use crate::fire::{Fired, Shot, fire, list, storm_shots, until, warm_up};
use crate::requests::{Call, login, refresh};
use crate::stats::{Figures, Summary, Unit, format_value};
use crate::{Error, SETTLE};

/// A token with a live replay: refreshed once (rotating it) and presented again (replayed).
pub(crate) async fn live_replay(client: &Client, base: &str) -> Result<Arc<str>, Error> {
    let token = login(client, base).await?;
    let first = refresh(client, base, &token).await?;
    let again = refresh(client, base, &token).await?;
    if first.body != again.body {
        return Err("the second refresh was not a replay of the first (is the layer on?)".into());
    }
    Ok(token)
}

/// The requests of one kind in a replay run, and the CPU time this process spent on them.
pub(crate) struct Phase {
    pub(crate) fired: Fired,
    pub(crate) cpu: Option<Duration>,
}

impl Phase {
    pub(crate) fn merge(&mut self, other: Phase) {
        self.fired.merge(other.fired);
        self.cpu = self.cpu.zip(other.cpu).map(|(a, b)| a + b);
    }

    /// CPU time of this process (client, and the server when in process) per request.
    pub(crate) fn cpu_per_request(&self) -> Option<Duration> {
        let count = u32::try_from(self.fired.total().count()).ok()?.max(1);
        Some(self.cpu? / count)
    }
}

/// One replay run: `/healthz` and replayed refreshes, in the order A B B A so that a linear
/// drift in machine load favours neither.
pub(crate) struct ReplayRun {
    pub(crate) healthz: Phase,
    pub(crate) replay: Phase,
    pub(crate) counters: CounterDelta,
}

pub(crate) async fn replay_run(
    client: &Client,
    bases: &Arc<[String]>,
    args: &ReplayArgs,
) -> Result<ReplayRun, Error> {
    let token = live_replay(client, &bases[0]).await?;
    let before = scrape_all(client, bases).await?;
    let slot = Duration::from_secs_f64(args.duration / 2.0);
    let phase = |call: Call| async move {
        let shot = Shot { instance: 0, call };
        let cpu = process_cpu();
        let plan = until(Instant::now() + slot, shot);
        let fired = fire(client, bases, args.concurrency, plan, false).await?;
        let cpu = process_cpu()
            .zip(cpu)
            .map(|(after, before)| after.saturating_sub(before));
        Ok::<_, Error>(Phase { fired, cpu })
    };
    let mut healthz = phase(Call::Healthz).await?;
    let mut replay = phase(Call::Refresh(Arc::clone(&token))).await?;
    replay.merge(phase(Call::Refresh(token)).await?);
    healthz.merge(phase(Call::Healthz).await?);
    tokio::time::sleep(SETTLE).await;
    let after = scrape_all(client, bases).await?;
    Ok(ReplayRun {
        healthz,
        replay,
        counters: CounterDelta { before, after },
    })
}

impl ReplayRun {
    pub(crate) fn percent(&self) -> f64 {
        100.0 * self.replay.fired.throughput() / self.healthz.fired.throughput().max(1e-9)
    }

    /// `/healthz` CPU per request over replay CPU per request: the throughput ratio a
    /// CPU-bound machine would show, insensitive to CPU taken by other processes.
    pub(crate) fn cpu_percent(&self) -> Option<f64> {
        let (healthz, replay) = (
            self.healthz.cpu_per_request()?,
            self.replay.cpu_per_request()?,
        );
        Some(100.0 * healthz.as_secs_f64() / replay.as_secs_f64().max(1e-12))
    }

    pub(crate) fn report(&self) -> String {
        let cpu = |phase: &Phase| {
            phase
                .cpu_per_request()
                .map_or("?".into(), |d| format!("{:.1} µs", d.as_secs_f64() * 1e6))
        };
        format!(
            "  /healthz: {}
  replayed refresh: {}
  replayed refresh = {:.1} % of /healthz \
             throughput; CPU of this process per request: /healthz {}, replay {} (ratio {})\n  \
             counters: {}\n",
            self.healthz.fired.line(),
            self.replay.fired.line(),
            self.percent(),
            cpu(&self.healthz),
            cpu(&self.replay),
            self.cpu_percent()
                .map_or("?".into(), |p| format_value(p, Unit::Percent)),
            self.counters.line()
        )
    }

    pub(crate) fn figures(&self) -> Figures {
        let mut figures = Figures::default();
        figures.load("/healthz ", &self.healthz.fired);
        figures.load("replay ", &self.replay.fired);
        figures.add(
            "replay vs /healthz (throughput)",
            self.percent(),
            Unit::Percent,
        );
        if let Some(percent) = self.cpu_percent() {
            figures.add(
                "replay vs /healthz (CPU per request)",
                percent,
                Unit::Percent,
            );
        }
        figures.counters("", &self.counters.total());
        figures
    }
}

/// User and system CPU time of this process, from `/proc/self/stat` (Linux; 100 ticks/s).
pub(crate) fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

pub(crate) async fn replay_mode(
    target: &TargetArgs,
    runs: usize,
    args: &ReplayArgs,
) -> Result<Summary, Error> {
    let cluster = Cluster::start(target, 1, target.no_coalesce).await?;
    cluster.check_descriptors(args.concurrency);
    warm_up(&cluster).await?;
    if cluster.len() > 1 {
        println!("note: replay drives the first target only");
    }
    if target.targets.is_empty() && target.ttl < args.duration + 1.0 {
        println!(
            "note: --ttl {} s is shorter than a run: the replay expires mid-run",
            target.ttl
        );
    }
    println!(
        "replay: {} requests in flight over kept-alive HTTP/1.1 connections, {} s per kind in \
         the order /healthz, replay, replay, /healthz: GET /healthz (the ceiling) and POST \
         /auth/refresh of a token with a live replay",
        args.concurrency, args.duration
    );
    let bases: Arc<[String]> = Arc::from(&cluster.bases[..1]);
    // One client for both kinds, its connections opened before anything is measured.
    let client = Client::new();
    let warm = storm_shots(&[Call::Healthz], args.concurrency, 1);
    fire(&client, &bases, args.concurrency, list(warm), false).await?;

    let mut summary = Summary::default();
    for run in 1..=runs {
        let result = replay_run(&client, &bases, args).await?;
        println!(
            "run {run}/{runs} [{}; load average {}]",
            cluster.description,
            loadavg()
        );
        print!("{}", result.report());
        summary.runs.push(result.figures());
    }
    Ok(summary)
}
