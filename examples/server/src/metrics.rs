//! Prometheus metrics with a per-app [`Registry`] (no global recorder, so several apps can
//! live in one process, as they do in the tests).

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `outcome` label of the request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` or the OAuth error code of the answer (`invalid_grant`, `invalid_request`, ...).
    pub outcome: &'static str,
}

/// Outcomes pre-registered at zero so dashboards see every series from the start.
const REFRESH_OUTCOMES: &[&str] = &[
    "ok",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unsupported_grant_type",
    "temporarily_unavailable",
    "server_error",
];
const LOGOUT_OUTCOMES: &[&str] = &[
    "ok",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "temporarily_unavailable",
    "server_error",
];
const LOGIN_OUTCOMES: &[&str] = &[
    "ok",
    "invalid_request",
    "invalid_credentials",
    "temporarily_unavailable",
    "server_error",
];

/// The app's counters and the registry they are registered in.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    rotations: Counter,
    reuse_detected: Counter,
    refresh_requests: Family<OutcomeLabels, Counter>,
    login_requests: Family<OutcomeLabels, Counter>,
    logout_requests: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry holding this app's counters.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rotations = Counter::default();
        let reuse_detected = Counter::default();
        let refresh_requests = Family::<OutcomeLabels, Counter>::default();
        let login_requests = Family::<OutcomeLabels, Counter>::default();
        let logout_requests = Family::<OutcomeLabels, Counter>::default();
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "refresh_rotations",
            "Refresh-token rotations committed by the refresh handler",
            rotations.clone(),
        );
        registry.register(
            "refresh_reuse_detected",
            "Already-used refresh tokens presented again (each revoked its token family)",
            reuse_detected.clone(),
        );
        registry.register(
            "refresh_requests",
            "Requests answered by the refresh handler, by outcome",
            refresh_requests.clone(),
        );
        registry.register(
            "login_requests",
            "Requests answered by the login handler, by outcome",
            login_requests.clone(),
        );
        registry.register(
            "logout_requests",
            "Requests answered by the logout handler, by outcome",
            logout_requests.clone(),
        );
        for &outcome in REFRESH_OUTCOMES {
            drop(refresh_requests.get_or_create(&OutcomeLabels { outcome }));
        }
        for &outcome in LOGOUT_OUTCOMES {
            drop(logout_requests.get_or_create(&OutcomeLabels { outcome }));
        }
        for &outcome in LOGIN_OUTCOMES {
            drop(login_requests.get_or_create(&OutcomeLabels { outcome }));
        }
        Self {
            registry: Arc::new(Mutex::new(registry)),
            rotations,
            reuse_detected,
            refresh_requests,
            login_requests,
            logout_requests,
        }
    }

    /// The shared registry: register more metrics (the coalescing layer's) here.
    pub fn registry(&self) -> Arc<Mutex<Registry>> {
        Arc::clone(&self.registry)
    }

    /// Runs `f` with the registry locked, e.g. to register more metrics.
    pub fn register_with<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The registry in the OpenMetrics text format (which Prometheus scrapes).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock())?;
        Ok(out)
    }

    /// Counts one committed rotation.
    pub fn rotation(&self) {
        self.rotations.inc();
    }

    /// Counts one detected reuse.
    pub fn reuse_detected(&self) {
        self.reuse_detected.inc();
    }

    /// Counts one answered refresh request.
    pub fn refresh_request(&self, outcome: &'static str) {
        self.refresh_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one answered login request.
    pub fn login_request(&self, outcome: &'static str) {
        self.login_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one answered logout request.
    pub fn logout_request(&self, outcome: &'static str) {
        self.logout_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Rotations committed so far.
    pub fn rotations_total(&self) -> u64 {
        self.rotations.get()
    }

    /// Reuses detected so far.
    pub fn reuse_detected_total(&self) -> u64 {
        self.reuse_detected.get()
    }
}
