//! Bounded memory under a flood of distinct valid refresh tokens (issue 7, item 4).
//!
//! ```text
//! cargo run --release -p bench-tools --bin flood                       # 1,000,000 tokens
//! cargo run --release -p bench-tools --bin flood -- --tokens 200000 --concurrency 512 --no-drain
//! ```
//!
//! Sends `--tokens` distinct, valid HS256 refresh tokens (`typ: refresh+jwt`, one subject and
//! `jti` each, signed like the tests' `support::tokens` does) through the HTTP front
//! (`RefreshCoalesceLayer::http` with a `JwtVerifier`) at the **default limits**
//! (`max_entries` 100,000, TTL 30 s, `wait_timeout` 10 s, hard cap 30 s), in process, as fast
//! as one current-thread runtime can, `--concurrency` requests in flight (one task each). Each request is an
//! RFC 6749 form (`grant_type=refresh_token&refresh_token=…`); the inner service answers
//! every call at once with `200` and a small JSON pair naming the call, so every leader leaves
//! a replay of its own response in the table.
//!
//! Tokens are minted on a second thread, in batches through a bounded channel, so minting
//! overlaps the flood and at most a few batches are alive at once.
//!
//! `handle.stats().entries` is sampled after every response and every 1,000 tokens sent,
//! and must never exceed `max_entries`. Every 100,000 tokens a line reports the entries, the
//! overloaded count, the statuses seen and the growth of the resident set (`/proc/self/statm`)
//! since the flood started. Unless `--no-drain`, the tool then waits for the TTL and one sweep
//! and reports the table again (it must be empty). It exits with status 1 if entries ever
//! exceeded `max_entries`, if the RSS growth (sampled, or the peak `VmHWM`) exceeded
//! 64 MiB, or if any response was neither `200` nor `503 temporarily_unavailable`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    process::ExitCode,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bench_tools::rss;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::task::JoinSet;
use tower::{Layer as _, ServiceExt as _, service_fn};
use tower_refresh_coalesce::{HttpExtract, JwtVerifier, RefreshCoalesceLayer};

/// The HS256 secret, as in the tests' `support::tokens`.
const SECRET: &[u8] = b"test signing secret, 32 bytes ok";
const REFRESH_TYP: &str = "refresh+jwt";
/// The layer's default `max_entries`, asserted on every sample.
const MAX_ENTRIES: u64 = 100_000;
/// The layer's default TTL, for the drain.
const TTL: Duration = Duration::from_secs(30);
const RSS_BUDGET: u64 = 64 * 1024 * 1024;
const REPORT_EVERY: u64 = 100_000;
const BATCH: usize = 2_048;

struct Options {
    tokens: u64,
    concurrency: usize,
    drain: bool,
    /// Inner responses without headers: how much of an entry is the response's `HeaderMap`.
    bare: bool,
    /// One subject for every token (one group of `max_entries` members) instead of one each.
    one_subject: bool,
}

fn options() -> Result<Options, String> {
    let usage = "usage: flood [--tokens N] [--concurrency N] [--no-drain] [--bare] [--one-subject]";
    let mut options = Options {
        tokens: 1_000_000,
        concurrency: 512,
        drain: true,
        bare: false,
        one_subject: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| {
            args.next()
                .and_then(|n| n.replace('_', "").parse::<u64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number; {usage}"))
        };
        match arg.as_str() {
            "--tokens" => options.tokens = number("--tokens")?,
            "--concurrency" => options.concurrency = number("--concurrency")? as usize,
            "--no-drain" => options.drain = false,
            "--bare" => options.bare = true,
            "--one-subject" => options.one_subject = true,
            _ => return Err(usage.to_owned()),
        }
    }
    Ok(options)
}

/// Mints tokens `from..to` in batches on this thread, sending each batch as it is ready.
fn mint(from: u64, to: u64, one_subject: bool, tx: tokio::sync::mpsc::Sender<Vec<String>>) {
    let key = EncodingKey::from_secret(SECRET);
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some(REFRESH_TYP.to_owned());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let mut batch = Vec::with_capacity(BATCH);
    for i in from..to {
        let claims = json!({
            "sub": if one_subject { "user".to_owned() } else { format!("user-{i}") },
            "jti": format!("jti-{i}"),
            "iat": now,
            "exp": now + 3600,
        });
        batch.push(jsonwebtoken::encode(&header, &claims, &key).expect("encode"));
        if batch.len() == BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if tx.blocking_send(full).is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn form(token: &str) -> Request<Full<Bytes>> {
    Request::post("/oauth/token")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!(
            "grant_type=refresh_token&refresh_token={token}"
        ))))
        .expect("request")
}

