//! Integration tests of the reference server's inner application (`examples/server/app`),
//! without the coalescing layer: every token form, rotation, reuse detection, the refresh
//! storm the layer exists to fix, logout, `/api/me`, `/metrics` and a database file shared
//! by two instances.

// `pub` so the whole API counts as reachable in this test crate (no dead-code warnings for
// the parts these tests do not call).
#[path = "../examples/server/app/mod.rs"]
pub mod app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use base64::Engine as _;
use clap::{CommandFactory as _, Parser as _};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use app::{App, AppState, Config, LogoutEvent};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A response, fully read.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}), got {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a JSON error answer and returns it.
    fn assert_error(&self, status: StatusCode, error: &str) -> Value {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(
            self.header(header::CONTENT_TYPE),
            Some("application/json"),
            "errors are JSON"
        );
        let body = self.json();
        assert_eq!(body["error"], error, "body: {body}");
        if let Some(description) = body.get("error_description") {
            assert!(description.is_string());
        }
        body
    }

    fn assert_invalid_grant(&self) -> Value {
        self.assert_error(app::INVALID_GRANT_STATUS, "invalid_grant")
    }

    /// Asserts a successful token response and returns its tokens.
    fn assert_tokens(&self) -> Tokens {
        assert_eq!(self.status, StatusCode::OK, "body: {:?}", self.body);
        let body = self.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 900);
        let tokens = Tokens {
            access: body["access_token"]
                .as_str()
                .expect("access_token")
                .to_owned(),
            refresh: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .to_owned(),
        };
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
        assert_eq!(self.header(header::PRAGMA), Some("no-cache"));
        let cookies: Vec<&str> = self
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(cookies.len(), 1, "one Set-Cookie: {cookies:?}");
        let cookie = cookies[0];
        assert!(
            cookie.starts_with(&format!("refresh_token={};", tokens.refresh)),
            "cookie carries the new refresh token: {cookie}"
        );
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/auth"] {
            assert!(
                cookie.split("; ").any(|a| a == attribute),
                "{attribute} in {cookie}"
            );
        }
        tokens
    }
}

#[derive(Debug, Clone)]
struct Tokens {
    access: String,
    refresh: String,
}

/// The inner application alone: these tests are about the token store and the handlers,
/// so the coalescing layer is off (`tests/server_e2e.rs` tests the app with it).
fn config() -> Config {
    Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        no_coalesce: true,
        ..Config::default()
    }
}

fn start_app(config: Config) -> App {
    app::app(config).expect("the app starts")
}

/// Sends one request to the router in process.
async fn call<B>(router: &Router, request: Request<B>) -> Reply
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("routers are infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn post(path: &str) -> hyper::http::request::Builder {
    Request::builder().method(Method::POST).uri(path)
}

fn json_request(path: &str, body: &Value) -> Request<Body> {
    post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("valid request")
}

fn form_request(path: &str, body: &str) -> Request<Body> {
    post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .expect("valid request")
}

fn basic(client_id: &str, secret: &str) -> String {
    let credentials = format!("{client_id}:{secret}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

async fn login(router: &Router, username: &str, password: &str) -> Reply {
    call(
        router,
        json_request(
            "/auth/login",
            &json!({ "username": username, "password": password }),
        ),
    )
    .await
}

async fn login_demo(router: &Router) -> Tokens {
    login(router, "demo", "demo").await.assert_tokens()
}

async fn refresh_json(router: &Router, refresh_token: &str) -> Reply {
    call(
        router,
        json_request("/auth/refresh", &json!({ "refresh_token": refresh_token })),
    )
    .await
}

async fn get_with_bearer(router: &Router, path: &str, token: &str) -> Reply {
    let request = Request::builder()
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .expect("valid request");
    call(router, request).await
}

/// Whether the family of `refresh_token` is revoked in `state`'s store.
async fn family_revoked(state: &AppState, refresh_token: &str) -> bool {
    let claims = state
        .keys()
        .verify_refresh(refresh_token, app::unix_now())
        .expect("a token this app issued");
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.store().family_revoked(&claims.fam))
        .await
        .expect("no panic")
        .expect("store works")
        .expect("the family exists")
}

/// A server on a real socket, stopped on drop.
struct TestServer {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    state: AppState,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    async fn start(config: Config) -> Self {
        let App { router, state } = start_app(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("bound address");
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("server runs");
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            base: format!("http://{addr}"),
            client,
            state,
            task,
        }
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        let response = self
            .client
            .request(request)
            .await
            .expect("the server answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body reads").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    fn post(&self, path: &str) -> hyper::http::request::Builder {
        post(&format!("{}{path}", self.base))
    }

    async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let request = self
            .post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))
            .expect("valid request");
        self.send(request).await
    }

    async fn login_demo(&self) -> Tokens {
        self.post_json(
            "/auth/login",
            &json!({ "username": "demo", "password": "demo" }),
        )
        .await
        .assert_tokens()
    }

    async fn get(&self, path: &str) -> Reply {
        let request = Request::builder()
            .uri(format!("{}{path}", self.base))
            .body(Full::default())
            .expect("valid request");
        self.send(request).await
    }
}

