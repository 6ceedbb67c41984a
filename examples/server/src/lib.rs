//! The reference deployment of `tower-refresh-coalesce`: an axum token server over a SQLite
//! token store with refresh-token rotation and reuse detection, and the coalescing layer in
//! front of its refresh route.
//!
//! The crate is a library (the application, [`app`], and the [`harness`] that tests, the
//! demo and the load tool drive it with) and a binary (`cargo run -p server -- --help`).
//!
//! # HTTP contract
//!
//! | Route | Answer |
//! | --- | --- |
//! | `POST /auth/login` `{"username","password"}` (a form with the same fields also works) | `200 {"access_token","refresh_token","token_type":"Bearer","expires_in"}` (a new token family, refresh token also set as cookie); bad credentials `401 {"error":"invalid_credentials"}`; a confidential client with a wrong or missing secret `401 {"error":"invalid_client"}`; malformed body `400 {"error":"invalid_request"}` |
//! | `POST /auth/refresh` | the same `200` shape with `Cache-Control: no-store`, `Pragma: no-cache` and `Set-Cookie: refresh_token=...; HttpOnly; Secure; SameSite=Strict; Path=/auth`; no token `400 {"error":"invalid_request"}`; invalid, expired, revoked or reused token [`INVALID_GRANT_STATUS`] `{"error":"invalid_grant"}`; malformed `Authorization: Basic`, or failed client authentication, `401 {"error":"invalid_client"}`; another client's token `invalid_grant`; a form with another `grant_type` `400 {"error":"unsupported_grant_type"}` |
//! | `POST /auth/logout` | revokes the token's family: `200 {"status":"logged_out"}` (idempotent), invalid token `invalid_grant` |
//! | `GET /api/me` | `Authorization: Bearer <access token>` -> `200 {"sub": ...}`; anything else `401 {"error":"invalid_token"}` |
//! | `GET /metrics` | OpenMetrics text: `refresh_rotations_total`, `refresh_reuse_detected_total`, `refresh_requests_total{outcome}`, `login_requests_total{outcome}`, `logout_requests_total{outcome}`, and the coalescing layer's OpenTelemetry instruments (`refresh_coalesce_requests_total{outcome}`, `refresh_coalesce_wait_duration_seconds`, `refresh_coalesce_flights_active`, ...) |
//! | `GET /healthz` | `200 ok` |
//!
//! Refresh and logout take the token as JSON `{"refresh_token"}`, as an RFC 6749 §6 form
//! (`grant_type=refresh_token&refresh_token=...`, optional `client_id`, `client_secret` and
//! `scope`), as the
//! `refresh_token` cookie or as `Authorization: Bearer`. `Authorization: Basic` is client
//! authentication (RFC 6749 §2.3.1), never a token. Different tokens in one request are
//! refused with `invalid_request`. Every error is JSON `{"error", "error_description"}`;
//! bodies over [`MAX_BODY_BYTES`] get `413`.
//!
//! Confidential clients (`--client ID:SECRET`, [`ClientSpec`]) authenticate by
//! `Authorization: Basic` (id and secret form-urlencoded, RFC 6749 §2.3.1) or by
//! `client_id` + `client_secret` in the body, at most one way per request. Login binds the
//! new family to the confidential client it authenticated. Naming a confidential client
//! with a wrong or missing secret, or presenting its family's token with no client at all,
//! gets `401 {"error":"invalid_client"}` with `WWW-Authenticate: Basic`; another client
//! gets `invalid_grant`. Both are decided before the token is consumed: they never rotate
//! it, never count as reuse and never revoke the family. Other client ids are public
//! clients: nothing is checked and nothing bound.
//!
//! Refresh tokens are HS256 JWTs (`typ: refresh+jwt`, claims `sub exp iat jti fam
//! token_use`), stored only as their SHA-256. Each is single-use: rotation marks it
//! `rotated` in the same `BEGIN IMMEDIATE` transaction that stores its successor, and a
//! rotated token presented again revokes its whole family (reuse detection). Access tokens
//! (`typ: at+jwt`) are stateless: they stay valid until they expire, even after logout.
//!
//! The coalescing layer is attached in exactly one place, [`refresh_route`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{MethodRouter, get, post};
use prometheus_client::registry::Registry;

pub mod audit;
pub mod coalesce;
mod crypto;
pub mod handlers;
pub mod harness;
pub mod metrics;
pub mod store;
pub mod telemetry;
pub mod tokens;

