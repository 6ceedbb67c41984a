//! A refresh storm against an in-process token service, without and with the layer.
//!
//! Every request presents the same single-use refresh token, as the requests of one client
//! do when its access token expires. Without the layer one refresh wins and the others look
//! like token reuse; with it, the token rotates once and every caller gets the new pair.
//!
//! `cargo run --release --example demo -- [REQUESTS]` (default 1,000).

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tower::{Service, ServiceExt, service_fn};
use tower_refresh_coalesce::RefreshCoalesceLayer;

/// A rotating token store: each token is single-use; presenting a used one revokes it all.
#[derive(Default)]
struct Store {
    active: HashSet<String>,
    used: HashSet<String>,
    rotations: u64,
    reuse_detected: u64,
    next: u64,
}

#[derive(Clone, Debug, PartialEq)]
enum Reply {
    Pair(String),
    InvalidGrant,
}

fn token_service(
    store: Arc<Mutex<Store>>,
) -> impl Service<String, Response = Reply, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    service_fn(move |token: String| {
        let store = store.clone();
        async move {
            // A database round trip.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut store = store.lock().unwrap();
            if store.active.remove(&token) {
                store.used.insert(token);
                store.rotations += 1;
                store.next += 1;
                let fresh = format!("refresh-{}", store.next);
                store.active.insert(fresh.clone());
                Ok(Reply::Pair(fresh))
            } else {
                if store.used.contains(&token) {
                    // Reuse of a rotated token: revoke the whole family.
                    store.reuse_detected += 1;
                    store.active.clear();
                }
                Ok(Reply::InvalidGrant)
            }
        }
    })
}

struct Run {
    ok: usize,
    invalid: usize,
    distinct: usize,
    rotations: u64,
    reuse: u64,
    wall: Duration,
}

async fn storm<S>(service: S, store: Arc<Mutex<Store>>, requests: usize) -> Run
where
    S: Service<String, Response = Reply> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    store.lock().unwrap().active.insert("refresh-0".into());
    let start = Instant::now();
    let tasks: Vec<_> = (0..requests)
        .map(|_| tokio::spawn(service.clone().oneshot("refresh-0".to_owned())))
        .collect();
    let mut replies = HashMap::<String, usize>::new();
    let mut invalid = 0;
    for task in tasks {
        match task.await.expect("task").expect("reply") {
            Reply::Pair(token) => *replies.entry(token).or_default() += 1,
            Reply::InvalidGrant => invalid += 1,
        }
    }
    let wall = start.elapsed();
    let store = store.lock().unwrap();
    Run {
        ok: replies.values().sum(),
        invalid,
        distinct: replies.len(),
        rotations: store.rotations,
        reuse: store.reuse_detected,
        wall,
    }
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);

    let plain = Arc::new(Mutex::new(Store::default()));
    let without = storm(token_service(plain.clone()), plain, requests).await;

    let coalesced = Arc::new(Mutex::new(Store::default()));
    let layer = RefreshCoalesceLayer::new(|token: &String| Some(token.clone()));
    let with = storm(
        tower::Layer::layer(&layer, token_service(coalesced.clone())),
        coalesced,
        requests,
    )
    .await;

    println!("refresh storm: {requests} concurrent refreshes with one token\n");
    println!("{:<28}{:>14}{:>14}", "", "without layer", "with layer");
    let rows: [(&str, String, String); 6] = [
        (
            "200 (new pair)",
            without.ok.to_string(),
            with.ok.to_string(),
        ),
        (
            "invalid_grant",
            without.invalid.to_string(),
            with.invalid.to_string(),
        ),
        (
            "rotations committed",
            without.rotations.to_string(),
            with.rotations.to_string(),
        ),
        (
            "reuse detections",
            without.reuse.to_string(),
            with.reuse.to_string(),
        ),
        (
            "distinct tokens handed out",
            without.distinct.to_string(),
            with.distinct.to_string(),
        ),
        (
            "wall time",
            format!("{:.1?}", without.wall),
            format!("{:.1?}", with.wall),
        ),
    ];
    for (name, a, b) in rows {
        println!("{name:<28}{a:>14}{b:>14}");
    }
    let verdict = if with.rotations == 1 && with.ok == requests && without.reuse > 0 {
        "without the layer the user is logged out; with it, one rotation serves every request"
    } else {
        "unexpected result"
    };
    println!("\nverdict: {verdict}");
}
