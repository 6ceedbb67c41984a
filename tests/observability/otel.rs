//! The `opentelemetry` feature: the layer's instruments, exported through the SDK's
//! in-memory exporter, agree with `Handle::stats`.

use opentelemetry::{KeyValue, metrics::MeterProvider};
use opentelemetry_sdk::metrics::{
    InMemoryMetricExporter, PeriodicReader, SdkMeterProvider,
    data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics},
};
use support::until;

use super::*;

/// The last export of `name`.
fn find<'a>(exported: &'a [ResourceMetrics], name: &str) -> &'a Metric {
    exported
        .iter()
        .rev()
        .flat_map(|resource| resource.scope_metrics())
        .flat_map(|scope| scope.metrics())
        .find(|metric| metric.name() == name)
        .unwrap_or_else(|| panic!("{name} was not exported"))
}

fn attribute<'a>(mut attributes: impl Iterator<Item = &'a KeyValue>, key: &str) -> Option<String> {
    attributes
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// A counter's points, by the value of `key`.
fn sums(metric: &Metric, key: &str) -> Vec<(Option<String>, u64)> {
    let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() else {
        panic!("{} is not a u64 sum: {:?}", metric.name(), metric.data());
    };
    assert!(sum.is_monotonic(), "{} is a counter", metric.name());
    sum.data_points()
        .map(|p| (attribute(p.attributes(), key), p.value()))
        .collect()
}

fn gauge(metric: &Metric) -> u64 {
    let AggregatedMetrics::U64(MetricData::Gauge(gauge)) = metric.data() else {
        panic!("{} is not a u64 gauge: {:?}", metric.name(), metric.data());
    };
    gauge.data_points().map(|p| p.value()).sum()
}

/// A histogram's count of observations, by the value of `key`.
fn counts(metric: &Metric, key: &str) -> Vec<(Option<String>, u64)> {
    assert_eq!(metric.unit(), "s", "{} is in seconds", metric.name());
    let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
        panic!(
            "{} is not an f64 histogram: {:?}",
            metric.name(),
            metric.data()
        );
    };
    let mut counts: Vec<_> = histogram
        .data_points()
        .map(|p| (attribute(p.attributes(), key), p.count()))
        .collect();
    counts.sort();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_instruments_match_the_handle_stats() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let inner = Gated::closed();
    let (front, handle) = front(
        |builder| builder.meter(provider.meter("observability-test")),
        &inner,
    );

    // A storm of 20 callers on one token while its flight is held: one leader, 19 joined.
    let token = tokens::refresh("frank");
    let storm: Vec<_> = (0..20)
        .map(|_| {
            let (front, token) = (front.clone(), token.clone());
            tokio::spawn(async move { send(&front, bearer(&token)).await })
        })
        .collect();
    until(|| handle.stats().leader + handle.stats().joined == 20).await;

    // While it is held: one flight in the air, one entry.
    provider.force_flush().expect("flush");
    let exported = exporter.get_finished_metrics().expect("exported");
    assert_eq!(gauge(find(&exported, "refresh_coalesce.flights.active")), 1);
    assert_eq!(gauge(find(&exported, "refresh_coalesce.entries")), 1);
    assert_eq!(gauge(find(&exported, "refresh_coalesce.breaker.open")), 0);

    inner.open();
    for answer in storm {
        assert_eq!(answer.await.unwrap().status, StatusCode::OK);
    }
    // Three late retries are replayed, two requests are refused.
    for _ in 0..3 {
        send(&front, bearer(&token)).await;
    }
    send(&front, bearer("not.a.token")).await;
    send(&front, Request::post("/").body(Body::default()).unwrap()).await;

    exporter.reset();
    provider.force_flush().expect("flush");
    let exported = exporter.get_finished_metrics().expect("exported");
    let stats = handle.stats();
    assert_eq!(
        (stats.leader, stats.joined, stats.replayed, stats.rejected),
        (1, 19, 3, 2)
    );
    let mut requests = sums(find(&exported, "refresh_coalesce.requests"), "outcome");
    requests.sort();
    let mut expected: Vec<_> = Outcome::ALL
        .iter()
        .map(|o| (Some(o.as_str().to_owned()), stats.outcome(*o)))
        .collect();
    expected.sort();
    assert_eq!(requests, expected);
    assert_eq!(
        sums(
            find(&exported, "refresh_coalesce.reuse_suspected"),
            "outcome"
        ),
        [(None, stats.reuse_suspected)]
    );
    assert_eq!(gauge(find(&exported, "refresh_coalesce.flights.active")), 0);
    assert_eq!(
        gauge(find(&exported, "refresh_coalesce.entries")),
        stats.entries
    );
    assert_eq!(stats.entries, 1);
    // One inner call; a wait for each of the 20 callers of the flight.
    assert_eq!(
        counts(
            find(&exported, "refresh_coalesce.inner.duration"),
            "command"
        ),
        [(None, 1)]
    );
    assert_eq!(
        counts(find(&exported, "refresh_coalesce.wait.duration"), "command"),
        [(None, 20)]
    );
    provider.shutdown().expect("shutdown");
}