pub use metrics::Metrics;
pub use store::{Store, StoreError};
pub use tokens::TokenKeys;

/// The always-present demo user's name.
pub const DEMO_USER: &str = "demo";
/// The demo user's password (unless `--user demo:...` replaces it).
pub const DEMO_PASSWORD: &str = "demo";
/// Status of `invalid_grant` answers: `400 Bad Request`, as RFC 6749 §5.2 requires.
pub const INVALID_GRANT_STATUS: StatusCode = StatusCode::BAD_REQUEST;
/// Status of a refused login (`{"error":"invalid_credentials"}`): `401 Unauthorized`.
pub const INVALID_CREDENTIALS_STATUS: StatusCode = StatusCode::UNAUTHORIZED;
/// Largest accepted request body; larger ones get `413`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Name of the refresh-token cookie.
pub const REFRESH_COOKIE: &str = "refresh_token";
/// `Path` of the refresh-token cookie: sent to `/auth/refresh` and `/auth/logout` only.
pub const REFRESH_COOKIE_PATH: &str = "/auth";
/// Path of the refresh endpoint.
pub const REFRESH_PATH: &str = "/auth/refresh";

/// Command-line configuration of the reference server.
///
/// `ttl`, `wait_timeout`, `no_coalesce` and the `redis` flags configure the coalescing
/// layer; the inner application only keeps them.
#[derive(Clone, clap::Parser)]
#[command(
    name = "server",
    about = "Reference deployment of tower-refresh-coalesce: an axum token server over SQLite",
    long_about = None
)]
pub struct Config {
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,

    /// SQLite database file, shareable by several instances [default: in memory]
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// Add a user (repeatable); the user demo with password demo always exists
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    pub users: Vec<UserSpec>,

    /// Add a confidential client (repeatable); it must authenticate with its secret.
    /// Clients not named are public
    #[arg(long = "client", value_name = "ID:SECRET")]
    pub clients: Vec<ClientSpec>,

    /// Seconds a refresh response is replayed to late retries of the same token
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_secs)]
    pub ttl: f64,

    /// Seconds a caller waits for a coalesced refresh before it gets 429
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub wait_timeout: f64,

    /// Simulated slow upstream: the refresh handler sleeps this long before the database
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub refresh_delay_ms: u64,

    /// Serve /auth/refresh without the coalescing layer
    #[arg(long)]
    pub no_coalesce: bool,

    /// Deployment secret for token signing and fingerprints [default: random, kept in the database]
    #[arg(
        long,
        value_name = "VALUE",
        env = "SERVER_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,

    /// Redis URL to coordinate the coalescing layer across instances
    #[arg(long, value_name = "URL", conflicts_with_all = ["redis_cluster", "redis_sentinel"])]
    pub redis: Option<String>,

    /// A seed node of a Redis Cluster to coordinate through instead (repeatable)
    #[arg(
        long = "redis-cluster",
        value_name = "URL",
        conflicts_with = "redis_sentinel"
    )]
    pub redis_cluster: Vec<String>,

    /// A Redis Sentinel to find the master through instead (repeatable; with --redis-master)
    #[arg(long = "redis-sentinel", value_name = "URL", requires = "redis_master")]
    pub redis_sentinel: Vec<String>,

    /// The name the sentinels know the master by
    #[arg(
        long = "redis-master",
        value_name = "NAME",
        requires = "redis_sentinel"
    )]
    pub redis_master: Option<String>,

    /// Replicas that must acknowledge an election before its leader refreshes
    /// [default: 0 with --redis, 1 with --redis-cluster or --redis-sentinel]
    #[arg(long = "redis-min-replicas", value_name = "N")]
    pub redis_min_replicas: Option<u32>,

    /// Answer 503 rather than refresh on this instance alone while Redis is unreachable
    #[arg(long)]
    pub require_redis: bool,

    /// Access-token lifetime in seconds
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub access_ttl: u64,

    /// Refresh-token lifetime in seconds (default 14 days)
    #[arg(long, value_name = "SECS", default_value_t = 14 * 24 * 3600)]
    pub refresh_ttl: u64,

    /// Append the coalescing layer's audit events (JSON lines) to this file [default: the log]
    #[arg(long = "audit-log", value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

