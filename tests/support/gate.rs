//! Gated, counting inner services: the test holds every inner call at a gate until all the
//! callers it wants have joined, then opens it, and counts the inner calls exactly.
//!
//! ```
//! # use std::convert::Infallible;
//! # use tower::ServiceExt as _;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use support::Gated;
//!
//! let inner = Gated::closed();
//! let service = inner.service(|name: String, n| async move { Ok::<_, Infallible>(format!("{name}#{n}")) });
//! let call = tokio::spawn(service.oneshot("r1".to_owned()));
//! support::until(|| inner.calls() == 1).await; // called, held at the gate
//! inner.open();
//! assert_eq!(call.await.unwrap().unwrap(), "r1#1");
//! # }
//! ```

use std::{
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

    /// Waits until the gate is open. The wait is registered when this is called, not when
    /// the future is first polled.
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

/// The gate and the call counter of a test's inner service, and the services built on them.
///
/// Clones share the gate and the counter.
#[derive(Clone, Debug)]
pub struct Gated {
    calls: Calls,
    gate: Gate,
}

impl Gated {
    /// A counter at 0 and a closed gate: calls wait until [`open`](Self::open).
    pub fn closed() -> Self {
        Self {
            calls: Calls::default(),
            gate: Gate::closed(),
        }
    }

    /// A counter at 0 and an open gate: calls go straight through.
    pub fn open_now() -> Self {
        let gated = Self::closed();
        gated.open();
        gated
    }

    /// Opens the gate: every held call, and every later one, goes on.
    pub fn open(&self) {
        self.gate.open();
    }

    /// How many calls so far.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    /// The call counter (shared).
    pub fn counter(&self) -> Calls {
        self.calls.clone()
    }

    /// The gate (shared).
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// A service that, for each request, records the call and numbers it (from 1), waits
    /// at the gate, then answers `answer(request, n)`.
    ///
    /// The call is counted and the wait registered when the service is called, before its
    /// future is polled. Every service made here counts on the same counter.
    pub fn service<R, F, Fut, T, E>(
        &self,
        answer: F,
    ) -> impl tower::Service<
        R,
        Response = T,
        Error = E,
        Future = impl Future<Output = Result<T, E>> + Send + 'static + use<R, F, Fut, T, E>,
    >
    + Clone
    + Send
    + Sync
    + 'static
    + use<R, F, Fut, T, E>
    where
        R: Send + 'static,
        F: Fn(R, usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (calls, gate) = (self.calls.clone(), self.gate.clone());
        tower::service_fn(move |request: R| {
            let n = calls.record();
            let open = gate.wait();
            let answer = answer.clone();
            async move {
                open.await;
                answer(request, n).await
            }
        })
    }
}

/// Yields until `condition` holds. Used to wait until every caller has joined a flight;
/// the inner service is gated meanwhile, so nothing can complete early.
pub async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::task::yield_now().await;
    }
}
