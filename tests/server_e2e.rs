//! End-to-end tests of the reference server (`examples/server`) WITH the coalescing layer,
//! over real sockets: every token form, a storm of a thousand refreshes, replays inside and
//! after the TTL, logout, `/metrics`, the demo, and an RFC 6749 §6 client.
//!
//! `tests/server_store.rs` tests the inner application with the layer off.

// The demo, and through it the reference app (`demo::app`), compiled once. `pub` so their
// API counts as reachable here (`unreachable_pub` fires on a private include).
#[allow(
    dead_code,
    reason = "the demo's `main` is for `cargo run`; these tests call `demo::run`"
)]
#[path = "../examples/demo.rs"]
pub mod demo;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use demo::app::{self, App, AppState, Config};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A response, fully read.
#[derive(Debug, Clone)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}), got {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ASCII Set-Cookie"))
            .collect()
    }

    fn assert_invalid_grant(&self) {
        assert_eq!(
            self.status,
            app::INVALID_GRANT_STATUS,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header(header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(self.json()["error"], "invalid_grant");
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
    }

    /// Asserts an RFC 6749 §5.1 token response (and the server's cookie) and returns its
    /// tokens.
    fn assert_tokens(&self) -> Tokens {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header(header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
        assert_eq!(self.header(header::PRAGMA), Some("no-cache"));
        let body = self.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 900);
        let tokens = Tokens {
            access: body["access_token"].as_str().expect("access_token").into(),
            refresh: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .into(),
        };
        let cookies = self.set_cookies();
        assert_eq!(cookies.len(), 1, "one Set-Cookie: {cookies:?}");
        assert!(
            cookies[0].starts_with(&format!("refresh_token={};", tokens.refresh)),
            "the cookie carries the new refresh token: {}",
            cookies[0]
        );
        tokens
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tokens {
    access: String,
    refresh: String,
}

/// The ways a client presents its refresh token.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// `{"refresh_token": ...}`
    Json,
    /// `grant_type=refresh_token&refresh_token=...` without `client_id`.
    Rfc6749,
    /// `Cookie: refresh_token=...`
    Cookie,
    /// `Authorization: Bearer ...`
    Bearer,
}

const FORMS: [Form; 4] = [Form::Json, Form::Rfc6749, Form::Cookie, Form::Bearer];

/// The app with the layer (the default configuration), on a free port.
fn config() -> Config {
    Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    }
}

/// The reference server on a real socket, stopped on drop, with an HTTP/1.1 client that
/// opens a connection per request in flight (no HTTP/2: one h2 connection would cap a storm
/// at the server's 200 concurrent streams).
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
    async fn start(config: Config) -> Arc<Self> {
        let App { router, state } = tokio::task::spawn_blocking(move || app::app(config))
            .await
            .expect("no panic")
            .expect("the app starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("bound address");
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("server runs");
        });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Arc::new(Self {
            base: format!("http://{addr}"),
            client,
            state,
            task,
        })
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
        Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
    }

    async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let request = self
            .post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))
            .expect("valid request");
        self.send(request).await
    }

    async fn post_form(&self, path: &str, body: String, basic: Option<&str>) -> Reply {
        let mut request = self
            .post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(credentials) = basic {
            request = request.header(header::AUTHORIZATION, credentials);
        }
        self.send(request.body(Full::from(body)).expect("valid request"))
            .await
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut request = Request::builder().uri(format!("{}{path}", self.base));
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.send(request.body(Full::default()).expect("valid request"))
            .await
    }

    async fn login_demo(&self) -> Tokens {
        self.post_json(
            "/auth/login",
            &json!({ "username": "demo", "password": "demo" }),
        )
        .await
        .assert_tokens()
    }

    fn refresh_request(&self, token: &str, form: Form) -> Request<Full<Bytes>> {
        let builder = self.post(app::REFRESH_PATH);
        match form {
            Form::Json => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(json!({ "refresh_token": token }).to_string())),
            Form::Rfc6749 => builder
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::from(format!(
                    "grant_type=refresh_token&refresh_token={token}"
                ))),
            Form::Cookie => builder
                .header(header::COOKIE, format!("refresh_token={token}"))
                .body(Full::default()),
            Form::Bearer => builder
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::default()),
        }
        .expect("valid request")
    }

    async fn refresh(&self, token: &str, form: Form) -> Reply {
        self.send(self.refresh_request(token, form)).await
    }

    async fn logout(&self, token: &str) -> Reply {
        self.post_json("/auth/logout", &json!({ "refresh_token": token }))
            .await
    }

    /// `requests` concurrent refreshes with `token`, each on its own task (and so on its
    /// own connection), cycling through the token forms.
    async fn storm(self: &Arc<Self>, requests: usize, token: &str) -> Vec<Reply> {
        let mut storm = JoinSet::new();
        for i in 0..requests {
            let server = Arc::clone(self);
            let request = self.refresh_request(token, FORMS[i % FORMS.len()]);
            storm.spawn(async move { server.send(request).await });
        }
        let mut replies = Vec::with_capacity(requests);
        while let Some(reply) = storm.join_next().await {
            replies.push(reply.expect("request task completes"));
        }
        replies
    }

    async fn metrics(&self) -> Metrics {
        let reply = self.get("/metrics", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header(header::CONTENT_TYPE),
            Some(app::metrics::METRICS_CONTENT_TYPE)
        );
        Metrics::parse(std::str::from_utf8(&reply.body).expect("UTF-8 metrics"))
    }

    /// Whether the family of `refresh_token` is revoked in the store.
    async fn family_revoked(&self, refresh_token: &str) -> bool {
        let claims = self
            .state
            .keys()
            .verify_refresh(refresh_token, app::unix_now())
            .expect("a token this app issued");
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.store().family_revoked(&claims.fam))
            .await
            .expect("no panic")
            .expect("the store works")
            .expect("the family exists")
    }
}