/// With a store, each command is timed under its name; with Redis killed, the breaker
/// gauge reads 1 as `Handle::stats` does.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_commands_are_timed_by_name_and_the_breaker_gauge_follows_the_store() {
    use support::redis::RedisServer;
    use tower_refresh_coalesce::store::RedisStore;

    let mut server = RedisServer::start();
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let store = RedisStore::standalone(server.client(), b"otel test sealing secret, 32 B!!")
        .command_timeout(Duration::from_millis(100))
        .build()
        .expect("store");
    let layer = RefreshCoalesceLayer::http(
        HttpExtract::new(verifier()).secret(b"otel test fingerprint secret, 32"),
    )
    .store(store.clone())
    .breaker(1, Duration::from_secs(60))
    .meter(provider.meter("observability-test"))
    .build();
    let inner = Gated::open_now();
    let front = BoxCloneSyncService::new(tower::Layer::layer(
        &layer,
        inner.service(|_request: Request<RequestBody<Body>>, n| async move {
            Ok::<_, Infallible>(Response::new(Body::from(format!("pair {n}"))))
        }),
    ));
    until(|| store.is_subscribed()).await;
    let answer = send(&front, bearer(&tokens::refresh("grace"))).await;
    assert_eq!(answer.status, StatusCode::OK);

    provider.force_flush().expect("flush");
    let exported = exporter.get_finished_metrics().expect("exported");
    let commands: Vec<String> = counts(
        find(&exported, "refresh_coalesce.store.duration"),
        "command",
    )
    .into_iter()
    .map(|(command, count)| format!("{}={count}", command.unwrap_or_default()))
    .collect();
    // A leader loads (nothing), elects itself, completes; its group and tag are read and
    // remembered with the election.
    for command in ["load=1", "elect=1", "complete=1"] {
        assert!(
            commands.iter().any(|c| c == command),
            "{command} in {commands:?}"
        );
    }
    assert_eq!(gauge(find(&exported, "refresh_coalesce.breaker.open")), 0);

    server.kill();
    send(&front, bearer(&tokens::refresh("grace"))).await;
    assert_eq!(layer.handle().stats().breaker_open, 1);
    exporter.reset();
    provider.force_flush().expect("flush");
    let exported = exporter.get_finished_metrics().expect("exported");
    assert_eq!(gauge(find(&exported, "refresh_coalesce.breaker.open")), 1);
    let events = sums(find(&exported, "refresh_coalesce.store.events"), "event");
    let stats = layer.handle().stats();
    let expected: Vec<_> = stats
        .store_events()
        .iter()
        .map(|(event, value)| (Some((*event).to_owned()), *value))
        .collect();
    let mut events = events;
    events.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(events, expected);
    provider.shutdown().expect("shutdown");
}