/// A database file in the temp directory, removed (with its WAL files) on drop.
struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "tower-refresh-coalesce-{name}-{}-{}-{}.db",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            app::unix_now()
        );
        Self(std::env::temp_dir().join(unique))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The samples of an OpenMetrics text, checking its syntax on the way.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
    let mut samples = Vec::new();
    for line in lines {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line == "# EOF" {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line without value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value is not a number: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name: {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "label set: {line:?}");
        }
        samples.push((series.to_owned(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {series} in {samples:?}"))
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[test]
fn default_config_matches_the_command_line_defaults() {
    Config::command().debug_assert();
    let parsed = Config::try_parse_from(["server"]).expect("an empty command line parses");
    let default = Config::default();
    assert_eq!(parsed.addr, default.addr);
    assert_eq!(parsed.addr.to_string(), "127.0.0.1:3000");
    assert_eq!(parsed.db, None);
    assert!(parsed.users.is_empty());
    assert_eq!(parsed.ttl, 30.0);
    assert_eq!(parsed.ttl, default.ttl);
    assert_eq!(parsed.wait_timeout, 10.0);
    assert_eq!(parsed.wait_timeout, default.wait_timeout);
    assert_eq!(parsed.refresh_delay_ms, default.refresh_delay_ms);
    assert!(!parsed.no_coalesce && !default.no_coalesce);
    assert_eq!(parsed.access_ttl, 900);
    assert_eq!(parsed.access_ttl, default.access_ttl);
    assert_eq!(parsed.refresh_ttl, 14 * 24 * 3600);
    assert_eq!(parsed.refresh_ttl, default.refresh_ttl);
    assert_eq!(parsed.redis, None);
}

#[test]
fn help_lists_every_flag_with_a_description() {
    let help = Config::command().render_help().to_string();
    for flag in [
        "--addr",
        "--db",
        "--user",
        "--ttl",
        "--wait-timeout",
        "--refresh-delay-ms",
        "--no-coalesce",
        "--secret",
        "--access-ttl",
        "--refresh-ttl",
        "--redis",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        assert!(
            line.trim_start().len() > flag.len() + 12,
            "{flag} has a description: {line:?}"
        );
    }
}

#[test]
fn flags_parse_decimals_repeated_users_and_reject_bad_values() {
    let config = Config::try_parse_from([
        "server",
        "--ttl",
        "0.5",
        "--wait-timeout",
        "2.25",
        "--user",
        "alice:s3:cret",
        "--user",
        "bob:pw",
        "--no-coalesce",
        "--secret",
        "k",
    ])
    .expect("valid flags parse");
    assert_eq!(config.ttl_duration(), std::time::Duration::from_millis(500));
    assert_eq!(
        config.wait_timeout_duration(),
        std::time::Duration::from_millis(2250)
    );
    assert_eq!(config.users.len(), 2);
    assert_eq!(config.users[0].name, "alice");
    assert_eq!(config.users[0].password, "s3:cret");
    assert!(config.no_coalesce);
    assert!(
        !format!("{config:?}").contains("s3:cret"),
        "Debug redacts passwords"
    );
    for bad in [
        &["--ttl", "-1"][..],
        &["--ttl", "NaN"],
        &["--wait-timeout", "inf"],
        &["--user", "nocolon"],
        &["--user", ":pw"],
        &["--user", "carol:"],
    ] {
        let args = std::iter::once("server").chain(bad.iter().copied());
        assert!(Config::try_parse_from(args).is_err(), "{bad:?} is refused");
    }
}

#[tokio::test]
async fn command_line_users_can_log_in_next_to_demo() {
    let App { router, .. } = start_app(Config {
        users: vec!["alice:wonder:land".parse().expect("valid user")],
        ..config()
    });
    login(&router, "alice", "wonder:land").await.assert_tokens();
    login_demo(&router).await;
}

// ---------------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn login_with_good_credentials_returns_a_token_pair() {
    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;
    assert_ne!(tokens.access, tokens.refresh);
    let me = server
        .send(
            Request::builder()
                .uri(format!("{}/api/me", server.base))
                .header(header::AUTHORIZATION, format!("Bearer {}", tokens.access))
                .body(Full::default())
                .expect("valid request"),
        )
        .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json(), json!({ "sub": "demo" }));
}

#[tokio::test]
async fn login_with_bad_credentials_is_refused_with_401() {
    let App { router, .. } = start_app(config());
    for (user, password) in [("demo", "wrong"), ("nobody", "demo"), ("demo", "")] {
        login(&router, user, password)
            .await
            .assert_error(app::INVALID_CREDENTIALS_STATUS, "invalid_credentials");
    }
}

#[tokio::test]
async fn login_with_a_malformed_body_is_a_json_400() {
    let App { router, .. } = start_app(config());
    let long_name = "x".repeat(300);
    let too_long = json!({ "username": long_name, "password": "pw" }).to_string();
    for body in [
        "",
        "{",
        "[]",
        "null",
        r#"{"username":"demo"}"#,
        r#"{"username":1,"password":"demo"}"#,
        &too_long,
    ] {
        let request = post("/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .expect("valid request");
        call(&router, request)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let invalid_utf8 = post("/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(vec![b'{', 0xff, 0xfe, b'}']))
        .expect("valid request");
    call(&router, invalid_utf8)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

// ---------------------------------------------------------------------------------------
// Refresh: every token form
// ---------------------------------------------------------------------------------------

/// Presents `token` in one of the accepted forms and checks the rotation.
async fn assert_rotates(build: impl Fn(&str) -> Request<Body>) {
    let App { router, state } = start_app(config());
    let first = login_demo(&router).await;
    let second = call(&router, build(&first.refresh)).await.assert_tokens();
    assert_ne!(second.refresh, first.refresh, "a new refresh token");
    assert_ne!(second.access, first.access, "a new access token");
    // The new pair works: the access token on the API, the refresh token once more.
    let me = get_with_bearer(&router, "/api/me", &second.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    let third = call(&router, build(&second.refresh)).await.assert_tokens();
    assert_ne!(third.refresh, second.refresh);
    assert_eq!(state.metrics().rotations_total(), 2);
    assert_eq!(state.metrics().reuse_detected_total(), 0);
}

#[tokio::test]
async fn refresh_with_a_json_body_rotates_the_pair() {
    assert_rotates(|token| json_request("/auth/refresh", &json!({ "refresh_token": token }))).await;
}

#[tokio::test]
async fn refresh_with_an_oauth_form_rotates_the_pair() {
    assert_rotates(|token| {
        form_request(
            "/auth/refresh",
            &format!("grant_type=refresh_token&refresh_token={token}&scope=profile"),
        )
    })
    .await;
}

#[tokio::test]
async fn refresh_with_an_oauth_form_and_basic_client_auth_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::AUTHORIZATION, basic("mobile-app", "not-checked"))
            .body(Body::from(format!(
                "grant_type=refresh_token&refresh_token={token}&client_id=mobile-app"
            )))
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_with_the_cookie_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::COOKIE, format!("theme=dark; refresh_token={token}"))
            .body(Body::empty())
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_with_a_bearer_header_rotates_the_pair() {
    assert_rotates(|token| {
        post("/auth/refresh")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .expect("valid request")
    })
    .await;
}

#[tokio::test]
async fn refresh_over_a_socket_answers_no_store_and_one_set_cookie() {
    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;
    let request = server
        .post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::from(format!(
            "grant_type=refresh_token&refresh_token={}",
            tokens.refresh
        )))
        .expect("valid request");
    let rotated = server.send(request).await.assert_tokens();
    assert_ne!(rotated.refresh, tokens.refresh);
    assert_eq!(server.state.metrics().rotations_total(), 1);
}

#[tokio::test]
async fn refresh_accepts_any_request_body_type() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;
    let body = json!({ "refresh_token": tokens.refresh }).to_string();
    let with_string: Request<String> = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("valid request");
    let next = call(&router, with_string).await.assert_tokens();
    let with_full: Request<Full<Bytes>> = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::from(
            json!({ "refresh_token": next.refresh }).to_string(),
        ))
        .expect("valid request");
    call(&router, with_full).await.assert_tokens();
}

#[tokio::test]
async fn the_same_token_in_several_places_is_accepted() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;
    let request = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::COOKIE, format!("refresh_token={}", tokens.refresh))
        .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
        .body(Body::from(
            json!({ "refresh_token": tokens.refresh }).to_string(),
        ))
        .expect("valid request");
    call(&router, request).await.assert_tokens();
}

