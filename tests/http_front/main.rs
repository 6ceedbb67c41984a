//! The HTTP front: token sources, verification before coalescing, whole-response sharing,
//! refusals, and the token-bound keys that keep one caller's pair from another.

mod bad_input;
mod keys;
mod sharing;
mod storms;

use std::{convert::Infallible, future::Future, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use support::tokens::{self, REFRESH_TYP, RSA_OTHER_PRIVATE, RSA_PUBLIC, SECRET};
use support::{Gated, until};
use tower::{Layer, Service, ServiceExt};
use tower_refresh_coalesce::{
    Handle, HttpExtract, HttpShare, JwtVerifier, RefreshCoalesceLayer, TokenSource,
    http::{RequestBody, ResponseBody},
};

type Body = Full<Bytes>;
type Inner = http::request::Parts;

/// A refresh service as the layer sees it, plus its inner service's gate and call count.
struct Front<S> {
    service: S,
    handle: Handle,
    inner: Gated,
}

fn hs256_verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .build()
        .expect("verifier")
}

/// The inner handler of most tests: gated, counted, and answering `200` with a new pair
/// that names the call, two `Set-Cookie` headers and `Cache-Control: no-store`. It echoes
/// the body it received, to show the layer passes it on unchanged.
fn refresh_handler(
    inner: &Gated,
    respond: fn(usize, &Inner, &Bytes) -> Response<Body>,
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
    inner.service(move |request: Request<RequestBody<Body>>, n| async move {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.expect("buffered body").to_bytes();
        Ok(respond(n, &parts, &body))
    })
}

fn new_pair(n: usize, _parts: &Inner, body: &Bytes) -> Response<Body> {
    let json = json!({
        "access_token": format!("access-{n}"),
        "refresh_token": format!("refresh-{n}"),
        "token_type": "Bearer",
        "expires_in": 900,
        "echo": String::from_utf8_lossy(body),
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            header::SET_COOKIE,
            format!("refresh_token=refresh-{n}; HttpOnly; Path=/auth"),
        )
        .header(header::SET_COOKIE, "session=1; HttpOnly")
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("response")
}

fn front_with(
    extract: HttpExtract<JwtVerifier>,
    share: HttpShare,
    respond: fn(usize, &Inner, &Bytes) -> Response<Body>,
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
    let layer = RefreshCoalesceLayer::http(extract).share(share).build();
    let handle = layer.handle();
    let service = layer.layer(refresh_handler(&inner, respond));
    Front {
        service,
        handle,
        inner,
    }
}

fn front() -> Front<
    impl Service<
        Request<Body>,
        Response = Response<ResponseBody<Body>>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static,
> {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    front.inner.open();
    front
}

fn post() -> http::request::Builder {
    Request::post("/auth/refresh")
}

fn bearer(token: &str) -> Request<Body> {
    post()
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::default())
        .unwrap()
}

fn cookie(token: &str) -> Request<Body> {
    post()
        .header(header::COOKIE, format!("theme=dark; refresh_token={token}"))
        .body(Body::default())
        .unwrap()
}

fn json_body(token: &str) -> Request<Body> {
    post()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({ "refresh_token": token }).to_string()))
        .unwrap()
}

fn form(token: &str, client_id: Option<&str>) -> Request<Body> {
    let mut body = format!("grant_type=refresh_token&refresh_token={token}");
    if let Some(client_id) = client_id {
        body.push_str(&format!("&client_id={client_id}"));
    }
    post()
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap()
}

/// Everything a client sees of a response, in order.
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

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).expect("ascii header"))
    }
}

async fn seen(response: Response<ResponseBody<Body>>) -> Seen {
    let (parts, body) = response.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    Seen {
        status: parts.status,
        headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

async fn send<S>(service: &S, request: Request<Body>) -> Seen
where
    S: Service<Request<Body>, Response = Response<ResponseBody<Body>>, Error = Infallible> + Clone,
{
    let response = service.clone().oneshot(request).await;
    seen(response.unwrap_or_else(|never| match never {})).await
}
