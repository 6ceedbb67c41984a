//! `steady`: refreshes at a fixed rate over several token families, open loop, following
//! rotation as a client does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use server::harness::Client;
use tokio::task::JoinSet;

use crate::cli::{SteadyArgs, TargetArgs};
use crate::cluster::{Cluster, loadavg};
use crate::counters::{CounterDelta, scrape_all};
use crate::fire::{Fired, Sample, warm_up};
use crate::requests::{Call, logins};
use crate::stats::{Figures, Summary, Unit, millis, ms};
use crate::{Error, SETTLE};

/// A client's view of one token family: the refresh token it presents, and the successor
/// a response handed it.
pub(crate) struct Family {
    pub(crate) current: Arc<str>,
    pub(crate) adopted: Instant,
    pub(crate) successor: Option<Arc<str>>,
    pub(crate) followed: u64,
}

impl Family {
    pub(crate) fn new(token: Arc<str>) -> Self {
        Self {
            current: token,
            adopted: Instant::now(),
            successor: None,
            followed: 0,
        }
    }

    /// The token to present now: the successor, once the current token has been presented
    /// for `hold`.
    pub(crate) fn present(&mut self, hold: Duration) -> Arc<str> {
        let held = self.adopted.elapsed() >= hold;
        if let Some(next) = self.successor.take_if(|_| held) {
            self.current = next;
            self.adopted = Instant::now();
            self.followed += 1;
        }
        Arc::clone(&self.current)
    }

    /// A request that presented `presented` got a pair with refresh token `issued`. Answers
    /// to older tokens (replays of a pair already followed) are ignored.
    pub(crate) fn observe(&mut self, presented: &str, issued: &str) {
        if self.successor.is_none() && *self.current == *presented && presented != issued {
            self.successor = Some(issued.into());
        }
    }
}

pub(crate) fn lock(family: &Mutex<Family>) -> std::sync::MutexGuard<'_, Family> {
    family
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One steady run: what was answered, and how far the sender fell behind its schedule.
pub(crate) struct SteadyRun {
    pub(crate) fired: Fired,
    pub(crate) sent: usize,
    pub(crate) max_lag: Duration,
    pub(crate) followed: u64,
    pub(crate) counters: CounterDelta,
}

pub(crate) async fn steady_run(cluster: &Cluster, args: &SteadyArgs) -> Result<SteadyRun, Error> {
    let setup = Client::new();
    let families: Arc<[Mutex<Family>]> = logins(&setup, &cluster.bases[0], args.tokens)
        .await?
        .into_iter()
        .map(|token| Mutex::new(Family::new(token)))
        .collect();
    let before = scrape_all(&setup, &cluster.bases).await?;

    let client = Client::new();
    let hold = Duration::from_secs_f64(args.hold);
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = (args.rate as f64 * args.duration).round() as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = JoinSet::new();
    let mut max_lag = Duration::ZERO;
    for i in 0..total {
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        max_lag = max_lag.max(due.elapsed());
        let (family, instance) = (i % args.tokens, (i / args.tokens) % cluster.len());
        let token = lock(&families[family]).present(hold);
        let request = Call::Refresh(Arc::clone(&token)).request(&cluster.bases[instance])?;
        let (client, families) = (client.clone(), Arc::clone(&families));
        tasks.spawn(async move {
            let result = client.send(request).await;
            // From the scheduled time: a sender that falls behind does not hide latency.
            let latency = due.elapsed();
            let sample = Sample::new(instance, result, latency, true);
            if let Some(issued) = &sample.issued {
                lock(&families[family]).observe(&token, issued);
            }
            sample
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(sample) = tasks.join_next().await {
        samples.push(sample?);
    }
    let wall = start.elapsed();
    tokio::time::sleep(SETTLE).await;
    let after = scrape_all(&setup, &cluster.bases).await?;
    let followed = families.iter().map(|f| lock(f).followed).sum();
    Ok(SteadyRun {
        fired: Fired::new(cluster.len(), samples, wall),
        sent: total,
        max_lag,
        followed,
        counters: CounterDelta { before, after },
    })
}

impl SteadyRun {
    pub(crate) fn report(&self) -> String {
        format!(
            "  {}\n  sender: {} requests on schedule, max lag behind schedule {}; rotations \
             followed by the client: {}\n  counters: {}\n",
            self.fired.line(),
            self.sent,
            millis(self.max_lag),
            self.followed,
            self.counters.line()
        )
    }

    pub(crate) fn figures(&self) -> Figures {
        let mut figures = Figures::default();
        figures.add("sent", self.sent as f64, Unit::Count);
        figures.load("", &self.fired);
        figures.counters("", &self.counters.total());
        figures.add(
            "rotations followed by the client",
            self.followed as f64,
            Unit::Count,
        );
        figures.add("max sender lag", ms(self.max_lag), Unit::Millis);
        figures
    }
}

pub(crate) async fn steady_mode(
    target: &TargetArgs,
    runs: usize,
    args: &SteadyArgs,
) -> Result<Summary, Error> {
    let cluster = Cluster::start(target, 1, target.no_coalesce).await?;
    warm_up(&cluster).await?;
    println!(
        "steady: {} refreshes/s for {} s over {} token famil{} (open loop, latency from the \
         scheduled time), following rotation{}; ttl {} s",
        args.rate,
        args.duration,
        args.tokens,
        if args.tokens == 1 { "y" } else { "ies" },
        if args.hold > 0.0 {
            format!(" after holding each token {} s", args.hold)
        } else {
            " at once".into()
        },
        target.ttl
    );
    let mut summary = Summary::default();
    for run in 1..=runs {
        let result = steady_run(&cluster, args).await?;
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
