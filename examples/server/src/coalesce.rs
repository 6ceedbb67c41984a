//! The coalescing layer of the refresh route, and its counters on `/metrics`.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use tower_refresh_coalesce::{
    BoxError, Handle, HttpExtract, HttpShare, JwtVerifier, Outcome, RefreshCoalesceLayer,
};

use super::{Config, INVALID_GRANT_STATUS, TokenKeys, crypto};

/// The layer in front of `POST /auth/refresh`.
pub type Layer = RefreshCoalesceLayer<HttpExtract<JwtVerifier>, HttpShare>;

/// Builds the layer: it verifies refresh tokens exactly as the handler does (HS256 under
/// the server's key, `typ: refresh+jwt`), keys them with a fingerprint secret derived from
/// the deployment secret (so instances sharing a secret agree on keys), answers
/// `invalid_grant` with the handler's status, and with `--redis` coordinates with the
/// other instances.
pub fn layer(config: &Config, secret: &[u8], keys: &TokenKeys) -> Result<Layer, BoxError> {
    let verifier = JwtVerifier::hs256(keys.signing_key())
        .typ(super::tokens::REFRESH_TOKEN_TYP)
        .build()?;
    let extract =
        HttpExtract::new(verifier).secret(crypto::hmac_sha256(secret, b"refresh-fingerprints"));
    let mut builder = RefreshCoalesceLayer::http(extract)
        .ttl(config.ttl_duration())
        .wait_timeout(config.wait_timeout_duration())
        .share(HttpShare::new().invalid_grant_status(INVALID_GRANT_STATUS));
    if let Some(store) = redis_store(config, secret)? {
        builder = builder.store(store).require_store(config.require_redis);
    }
    Ok(builder.build())
}

/// The Redis store the `--redis*` flags name, if any.
#[cfg(feature = "redis")]
fn redis_store(
    config: &Config,
    secret: &[u8],
) -> Result<Option<tower_refresh_coalesce::store::RedisStore>, BoxError> {
    use tower_refresh_coalesce::store::RedisStore;

    let seal_secret = crypto::hmac_sha256(secret, b"redis-seal");
    // The URLs may carry passwords: they are logged redacted.
    let builder = if let Some(url) = &config.redis {
        tracing::info!(url = %super::redact_url(url), "coordinating with other instances through redis");
        RedisStore::standalone(redis::Client::open(url.as_str())?, seal_secret)
    } else if !config.redis_cluster.is_empty() {
        tracing::info!(seeds = ?super::redact_urls(&config.redis_cluster), "coordinating with other instances through a redis cluster");
        RedisStore::cluster(config.redis_cluster.iter().map(String::as_str), seal_secret)
    } else if let Some(master) = &config.redis_master {
        tracing::info!(sentinels = ?super::redact_urls(&config.redis_sentinel), %master, "coordinating with other instances through redis sentinel");
        RedisStore::sentinel(
            config.redis_sentinel.iter().map(String::as_str),
            master.as_str(),
            seal_secret,
        )
    } else {
        return Ok(None);
    };
    let builder = match config.redis_min_replicas {
        Some(replicas) => builder.min_replicas(replicas),
        None => builder,
    };
    Ok(Some(builder.build()?))
}

#[cfg(not(feature = "redis"))]
fn redis_store(
    config: &Config,
    _secret: &[u8],
) -> Result<Option<tower_refresh_coalesce::store::MemoryStore>, BoxError> {
    let wants_redis = config.redis.is_some()
        || !config.redis_cluster.is_empty()
        || !config.redis_sentinel.is_empty();
    if wants_redis {
        return Err(
            "the --redis flags need the `redis` feature: cargo run --release -p server --features redis"
                .into(),
        );
    }
    Ok(None)
}

/// Exposes the layer's [`Stats`](tower_refresh_coalesce::Stats) on each scrape.
#[derive(Debug)]
pub struct StatsCollector(pub Handle);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "refresh_coalesce_requests",
            "Requests seen by the coalescing layer, by how they were served or refused",
            None,
            counter.metric_type(),
        )?;
        for outcome in Outcome::ALL {
            let labels = OutcomeLabel {
                outcome: outcome.as_str(),
            };
            ConstCounter::new(stats.outcome(outcome)).encode(family.encode_family(&labels)?)?;
        }
        let reuse = ConstCounter::new(stats.reuse_suspected);
        reuse.encode(encoder.encode_descriptor(
            "refresh_coalesce_reuse_suspected",
            "Flights started for a second token of a subject that had a live entry",
            None,
            reuse.metric_type(),
        )?)?;
        let store = ConstCounter::new(0u64);
        let mut store_family = encoder.encode_descriptor(
            "refresh_coalesce_store",
            "What flights did with the coordination store (with --redis)",
            None,
            store.metric_type(),
        )?;
        for (event, value) in [
            ("won", stats.store_won),
            ("lost", stats.store_lost),
            ("replayed", stats.store_replayed),
            ("errors", stats.store_errors),
            ("breaker_opened", stats.breaker_opened),
        ] {
            let labels = EventLabel { event };
            ConstCounter::new(value).encode(store_family.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            (
                "refresh_coalesce_in_flight",
                "Inner refresh calls running now",
                stats.in_flight,
            ),
            (
                "refresh_coalesce_entries",
                "Live flights and replays in the coalescing table",
                stats.entries,
            ),
            (
                "refresh_coalesce_breaker_open",
                "1 while the coordination store is skipped after repeated failures",
                stats.breaker_open,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
