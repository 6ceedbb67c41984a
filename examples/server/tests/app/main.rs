//! Integration tests of the reference server's inner application, without the coalescing
//! layer: every token form, rotation, reuse detection, the refresh storm the layer exists
//! to fix, logout, `/api/me`, `/metrics` and a database file shared by two instances.

mod refresh;
mod session;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use clap::{CommandFactory as _, Parser as _};
use http_body_util::Full;
use serde_json::{Value, json};
use server::harness::{self, Reply, TestServer, basic, call};
use server::{self as app, App, Config, LogoutEvent};

/// What these tests check of an answer.
trait Answer {
    /// Asserts a JSON error answer and returns it.
    fn assert_error(&self, status: StatusCode, error: &str) -> Value;

    fn assert_invalid_grant(&self) -> Value {
        self.assert_error(app::INVALID_GRANT_STATUS, "invalid_grant")
    }

    /// Asserts a successful token response and returns its tokens.
    fn assert_tokens(&self) -> Tokens;
}

impl Answer for Reply {
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
/// so the coalescing layer is off (`tests/e2e` tests the app with it).
fn config() -> Config {
    Config {
        no_coalesce: true,
        ..harness::config()
    }
}

fn start_app(config: Config) -> App {
    app::app(config).expect("the app starts")
}

/// The app on a real socket, stopped on drop.
async fn start(config: Config) -> TestServer {
    TestServer::start(config).await.expect("the app starts")
}

fn post(path: &str) -> axum::http::request::Builder {
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
    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();
    assert_ne!(tokens.access, tokens.refresh);
    let me = server
        .send(
            Request::builder()
                .uri(format!("{}/api/me", server.base()))
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