impl Default for Config {
    /// The documented defaults, the same as an empty command line (without reading
    /// `SERVER_SECRET`).
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            db: None,
            users: Vec::new(),
            clients: Vec::new(),
            ttl: 30.0,
            wait_timeout: 10.0,
            refresh_delay_ms: 0,
            no_coalesce: false,
            secret: None,
            redis: None,
            redis_cluster: Vec::new(),
            redis_sentinel: Vec::new(),
            redis_master: None,
            redis_min_replicas: None,
            require_redis: false,
            access_ttl: 900,
            refresh_ttl: 14 * 24 * 3600,
            audit_log: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .field("users", &self.users)
            .field("clients", &self.clients)
            .field("ttl", &self.ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("refresh_delay_ms", &self.refresh_delay_ms)
            .field("no_coalesce", &self.no_coalesce)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("redis_cluster", &redact_urls(&self.redis_cluster))
            .field("redis_sentinel", &redact_urls(&self.redis_sentinel))
            .field("redis_master", &self.redis_master)
            .field("redis_min_replicas", &self.redis_min_replicas)
            .field("require_redis", &self.require_redis)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("audit_log", &self.audit_log)
            .finish()
    }
}

impl Config {
    /// `--ttl` as a [`Duration`].
    pub fn ttl_duration(&self) -> Duration {
        secs_to_duration(self.ttl)
    }

    /// `--wait-timeout` as a [`Duration`].
    pub fn wait_timeout_duration(&self) -> Duration {
        secs_to_duration(self.wait_timeout)
    }

    fn validate(&self) -> Result<(), AppError> {
        for (name, value) in [("ttl", self.ttl), ("wait_timeout", self.wait_timeout)] {
            if check_secs(value).is_err() {
                return Err(AppError::Config(format!(
                    "{name} must be a finite, non-negative number of seconds"
                )));
            }
        }
        for user in &self.users {
            user.validate().map_err(AppError::Config)?;
        }
        for client in &self.clients {
            client.validate().map_err(AppError::Config)?;
        }
        if self.secret.as_deref() == Some("") {
            return Err(AppError::Config("the secret must not be empty".into()));
        }
        Ok(())
    }
}

fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

fn check_secs(secs: f64) -> Result<f64, String> {
    if secs.is_finite() && secs >= 0.0 && Duration::try_from_secs_f64(secs).is_ok() {
        Ok(secs)
    } else {
        Err("expected a finite, non-negative number of seconds".into())
    }
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    check_secs(secs)
}

/// A `--user NAME:PASSWORD` entry. The password may contain `:`; the name may not.
#[derive(Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// User name (the `sub` of its tokens).
    pub name: String,
    /// Plain-text password; hashed with a random salt before it is stored.
    pub password: String,
}

impl UserSpec {
    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 256 || self.name.contains(':') {
            return Err(format!(
                "user name `{}` must be 1 to 256 bytes without `:`",
                self.name
            ));
        }
        if self.password.is_empty() {
            return Err(format!("user `{}` needs a non-empty password", self.name));
        }
        Ok(())
    }
}