/// The worst figures seen, for the verdict.
#[derive(Default)]
struct Worst {
    entries: u64,
    rss_growth: u64,
}

/// The longest the runtime's thread was late for a 10 ms tick, in microseconds: how long
/// the table kept the event loop (every other request) waiting.
static STALL_US: AtomicU64 = AtomicU64::new(0);

async fn watch_stalls() {
    let tick = Duration::from_millis(10);
    loop {
        let due = Instant::now() + tick;
        tokio::time::sleep(tick).await;
        let late = Instant::now().saturating_duration_since(due).as_micros() as u64;
        STALL_US.fetch_max(late, Ordering::Relaxed);
    }
}

fn take_stall() -> Duration {
    Duration::from_micros(STALL_US.swap(0, Ordering::Relaxed))
}

async fn flood(options: &Options) -> bool {
    let page = rss::page_size();
    let watcher = tokio::spawn(watch_stalls());
    let verifier = JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .build()
        .expect("verifier");
    // The default limits: only the extraction is configured.
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(verifier)).build();
    let handle = layer.handle();
    let calls = std::sync::Arc::new(AtomicU64::new(0));
    let bare = options.bare;
    let inner = service_fn({
        let calls = calls.clone();
        move |_request: Request<_>| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            let body = format!(
                r#"{{"access_token":"access-{n}","refresh_token":"refresh-{n}","token_type":"Bearer","expires_in":900}}"#
            );
            async move {
                let mut response = Response::builder();
                if !bare {
                    response = response
                        .header(header::CONTENT_TYPE, "application/json")
                        .header(header::CACHE_CONTROL, "no-store");
                }
                let response = response.body(Full::new(Bytes::from(body)));
                Ok::<_, Infallible>(response.expect("response"))
            }
        }
    });
    let service = layer.layer(inner);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<String>>(4);
    let tokens = options.tokens;
    let one_subject = options.one_subject;
    let minter = std::thread::spawn(move || mint(0, tokens, one_subject, tx));
    // The baseline: runtime, layer, minting thread and its first batch in place.
    let mut batch = rx.recv().await.expect("a first batch").into_iter();
    let (pages, _, hwm_before) = rss::resident();
    let before = pages * page;
    println!(
        "flood: {} distinct valid tokens ({}), {} in flight, default limits (max_entries \
         {MAX_ENTRIES}, ttl {TTL:?}), responses {}; rss at start {:.1} MiB",
        options.tokens,
        if options.one_subject {
            "one subject"
        } else {
            "one subject each"
        },
        options.concurrency,
        if options.bare {
            "without headers"
        } else {
            "with 2 headers"
        },
        mib(before)
    );

    let start = Instant::now();
    let mut worst = Worst::default();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected = 0u64;
    let mut sent = 0u64;
    let mut answered = 0u64;
    // One task per request, as a server runs one per connection; `join_next` takes part in
    // Tokio's cooperative budget, so the flight tasks and the sweeper get their turns.
    let mut in_flight = JoinSet::new();
    let sample = |worst: &mut Worst| {
        let entries = handle.stats().entries;
        worst.entries = worst.entries.max(entries);
        if entries > MAX_ENTRIES {
            eprintln!("FAIL: {entries} entries > max_entries {MAX_ENTRIES}");
        }
    };
    let report = |sent: u64, worst: &mut Worst, statuses: &BTreeMap<String, u64>| {
        let stats = handle.stats();
        let (pages, _, _) = rss::resident();
        let growth = (pages * page).saturating_sub(before);
        worst.rss_growth = worst.rss_growth.max(growth);
        let elapsed = start.elapsed();
        println!(
            "{sent:>9} tokens  {:>6.1} s  entries {:>6} (max {:>6})  leaders {:>7}  \
             overloaded {:>7}  in flight {:>3}  rss +{:>6.1} MiB  {statuses:?}",
            elapsed.as_secs_f64(),
            stats.entries,
            worst.entries,
            stats.leader,
            stats.overloaded,
            stats.in_flight,
            mib(growth),
        );
    };
    loop {
        // Keep `concurrency` requests in flight while tokens remain.
        while in_flight.len() < options.concurrency {
            let token = match batch.next() {
                Some(token) => token,
                None => match rx.recv().await {
                    Some(next) => {
                        batch = next.into_iter();
                        continue;
                    }
                    None => break,
                },
            };
            let service = service.clone();
            in_flight.spawn(async move {
                let response = service.oneshot(form(&token)).await.expect("infallible");
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                (status, body)
            });
            sent += 1;
            if sent.is_multiple_of(1_000) {
                sample(&mut worst);
            }
        }
        let Some(joined) = in_flight.join_next().await else {
            break;
        };
        let (status, body) = joined.expect("a request task");
        answered += 1;
        sample(&mut worst);
        let label = if status == StatusCode::OK {
            "200".to_owned()
        } else {
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error_description"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if status != StatusCode::SERVICE_UNAVAILABLE {
                unexpected += 1;
            }
            format!("{} {error}", status.as_u16())
        };
        *statuses.entry(label).or_default() += 1;
        if answered.is_multiple_of(REPORT_EVERY) {
            report(answered, &mut worst, &statuses);
        }
    }
    if !answered.is_multiple_of(REPORT_EVERY) {
        report(answered, &mut worst, &statuses);
    }
    let total = start.elapsed();
    minter.join().expect("minting thread");
    let stats = handle.stats();
    let (_, _, hwm) = rss::resident();
    let peak_growth = hwm.saturating_sub(hwm_before.max(before));
    println!(
        "flood done: {answered} tokens in {:.1} s ({:.0} tokens/s); inner calls {}, leaders {}, \
         overloaded {}, replayed {}, rejected {}; entries max {} (limit {MAX_ENTRIES}); \
         rss growth max sampled {:.1} MiB, peak (VmHWM) {:.1} MiB",
        total.as_secs_f64(),
        answered as f64 / total.as_secs_f64(),
        calls.load(Ordering::Relaxed),
        stats.leader,
        stats.overloaded,
        stats.replayed,
        stats.rejected,
        worst.entries,
        mib(worst.rss_growth),
        mib(peak_growth),
    );

    println!(
        "longest event-loop stall during the flood: {:?}",
        take_stall()
    );

    let mut ok = true;
    if options.drain {
        // Every replay expires within the TTL of the last response; the sweeper runs every
        // second. Then wait (at most a minute) for the table to be empty.
        tokio::time::sleep(TTL).await;
        let expired = Instant::now();
        let mut entries = handle.stats().entries;
        while entries > 0 && expired.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            entries = handle.stats().entries;
        }
        let stats = handle.stats();
        let (pages, _, _) = rss::resident();
        println!(
            "drain: entries {} and in flight {} {:.2} s after the last replay expired; longest \
             event-loop stall {:?}; rss +{:.1} MiB (freed memory stays with the allocator)",
            stats.entries,
            stats.in_flight,
            expired.elapsed().as_secs_f64(),
            take_stall(),
            mib((pages * page).saturating_sub(before))
        );
        if stats.entries != 0 {
            eprintln!(
                "FAIL: {} entries left a minute after the TTL",
                stats.entries
            );
            ok = false;
        }
    }
    watcher.abort();

    if worst.entries > MAX_ENTRIES {
        eprintln!("FAIL: entries reached {} > {MAX_ENTRIES}", worst.entries);
        ok = false;
    }
    let growth = worst.rss_growth.max(peak_growth);
    if growth > RSS_BUDGET {
        eprintln!(
            "FAIL: rss grew {:.1} MiB > {:.0} MiB",
            mib(growth),
            mib(RSS_BUDGET)
        );
        ok = false;
    }
    if unexpected > 0 {
        eprintln!("FAIL: {unexpected} responses neither 200 nor 503: {statuses:?}");
        ok = false;
    }
    ok
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if runtime.block_on(flood(&options)) {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
