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
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
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

    /// A collector for the app's registry. It keeps the provider alive: the layer's
    /// instruments report for as long as the registry holds it.
    pub fn collector(&self) -> OtelCollector {
        OtelCollector(self.clone())
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
pub struct OtelCollector(Telemetry);

type Labels = Vec<(String, String)>;

fn labels<'a>(attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Labels {
    attributes
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

/// The Prometheus name and unit of an instrument.
fn prometheus_name(metric: &Metric) -> (String, Option<Unit>) {
    let name = metric.name().replace('.', "_");
    let unit = (metric.unit() == "s").then_some(Unit::Seconds);
    (name, unit)
}

/// Writes the points of one family: with their labels, or, for a single point without
/// attributes, without a label set.
fn write_points<P>(
    mut family: MetricEncoder<'_>,
    points: Vec<(Labels, P)>,
    write: impl Fn(MetricEncoder<'_>, &P) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if let [(labels, point)] = points.as_slice()
        && labels.is_empty()
    {
        return write(family, point);
    }
    for (labels, point) in &points {
        write(family.encode_family(labels)?, point)?;
    }
    Ok(())
}

fn encode(metric: &Metric, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let (name, unit) = prometheus_name(metric);
    let help = metric.description();
    let kind = match metric.data() {
        AggregatedMetrics::U64(MetricData::Sum(sum)) if sum.is_monotonic() => MetricType::Counter,
        AggregatedMetrics::U64(MetricData::Sum(_) | MetricData::Gauge(_)) => MetricType::Gauge,
        AggregatedMetrics::F64(MetricData::Histogram(_)) => MetricType::Histogram,
        // The layer reports nothing else.
        _ => return Ok(()),
    };
    let family = encoder.encode_descriptor(&name, help, unit.as_ref(), kind)?;
    let counter = matches!(kind, MetricType::Counter);
    let values: Vec<(Labels, u64)> = match metric.data() {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => sum
            .data_points()
            .map(|point| (labels(point.attributes()), point.value()))
            .collect(),
        AggregatedMetrics::U64(MetricData::Gauge(gauge)) => gauge
            .data_points()
            .map(|point| (labels(point.attributes()), point.value()))
            .collect(),
        _ => Vec::new(),
    };
    match metric.data() {
        AggregatedMetrics::U64(_) => write_points(family, values, |metric, value| {
            if counter {
                ConstCounter::new(*value).encode(metric)
            } else {
                ConstGauge::new(*value as i64).encode(metric)
            }
        })?,
        AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
            let points = histogram
                .data_points()
                .map(|point| {
                    // OpenTelemetry counts per bucket, with one more bucket above the last
                    // bound; prometheus-client sums them up and writes that one as `+Inf`.
                    let bounds = point.bounds().chain(std::iter::once(f64::MAX));
                    let buckets: Vec<(f64, u64)> = bounds.zip(point.bucket_counts()).collect();
                    (
                        labels(point.attributes()),
                        (point.sum(), point.count(), buckets),
                    )
                })
                .collect();
            write_points(family, points, |mut metric, (sum, count, buckets)| {
                metric.encode_histogram::<Labels>(*sum, *count, buckets, None)
            })?;
        }
        _ => {}
    }
    Ok(())
}

impl Collector for OtelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut collected = ResourceMetrics::default();
        if let Err(error) = self.0.reader.collect(&mut collected) {
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

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    #[test]
    fn instruments_are_written_with_prometheus_names() {
        let telemetry = Telemetry::new();
        let meter = telemetry.meter();
        let counter = meter.u64_counter("demo.requests").build();
        counter.add(3, &[opentelemetry::KeyValue::new("outcome", "leader")]);
        let histogram = meter
            .f64_histogram("demo.wait.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        histogram.record(0.05, &[]);
        histogram.record(0.5, &[]);
        histogram.record(5.0, &[]);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(telemetry.collector()));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for line in [
            "demo_requests_total{outcome=\"leader\"} 3",
            "demo_wait_duration_seconds_count 3",
            "demo_wait_duration_seconds_bucket{le=\"0.1\"} 1",
            "demo_wait_duration_seconds_bucket{le=\"1.0\"} 2",
            "demo_wait_duration_seconds_bucket{le=\"+Inf\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
