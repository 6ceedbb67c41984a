//! [`RefreshCoalesceLayer`] and its builder: configuration only, no I/O.

use std::{fmt, sync::Arc, time::Duration};

use tower_layer::Layer;

use crate::{
    audit::{Audit, AuditEvent},
    core::Core,
    durations::Durations,
    error::BuildError,
    flight::{Limits, Table},
    handle::Handle,
    key::Fingerprinter,
    leader::{Breaker, Flights, Remote},
    metrics::Counters,
    service::RefreshCoalesce,
    share::CloneResponse,
    store::{Invalidation, Store},
};

/// Applies [`RefreshCoalesce`] to a service: concurrent requests with the same key become one
/// call of the inner service, every caller gets the same result, and the result is replayed
/// to late retries for a short window.
///
/// The table of flights and replays is created when the layer is built and lives in an
/// `Arc`: **every service this layer makes, and every clone of those services, shares one
/// table.** Frameworks that call [`Layer::layer`] several times (axum does, once per route
/// and method) therefore still coalesce across all of them. Build a second layer for a
/// separate table.
///
/// `X` is the [`Extract`](crate::Extract) strategy (how a request becomes a key), `P` the
/// [`Share`](crate::Share) policy (how a result is stored and answered).
///
/// ```
/// use std::{convert::Infallible, time::Duration};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
/// use tower_refresh_coalesce::RefreshCoalesceLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_refresh_coalesce::BoxError> {
/// // Requests are (user, refresh token); coalesce by token.
/// let layer = RefreshCoalesceLayer::builder(|req: &(u32, String)| Some(req.1.clone()))
///     .ttl(Duration::from_secs(30))
///     .wait_timeout(Duration::from_secs(10))
///     .build();
/// let handle = layer.handle();
///
/// let mut service = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|(user, _token): (u32, String)| async move {
///         Ok::<_, Infallible>(format!("new pair for user {user}"))
///     }));
///
/// let response = service.ready().await?.call((7, "r1".to_owned())).await?;
/// assert_eq!(response, "new pair for user 7");
/// assert_eq!(handle.stats().leader, 1);
/// # Ok(())
/// # }
/// ```
pub struct RefreshCoalesceLayer<X, P = CloneResponse> {
    core: Arc<Core<X, P>>,
}

impl<X> RefreshCoalesceLayer<X> {
    /// A layer with the default settings that keys requests with `extract`.
    pub fn new(extract: X) -> Self {
        Self::builder(extract).build()
    }

    /// A builder that keys requests with `extract`.
    pub fn builder(extract: X) -> Builder<X> {
        Builder {
            extract,
            share: CloneResponse::new(),
            ttl: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(10),
            hard_cap: Duration::from_secs(30),
            max_entries: 100_000,
            max_waiters: 10_000,
            max_replays: None,
            max_per_group: DEFAULT_MAX_PER_GROUP,
            keys: None,
            check: None,
            store: None,
            breaker: (3, Duration::from_secs(5)),
            require_store: false,
            audit: Audit::default(),
            #[cfg(feature = "opentelemetry")]
            meter: None,
        }
    }
}

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
impl<V: crate::token::Verify>
    RefreshCoalesceLayer<crate::http::HttpExtract<V>, crate::http::HttpShare>
{
    /// A builder for the HTTP front: `extract` finds and verifies the refresh token,
    /// [`HttpShare`](crate::http::HttpShare) shares whole responses and writes refusals.
    ///
    /// Its [`Handle`] can invalidate by token and by subject.
    pub fn http(
        extract: crate::http::HttpExtract<V>,
    ) -> Builder<crate::http::HttpExtract<V>, crate::http::HttpShare> {
        let keys = extract.keys().clone();
        let checked = extract.clone();
        let mut builder =
            RefreshCoalesceLayer::builder(extract).share(crate::http::HttpShare::new());
        builder.keys = Some(keys);
        builder.check = Some(Box::new(move |with_store| checked.problems(with_store)));
        builder
    }
}

impl<X, P> RefreshCoalesceLayer<X, P> {
    /// A handle on this layer's table, for invalidation and statistics.
    pub fn handle(&self) -> Handle {
        self.core.handle()
    }
}

impl<X, P> Clone for RefreshCoalesceLayer<X, P> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
        }
    }
}

impl<S, X, P> Layer<S> for RefreshCoalesceLayer<X, P> {
    type Service = RefreshCoalesce<S, X, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RefreshCoalesce::new(inner, self.core.clone())
    }
}

impl<X, P> fmt::Debug for RefreshCoalesceLayer<X, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshCoalesceLayer")
            .field("core", &self.core)
            .finish()
    }
}

