//! The coalescing layer's OpenTelemetry instruments on `/metrics`: an SDK meter provider
//! with a manual reader, collected at each scrape and written into the app's
//! prometheus-client registry (one exposition, OpenMetrics text).
//!
//! Names follow the OpenTelemetry-to-Prometheus rules: dots become underscores, counters
//! end in `_total`, durations in `_seconds` (`refresh_coalesce.wait.duration` is
//! `refresh_coalesce_wait_duration_seconds`).

use std::{sync::Arc, time::Duration};

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
        data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics},
        reader::MetricReader,
    },
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// The layer's meter provider and the reader a scrape collects from.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkMeterProvider,
    reader: SharedReader,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A provider of this app's own (no global provider, so several apps live in one
    /// process, as they do in the tests).
    pub fn new() -> Self {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        Self { provider, reader }
    }

    /// The meter the coalescing layer reports through.
    pub fn meter(&self) -> Meter {
        self.provider.meter("tower-refresh-coalesce")
    }

    /// A collector for the app's registry.
    pub fn collector(&self) -> OtelCollector {
        OtelCollector(self.reader.clone())
    }
}

/// The manual reader, shared between the provider (which registers its pipeline) and the
/// collector (which collects at each scrape).
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Writes the OpenTelemetry instruments into a scrape.
#[derive(Debug)]
pub struct OtelCollector(SharedReader);

type Labels = Vec<(String, String)>;

fn labels<'a>(attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Labels {
    attributes
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

/// The Prometheus name and unit of an instrument.
fn prometheus_name(metric: &Metric) -> (String, Option<Unit>) {
    let name = metric.name().replace('.', "_");
    match metric.unit() {
        "s" => (
            name.strip_suffix("_seconds").unwrap_or(&name).to_owned(),
            Some(Unit::Seconds),
        ),
        _ => (name, None),
    }
}

fn encode(metric: &Metric, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let (name, unit) = prometheus_name(metric);
    let help = metric.description();
    match metric.data() {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => {
            let kind = if sum.is_monotonic() {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(&name, help, unit.as_ref(), kind)?;
            for point in sum.data_points() {
                let labels = labels(point.attributes());
                let metric = family.encode_family(&labels)?;
                if sum.is_monotonic() {
                    ConstCounter::new(point.value()).encode(metric)?;
                } else {
                    ConstGauge::new(point.value() as i64).encode(metric)?;
                }
            }
        }
        AggregatedMetrics::U64(MetricData::Gauge(gauge)) => {
            let mut family =
                encoder.encode_descriptor(&name, help, unit.as_ref(), MetricType::Gauge)?;
            for point in gauge.data_points() {
                let labels = labels(point.attributes());
                ConstGauge::new(point.value() as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
            let mut family =
                encoder.encode_descriptor(&name, help, unit.as_ref(), MetricType::Histogram)?;
            for point in histogram.data_points() {
                let labels = labels(point.attributes());
                // OpenTelemetry counts per bucket, with one more bucket above the last
                // bound; prometheus-client sums them up and writes that one as `+Inf`.
                let bounds = point.bounds().chain(std::iter::once(f64::MAX));
                let buckets: Vec<(f64, u64)> = bounds.zip(point.bucket_counts()).collect();
                family.encode_family(&labels)?.encode_histogram::<Labels>(
                    point.sum(),
                    point.count(),
                    &buckets,
                    None,
                )?;
            }
        }
        // The layer reports nothing else.
        _ => {}
    }
    Ok(())
}

impl Collector for OtelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut collected = ResourceMetrics::default();
        if let Err(error) = self.0.collect(&mut collected) {
            tracing::warn!(%error, "collecting the coalescing layer's instruments failed");
            return Ok(());
        }
        for scope in collected.scope_metrics() {
            for metric in scope.metrics() {
                encode(metric, &mut encoder)?;
            }
        }
        Ok(())
    }
}