impl std::str::FromStr for UserSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, password) = text
            .split_once(':')
            .ok_or_else(|| "expected NAME:PASSWORD".to_owned())?;
        let spec = Self {
            name: name.to_owned(),
            password: password.to_owned(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl std::fmt::Debug for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSpec")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A `--client ID:SECRET` entry: a confidential client. The secret may contain `:`; the
/// id may not.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// Client id (`client_id`, or the user part of `Authorization: Basic`).
    pub id: String,
    /// Plain-text client secret; hashed with a random salt before it is stored.
    pub secret: String,
}

impl ClientSpec {
    fn validate(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > handlers::MAX_CLIENT_ID_LEN
            || self.id.contains(':')
        {
            return Err(format!(
                "client id `{}` must be 1 to {} bytes without `:`",
                self.id,
                handlers::MAX_CLIENT_ID_LEN
            ));
        }
        if self.secret.is_empty() || self.secret.len() > handlers::MAX_CLIENT_SECRET_LEN {
            return Err(format!(
                "client `{}` needs a secret of 1 to {} bytes",
                self.id,
                handlers::MAX_CLIENT_SECRET_LEN
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for ClientSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (id, secret) = text
            .split_once(':')
            .ok_or_else(|| "expected ID:SECRET".to_owned())?;
        let spec = Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl std::fmt::Debug for ClientSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSpec")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `url` with its credentials replaced by `<redacted>`: the user information
/// (`redis://user:pass@host/` becomes `redis://<redacted>@host/`) and the value of a
/// `pass`, `password`, `user` or `username` query parameter
/// (`redis+unix:///run/redis.sock?pass=...`).
/// For logs and `Debug` output; the real URL is only handed to the Redis client.
pub fn redact_url(url: &str) -> String {
    redact_one(url)
}

/// [`redact_url`] of each URL.
pub fn redact_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|url| redact_url(url)).collect()
}

fn redact_one(url: &str) -> String {
    let Some((scheme, after)) = url.split_once("://") else {
        // Not a URL we understand: it may be anything, so show none of it.
        return "<redacted>".to_owned();
    };
    // The last `@` ends the user information even when an unescaped password holds `/`,
    // `?` or `@`: redacting too much is fine, too little is not.
    let after = match after.rsplit_once('@') {
        Some((_userinfo, host)) => format!("<redacted>@{host}"),
        None => after.to_owned(),
    };
    let Some((base, query)) = after.split_once('?') else {
        return format!("{scheme}://{after}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if ["pass", "password", "user", "username"]
                    .iter()
                    .any(|k| key.eq_ignore_ascii_case(k)) =>
            {
                format!("{key}=<redacted>")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{base}?{}", query.join("&"))
}

/// Why [`app`] could not start.
#[derive(Debug)]
pub enum AppError {
    /// An invalid configuration value.
    Config(String),
    /// The database could not be opened, migrated or seeded.
    Store(StoreError),
    /// The coalescing layer could not be built.
    Layer(tower_refresh_coalesce::BoxError),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Config(message) => write!(f, "invalid configuration: {message}"),
            AppError::Store(e) => write!(f, "cannot prepare the token store: {e}"),
            AppError::Layer(e) => write!(f, "cannot build the coalescing layer: {e}"),
        }
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AppError::Config(_) => None,
            AppError::Store(e) => Some(e),
            AppError::Layer(e) => Some(&**e),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Store(e)
    }
}

/// What a successful logout reports to [`AppState::set_on_logout`]'s hook.
#[derive(Clone)]
pub struct LogoutEvent {
    /// The user (`sub`) whose token family was revoked.
    pub subject: String,
    /// The refresh token presented to logout, so a cache keyed by it can be dropped.
    /// Never log it.
    pub token: String,
    /// The client id from `Authorization: Basic` or a `client_id` parameter, if any.
    pub client_id: Option<String>,
}

impl std::fmt::Debug for LogoutEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogoutEvent")
            .field("subject", &self.subject)
            .field("token", &"<redacted>")
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// The logout hook: called after every successful logout (see [`AppState::set_on_logout`]).
pub type LogoutHook = Arc<dyn Fn(&LogoutEvent) + Send + Sync>;

/// Shared application state: cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    secret: Vec<u8>,
    keys: TokenKeys,
    metrics: Metrics,
    on_logout: RwLock<LogoutHook>,
    coalesce: Option<coalesce::Layer>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.inner.config)
            .field("store", &self.inner.store)
            .field("secret", &"<redacted>")
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The configuration the app was started with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The deployment secret (`--secret`, or the random one kept in the database). The
    /// coalescing layer derives its fingerprint key from it.
    pub fn secret(&self) -> &[u8] {
        &self.inner.secret
    }

    /// The HS256 key tokens are signed with (`HMAC-SHA256(secret, "jwt-signing")`), for a
    /// verifier in front of the handlers.
    pub fn jwt_signing_key(&self) -> &[u8] {
        self.inner.keys.signing_key()
    }

    /// Token signing and verification.
    pub fn keys(&self) -> &TokenKeys {
        &self.inner.keys
    }

    /// The token store. Its methods block: call them from `spawn_blocking`.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A handle on the coalescing layer of the refresh route; `None` with `--no-coalesce`.
    pub fn coalesce(&self) -> Option<tower_refresh_coalesce::Handle> {
        self.inner.coalesce.as_ref().map(|layer| layer.handle())
    }

    /// The app's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The app's Prometheus registry, served at `/metrics`.
    pub fn registry(&self) -> Arc<Mutex<Registry>> {
        self.inner.metrics.registry()
    }

    /// Registers more metrics (the coalescing layer's) in the app's registry.
    pub fn register_metrics<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        self.inner.metrics.register_with(f)
    }

    /// Replaces the logout hook (the default does nothing). The coalescing layer uses it
    /// to drop replays of a revoked family's token.
    ///
    /// The hook runs on tokio's blocking pool right after the revocation is committed
    /// (even if the caller has disconnected), before the answer is sent. It may block
    /// briefly; the tokio runtime is available in it (`tokio::spawn` works).
    pub fn set_on_logout(&self, hook: impl Fn(&LogoutEvent) + Send + Sync + 'static) {
        let mut slot = self
            .inner
            .on_logout
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Arc::new(hook);
    }

    /// The current logout hook.
    pub fn on_logout(&self) -> LogoutHook {
        Arc::clone(
            &self
                .inner
                .on_logout
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A ready application: the router to serve and its state.
#[derive(Debug)]
pub struct App {
    /// All routes, with the state applied.
    pub router: Router,
    /// The state the router holds.
    pub state: AppState,
}

/// Opens the store, seeds the users, loads the secret and builds the router.
///
/// This blocks (SQLite, password hashing); call it at start-up.
pub fn app(config: Config) -> Result<App, AppError> {
    config.validate()?;
    let store = Store::open(config.db.as_deref())?;
    let (secret, secret_source) = match &config.secret {
        Some(secret) => (secret.as_bytes().to_vec(), "configured"),
        None => (store.load_or_create_secret()?, "database"),
    };
    if !store.user_exists(DEMO_USER)? {
        store.put_user(DEMO_USER, DEMO_PASSWORD, false)?;
    }
    for user in &config.users {
        store.put_user(&user.name, &user.password, true)?;
    }
    for client in &config.clients {
        store.put_client(&client.id, &client.secret)?;
    }
    let keys = TokenKeys::from_secret(&secret, config.access_ttl, config.refresh_ttl);
    let telemetry = telemetry::Telemetry::new();
    let coalesce = if config.no_coalesce {
        None
    } else {
        let audit = match &config.audit_log {
            Some(path) => audit::AuditLog::file(path).map_err(|error| {
                AppError::Config(format!(
                    "cannot open the audit log {}: {error}",
                    path.display()
                ))
            })?,
            None => audit::AuditLog::log(),
        };
        Some(
            coalesce::layer(&config, &secret, &keys, telemetry.meter(), audit)
                .map_err(AppError::Layer)?,
        )
    };
    tracing::info!(
        db = %config.db.as_deref().map_or("<memory>".into(), |p| p.display().to_string()),
        secret = secret_source,
        users = config.users.len() + 1,
        confidential_clients = config.clients.len(),
        "token store ready"
    );
    let state = AppState {
        inner: Arc::new(Inner {
            config,
            store,
            secret,
            keys,
            metrics: Metrics::new(),
            on_logout: RwLock::new(Arc::new(|_: &LogoutEvent| {})),
            coalesce,
        }),
    };
    if let Some(handle) = state.coalesce() {
        state.register_metrics(|registry| {
            registry.register_collector(Box::new(telemetry.collector()));
        });
        // A revoked family must never be replayed: drop the token's entry and every entry
        // of its subject.
        state.set_on_logout(move |event| {
            handle.invalidate_token(&event.token);
            handle.invalidate_subject(&event.subject);
        });
    }
    Ok(App {
        router: router(state.clone()),
        state,
    })
}

/// The whole router for `state`: every route of the contract, JSON fallbacks for unknown
/// paths (404) and methods (405), and a [`MAX_BODY_BYTES`] body limit.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/auth/login", post(handlers::login))
        .route("/auth/logout", post(handlers::logout))
        .route("/api/me", get(handlers::me))
        .route("/metrics", get(handlers::metrics))
        .route("/healthz", get(handlers::healthz))
        .with_state(state.clone())
        .route(REFRESH_PATH, refresh_route(&state))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// The `POST /auth/refresh` route: the one place where the coalescing layer is attached,
/// unless `--no-coalesce`.
pub fn refresh_route(state: &AppState) -> MethodRouter {
    let route = post(handlers::refresh).with_state(state.clone());
    match &state.inner.coalesce {
        Some(layer) => route.route_layer(layer.clone()),
        None => route,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_lose_their_credentials_in_logs() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "redis://user:pass@host:6379/0",
                "redis://<redacted>@host:6379/0",
            ),
            ("rediss://:p@ss/w?rd@host/", "rediss://<redacted>@host/"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=hunter2",
                "redis+unix:///run/redis.sock?db=1&pass=<redacted>",
            ),
            ("user:pass@host", "<redacted>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let config = Config {
            redis: Some("redis://admin:hunter2@cache:6379/".into()),
            clients: vec!["app:s3cret".parse().expect("a valid client")],
            ..Config::default()
        };
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("admin"),
            "{debug}"
        );
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("app"), "{debug}");
    }
}
