//! The application in this process, on a real socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use axum::Router;
use axum::http::{Method, Request, header, request};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::{Client, Error, Metrics, Reply, TokenForm};
use crate::{App, AppState, Config};

/// The reference server in this process, listening on `config.addr` (port 0: a free one),
/// stopped on drop.
///
/// Its request helpers (`send`, `refresh`, `storm`, ...) are for tests: they go through
/// the server's own [`Client`] and panic if the server does not answer.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    base: String,
    state: AppState,
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Builds the app (on tokio's blocking pool: SQLite and password hashing block), binds
    /// `config.addr` and serves it on a task of its own.
    ///
    /// The listen backlog is 4096, so that storms of thousands of simultaneous connects do
    /// not overflow it (tokio's default is 1024; an overflow costs a SYN retry of a second).
    pub async fn start(config: Config) -> Result<Self, Error> {
        let addr = config.addr;
        let App { router, state } =
            tokio::task::spawn_blocking(move || crate::app(config)).await??;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("server on {addr} stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            base: format!("http://{addr}"),
            state,
            client: Client::new(),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The application's state: its store, keys, metrics and coalescing handle.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The client the request helpers use.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `request`.
    ///
    /// # Panics
    ///
    /// If the server does not answer.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        self.client
            .send(request)
            .await
            .unwrap_or_else(|e| panic!("{} does not answer: {e}", self.base))
    }

    /// A `POST` to `path`, to be completed.
    pub fn post(&self, path: &str) -> request::Builder {
        Request::builder().method(Method::POST).uri(self.url(path))
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let request = self
            .post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))
            .expect("valid request");
        self.send(request).await
    }

    /// `GET path`, with `Authorization: Bearer` if `bearer` is given.
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut request = Request::builder().uri(self.url(path));
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.send(request.body(Full::default()).expect("valid request"))
            .await
    }

    /// `POST /auth/login` as the demo user.
    pub async fn login_demo(&self) -> Reply {
        self.post_json(
            "/auth/login",
            &json!({ "username": crate::DEMO_USER, "password": crate::DEMO_PASSWORD }),
        )
        .await
    }

    /// The refresh request presenting `token` in `form`.
    pub fn refresh_request(&self, token: &str, form: TokenForm) -> Request<Full<Bytes>> {
        super::refresh_request(&self.base, token, form).expect("valid request")
    }

    /// `POST /auth/refresh` presenting `token` in `form`.
    pub async fn refresh(&self, token: &str, form: TokenForm) -> Reply {
        self.send(self.refresh_request(token, form)).await
    }

    /// `POST /auth/logout` with `{"refresh_token"}`.
    pub async fn logout(&self, token: &str) -> Reply {
        self.post_json("/auth/logout", &json!({ "refresh_token": token }))
            .await
    }

    /// `requests` concurrent refreshes of `token`, each on its own connection, cycling
    /// through [`TokenForm::ALL`]; the answers in the order they arrived.
    pub async fn storm(&self, requests: usize, token: &str) -> Vec<Reply> {
        let answers = super::refresh_storm(
            &self.client,
            &self.base,
            token,
            requests,
            requests,
            Arc::new(AtomicUsize::new(0)),
        )
        .await
        .expect("every storm request is sent");
        answers
            .into_iter()
            .map(|(reply, _)| reply.expect("the server answers"))
            .collect()
    }

    /// `GET /metrics`, parsed, after checking its content type.
    pub async fn metrics(&self) -> Metrics {
        let reply = self.get("/metrics", None).await;
        assert_eq!(reply.status, 200, "GET /metrics");
        assert_eq!(
            reply.header(header::CONTENT_TYPE),
            Some(crate::metrics::METRICS_CONTENT_TYPE)
        );
        Metrics::parse(std::str::from_utf8(&reply.body).expect("UTF-8 metrics"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether the family of `refresh_token` (a token this server issued) is revoked.
    pub async fn family_revoked(&self, refresh_token: &str) -> bool {
        family_revoked(&self.state, refresh_token).await
    }
}

/// Whether the family of `refresh_token`, a token `state`'s app issued, is revoked in its
/// store.
///
/// # Panics
///
/// If the token was not issued there or the store fails.
pub async fn family_revoked(state: &AppState, refresh_token: &str) -> bool {
    let claims = state
        .keys()
        .verify_refresh(refresh_token, crate::unix_now())
        .expect("a token this app issued");
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.store().family_revoked(&claims.fam))
        .await
        .expect("no panic")
        .expect("the store works")
        .expect("the family exists")
}

/// Sends `request` to `router` in this process, without a socket, and reads the answer.
pub async fn call<B>(router: &Router, request: Request<B>) -> Reply
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
