//! Shared harness: a gated, counting inner service.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::watch;

/// A gate the inner service waits on until the test opens it.
#[derive(Clone, Debug)]
pub struct Gate {
    tx: Arc<watch::Sender<bool>>,
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// An open gate.
    pub fn open_now() -> Self {
        let gate = Self::closed();
        gate.open();
        gate
    }

    /// Lets every current and future waiter through.
    pub fn open(&self) {
        self.tx.send_replace(true);
    }

    /// Waits until the gate is open.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|open| *open).await;
        }
    }
}

/// Counts calls of the inner service.
#[derive(Clone, Debug, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    /// Records one call and returns its number, starting at 1.
    pub fn record(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many calls so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A request of the core tests: a key and a caller number.
#[derive(Clone, Debug)]
pub struct Req {
    pub key: String,
    pub caller: usize,
}

impl Req {
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            caller: 0,
        }
    }
}

/// The key strategy of the core tests.
pub fn by_key(req: &Req) -> Option<String> {
    Some(req.key.clone())
}

/// An inner service that waits for `gate`, counts its calls and answers `"{key}#{call}"`.
pub fn gated(
    calls: Calls,
    gate: Gate,
) -> impl tower::Service<
    Req,
    Response = String,
    Error = Infallible,
    Future = impl Future<Output = Result<String, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Req| {
        let n = calls.record();
        let open = gate.wait();
        async move {
            open.await;
            Ok::<_, Infallible>(format!("{}#{n}", req.key))
        }
    })
}

/// Yields until `condition` holds. Used to wait until every caller has joined a flight;
/// the inner service is gated meanwhile, so nothing can complete early.
pub async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::task::yield_now().await;
    }
}