fn basic(client_id: &str, secret: &str) -> String {
    let credentials = format!("{client_id}:{secret}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

// ---------------------------------------------------------------------------------------
// A strict OpenMetrics text parser
// ---------------------------------------------------------------------------------------

/// The samples of an OpenMetrics exposition, keyed by `name{label="value",...}` exactly as
/// written.
#[derive(Debug, Clone, PartialEq)]
struct Metrics {
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    /// Parses `text`, panicking on any line that is not `# HELP`, `# TYPE`, `# UNIT`, a
    /// sample `name{labels} value` of the family last declared by `# TYPE`, or the final
    /// `# EOF`.
    fn parse(text: &str) -> Self {
        let body = text
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("OpenMetrics text ends with `# EOF`: {text:?}"));
        let mut samples = BTreeMap::new();
        let mut family: Option<(String, String)> = None;
        for line in body.lines() {
            let fail = |why: &str| -> ! { panic!("malformed metrics line ({why}): {line:?}") };
            if let Some(rest) = line.strip_prefix("# ") {
                let (keyword, rest) = rest.split_once(' ').unwrap_or_else(|| fail("comment"));
                let (name, text) = rest.split_once(' ').unwrap_or_else(|| fail("descriptor"));
                if metric_name_len(name) != Some(name.len()) {
                    fail("metric family name");
                }
                match keyword {
                    "HELP" | "UNIT" => {}
                    "TYPE" => {
                        const TYPES: [&str; 8] = [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "stateset",
                            "info",
                            "summary",
                            "unknown",
                        ];
                        if !TYPES.contains(&text) {
                            fail("metric type");
                        }
                        family = Some((name.to_owned(), text.to_owned()));
                    }
                    _ => fail("unknown comment"),
                }
                continue;
            }
            let name_len = metric_name_len(line).unwrap_or_else(|| fail("metric name"));
            let name = &line[..name_len];
            let mut rest = &line[name_len..];
            if let Some(labels) = rest.strip_prefix('{') {
                let len = label_set_len(labels).unwrap_or_else(|| fail("label set"));
                rest = &labels[len..];
            }
            let series = &line[..line.len() - rest.len()];
            let value = rest.strip_prefix(' ').unwrap_or_else(|| fail("no value"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                number if number.bytes().all(|b| b"0123456789+-.eE".contains(&b)) => {
                    number.parse().unwrap_or_else(|_| fail("value"))
                }
                _ => fail("value (or an unexpected timestamp)"),
            };
            let (family_name, family_type) = family
                .as_ref()
                .unwrap_or_else(|| fail("sample before any # TYPE"));
            let belongs = match family_type.as_str() {
                "counter" => name == format!("{family_name}_total"),
                "gauge" | "unknown" => name == family_name,
                _ => name.starts_with(family_name.as_str()),
            };
            if !belongs {
                fail("sample outside its # TYPE family");
            }
            if family_type == "counter" && !(value >= 0.0 && value.fract() == 0.0) {
                fail("counter value must be a whole, non-negative number here");
            }
            if samples.insert(series.to_owned(), value).is_some() {
                fail("duplicate series");
            }
        }
        assert!(!samples.is_empty(), "no samples in {text:?}");
        Self { samples }
    }

    /// The value of `series` (`name` or `name{label="value"}`), which must exist.
    fn get(&self, series: &str) -> u64 {
        let value = *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {:#?}", self.samples));
        value as u64
    }

    fn rotations(&self) -> u64 {
        self.get("refresh_rotations_total")
    }

    fn reuse_detected(&self) -> u64 {
        self.get("refresh_reuse_detected_total")
    }

    fn layer(&self, outcome: &str) -> u64 {
        self.get(&format!(
            "refresh_coalesce_requests_total{{outcome=\"{outcome}\"}}"
        ))
    }
}

/// Length of the metric name `[a-zA-Z_:][a-zA-Z0-9_:]*` at the start of `text`.
fn metric_name_len(text: &str) -> Option<usize> {
    let first = text.bytes().next()?;
    if !(first.is_ascii_alphabetic() || first == b'_' || first == b':') {
        return None;
    }
    Some(
        text.bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
            .unwrap_or(text.len()),
    )
}

/// Length of `name="value",...}` (after the `{`), with `\\`, `\"` and `\n` escapes.
fn label_set_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    loop {
        let name = &text[i..];
        let first = name.bytes().next()?;
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        i += name
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))?;
        if bytes.get(i..i + 2)? != b"=\"" {
            return None;
        }
        i += 2;
        loop {
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => match bytes.get(i + 1)? {
                    b'\\' | b'"' | b'n' => i += 2,
                    _ => return None,
                },
                b'\n' => return None,
                _ => i += 1,
            }
        }
        i += 1;
        match *bytes.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

#[test]
fn the_metrics_parser_refuses_malformed_lines() {
    let good = "# HELP a_total A.\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"\"} 2\n# EOF\n";
    assert_eq!(Metrics::parse(good).get("a_total{x=\"1\",y=\"q\\\"\"}"), 2);
    for bad in [
        "# TYPE a counter\na_total 1\n",                   // no # EOF
        "# TYPE a counter\na_total  1\n# EOF\n",           // two spaces
        "# TYPE a counter\na_total{x=1} 1\n# EOF\n",       // unquoted label value
        "# TYPE a counter\na_total{x=\"1\" 1\n# EOF\n",    // unclosed label set
        "# TYPE a counter\na_total 1 123\n# EOF\n",        // timestamp
        "# TYPE a counter\na 1\n# EOF\n",                  // counter without _total
        "# TYPE a counter\na_total 1.5\n# EOF\n",          // fractional counter
        "# TYPE a counter\na_total 1\na_total 2\n# EOF\n", // duplicate
        "a_total 1\n# EOF\n",                              // no # TYPE
        "# TYPE a teapot\na_total 1\n# EOF\n",             // unknown type
        "# TYPE a counter\n\n# EOF\n",                     // empty line
        "# TYPE a counter\n1a_total 1\n# EOF\n",           // bad name
    ] {
        let outcome = std::panic::catch_unwind(|| Metrics::parse(bad));
        assert!(outcome.is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The storm
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_refreshes_rotates_once_and_every_caller_gets_the_same_pair() {
    // The simulated upstream keeps the leader's refresh running while the storm connects.
    let server = TestServer::start(Config {
        refresh_delay_ms: 100,
        ..config()
    })
    .await;
    let mut tokens = server.login_demo().await;

    // Every token form reaches the handler through the layer, and each fresh token rotates.
    for form in FORMS {
        let next = server.refresh(&tokens.refresh, form).await.assert_tokens();
        assert_ne!(next.refresh, tokens.refresh, "{form:?} rotated");
        tokens = next;
    }
    let before = server.metrics().await;
    assert_eq!(before.rotations(), 4);
    assert_eq!(before.layer("leader"), 4);

    let replies = server.storm(1000, &tokens.refresh).await;
    let first = replies[0].assert_tokens();
    assert_ne!(first.refresh, tokens.refresh);
    for reply in &replies {
        assert_eq!(reply.assert_tokens(), first);
        assert_eq!(reply.body, replies[0].body, "byte-identical bodies");
        assert_eq!(reply.set_cookies(), replies[0].set_cookies());
    }

    let after = server.metrics().await;
    assert_eq!(after.rotations() - before.rotations(), 1, "one rotation");
    assert_eq!(after.reuse_detected(), before.reuse_detected());
    assert_eq!(after.reuse_detected(), 0);
    assert_eq!(after.layer("leader") - before.layer("leader"), 1);
    assert_eq!(
        after.layer("joined") + after.layer("replayed")
            - before.layer("joined")
            - before.layer("replayed"),
        999
    );

    // The session goes on with the pair everyone got.
    let next = server
        .refresh(&first.refresh, Form::Json)
        .await
        .assert_tokens();
    assert_ne!(next.refresh, first.refresh);
    let me = server.get("/api/me", Some(&next.access)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json(), json!({ "sub": "demo" }));
    assert_eq!(server.metrics().await.rotations(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_layer_the_same_storm_revokes_the_family() {
    let server = TestServer::start(Config {
        no_coalesce: true,
        refresh_delay_ms: 50,
        ..config()
    })
    .await;
    assert!(server.state.coalesce().is_none());
    let tokens = server.login_demo().await;

    let replies = server.storm(200, &tokens.refresh).await;
    let mut winners = Vec::new();
    for reply in &replies {
        if reply.status == StatusCode::OK {
            winners.push(reply.assert_tokens());
        } else {
            reply.assert_invalid_grant();
        }
    }
    assert_eq!(winners.len(), 1, "exactly one refresh wins");

    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert!(metrics.reuse_detected() > 0, "the losers looked like theft");
    assert!(
        !metrics
            .samples
            .keys()
            .any(|k| k.starts_with("refresh_coalesce")),
        "no layer, no layer counters"
    );

    // The user is logged out: the family is revoked, the winner's new token refused.
    assert!(server.family_revoked(&tokens.refresh).await);
    server
        .refresh(&winners[0].refresh, Form::Json)
        .await
        .assert_invalid_grant();
}

// ---------------------------------------------------------------------------------------
// Replays, TTL and logout
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_inside_the_ttl_is_replayed_and_after_the_ttl_it_is_reuse() {
    // Inside the TTL (the default 30 s): the retry gets the very same answer, in any form.
    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;
    let first = server.refresh(&tokens.refresh, Form::Json).await;
    let pair = first.assert_tokens();
    for form in FORMS {
        let retry = server.refresh(&tokens.refresh, form).await;
        assert_eq!(retry.assert_tokens(), pair, "{form:?}");
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.set_cookies(), first.set_cookies());
    }
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!((metrics.layer("leader"), metrics.layer("replayed")), (1, 4));

    // After the TTL the old token is an already rotated token presented again: reuse.
    //
    // The TTL runs on the layer's tokio clock on this (real) runtime. Pausing the clock
    // would not help over sockets: a paused runtime that waits for socket I/O auto-advances
    // to the next timer, so time would jump by whole timer periods during a request. So the
    // test waits for real, 0.2 s, and without a race: the layer stores the replay (and
    // starts its TTL) before it answers, so the entry has expired once `ttl` has passed
    // since the answer arrived.
    let ttl = Duration::from_millis(200);
    let server = TestServer::start(Config {
        ttl: ttl.as_secs_f64(),
        ..config()
    })
    .await;
    let tokens = server.login_demo().await;
    let pair = server
        .refresh(&tokens.refresh, Form::Json)
        .await
        .assert_tokens();
    let answered = tokio::time::Instant::now();
    let quick = server.refresh(&tokens.refresh, Form::Cookie).await;
    if answered.elapsed() < ttl {
        assert_eq!(quick.assert_tokens(), pair, "still inside the short TTL");
    }
    tokio::time::sleep_until(answered + ttl).await;

    server
        .refresh(&tokens.refresh, Form::Json)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 1);
    assert!(server.family_revoked(&tokens.refresh).await);
    server
        .refresh(&pair.refresh, Form::Json)
        .await
        .assert_invalid_grant();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_stops_the_replay_of_the_old_token() {
    let server = TestServer::start(config()).await;
    let handle = server.state.coalesce().expect("the layer is on");
    let old = server.login_demo().await;
    let new = server
        .refresh(&old.refresh, Form::Json)
        .await
        .assert_tokens();
    assert_eq!(handle.stats().entries, 1, "the old token's answer is kept");

    let reply = server.logout(&new.refresh).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({ "status": "logged_out" }));
    assert_eq!(handle.stats().entries, 0, "logout dropped the replay");

    // Inside the TTL, yet no pair: the layer lets it through and the store refuses it.
    server
        .refresh(&old.refresh, Form::Json)
        .await
        .assert_invalid_grant();
    server
        .refresh(&new.refresh, Form::Bearer)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.layer("replayed"), 0);
    assert_eq!(
        metrics.reuse_detected(),
        0,
        "a logged-out family is no reuse"
    );
    assert!(server.family_revoked(&old.refresh).await);
}

// ---------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_match_the_requests_made() {
    const STORM: u64 = 300;
    let server = TestServer::start(Config {
        refresh_delay_ms: 100,
        ..config()
    })
    .await;
    let start = server.metrics().await;
    assert!(start.samples.values().all(|v| *v == 0.0), "{start:#?}");

    let tokens = server.login_demo().await;
    let replies = server.storm(STORM as usize, &tokens.refresh).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));

    let metrics = server.metrics().await;
    assert_eq!(metrics.get("login_requests_total{outcome=\"ok\"}"), 1);
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!(
        metrics.get("refresh_requests_total{outcome=\"ok\"}"),
        1,
        "the handler answered once"
    );
    assert_eq!(metrics.layer("leader"), 1);
    assert_eq!(
        metrics.layer("joined") + metrics.layer("replayed"),
        STORM - 1
    );
    for outcome in [
        "rejected",
        "timed_out",
        "overloaded",
        "leader_failed",
        "bypassed",
    ] {
        assert_eq!(metrics.layer(outcome), 0, "{outcome}");
    }
    assert_eq!(metrics.get("refresh_coalesce_in_flight"), 0);
    assert_eq!(
        metrics.get("refresh_coalesce_entries"),
        1,
        "one replay kept"
    );
    assert_eq!(metrics.get("refresh_coalesce_reuse_suspected_total"), 0);

    // One more retry (a replay) and one garbage token (refused by the layer, before the
    // handler).
    let replayed = metrics.layer("replayed");
    server
        .refresh(&tokens.refresh, Form::Bearer)
        .await
        .assert_tokens();
    server
        .refresh("not-a-token", Form::Json)
        .await
        .assert_invalid_grant();
    let metrics = server.metrics().await;
    assert_eq!(metrics.layer("replayed"), replayed + 1);
    assert_eq!(metrics.layer("rejected"), 1);
    assert_eq!(metrics.get("refresh_requests_total{outcome=\"ok\"}"), 1);
    assert_eq!(
        metrics.get("refresh_requests_total{outcome=\"invalid_grant\"}"),
        0,
        "the handler never saw the garbage"
    );
    let seen_by_layer: u64 = [
        "leader",
        "joined",
        "replayed",
        "rejected",
        "timed_out",
        "overloaded",
        "leader_failed",
        "bypassed",
    ]
    .into_iter()
    .map(|outcome| metrics.layer(outcome))
    .sum();
    assert_eq!(
        seen_by_layer,
        STORM + 2,
        "every refresh request counted once"
    );
    assert_eq!(metrics.rotations(), 1);
    assert_eq!(metrics.reuse_detected(), 0);
}

// ---------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_completion_and_the_layer_rotates_once() {
    let report = demo::run(demo::Options {
        requests: 100,
        concurrency: 100,
        refresh_delay_ms: 50,
    })
    .await
    .expect("the demo runs");
    let (with, without) = (&report.with, &report.without);
    assert_eq!(with.requests, 100);
    assert_eq!(with.rotations, 1);
    assert_eq!(with.ok, 100);
    assert_eq!(with.distinct_refresh_tokens, 1);
    assert_eq!(with.reuse_detected, 0);
    assert!(with.session_survives);
    let layer = with.layer.expect("layer counters");
    assert_eq!(layer.leader, 1);
    assert_eq!(layer.joined + layer.replayed, 99);

    assert_eq!(without.ok, 1);
    assert_eq!(without.invalid_grant, 99);
    assert!(without.reuse_detected > 0);
    assert!(!without.session_survives);
    assert!(without.layer.is_none());

    assert!(report.layer_kept_its_promise());
    let table = report.to_string();
    assert!(
        table.contains("with it: one rotation, every request got the same new pair"),
        "{table}"
    );
}

