//! hyper-util's client behind the client layer, refreshing with the `oauth2` crate.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use server::harness::Reply;
use tower::{Layer, ServiceExt};
use tower_refresh_coalesce::client::{
    BearerAuth, BearerAuthLayer, ClientBody, Credentials, oauth2::OAuth2Refresh,
};

use crate::Error;

/// An HTTP/1.1 client (`TCP_NODELAY`, one connection per request in flight) whose request
/// bodies are the layer's [`ClientBody`]; the same type carries the refreshes.
pub type Transport = HyperClient<HttpConnector, ClientBody<Full<Bytes>>>;

/// The client layer over [`Transport`].
pub type Layered = BearerAuth<Transport>;

/// The client id the clients name (a public client of the reference server).
pub const CLIENT_ID: &str = "api-client";

/// A [`Transport`] keeping up to `idle` connections per host for reuse.
pub fn transport(idle: usize) -> Transport {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle)
        .build(connector)
}

/// The RFC 6749 §6 refresh at `base`'s `/auth/refresh`, through `transport`.
pub fn refresh(
    transport: Transport,
    base: &str,
) -> Result<OAuth2Refresh<Transport, ClientBody<Full<Bytes>>>, Error> {
    let url = format!("{base}{}", server::REFRESH_PATH);
    Ok(OAuth2Refresh::new(transport, &url, CLIENT_ID)?)
}

/// A client of `base` that authenticates with `credentials`: one refresh per generation,
/// each rejected request sent again once.
pub fn client(base: &str, credentials: Credentials, idle: usize) -> Result<Layered, Error> {
    let transport = transport(idle);
    let layer = BearerAuthLayer::new(credentials, refresh(transport.clone(), base)?);
    Ok(layer.layer(transport))
}

/// `GET url` through `client`, the answer read whole.
pub async fn get(client: &Layered, url: &str) -> Result<Reply, Error> {
    let request = Request::get(url).body(Full::default())?;
    let response = client.clone().oneshot(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
