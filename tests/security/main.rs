//! The security model: two requests share one answer only if the inner service, given each
//! alone, would authenticate both the same way (the same token, client, client credential
//! and sender constraint). Each attack here was a way to receive another caller's pair.

mod client_auth;
mod limits;
mod sender;

use std::{convert::Infallible, future::Future};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::dpop;
use support::tokens::{self, REFRESH_TYP, SECRET};
use support::{Gated, until};
use tower::{Layer, Service, ServiceExt};
use tower_refresh_coalesce::{
    Handle, HttpExtract, JwtVerifier, Opaque, RefreshCoalesceLayer, RefreshGrant, Verified,
    error::Rejected,
    http::{RequestBody, ResponseBody},
    store::MemoryStore,
    token::DpopVerifier,
};

type Body = Full<Bytes>;

const ORIGIN: &str = "https://auth.example";
const HTU: &str = "https://auth.example/auth/refresh";

fn verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .build()
        .expect("verifier")
}

fn extract() -> HttpExtract<JwtVerifier> {
    HttpExtract::new(verifier()).dpop(
        DpopVerifier::builder()
            .origin(ORIGIN)
            .build()
            .expect("DPoP verifier"),
    )
}

/// A gated, counted inner service answering a pair that names its call, plus what it saw of
/// the request: the verified grant's client and subject.
fn handler(
    inner: &Gated,
) -> impl Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + use<>,
>
+ Clone
+ Send
+ 'static
+ use<> {
    inner.service(|request: Request<RequestBody<Body>>, n| {
        let grant = request.extensions().get::<RefreshGrant>().cloned();
        async move {
            let grant = grant.expect("the layer hands the inner service a RefreshGrant");
            let body = json!({
                "access_token": format!("access-{n}"),
                "refresh_token": format!("refresh-{n}"),
                "client_id": grant.client_id(),
                "sub": grant.claims().and_then(|c| c.subject.clone()),
                "jkt": grant.dpop_thumbprint(),
            });
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("response"))
        }
    })
}

struct Front<S> {
    service: S,
    handle: Handle,
    inner: Gated,
}

fn front(
    extract: HttpExtract<JwtVerifier>,
) -> Front<
    impl Service<
        Request<Body>,
        Response = Response<ResponseBody<Body>>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static,
> {
    let inner = Gated::closed();
    let layer = RefreshCoalesceLayer::http(extract).build();
    let handle = layer.handle();
    let service = layer.layer(handler(&inner));
    Front {
        service,
        handle,
        inner,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: StatusCode,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn send<S>(service: &S, request: Request<Body>) -> Seen
where
    S: Service<Request<Body>, Response = Response<ResponseBody<Body>>, Error = Infallible> + Clone,
{
    let response = service
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {});
    let (parts, body) = response.into_parts();
    Seen {
        status: parts.status,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.collect().await.expect("body").to_bytes(),
    }
}

fn post() -> http::request::Builder {
    Request::post("/auth/refresh")
}

fn basic(token: &str, id: &str, secret: &str) -> Request<Body> {
    post()
        .header(
            header::AUTHORIZATION,
            format!("Basic {}", STANDARD.encode(format!("{id}:{secret}"))),
        )
        .header(header::COOKIE, format!("refresh_token={token}"))
        .body(Body::default())
        .unwrap()
}

fn form(token: &str, extra: &str) -> Request<Body> {
    post()
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "grant_type=refresh_token&refresh_token={token}{extra}"
        )))
        .unwrap()
}

fn json_body(body: Value) -> Request<Body> {
    post()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn with_dpop(key: &dpop::TestKey, jti: &str, token: &str) -> Request<Body> {
    let proof = dpop::proof(key, "POST", HTU, tokens::now() as u64, jti);
    let mut request = form(token, "&client_id=app");
    request
        .headers_mut()
        .insert("dpop", proof.parse().expect("header value"));
    request
}
