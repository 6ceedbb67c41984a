//! The hand-written client: on a `401`, refresh, then send the request again.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http::{Request, StatusCode, header::AUTHORIZATION};
use http_body_util::Full;
use server::harness::{self, Client, Reply, TokenForm};

use crate::Error;

/// A client that keeps its tokens behind a lock and, when a request is rejected, refreshes
/// with the refresh token that request was sent with, then sends it again once: correct for
/// one request at a time, and a refresh storm for many.
#[derive(Debug, Clone)]
pub struct Naive {
    http: Client,
    base: String,
    tokens: Arc<RwLock<(String, String)>>,
    refreshes: Arc<AtomicU64>,
}

impl Naive {
    /// A client of `base` holding `access_token` and `refresh_token`, over `http`.
    pub fn new(http: Client, base: &str, access_token: &str, refresh_token: &str) -> Self {
        Self {
            http,
            base: base.to_owned(),
            tokens: Arc::new(RwLock::new((
                access_token.to_owned(),
                refresh_token.to_owned(),
            ))),
            refreshes: Arc::default(),
        }
    }

    /// The refreshes it sent.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The refresh token it holds now.
    pub fn refresh_token(&self) -> String {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    async fn send(&self, path: &str, access_token: &str) -> Result<Reply, Error> {
        let request = Request::get(format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {access_token}"))
            .body(Full::<Bytes>::default())?;
        self.http.send(request).await
    }

    /// `GET path`; on a `401`, one refresh and one more try.
    pub async fn get(&self, path: &str) -> Result<Reply, Error> {
        let (access, refresh) = self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let reply = self.send(path, &access).await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            return Ok(reply);
        }
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let request = harness::refresh_request(&self.base, &refresh, TokenForm::Form)?;
        let refreshed = self.http.send(request).await?;
        let json = refreshed
            .try_json()
            .filter(|_| refreshed.status == StatusCode::OK);
        let pair = json.as_ref().and_then(|json| {
            Some((
                json["access_token"].as_str()?.to_owned(),
                json["refresh_token"].as_str()?.to_owned(),
            ))
        });
        let Some(pair) = pair else {
            // The refresh failed: the request's own rejection is the answer.
            return Ok(reply);
        };
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = pair.clone();
        self.send(path, &pair.0).await
    }
}
