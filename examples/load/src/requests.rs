//! The requests of a load: `/healthz`, a refresh, logins.

use std::sync::Arc;

use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use server::harness::{Client, Reply};

use crate::Error;

/// What one request asks for.
#[derive(Debug, Clone)]
pub(crate) enum Call {
    Healthz,
    Refresh(Arc<str>),
}

impl Call {
    pub(crate) fn request(&self, base: &str) -> Result<Request<Full<Bytes>>, Error> {
        let request = match self {
            Call::Healthz => Request::get(format!("{base}/healthz")).body(Full::default()),
            Call::Refresh(token) => Request::post(format!("{base}{}", server::REFRESH_PATH))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(json!({ "refresh_token": &**token }).to_string())),
        };
        Ok(request?)
    }
}

/// Logs in as `demo` `n` times: `n` token families.
pub(crate) async fn logins(client: &Client, base: &str, n: usize) -> Result<Vec<Arc<str>>, Error> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(client.login_demo(base).await?.into());
    }
    Ok(tokens)
}

pub(crate) async fn login(client: &Client, base: &str) -> Result<Arc<str>, Error> {
    Ok(logins(client, base, 1).await?.remove(0))
}

/// One refresh, expected to answer 200.
pub(crate) async fn refresh(client: &Client, base: &str, token: &Arc<str>) -> Result<Reply, Error> {
    let reply = client
        .send(Call::Refresh(Arc::clone(token)).request(base)?)
        .await?;
    if reply.status != StatusCode::OK {
        return Err(format!("refresh at {base} answered {}", reply.label()).into());
    }
    Ok(reply)
}