// ---------------------------------------------------------------------------------------
// Refresh: refusals
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_without_a_token_is_invalid_request() {
    let App { router, .. } = start_app(config());
    let requests = [
        post("/auth/refresh").body(Body::empty()),
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}")),
        post("/auth/refresh")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=refresh_token")),
        post("/auth/refresh")
            .header(header::AUTHORIZATION, basic("client", "secret"))
            .body(Body::empty()),
        post("/auth/refresh")
            .header(header::COOKIE, "refresh_token=; other=1")
            .body(Body::empty()),
    ];
    for request in requests {
        call(&router, request.expect("valid request"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
}

#[tokio::test]
async fn malformed_requests_get_json_errors_and_never_reach_the_store() {
    let App { router, state } = start_app(config());
    let tokens = login_demo(&router).await;
    let form = "application/x-www-form-urlencoded";
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"refresh_token": 5}"#))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("not json"))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!("grant_type=password&refresh_token={}", tokens.refresh),
            ),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!("refresh_token={}", tokens.refresh),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            form_request(
                "/auth/refresh",
                &format!(
                    "grant_type=refresh_token&refresh_token={0}&refresh_token={0}",
                    tokens.refresh
                ),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, form)
                .body(Body::from(vec![0xff, b'=', 0xfe]))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Digest realm=x")
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Bearer")
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
                .header(header::AUTHORIZATION, format!("Bearer {}", tokens.refresh))
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            // Two different tokens in one request.
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::COOKIE, "refresh_token=other")
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            // Two different client identifiers in one request.
            post("/auth/refresh")
                .header(header::CONTENT_TYPE, form)
                .header(header::AUTHORIZATION, basic("one", "s"))
                .body(Body::from(format!(
                    "grant_type=refresh_token&refresh_token={}&client_id=two",
                    tokens.refresh
                )))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(header::AUTHORIZATION, "Basic !!!not-base64")
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            // Read as the layer reads it: a malformed header, not a failed authentication.
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(
                    header::AUTHORIZATION,
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("no-colon")
                    ),
                )
                .body(Body::from(
                    json!({ "refresh_token": tokens.refresh }).to_string(),
                ))
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post("/auth/refresh")
                .header(
                    header::AUTHORIZATION,
                    HeaderValue::from_bytes(b"Bearer \xfftoken").expect("opaque header"),
                )
                .body(Body::empty())
                .expect("valid request"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (request, status, error) in cases {
        let described = format!("{} {:?}", request.uri(), request.headers());
        let reply = call(&router, request).await;
        assert_eq!(reply.status, status, "{described}: {:?}", reply.body);
        reply.assert_error(status, error);
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                reply
                    .header(header::WWW_AUTHENTICATE)
                    .is_some_and(|c| c.starts_with("Basic")),
                "invalid_client carries a Basic challenge"
            );
        }
    }
    assert_eq!(state.metrics().rotations_total(), 0);
    // The token survived all of that.
    refresh_json(&router, &tokens.refresh).await.assert_tokens();
}