/// Builds a [`RefreshCoalesceLayer`]; start with [`RefreshCoalesceLayer::builder`].
pub struct Builder<X, P = CloneResponse> {
    extract: X,
    share: P,
    ttl: Duration,
    wait_timeout: Duration,
    hard_cap: Duration,
    max_entries: usize,
    max_waiters: usize,
    max_replays: Option<u32>,
    max_per_group: u32,
    keys: Option<Fingerprinter>,
    /// What the extract strategy demands of the configuration (given whether a store is
    /// set), checked when the layer is built.
    check: Option<Check>,
    store: Option<Arc<dyn Store>>,
    breaker: (u32, Duration),
    require_store: bool,
    audit: Audit,
    #[cfg(feature = "opentelemetry")]
    meter: Option<opentelemetry::metrics::Meter>,
}

type Check = Box<dyn FnOnce(bool) -> Result<(), BuildError> + Send>;

/// The most live entries of one group (the HTTP front: one subject) by default.
pub(crate) const DEFAULT_MAX_PER_GROUP: u32 = 32;

impl<X, P> Builder<X, P> {
    /// Hands every [`AuditEvent`] of the layer to `hook`, on the task where it happens:
    /// suspected reuse, invalidations, refusals with their reason, the per-subject cap
    /// reached, the store's breaker opening and closing. Events carry the subject where the
    /// layer verified one, never a token. Keep the hook quick (a log line, a channel send).
    ///
    /// ```
    /// use tower_refresh_coalesce::{AuditEvent, RefreshCoalesceLayer};
    ///
    /// let layer = RefreshCoalesceLayer::builder(|req: &String| Some(req.clone()))
    ///     .audit(|event: &AuditEvent<'_>| {
    ///         tracing::warn!(event = event.kind(), subject = event.subject(), "audit");
    ///     })
    ///     .build();
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn audit(mut self, hook: impl Fn(&AuditEvent<'_>) + Send + Sync + 'static) -> Self {
        self.audit = Audit::new(hook);
        self
    }

    /// Reports the layer's instruments through `meter` (feature `opentelemetry`). Without
    /// it, the layer takes the meter `tower-refresh-coalesce` of the global meter provider
    /// when it is built: set the provider first.
    ///
    /// Counters by outcome and the gauges are observable instruments read at each
    /// collection, from the same atomics as [`Handle::stats`]; the wait, the inner call and
    /// each store command are histograms in seconds. The names are listed in the
    /// [crate documentation](crate#observability).
    #[cfg(feature = "opentelemetry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    #[must_use]
    pub fn meter(mut self, meter: opentelemetry::metrics::Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// How long a replayable result is replayed to later requests with the same key.
    /// Default: 30 seconds. Keep it shorter than the identity server's reuse window.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a caller waits for a flight before it gets [`Elapsed`](crate::error::Elapsed)
    /// (the HTTP front answers `429` with `Retry-After`). Default: 10 seconds.
    #[must_use]
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = wait_timeout;
        self
    }

    /// How long the inner call may run before it is aborted and its callers get
    /// [`LeaderFailed`](crate::error::LeaderFailed). Default: 30 seconds.
    #[must_use]
    pub fn hard_cap(mut self, hard_cap: Duration) -> Self {
        self.hard_cap = hard_cap;
        self
    }

    /// The most live entries (flights and replays) the table holds; a request that would
    /// add one more gets [`Overloaded`](crate::error::Overloaded) at once. Default: 100,000.
    #[must_use]
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The most callers that may wait on one flight; one more gets
    /// [`Overloaded`](crate::error::Overloaded) at once. Default: 10,000.
    #[must_use]
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.max_waiters = max_waiters;
        self
    }

    /// The most times one result is replayed; after that, requests with its key reach the
    /// inner service again. Default: no limit within the TTL.
    #[must_use]
    pub fn max_replays(mut self, max_replays: u32) -> Self {
        self.max_replays = Some(max_replays);
        self
    }

    /// The most live entries (flights and replays) of one group, which the HTTP front makes
    /// one per token subject; a request that would add one more gets
    /// [`Overloaded`](crate::error::Overloaded) at once (the HTTP front: `503` with
    /// `Retry-After`), and only that subject is turned away: one account minting tokens
    /// cannot fill the table for everyone. Default: 32.
    #[must_use]
    pub fn max_entries_per_group(mut self, max: u32) -> Self {
        self.max_per_group = max.max(1);
        self
    }

    /// Coordinates flights and replays with the other instances of a deployment through
    /// `store` (a [`RedisStore`](crate::store::RedisStore), say). Default: none, each process
    /// coalesces on its own.
    ///
    /// Only flights talk to the store; replays this process holds are answered without it.
    /// The share policy must encode its values ([`Share::encode`](crate::Share::encode)) for
    /// other instances to receive them; the HTTP front's does.
    #[must_use]
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// After `failures` store failures in a row, skip the store for `cool_down` and coalesce
    /// per instance; then try it again. Default: 3 failures, 5 seconds.
    #[must_use]
    pub fn breaker(mut self, failures: u32, cool_down: Duration) -> Self {
        self.breaker = (failures, cool_down);
        self
    }

