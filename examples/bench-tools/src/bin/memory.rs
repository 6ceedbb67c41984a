//! Bytes per live replay: fills our layer or a `moka::future::Cache` with N entries and
//! reports the growth of the process's resident set, per entry.
//!
//! ```text
//! cargo run --release -p bench-tools --bin memory -- ours 1000000
//! cargo run --release -p bench-tools --bin memory -- moka 1000000
//! ```
//!
//! Run each contender in its own process. Every entry holds the same `Arc`'d ~600-byte token
//! pair, so the value itself is excluded and what remains is the per-entry cost: key, entry,
//! table slot, expiry bookkeeping. Keys are 32-byte digests. Both tables are bounded at N
//! entries with a one-hour TTL, so nothing expires or is evicted during the fill. The RSS is
//! read from `/proc/self/statm` (resident pages times the page size, which is derived from
//! `VmRSS` in `/proc/self/status`) right before the first insert and after the last one has
//! settled; the crate forbids `unsafe`, so there is no counting global allocator.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bench_tools::rss;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_refresh_coalesce::{Fingerprint, RefreshCoalesceLayer};

const TTL: Duration = Duration::from_secs(3600);

/// A ~600-byte token pair, shared by every entry.
fn token_pair() -> Arc<str> {
    let access = "a".repeat(330);
    let refresh = "r".repeat(180);
    format!(
        r#"{{"access_token":"{access}","refresh_token":"{refresh}","token_type":"Bearer","expires_in":900,"scope":"openid profile offline_access","id_token":null}}"#
    )
    .into()
}

fn key(i: u64) -> [u8; 32] {
    *Fingerprint::of(i.to_le_bytes()).as_bytes()
}

fn rss(page: u64) -> u64 {
    rss::resident().0 * page
}

async fn fill_ours(n: u64, page: u64) -> (u64, u64, u64) {
    let pair = token_pair();
    let inner = service_fn(move |_key: [u8; 32]| {
        let pair = pair.clone();
        async move { Ok::<_, Infallible>(pair) }
    });
    let layer = RefreshCoalesceLayer::builder(|key: &[u8; 32]| Some(Fingerprint::from_bytes(*key)))
        .ttl(TTL)
        .max_entries(n as usize)
        .build();
    let handle = layer.handle();
    let mut service = layer.layer(inner);
    let before = rss(page);
    for i in 0..n {
        let service = service.ready().await.expect("ready");
        service.call(key(i)).await.expect("refresh");
    }
    tokio::task::yield_now().await;
    let after = rss(page);
    let stats = handle.stats();
    assert_eq!((stats.entries, stats.leader), (n, n), "every entry live");
    drop(service);
    (before, after, stats.entries)
}

async fn fill_moka(n: u64, page: u64) -> (u64, u64, u64) {
    let pair = token_pair();
    let cache = moka::future::Cache::<[u8; 32], Arc<str>>::builder()
        .time_to_live(TTL)
        .max_capacity(n)
        .build();
    let before = rss(page);
    for i in 0..n {
        let pair = pair.clone();
        let init = async move { Ok::<_, Infallible>(pair) };
        cache.try_get_with(key(i), init).await.expect("refresh");
    }
    cache.run_pending_tasks().await;
    let after = rss(page);
    let entries = cache.entry_count();
    assert_eq!(entries, n, "every entry live");
    (before, after, entries)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: memory ours|moka N";
    let contender = args.next().expect(usage);
    let n: u64 = args
        .next()
        .map(|n| n.replace('_', "").parse().expect(usage))
        .unwrap_or(1_000_000);
    let page = rss::page_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (before, after, entries) = match contender.as_str() {
        "ours" => rt.block_on(fill_ours(n, page)),
        "moka" => rt.block_on(fill_moka(n, page)),
        other => panic!("unknown contender {other:?}; {usage}"),
    };
    let grown = after.saturating_sub(before);
    println!(
        "memory {contender}: entries {entries}, rss before {before} B, after {after} B, \
         grown {grown} B, {:.1} bytes per entry (page {page} B)",
        grown as f64 / entries as f64
    );
}