// ---------------------------------------------------------------------------------------
// An OAuth 2.0 client
// ---------------------------------------------------------------------------------------

/// Checks an RFC 6749 §5.1 access token response and returns its refresh token.
fn assert_rfc6749_token_response(reply: &Reply) -> Tokens {
    assert_eq!(reply.status, StatusCode::OK);
    let content_type = reply.header(header::CONTENT_TYPE).expect("content type");
    assert_eq!(content_type.split(';').next(), Some("application/json"));
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(reply.header(header::PRAGMA), Some("no-cache"));
    let body = reply.json();
    let object = body.as_object().expect("a JSON object");
    assert!(
        object["access_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    assert!(
        object["token_type"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    );
    assert!(object["expires_in"].as_u64().is_some_and(|s| s > 0));
    assert!(
        object["refresh_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    reply.assert_tokens()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth2_style_client_with_basic_auth_and_client_id_refreshes() {
    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;

    // RFC 6749 §6, as in its example: a form, client credentials in `Authorization: Basic`
    // (the client id and secret of RFC 6749's examples).
    let reply = server
        .post_form(
            app::REFRESH_PATH,
            format!("grant_type=refresh_token&refresh_token={}", tokens.refresh),
            Some(&basic("s6BhdRkqt3", "gX1fBat3bV")),
        )
        .await;
    let second = assert_rfc6749_token_response(&reply);
    assert_ne!(second.refresh, tokens.refresh);
    let me = server.get("/api/me", Some(&second.access)).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));

    // A public client: `client_id` in the form, with a `scope` it may send.
    let reply = server
        .post_form(
            app::REFRESH_PATH,
            format!(
                "grant_type=refresh_token&refresh_token={}&client_id=s6BhdRkqt3&scope=profile",
                second.refresh
            ),
            None,
        )
        .await;
    let third = assert_rfc6749_token_response(&reply);
    assert_ne!(third.refresh, second.refresh);

    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 2);
    assert_eq!(metrics.layer("leader"), 2);
    assert_eq!(metrics.reuse_detected(), 0);
}

/// The `oauth2` crate's HTTP client contract, served by the test's hyper client.
async fn oauth2_http(
    server: &TestServer,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, hyper_util::client::legacy::Error> {
    let response = server.client.request(request.map(Full::from)).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Ok(oauth2::HttpResponse::from_parts(parts, body.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_oauth2_client_refreshes_with_basic_auth_and_with_client_id() {
    use oauth2::{
        AuthType, ClientId, ClientSecret, RefreshToken, TokenResponse, TokenUrl, basic::BasicClient,
    };

    let server = TestServer::start(config()).await;
    let tokens = server.login_demo().await;
    let http = |request| oauth2_http(&server, request);
    let token_url = TokenUrl::new(format!("{}{}", server.base, app::REFRESH_PATH)).unwrap();

    // The client's default: credentials in `Authorization: Basic` (RFC 6749 §2.3.1).
    let confidential = BasicClient::new(ClientId::new("s6BhdRkqt3".into()))
        .set_client_secret(ClientSecret::new("gX1fBat3bV".into()))
        .set_token_uri(token_url.clone());
    let first = confidential
        .exchange_refresh_token(&RefreshToken::new(tokens.refresh.clone()))
        .request_async(&http)
        .await
        .expect("the refresh_token grant succeeds with Basic client authentication");
    let refreshed = first
        .refresh_token()
        .expect("a rotated refresh token")
        .secret()
        .clone();
    assert_ne!(refreshed, tokens.refresh);
    assert!(first.expires_in().is_some());

    // A public client sends `client_id` in the form instead.
    let public = BasicClient::new(ClientId::new("s6BhdRkqt3".into()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(token_url);
    let second = public
        .exchange_refresh_token(&RefreshToken::new(refreshed.clone()))
        .request_async(&http)
        .await
        .expect("the refresh_token grant succeeds with client_id in the form");
    assert_ne!(second.refresh_token().unwrap().secret(), &refreshed);

    // The same client retrying the first token inside the TTL gets the same pair, replayed.
    let retry = confidential
        .exchange_refresh_token(&RefreshToken::new(tokens.refresh.clone()))
        .request_async(&http)
        .await
        .expect("a retry inside the TTL is replayed");
    assert_eq!(retry.refresh_token().unwrap().secret(), &refreshed);

    // A forged token: the layer refuses it, and the library sees a standard error response.
    let forged = public
        .exchange_refresh_token(&RefreshToken::new(format!("{}x", tokens.refresh)))
        .request_async(&http)
        .await
        .expect_err("a forged token is refused");
    match forged {
        oauth2::RequestTokenError::ServerResponse(response) => {
            assert_eq!(
                response.error(),
                &oauth2::basic::BasicErrorResponseType::InvalidGrant
            );
        }
        other => panic!("expected an invalid_grant response, got {other:?}"),
    }
    assert_eq!(server.metrics().await.rotations(), 2);
}

// ---------------------------------------------------------------------------------------
// Confidential clients (`--client ID:SECRET`)
// ---------------------------------------------------------------------------------------

/// The confidential client of these tests and its secret (with characters RFC 6749
/// §2.3.1's form-urlencoding must carry through `Authorization: Basic`).
const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "s3cret: with+symbols/%";
/// A second confidential client.
const OTHER_CLIENT: &str = "other";
const OTHER_SECRET: &str = "other-s3cret";
/// A wrong secret for `CLIENT`.
const WRONG_SECRET: &str = "guessed";

/// The default app (with the layer) and two confidential clients.
fn confidential_config() -> Config {
    Config {
        clients: vec![
            format!("{CLIENT}:{CLIENT_SECRET}")
                .parse()
                .expect("a valid --client"),
            format!("{OTHER_CLIENT}:{OTHER_SECRET}")
                .parse()
                .expect("a valid --client"),
        ],
        ..config()
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// RFC 6749 §2.3.1 `Authorization: Basic`: id and secret form-urlencoded, then base64.
fn client_basic(client_id: &str, secret: &str) -> String {
    basic(&form_encode(client_id), &form_encode(secret))
}

/// How a request authenticates its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    /// No client at all.
    None,
    /// `Authorization: Basic` with this id and secret.
    Basic(&'static str, &'static str),
    /// `client_id` and `client_secret` in the form (refresh) or JSON (login) body.
    Body(&'static str, &'static str),
    /// `client_id` and `client_secret` in a JSON body.
    Json(&'static str, &'static str),
    /// `client_id` alone.
    IdOnly(&'static str),
}

impl TestServer {
    /// A request to `path` with `fields` (the token or the user's credentials) and the
    /// client authentication `auth`, as a form unless `auth` is [`ClientAuth::Json`].
    fn client_request(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        auth: ClientAuth,
    ) -> Request<Full<Bytes>> {
        let mut fields: Vec<(&str, &str)> = fields.to_vec();
        let mut builder = self.post(path);
        match auth {
            ClientAuth::None => {}
            ClientAuth::Basic(id, secret) => {
                builder = builder.header(header::AUTHORIZATION, client_basic(id, secret));
            }
            ClientAuth::Body(id, secret) | ClientAuth::Json(id, secret) => {
                fields.extend([("client_id", id), ("client_secret", secret)]);
            }
            ClientAuth::IdOnly(id) => fields.push(("client_id", id)),
        }
        let request = if let ClientAuth::Json(..) = auth {
            let object: serde_json::Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| *k != "grant_type")
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(Value::Object(object).to_string()))
        } else {
            let form: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", form_encode(v)))
                .collect();
            builder
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::from(form.join("&")))
        };
        request.expect("valid request")
    }

    async fn login_as(&self, auth: ClientAuth) -> Reply {
        let fields = [("username", "demo"), ("password", "demo")];
        self.send(self.client_request("/auth/login", &fields, auth))
            .await
    }

    fn client_refresh_request(&self, token: &str, auth: ClientAuth) -> Request<Full<Bytes>> {
        let fields = [("grant_type", "refresh_token"), ("refresh_token", token)];
        self.client_request(app::REFRESH_PATH, &fields, auth)
    }

    async fn client_refresh(&self, token: &str, auth: ClientAuth) -> Reply {
        self.send(self.client_refresh_request(token, auth)).await
    }

    async fn client_logout(&self, token: &str, auth: ClientAuth) -> Reply {
        let fields = [("token", token)];
        self.send(self.client_request("/auth/logout", &fields, auth))
            .await
    }
}

impl Reply {
    fn assert_invalid_client(&self) {
        assert_eq!(
            self.status,
            StatusCode::UNAUTHORIZED,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.json()["error"], "invalid_client");
        let challenge = self
            .header(header::WWW_AUTHENTICATE)
            .expect("a WWW-Authenticate challenge");
        assert!(
            challenge == "Basic" || challenge.starts_with("Basic "),
            "a Basic challenge: {challenge}"
        );
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
    }

    /// Whether any part of `tokens` (a whole token, or a JWT's claims or signature)
    /// appears in this reply's body or headers.
    fn leaks(&self, tokens: &Tokens) -> bool {
        let secrets: Vec<&str> = [&tokens.access, &tokens.refresh]
            .into_iter()
            .flat_map(|token| {
                let segments = token.split('.').skip(1);
                std::iter::once(token.as_str()).chain(segments)
            })
            .collect();
        let body = String::from_utf8_lossy(&self.body);
        let headers = self
            .headers
            .values()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        std::iter::once(body.into_owned())
            .chain(headers)
            .any(|text| secrets.iter().any(|secret| text.contains(secret)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confidential_client_logs_in_with_basic_or_its_secret_in_the_body() {
    let server = TestServer::start(confidential_config()).await;

    for auth in [
        ClientAuth::Basic(CLIENT, CLIENT_SECRET),
        ClientAuth::Body(CLIENT, CLIENT_SECRET),
        ClientAuth::Json(CLIENT, CLIENT_SECRET),
    ] {
        let tokens = server.login_as(auth).await.assert_tokens();
        // The family is bound to the client: it refreshes with its credentials.
        server
            .client_refresh(&tokens.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
            .await
            .assert_tokens();
    }

    for auth in [
        ClientAuth::Basic(CLIENT, WRONG_SECRET),
        ClientAuth::Body(CLIENT, WRONG_SECRET),
        ClientAuth::Json(CLIENT, WRONG_SECRET),
        ClientAuth::IdOnly(CLIENT),
        ClientAuth::Basic(CLIENT, ""),
        ClientAuth::Basic(OTHER_CLIENT, CLIENT_SECRET),
    ] {
        let reply = server.login_as(auth).await;
        reply.assert_invalid_client();
        assert!(reply.set_cookies().is_empty(), "{auth:?}: no token cookie");
    }

    // Clients not named on the command line are public: no secret, nothing checked.
    server
        .login_as(ClientAuth::IdOnly("a-public-client"))
        .await
        .assert_tokens();
    server.login_as(ClientAuth::None).await.assert_tokens();

    let metrics = server.metrics().await;
    assert_eq!(
        metrics.get(r#"login_requests_total{outcome="invalid_client"}"#),
        6
    );
    assert_eq!(metrics.get(r#"login_requests_total{outcome="ok"}"#), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_without_the_familys_client_credentials_is_refused_and_revokes_nothing() {
    // No replays, so the already-rotated token below reaches the handler: what the layer
    // replays to whom is the subject of the thief race further down.
    let server = TestServer::start(Config {
        ttl: 0.0,
        ..confidential_config()
    })
    .await;
    let victim = server
        .login_as(ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    let tokens = server
        .client_refresh(&victim.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();

    // The current token and the already-rotated one: neither consumes nor revokes anything
    // in the wrong hands (a used token presented again would otherwise revoke the family).
    for token in [&tokens.refresh, &victim.refresh] {
        for auth in [
            ClientAuth::Basic(CLIENT, WRONG_SECRET),
            ClientAuth::Body(CLIENT, WRONG_SECRET),
            ClientAuth::Json(CLIENT, WRONG_SECRET),
            ClientAuth::IdOnly(CLIENT),
            ClientAuth::None,
        ] {
            let reply = server.client_refresh(token, auth).await;
            reply.assert_invalid_client();
            assert!(!reply.leaks(&tokens), "{auth:?}");
        }
        for auth in [
            ClientAuth::Basic(OTHER_CLIENT, OTHER_SECRET),
            ClientAuth::Body(OTHER_CLIENT, OTHER_SECRET),
            ClientAuth::IdOnly("a-public-client"),
        ] {
            let reply = server.client_refresh(token, auth).await;
            reply.assert_invalid_grant();
            assert!(!reply.leaks(&tokens), "{auth:?}");
        }
        for auth in [ClientAuth::None, ClientAuth::Basic(CLIENT, WRONG_SECRET)] {
            server
                .client_logout(token, auth)
                .await
                .assert_invalid_client();
        }
        server
            .client_logout(token, ClientAuth::Basic(OTHER_CLIENT, OTHER_SECRET))
            .await
            .assert_invalid_grant();
    }
    assert!(!server.family_revoked(&tokens.refresh).await);
    let metrics = server.metrics().await;
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!(metrics.rotations(), 1);

    // The victim's session goes on, with its secret in either place.
    let next = server
        .client_refresh(&tokens.refresh, ClientAuth::Body(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    let next = server
        .client_refresh(&next.refresh, ClientAuth::Json(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    assert_eq!(server.metrics().await.rotations(), 3);

    // A public family is not the confidential client's either.
    let public = server.login_as(ClientAuth::None).await.assert_tokens();
    server
        .client_refresh(&public.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_invalid_grant();
    server
        .client_refresh(&public.refresh, ClientAuth::None)
        .await
        .assert_tokens();

    // Its own client logs it out.
    let reply = server
        .client_logout(&next.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(server.family_revoked(&next.refresh).await);
}

/// The thieves of [`thief_race`]: the victim's client id with a wrong secret by Basic, the
/// same in the form body, and no client authentication.
const THIEVES: [ClientAuth; 3] = [
    ClientAuth::Basic(CLIENT, WRONG_SECRET),
    ClientAuth::Body(CLIENT, WRONG_SECRET),
    ClientAuth::None,
];
/// Thief requests of each kind in each wave.
const THIEVES_PER_KIND: usize = 50;

/// One thief request's answer and when it was sent.
struct Theft {
    auth: ClientAuth,
    sent: Instant,
    reply: Reply,
}

/// `THIEVES_PER_KIND` requests of every kind in [`THIEVES`] presenting `token`, at once.
fn send_thieves(server: &Arc<TestServer>, token: &str) -> JoinSet<Theft> {
    let mut thieves = JoinSet::new();
    for i in 0..THIEVES_PER_KIND * THIEVES.len() {
        let auth = THIEVES[i % THIEVES.len()];
        let server = Arc::clone(server);
        let request = server.client_refresh_request(token, auth);
        thieves.spawn(async move {
            let sent = Instant::now();
            let reply = server.send(request).await;
            Theft { auth, sent, reply }
        });
    }
    thieves
}

async fn collect(mut thieves: JoinSet<Theft>) -> Vec<Theft> {
    let mut done = Vec::new();
    while let Some(theft) = thieves.join_next().await {
        done.push(theft.expect("thief task completes"));
    }
    done
}

/// The victim refreshes with its client's secret; while its refresh runs (the simulated
/// upstream takes 200 ms), 150 thieves present the same refresh token, and 150 more
/// within the replay TTL after it answered. No thief may get the victim's new pair.
async fn thief_race(config: Config) {
    let server = TestServer::start(Config {
        refresh_delay_ms: 200,
        ..config
    })
    .await;
    let victim = server
        .login_as(ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();

    let refresh = {
        let server = Arc::clone(&server);
        let request = server
            .client_refresh_request(&victim.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET));
        tokio::spawn(async move { server.send(request).await })
    };
    if let Some(handle) = server.state.coalesce() {
        // The victim's request leads the flight before any thief arrives, so the thieves
        // meet a running flight (and then its replay), not one of their own.
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.stats().in_flight == 0 {
            assert!(
                Instant::now() < deadline,
                "the victim's flight never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let during = send_thieves(&server, &victim.refresh);
    let reply = refresh.await.expect("the victim's request completes");
    let answered = Instant::now();
    let fresh = reply.assert_tokens();
    let after = send_thieves(&server, &victim.refresh);
    let during = collect(during).await;
    let after = collect(after).await;

    let early = during.iter().filter(|t| t.sent < answered).count();
    assert_eq!(
        early,
        during.len(),
        "every thief of the first wave was sent while the victim's refresh ran"
    );

    let mut report = String::new();
    let mut robbed = 0;
    for (wave, thefts) in [("during the flight", &during), ("after it", &after)] {
        for kind in THIEVES {
            let of_kind = || thefts.iter().filter(move |t| t.auth == kind);
            let ok = of_kind()
                .filter(|t| t.reply.status == StatusCode::OK)
                .count();
            let leaked = of_kind().filter(|t| t.reply.leaks(&fresh)).count();
            robbed += of_kind()
                .filter(|t| t.reply.status == StatusCode::OK || t.reply.leaks(&fresh))
                .count();
            report.push_str(&format!(
                "\n  {wave}, {kind:?}: {ok} of {} got 200, {leaked} saw the new tokens",
                of_kind().count()
            ));
        }
    }
    assert_eq!(
        robbed, 0,
        "thief requests got 200 or saw the victim's new tokens:{report}"
    );
    for theft in during.iter().chain(&after) {
        theft.reply.assert_invalid_client();
    }

    // The victim's session is intact: its new refresh token works.
    assert!(!server.family_revoked(&fresh.refresh).await);
    let next = server
        .client_refresh(&fresh.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    assert_ne!(next.refresh, fresh.refresh);
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 2);
    assert_eq!(metrics.reuse_detected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thieves_racing_the_victims_refresh_through_the_layer_get_nothing() {
    thief_race(confidential_config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thieves_racing_the_victims_refresh_without_the_layer_get_nothing() {
    thief_race(Config {
        no_coalesce: true,
        ..confidential_config()
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// One reading of a request
// ---------------------------------------------------------------------------------------

/// A form body that reads as JSON too: `{"refresh_token":"V","x":"=&…&refresh_token=A&y="}`.
/// Read as a form (its Content-Type), it carries `grant_type` and token A; a reader that
/// decides by the first byte sees JSON and token V.
fn two_faced(json_token: &str, form: &str) -> String {
    format!(r#"{{"refresh_token":"{json_token}","x":"=&{form}&y="}}"#)
}

#[tokio::test]
async fn a_body_that_reads_as_two_requests_is_handled_as_the_layer_read_it() {
    for config in [
        config(),
        Config {
            no_coalesce: true,
            ..config()
        },
    ] {
        let server = TestServer::start(config).await;
        let attacker = server.login_demo().await;
        let victim = server.login_demo().await;
        // The layer verifies and keys A; the handler must rotate A, never V.
        let body = two_faced(
            &victim.refresh,
            &format!(
                "grant_type=refresh_token&refresh_token={}",
                attacker.refresh
            ),
        );
        let reply = server.post_form(app::REFRESH_PATH, body, None).await;
        reply.assert_tokens();
        // A hidden `grant_type=password`: the layer passes the request through as no
        // refresh, and the handler must not refresh V either.
        let body = two_faced(&victim.refresh, "grant_type=password&username=demo");
        let reply = server.post_form(app::REFRESH_PATH, body, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.json());
        assert_eq!(reply.json()["error"], "unsupported_grant_type");
        // V was never rotated: it still refreshes, once, with no reuse detected.
        server
            .refresh(&victim.refresh, Form::Json)
            .await
            .assert_tokens();
        let metrics = server.metrics().await;
        assert_eq!(metrics.rotations(), 2, "A once and V once");
        assert_eq!(metrics.reuse_detected(), 0);
    }
}
