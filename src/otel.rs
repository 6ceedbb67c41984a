//! The OpenTelemetry instruments of a layer (feature `opentelemetry`).
//!
//! Counters and gauges are observable instruments: a collection reads the same atomics
//! that [`Handle::stats`](crate::Handle::stats) reads, so the two always agree and the
//! request path pays nothing for them. Durations are histograms recorded as they happen.
//! The names are those of the `metrics` feature (see [`metrics`](crate::metrics)).

use std::sync::Arc;

use opentelemetry::{
    KeyValue,
    metrics::{Histogram, Meter, ObservableCounter, ObservableGauge},
};

use crate::{
    metrics::{Stats, names},
    outcome::Outcome,
};

/// Bucket boundaries of the duration histograms, in seconds: from 0.1 ms (a replay, a local
/// store command) to 10 s (the default wait timeout).
const BOUNDARIES: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// The histograms, recorded on the request path and in flight tasks.
#[derive(Debug, Clone)]
pub(crate) struct Histograms {
    pub(crate) wait: Histogram<f64>,
    pub(crate) inner: Histogram<f64>,
    pub(crate) store: Histogram<f64>,
}

impl Histograms {
    pub(crate) fn new(meter: &Meter) -> Self {
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(BOUNDARIES.to_vec())
                .build()
        };
        Self {
            wait: histogram(names::WAIT, "How long callers waited for their flight"),
            inner: histogram(
                names::INNER,
                "How long the inner refresh call took, with buffering its response",
            ),
            store: histogram(
                names::STORE,
                "How long each coordination store command took",
            ),
        }
    }
}

/// Where the observable instruments read a [`Stats`] snapshot: `None` once the layer is gone.
pub(crate) type Source = Arc<dyn Fn() -> Option<Stats> + Send + Sync>;

/// Hands each point of a counter (its value and attributes) to the observer.
type Observe = fn(&Stats, &mut dyn FnMut(u64, &[KeyValue]));

/// Registers the observable counters and gauges. They observe for as long as the meter
/// provider lives, and observe nothing once the layer is dropped.
pub(crate) fn observe(meter: &Meter, source: &Source) {
    {
        let counter = |name: &'static str,
                       unit: &'static str,
                       description: &'static str,
                       observe: Observe| {
            let source = source.clone();
            meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |instrument| {
                    if let Some(stats) = source() {
                        observe(&stats, &mut |value, attributes| {
                            instrument.observe(value, attributes)
                        });
                    }
                })
                .build()
        };
        let gauge = |name: &'static str,
                     unit: &'static str,
                     description: &'static str,
                     read: fn(&Stats) -> u64| {
            let source = source.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |instrument| {
                    if let Some(stats) = source() {
                        instrument.observe(read(&stats), &[]);
                    }
                })
                .build()
        };
        let _counters: [ObservableCounter<u64>; 3] = [
            counter(
                names::REQUESTS,
                "{request}",
                "Requests seen by the coalescing layer, by how they were served or refused",
                |stats, observe| {
                    for outcome in Outcome::ALL {
                        observe(
                            stats.outcome(outcome),
                            &[KeyValue::new("outcome", outcome.as_str())],
                        );
                    }
                },
            ),
            counter(
                names::REUSE_SUSPECTED,
                "{flight}",
                "Flights started for a second token of a subject that had a live entry",
                |stats, observe| observe(stats.reuse_suspected, &[]),
            ),
            counter(
                names::STORE_EVENTS,
                "{event}",
                "What flights did with the coordination store",
                |stats, observe| {
                    for (event, value) in stats.store_events() {
                        observe(value, &[KeyValue::new("event", event)]);
                    }
                },
            ),
        ];
        let _gauges: [ObservableGauge<u64>; 3] = [
            gauge(
                names::FLIGHTS,
                "{flight}",
                "Inner refresh calls running now",
                |stats| stats.in_flight,
            ),
            gauge(
                names::ENTRIES,
                "{entry}",
                "Live flights and replays in the coalescing table",
                |stats| stats.entries,
            ),
            gauge(
                names::BREAKER,
                "1",
                "1 while the coordination store's breaker is open",
                |stats| stats.breaker_open,
            ),
        ];
    }
}