#[tokio::test]
async fn invalid_refresh_tokens_are_invalid_grant() {
    let App { router, state } = start_app(config());
    let tokens = login_demo(&router).await;

    // An access token is not a refresh token (typ check).
    refresh_json(&router, &tokens.access)
        .await
        .assert_invalid_grant();
    // A tampered signature.
    let mut tampered = tokens.refresh.clone();
    let last = tampered.pop().expect("non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    refresh_json(&router, &tampered)
        .await
        .assert_invalid_grant();
    // Not a JWT at all, and an oversized token.
    refresh_json(&router, "garbage")
        .await
        .assert_invalid_grant();
    refresh_json(&router, &"a.b.c".repeat(2000))
        .await
        .assert_invalid_grant();
    // Signed by another deployment.
    let other = start_app(Config {
        secret: Some("another deployment".into()),
        ..config()
    });
    let foreign = login_demo(&other.router).await;
    refresh_json(&router, &foreign.refresh)
        .await
        .assert_invalid_grant();

    assert_eq!(state.metrics().rotations_total(), 0);
    assert!(!family_revoked(&state, &tokens.refresh).await);
    refresh_json(&router, &tokens.refresh).await.assert_tokens();
}

#[tokio::test]
async fn expired_refresh_token_is_invalid_grant() {
    // A zero lifetime makes tokens expire in the second they are issued.
    let App { router, state } = start_app(Config {
        refresh_ttl: 0,
        ..config()
    });
    let tokens = login_demo(&router).await;
    let body = refresh_json(&router, &tokens.refresh)
        .await
        .assert_invalid_grant();
    assert_eq!(body["error_description"], "token has expired");
    assert_eq!(state.metrics().rotations_total(), 0);
}

#[tokio::test]
async fn reused_refresh_token_revokes_the_family() {
    let server = TestServer::start(config()).await;
    let first = server.login_demo().await;
    let second = server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_tokens();

    // The used token again: reuse detected, the whole family revoked.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_invalid_grant();
    assert!(family_revoked(&server.state, &first.refresh).await);
    // The legitimate successor stops working too.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": second.refresh }))
        .await
        .assert_invalid_grant();

    assert_eq!(server.state.metrics().reuse_detected_total(), 1);
    assert_eq!(server.state.metrics().rotations_total(), 1);

    // Another session of the same user is untouched.
    let other = server.login_demo().await;
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": other.refresh }))
        .await
        .assert_tokens();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_refreshes_of_one_token_without_the_layer_revoke_the_family() {
    // The storm the coalescing layer exists for. The simulated upstream delay makes the
    // requests overlap in the handler; the outcome does not depend on it.
    let server = Arc::new(
        TestServer::start(Config {
            refresh_delay_ms: 20,
            ..config()
        })
        .await,
    );
    let tokens = server.login_demo().await;

    let mut storm = JoinSet::new();
    for _ in 0..50 {
        let server = Arc::clone(&server);
        let token = tokens.refresh.clone();
        storm.spawn(async move {
            server
                .post_json("/auth/refresh", &json!({ "refresh_token": token }))
                .await
        });
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    while let Some(reply) = storm.join_next().await {
        let reply = reply.expect("request task completes");
        if reply.status == StatusCode::OK {
            winners.push(reply.assert_tokens());
        } else {
            reply.assert_invalid_grant();
            losers += 1;
        }
    }
    assert_eq!(winners.len(), 1, "exactly one refresh wins");
    assert_eq!(losers, 49);

    // The losers looked like token theft: the family is gone, the winner's tokens too.
    assert!(family_revoked(&server.state, &tokens.refresh).await);
    server
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": winners[0].refresh }),
        )
        .await
        .assert_invalid_grant();
    assert_eq!(server.state.metrics().rotations_total(), 1);
    assert_eq!(server.state.metrics().reuse_detected_total(), 1);
}

// ---------------------------------------------------------------------------------------
// Logout
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn logout_revokes_the_family_and_calls_the_hook() {
    let App { router, state } = start_app(config());
    let events: Arc<Mutex<Vec<LogoutEvent>>> = Arc::default();
    let seen = Arc::clone(&events);
    state.set_on_logout(move |event| {
        // The hook may hand slow work (a Redis invalidation) to the runtime.
        assert!(
            tokio::runtime::Handle::try_current().is_ok(),
            "runtime available"
        );
        seen.lock().unwrap().push(event.clone());
    });

    let first = login_demo(&router).await;
    let second = refresh_json(&router, &first.refresh).await.assert_tokens();

    let request = post("/auth/logout")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::AUTHORIZATION, basic("web%20app", "x"))
        .body(Body::from(format!("token={}", second.refresh)))
        .expect("valid request");
    let reply = call(&router, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({ "status": "logged_out" }));
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));
    let cleared = reply.header(header::SET_COOKIE).expect("cookie cleared");
    assert!(cleared.starts_with("refresh_token=;") && cleared.contains("Max-Age=0"));

    assert!(family_revoked(&state, &second.refresh).await);
    refresh_json(&router, &second.refresh)
        .await
        .assert_invalid_grant();
    {
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, "demo");
        assert_eq!(events[0].token, second.refresh);
        assert_eq!(events[0].client_id.as_deref(), Some("web app"));
        assert!(!format!("{:?}", events[0]).contains(&second.refresh));
    }

    // Idempotent, with any token of the family and any accepted form.
    for request in [
        json_request("/auth/logout", &json!({ "refresh_token": first.refresh })),
        post("/auth/logout")
            .header(header::COOKIE, format!("refresh_token={}", second.refresh))
            .body(Body::empty())
            .expect("valid request"),
        post("/auth/logout")
            .header(header::AUTHORIZATION, format!("Bearer {}", second.refresh))
            .body(Body::empty())
            .expect("valid request"),
    ] {
        let reply = call(&router, request).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
    assert_eq!(events.lock().unwrap().len(), 4);
    // A logout is not a reuse.
    assert_eq!(state.metrics().reuse_detected_total(), 0);
}

