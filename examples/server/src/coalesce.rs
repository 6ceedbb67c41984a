//! The coalescing layer of the refresh route.

use opentelemetry::metrics::Meter;
use tower_refresh_coalesce::{
    AuditEvent, BoxError, HttpExtract, HttpShare, JwtVerifier, RefreshCoalesceLayer,
};

use super::{Config, INVALID_GRANT_STATUS, TokenKeys, audit::AuditLog, crypto};

/// The layer in front of `POST /auth/refresh`.
pub type Layer = RefreshCoalesceLayer<HttpExtract<JwtVerifier>, HttpShare>;

/// Builds the layer: it verifies refresh tokens exactly as the handler does (HS256 under
/// the server's key, `typ: refresh+jwt`), keys them with a fingerprint secret derived from
/// the deployment secret (so instances sharing a secret agree on keys), answers
/// `invalid_grant` with the handler's status, reports its instruments through `meter` and
/// its audit events to `audit`, and with `--redis` coordinates with the other instances.
pub fn layer(
    config: &Config,
    secret: &[u8],
    keys: &TokenKeys,
    meter: Meter,
    audit: AuditLog,
) -> Result<Layer, BoxError> {
    let verifier = JwtVerifier::hs256(keys.signing_key())
        .typ(super::tokens::REFRESH_TOKEN_TYP)
        .build()?;
    let extract =
        HttpExtract::new(verifier).secret(crypto::hmac_sha256(secret, b"refresh-fingerprints"));
    let mut builder = RefreshCoalesceLayer::http(extract)
        .ttl(config.ttl_duration())
        .wait_timeout(config.wait_timeout_duration())
        .share(HttpShare::new().invalid_grant_status(INVALID_GRANT_STATUS))
        .meter(meter)
        .audit(move |event: &AuditEvent<'_>| audit.record(event));
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
