//! Firing requests at the servers and recording the answers.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use server::harness::{self, Client, Reply};
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::requests::{Call, login};
use crate::stats::millis;
use crate::{Error, SETTLE};

/// One request: which instance, what call.
#[derive(Debug, Clone)]
pub(crate) struct Shot {
    pub(crate) instance: usize,
    pub(crate) call: Call,
}

/// The `i`-th request of a load, or `None` when the load is over.
pub(crate) type Plan = Arc<dyn Fn(usize) -> Option<Shot> + Send + Sync>;

/// A fixed list of requests.
pub(crate) fn list(shots: Vec<Shot>) -> Plan {
    Arc::new(move |i| shots.get(i).cloned())
}

/// The same request over and over until `deadline`.
pub(crate) fn until(deadline: Instant, shot: Shot) -> Plan {
    Arc::new(move |_| (Instant::now() < deadline).then(|| shot.clone()))
}

/// `per_call` requests of each call, the calls interleaved, each call's requests spread
/// round-robin over `instances`.
pub(crate) fn storm_shots(calls: &[Call], per_call: usize, instances: usize) -> Vec<Shot> {
    (0..per_call * calls.len())
        .map(|i| Shot {
            instance: (i / calls.len()) % instances,
            call: calls[i % calls.len()].clone(),
        })
        .collect()
}

/// How one request was answered.
pub(crate) struct Sample {
    pub(crate) instance: usize,
    pub(crate) status: String,
    pub(crate) latency: Duration,
    /// The refresh token of a `200` pair, when the load keeps them.
    pub(crate) issued: Option<String>,
}

impl Sample {
    pub(crate) fn new(
        instance: usize,
        result: Result<Reply, Error>,
        latency: Duration,
        keep_issued: bool,
    ) -> Self {
        let (status, issued) = match result {
            Ok(reply) => (
                reply.label(),
                keep_issued.then(|| reply.refresh_token()).flatten(),
            ),
            Err(e) => (
                format!("transport error: {}", harness::error_chain(&*e)),
                None,
            ),
        };
        Self {
            instance,
            status,
            latency,
            issued,
        }
    }
}

/// Latencies (µs, hdrhistogram) and answers by status of a set of requests.
#[derive(Clone)]
pub(crate) struct Tally {
    pub(crate) latency: Histogram<u64>,
    pub(crate) statuses: BTreeMap<String, u64>,
}

impl Tally {
    pub(crate) fn new() -> Self {
        Self {
            // 1 µs to 10 min, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
        }
    }

    pub(crate) fn record(&mut self, status: &str, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
        *self.statuses.entry(status.to_owned()).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: &Tally) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
        for (status, n) in &other.statuses {
            *self.statuses.entry(status.clone()).or_default() += n;
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.latency.len()
    }

    pub(crate) fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    pub(crate) fn max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    pub(crate) fn latency_line(&self) -> String {
        format!(
            "p50 {}, p90 {}, p99 {}, max {}",
            millis(self.quantile(0.50)),
            millis(self.quantile(0.90)),
            millis(self.quantile(0.99)),
            millis(self.max())
        )
    }

    pub(crate) fn statuses_line(&self) -> String {
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status} ×{n}"))
            .collect();
        parts.join(", ")
    }
}

/// The answers of a load, by instance.
pub(crate) struct Fired {
    pub(crate) per_instance: Vec<Tally>,
    /// Distinct refresh tokens handed out in `200` answers (when kept).
    pub(crate) issued: HashSet<String>,
    pub(crate) wall: Duration,
}

impl Fired {
    pub(crate) fn new(instances: usize, samples: Vec<Sample>, wall: Duration) -> Self {
        let mut per_instance = vec![Tally::new(); instances];
        let mut issued = HashSet::new();
        for sample in samples {
            per_instance[sample.instance].record(&sample.status, sample.latency);
            issued.extend(sample.issued);
        }
        Self {
            per_instance,
            issued,
            wall,
        }
    }

    pub(crate) fn merge(&mut self, other: Fired) {
        for (tally, more) in self.per_instance.iter_mut().zip(&other.per_instance) {
            tally.merge(more);
        }
        self.issued.extend(other.issued);
        self.wall += other.wall;
    }

    pub(crate) fn total(&self) -> Tally {
        let mut total = Tally::new();
        for tally in &self.per_instance {
            total.merge(tally);
        }
        total
    }

    pub(crate) fn throughput(&self) -> f64 {
        self.total().count() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// "1000 requests in 212.3 ms: 4710 req/s; p50 ...; 200 ×1000".
    pub(crate) fn line(&self) -> String {
        let total = self.total();
        format!(
            "{} requests in {}: {:.0} req/s; {}; {}",
            total.count(),
            millis(self.wall),
            self.throughput(),
            total.latency_line(),
            total.statuses_line()
        )
    }
}

/// Runs `plan` with `concurrency` requests in flight (closed loop: each worker sends its
/// next request when the previous one is answered). Latency is from send to full body.
pub(crate) async fn fire(
    client: &Client,
    bases: &Arc<[String]>,
    concurrency: usize,
    plan: Plan,
    keep_issued: bool,
) -> Result<Fired, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (client, bases, plan, next) = (
            client.clone(),
            Arc::clone(bases),
            Arc::clone(&plan),
            Arc::clone(&next),
        );
        workers.spawn(async move {
            let mut samples = Vec::new();
            while let Some(shot) = plan(next.fetch_add(1, Ordering::Relaxed)) {
                let request = shot.call.request(&bases[shot.instance])?;
                let sent = Instant::now();
                let result = client.send(request).await;
                samples.push(Sample::new(
                    shot.instance,
                    result,
                    sent.elapsed(),
                    keep_issued,
                ));
            }
            Ok::<_, Error>(samples)
        });
    }
    let mut samples = Vec::new();
    while let Some(worker) = workers.join_next().await {
        samples.extend(worker??);
    }
    Ok(Fired::new(bases.len(), samples, started.elapsed()))
}

/// A small storm on a token of its own before anything is measured, so that connections
/// (Redis included), Lua scripts and SQLite pages are warm.
pub(crate) async fn warm_up(cluster: &Cluster) -> Result<(), Error> {
    let client = Client::new();
    let token = login(&client, &cluster.bases[0]).await?;
    let calls = [Call::Refresh(token), Call::Healthz];
    let shots = storm_shots(&calls, 4 * cluster.len(), cluster.len());
    fire(&client, &cluster.bases, shots.len(), list(shots), false).await?;
    tokio::time::sleep(SETTLE).await;
    Ok(())
}
