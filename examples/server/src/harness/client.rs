//! An HTTP/1.1 client for the server's contract, and fully read answers.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::header::{self, AsHeaderName, HeaderMap, HeaderValue};
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::{Counters, Error, Metrics};
use crate::{DEMO_PASSWORD, DEMO_USER, REFRESH_COOKIE, REFRESH_PATH};

/// An HTTP/1.1 client with `TCP_NODELAY`: each request in flight gets a connection of its
/// own. (HTTP/2 would multiplex them onto one connection, which hyper's server caps at 200
/// concurrent streams: a storm would be throttled by the client.)
///
/// Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct Client(HyperClient<HttpConnector, Full<Bytes>>);

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client with hyper's default pool.
    pub fn new() -> Self {
        Self(HyperClient::builder(TokioExecutor::new()).build(connector()))
    }

    /// A client that keeps up to `connections` idle connections per host open for reuse.
    pub fn with_idle_connections(connections: usize) -> Self {
        Self(
            HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(connections)
                .build(connector()),
        )
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Reply, Error> {
        let response = self.0.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Reply, Error> {
        self.send(Request::get(url).body(Full::default())?).await
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(&self, url: &str, body: &Value) -> Result<Reply, Error> {
        let request = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))?;
        self.send(request).await
    }

    /// `POST /auth/login` with `{"username", "password"}`.
    pub async fn login(&self, base: &str, username: &str, password: &str) -> Result<Reply, Error> {
        let body = json!({ "username": username, "password": password });
        self.post_json(&format!("{base}/auth/login"), &body).await
    }

    /// Logs in as the demo user (a new token family) and returns its refresh token; an
    /// error says what the server answered instead.
    pub async fn login_demo(&self, base: &str) -> Result<String, Error> {
        let reply = self.login(base, DEMO_USER, DEMO_PASSWORD).await?;
        reply.refresh_token().ok_or_else(|| {
            format!("login at {base} failed: {} {}", reply.status, reply.text()).into()
        })
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self, base: &str) -> Result<Metrics, Error> {
        let reply = self.get(&format!("{base}/metrics")).await?;
        if reply.status != StatusCode::OK {
            return Err(format!("GET {base}/metrics answered {}", reply.status).into());
        }
        Ok(Metrics::parse(std::str::from_utf8(&reply.body)?)?)
    }

    /// The counters of `/metrics` a storm is judged by.
    pub async fn counters(&self, base: &str) -> Result<Counters, Error> {
        Counters::from_metrics(&self.metrics(base).await?)
    }
}

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector
}

/// A response, fully read.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// Every header, repeated ones included.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    ///
    /// # Panics
    ///
    /// If it is not JSON (the message shows the status and the body); see
    /// [`try_json`](Self::try_json).
    pub fn json(&self) -> Value {
        self.try_json().unwrap_or_else(|| {
            panic!(
                "expected a JSON body, got {} {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as JSON, if it is.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The value of the header `name`, if present and visible ASCII.
    pub fn header(&self, name: impl AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every `Set-Cookie` header, in order.
    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    /// The refresh token of a `200` token pair.
    pub fn refresh_token(&self) -> Option<String> {
        if self.status != StatusCode::OK {
            return None;
        }
        self.try_json()?["refresh_token"]
            .as_str()
            .map(str::to_owned)
    }

    /// The JSON `error` code of the answer, if any.
    pub fn error(&self) -> Option<String> {
        self.try_json()?["error"].as_str().map(str::to_owned)
    }

    /// `200`, or the status with the JSON error code: `400 invalid_grant`.
    pub fn label(&self) -> String {
        let code = self.status.as_u16();
        if self.status.is_success() {
            return code.to_string();
        }
        match self.error() {
            Some(error) => format!("{code} {error}"),
            None => code.to_string(),
        }
    }
}

/// The four ways a client presents a refresh token to `POST /auth/refresh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenForm {
    /// `{"refresh_token": ...}`.
    Json,
    /// An RFC 6749 §6 form, `grant_type=refresh_token&refresh_token=...`, without a client.
    Form,
    /// The `refresh_token` cookie.
    Cookie,
    /// `Authorization: Bearer ...`.
    Bearer,
}

impl TokenForm {
    /// Every form, in the order a storm cycles through them.
    pub const ALL: [TokenForm; 4] = [
        TokenForm::Json,
        TokenForm::Form,
        TokenForm::Cookie,
        TokenForm::Bearer,
    ];
}

/// `POST {base}/auth/refresh` presenting `token` in `form`.
pub fn refresh_request(
    base: &str,
    token: &str,
    form: TokenForm,
) -> Result<Request<Full<Bytes>>, Error> {
    let builder = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}{REFRESH_PATH}"));
    let request = match form {
        TokenForm::Json => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(json!({ "refresh_token": token }).to_string())),
        TokenForm::Form => builder
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            // As given: a JWT is base64url and dots, nothing to escape.
            .body(Full::from(format!(
                "grant_type=refresh_token&refresh_token={token}"
            ))),
        TokenForm::Cookie => builder
            .header(
                header::COOKIE,
                HeaderValue::from_str(&format!("{REFRESH_COOKIE}={token}"))?,
            )
            .body(Full::default()),
        TokenForm::Bearer => builder
            .header(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            )
            .body(Full::default()),
    };
    Ok(request?)
}

/// Sends `requests` refreshes of `token` to `base`, `concurrency` in flight at once (each on
/// its own connection), cycling through [`TokenForm::ALL`], and counts each answer in
/// `done` as it arrives. Returns every answer (or transport error) with its latency, from
/// sending the request to reading the whole body, in the order they arrived.
pub async fn refresh_storm(
    client: &Client,
    base: &str,
    token: &str,
    requests: usize,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Result<Vec<(Result<Reply, Error>, Duration)>, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(requests) {
        let (client, next, done) = (client.clone(), Arc::clone(&next), Arc::clone(&done));
        let (base, token) = (base.to_owned(), token.to_owned());
        workers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let form = TokenForm::ALL[i % TokenForm::ALL.len()];
                let request = refresh_request(&base, &token, form)?;
                let started = Instant::now();
                let reply = client.send(request).await;
                answers.push((reply, started.elapsed()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(answers)
        });
    }
    let mut answers = Vec::with_capacity(requests);
    while let Some(worker) = workers.join_next().await {
        answers.extend(worker??);
    }
    Ok(answers)
}

/// `Authorization: Basic` with `user` and `password` as given: `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    let credentials = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// RFC 6749 §2.3.1 client authentication: id and secret form-urlencoded, then [`basic`].
pub fn client_basic(client_id: &str, secret: &str) -> String {
    basic(&form_encode(client_id), &form_encode(secret))
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(text: &str) -> String {
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