#[tokio::test]
async fn logout_with_an_invalid_token_is_invalid_grant() {
    let App { router, state } = start_app(config());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    state.set_on_logout(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let tokens = login_demo(&router).await;
    for token in ["garbage", tokens.access.as_str()] {
        call(
            &router,
            json_request("/auth/logout", &json!({ "refresh_token": token })),
        )
        .await
        .assert_invalid_grant();
    }
    call(
        &router,
        post("/auth/logout")
            .body(Body::empty())
            .expect("valid request"),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(!family_revoked(&state, &tokens.refresh).await);
}

// ---------------------------------------------------------------------------------------
// /api/me, /metrics, /healthz, fallbacks, limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn api_me_accepts_access_tokens_and_refuses_refresh_tokens() {
    let App { router, .. } = start_app(config());
    let tokens = login_demo(&router).await;

    let me = get_with_bearer(&router, "/api/me", &tokens.access).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json(), json!({ "sub": "demo" }));

    let refused = get_with_bearer(&router, "/api/me", &tokens.refresh).await;
    refused.assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    assert!(
        refused
            .header(header::WWW_AUTHENTICATE)
            .is_some_and(|c| c.starts_with("Bearer"))
    );

    get_with_bearer(&router, "/api/me", "garbage")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    let anonymous = Request::builder()
        .uri("/api/me")
        .body(Body::empty())
        .expect("valid request");
    call(&router, anonymous)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
}