    /// While the store cannot be reached (its breaker is open, or an election fails),
    /// refuses a request that would lead a flight with
    /// [`LeaderFailed`](crate::error::LeaderFailed)
    /// ([`Failure::StoreUnavailable`](crate::error::Failure::StoreUnavailable); the HTTP
    /// front answers `503` with `Retry-After`) instead of calling the inner service on this
    /// instance alone. For deployments where one extra rotation means a logout: without the
    /// store, instances cannot tell whether another one is refreshing the same token.
    /// Requests answered by a replay this instance holds, and requests joining a flight
    /// already running, are served as always. Default: `false` (refresh on this instance,
    /// at most once per instance per token).
    #[must_use]
    pub fn require_store(mut self, required: bool) -> Self {
        self.require_store = required;
        self
    }

    /// Installs the policy that stores, replays and answers results. Default:
    /// [`CloneResponse`], which clones `Clone` responses and replays every `Ok`.
    #[must_use]
    pub fn share<P2>(self, share: P2) -> Builder<X, P2> {
        Builder {
            extract: self.extract,
            share,
            ttl: self.ttl,
            wait_timeout: self.wait_timeout,
            hard_cap: self.hard_cap,
            max_entries: self.max_entries,
            max_waiters: self.max_waiters,
            max_replays: self.max_replays,
            max_per_group: self.max_per_group,
            keys: self.keys,
            check: self.check,
            store: self.store,
            breaker: self.breaker,
            require_store: self.require_store,
            audit: self.audit,
            #[cfg(feature = "opentelemetry")]
            meter: self.meter,
        }
    }

    /// Builds the layer and its table.
    ///
    /// # Panics
    ///
    /// If the configuration cannot be served safely: see [`try_build`](Self::try_build).
    pub fn build(self) -> RefreshCoalesceLayer<X, P> {
        match self.try_build() {
            Ok(layer) => layer,
            Err(error) => panic!("RefreshCoalesceLayer: {error}"),
        }
    }

    /// Builds the layer and its table, or says why the configuration cannot be served
    /// safely: a fingerprint secret shorter than 32 bytes, a store without an explicit
    /// fingerprint secret (instances would share nothing), or
    /// [`match_by_subject`](crate::HttpExtract::match_by_subject) with a verifier that yields
    /// no subjects or with a store.
    pub fn try_build(self) -> Result<RefreshCoalesceLayer<X, P>, BuildError> {
        if let Some(check) = self.check {
            check(self.store.is_some())?;
        }
        let table = Arc::new(Table::new(Limits {
            ttl: self.ttl,
            max_entries: self.max_entries,
            max_waiters: self.max_waiters,
            max_replays: self.max_replays,
            max_per_group: self.max_per_group,
        }));
        #[cfg(feature = "opentelemetry")]
        let meter = self
            .meter
            .unwrap_or_else(|| opentelemetry::global::meter("tower-refresh-coalesce"));
        #[cfg(feature = "opentelemetry")]
        let durations = Durations::with_otel(crate::otel::Histograms::new(&meter));
        #[cfg(not(feature = "opentelemetry"))]
        let durations = Durations::default();
        let remote = self.store.map(|store| {
            // Other instances' invalidations reach this table.
            let weak = Arc::downgrade(&table);
            store.listen(Arc::new(move |invalidation: &Invalidation| {
                if let Some(table) = weak.upgrade() {
                    match invalidation {
                        Invalidation::Key(key) => {
                            table.invalidate(key);
                        }
                        Invalidation::Group(group) => {
                            table.invalidate_group(group);
                        }
                    }
                }
            }));
            let (failures, cool_down) = self.breaker;
            // The lock outlives the hard cap, so it never expires under a running leader.
            let lease = self.hard_cap + Duration::from_secs(5);
            Arc::new(Remote::new(
                store,
                Breaker::new(failures, cool_down),
                lease,
                // A leader keeps trying to store its result as long as followers wait.
                self.wait_timeout,
                self.require_store,
                self.audit.clone(),
                durations.clone(),
            ))
        });
        let layer = RefreshCoalesceLayer {
            core: Arc::new(Core {
                extract: self.extract,
                flights: Arc::new(Flights {
                    share: self.share,
                    table,
                    counters: Arc::new(Counters::default()),
                    durations,
                    remote,
                    wait_timeout: self.wait_timeout,
                    hard_cap: self.hard_cap,
                    audit: self.audit,
                }),
                keys: self.keys,
            }),
        };
        #[cfg(feature = "opentelemetry")]
        crate::otel::observe(&meter, &layer.handle().stats_source());
        Ok(layer)
    }
}

impl<X, P> fmt::Debug for Builder<X, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("ttl", &self.ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("hard_cap", &self.hard_cap)
            .field("max_entries", &self.max_entries)
            .field("max_waiters", &self.max_waiters)
            .field("max_replays", &self.max_replays)
            .finish_non_exhaustive()
    }
}
