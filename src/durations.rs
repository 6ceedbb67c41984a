//! [`Durations`]: how long callers waited, inner calls ran and store commands took,
//! recorded to whichever backends are enabled.

#[cfg(feature = "metrics")]
use crate::metrics::names;
#[cfg(feature = "opentelemetry")]
use crate::otel::Histograms;

/// The durations the layer measures, recorded to whichever backends are enabled; cheap to
/// clone, and free without the `metrics` and `opentelemetry` features.
#[derive(Debug, Clone, Default)]
pub(crate) struct Durations {
    #[cfg(feature = "opentelemetry")]
    otel: Option<Histograms>,
}

impl Durations {
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn with_otel(otel: Histograms) -> Self {
        Self { otel: Some(otel) }
    }

    /// Whether any backend records durations: the clock is read only then.
    pub(crate) fn enabled(&self) -> bool {
        #[cfg(feature = "opentelemetry")]
        if self.otel.is_some() {
            return true;
        }
        cfg!(feature = "metrics")
    }

    /// How long a caller waited for its flight, from the deadline its wait had.
    pub(crate) fn wait(&self, deadline: tokio::time::Instant, wait_timeout: std::time::Duration) {
        if !self.enabled() {
            return;
        }
        let waited = (deadline - wait_timeout).elapsed().as_secs_f64();
        #[cfg(feature = "metrics")]
        metrics::histogram!(names::WAIT).record(waited);
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.otel {
            otel.wait.record(waited, &[]);
        }
        let _ = waited;
    }

    /// The start of a measurement, when any backend records durations.
    pub(crate) fn start(&self) -> Option<tokio::time::Instant> {
        self.enabled().then(tokio::time::Instant::now)
    }

    /// How long the inner call took, from `started`.
    pub(crate) fn inner(&self, started: Option<tokio::time::Instant>) {
        let Some(started) = started else { return };
        let took = started.elapsed().as_secs_f64();
        #[cfg(feature = "metrics")]
        metrics::histogram!(names::INNER).record(took);
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.otel {
            otel.inner.record(took, &[]);
        }
        let _ = took;
    }

    /// How long the store command `command` took, from `started`.
    pub(crate) fn store(&self, command: &'static str, started: Option<tokio::time::Instant>) {
        let Some(started) = started else { return };
        let took = started.elapsed().as_secs_f64();
        #[cfg(feature = "metrics")]
        metrics::histogram!(names::STORE, "command" => command).record(took);
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.otel {
            otel.store
                .record(took, &[opentelemetry::KeyValue::new("command", command)]);
        }
        let _ = (took, command);
    }
}