#[tokio::test]
async fn api_me_refuses_expired_access_tokens() {
    let App { router, .. } = start_app(Config {
        access_ttl: 0,
        ..config()
    });
    let reply = login(&router, "demo", "demo").await;
    let access = reply.json()["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();
    get_with_bearer(&router, "/api/me", &access)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
}

#[tokio::test]
async fn metrics_are_openmetrics_text_with_the_rotation_counters() {
    let server = TestServer::start(config()).await;
    let extra = prometheus_client::metrics::counter::Counter::<u64>::default();
    server.state.register_metrics(|registry| {
        registry.register(
            "layer_test",
            "A counter registered from outside",
            extra.clone(),
        );
    });
    extra.inc();

    let first = server.login_demo().await;
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_tokens();
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": first.refresh }))
        .await
        .assert_invalid_grant();

    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header(header::CONTENT_TYPE)
            .is_some_and(|c| c.starts_with("application/openmetrics-text"))
    );
    let text = std::str::from_utf8(&reply.body).expect("UTF-8 metrics");
    assert!(text.contains("# TYPE refresh_rotations counter"));
    let samples = parse_metrics(text);
    assert_eq!(sample(&samples, "refresh_rotations_total"), 1.0);
    assert_eq!(sample(&samples, "refresh_reuse_detected_total"), 1.0);
    assert_eq!(
        sample(&samples, r#"refresh_requests_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            r#"refresh_requests_total{outcome="invalid_grant"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, r#"login_requests_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(sample(&samples, "layer_test_total"), 1.0);
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = TestServer::start(config()).await;
    let reply = server.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"ok");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let App { router, .. } = start_app(config());
    let missing = Request::builder()
        .uri("/nope")
        .body(Body::empty())
        .expect("valid request");
    call(&router, missing)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let wrong_method = Request::builder()
        .uri("/auth/refresh")
        .body(Body::empty())
        .expect("valid request");
    let reply = call(&router, wrong_method).await;
    reply.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(
        reply
            .header(header::ALLOW)
            .is_some_and(|a| a.contains("POST"))
    );
}

#[tokio::test]
async fn bodies_over_16_kib_are_refused_with_a_json_413() {
    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;
    let padding = "x".repeat(app::MAX_BODY_BYTES);
    for path in ["/auth/refresh", "/auth/login", "/auth/logout"] {
        let body = json!({ "refresh_token": tokens.refresh, "padding": padding });
        server
            .post_json(path, &body)
            .await
            .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    }
    // A streamed body without Content-Length is cut off at the same size.
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = (0..20)
        .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![b' '; 1024]))))
        .collect();
    let App { router, .. } = start_app(config());
    let streamed = post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/json")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )))
        .expect("valid request");
    call(&router, streamed)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    // The token was never consumed.
    server
        .post_json("/auth/refresh", &json!({ "refresh_token": tokens.refresh }))
        .await
        .assert_tokens();
}

// ---------------------------------------------------------------------------------------
// Secrets and a shared database file
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_apps_sharing_a_database_file_accept_each_others_tokens() {
    let db = TempDb::new("shared");
    let a = start_app(Config {
        db: Some(db.0.clone()),
        ..config()
    });
    let b = start_app(Config {
        db: Some(db.0.clone()),
        ..config()
    });
    assert_eq!(a.state.secret().len(), 32, "a generated 32-byte secret");
    assert_eq!(
        a.state.secret(),
        b.state.secret(),
        "one secret kept in the database"
    );
    assert_eq!(a.state.jwt_signing_key(), b.state.jwt_signing_key());

    let first = login_demo(&a.router).await;
    let me = get_with_bearer(&b.router, "/api/me", &first.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    let second = refresh_json(&b.router, &first.refresh)
        .await
        .assert_tokens();
    let third = refresh_json(&a.router, &second.refresh)
        .await
        .assert_tokens();

    // Reuse seen by one instance revokes the family for both.
    refresh_json(&b.router, &first.refresh)
        .await
        .assert_invalid_grant();
    assert_eq!(b.state.metrics().reuse_detected_total(), 1);
    refresh_json(&a.router, &third.refresh)
        .await
        .assert_invalid_grant();

    // A restart on the same file keeps the secret.
    drop(a);
    let c = start_app(Config {
        db: Some(db.0.clone()),
        ..config()
    });
    assert_eq!(c.state.secret(), b.state.secret());
}

#[tokio::test]
async fn a_configured_secret_replaces_the_stored_one() {
    let with_secret = |secret: &str| Config {
        secret: Some(secret.to_owned()),
        ..config()
    };
    let a = start_app(with_secret("shared secret"));
    let b = start_app(with_secret("shared secret"));
    let c = start_app(with_secret("another secret"));
    assert_eq!(a.state.secret(), b"shared secret");
    let tokens = login_demo(&a.router).await;
    // Access tokens are stateless: same secret, accepted; other secret, refused.
    let me = get_with_bearer(&b.router, "/api/me", &tokens.access).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    get_with_bearer(&c.router, "/api/me", &tokens.access)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_token");
    // Refresh tokens also need the store: b never issued this one.
    refresh_json(&b.router, &tokens.refresh)
        .await
        .assert_invalid_grant();
    // An empty secret is a configuration error.
    assert!(matches!(
        app::app(with_secret("")),
        Err(app::AppError::Config(_))
    ));
}
