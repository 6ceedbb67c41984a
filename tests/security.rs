//! The security model: two requests share one answer only if the inner service, given each
//! alone, would authenticate both the same way (the same token, client, client credential
//! and sender constraint). Each attack here was a way to receive another caller's pair.

use std::{convert::Infallible, future::Future};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::dpop;
use support::tokens::{self, REFRESH_TYP, SECRET};
use support::{Calls, Gate, until};
use tower::{Layer, Service, ServiceExt, service_fn};
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
    calls: Calls,
    gate: Gate,
) -> impl Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: Request<RequestBody<Body>>| {
        let n = calls.record();
        let open = gate.wait();
        let grant = request.extensions().get::<RefreshGrant>().cloned();
        async move {
            open.await;
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
    calls: Calls,
    gate: Gate,
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
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = RefreshCoalesceLayer::http(extract).build();
    let handle = layer.handle();
    let service = layer.layer(handler(calls.clone(), gate.clone()));
    Front {
        service,
        handle,
        calls,
        gate,
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

// ---------------------------------------------------------------------------------------
// Client authentication is part of the key
// ---------------------------------------------------------------------------------------

/// A victim leads a flight; each thief request carries the same refresh token and client id
/// but another (or no) credential. None of them may join the flight or get its replay.
#[tokio::test]
async fn a_request_with_another_client_credential_never_shares_the_victims_answer() {
    let front = front(extract());
    let token = tokens::refresh("alice");
    let victim = tokio::spawn({
        let service = front.service.clone();
        let request = basic(&token, "app", "right secret");
        async move { send(&service, request).await }
    });
    until(|| front.handle.stats().leader == 1).await;
    let thieves = vec![
        basic(&token, "app", "wrong secret"),
        form(&token, "&client_id=app&client_secret=wrong"),
        form(&token, "&client_id=app"),
        json_body(json!({"refresh_token": token, "client_id": "app", "client_secret": "x"})),
        json_body(json!({"refresh_token": token, "client_id": "app", "client_secret": "y"})),
        with_dpop(&dpop::ES256_B, "thief-1", &token),
    ];
    let count = thieves.len();
    let thieves: Vec<_> = thieves
        .into_iter()
        .map(|request| {
            let service = front.service.clone();
            tokio::spawn(async move { send(&service, request).await })
        })
        .collect();
    until(|| front.calls.get() == 1 + count).await;
    assert_eq!(front.handle.stats().joined, 0, "no thief joined the flight");
    front.gate.open();
    let victim = victim.await.unwrap();
    assert_eq!(victim.status, StatusCode::OK);
    assert_eq!(victim.json()["refresh_token"], "refresh-1");
    for thief in join_all(thieves).await {
        let thief = thief.unwrap();
        assert_ne!(thief.json()["refresh_token"], "refresh-1");
    }

    // Within the TTL, the replay reaches only the victim's client authentication.
    let retry = send(&front.service, basic(&token, "app", "right secret")).await;
    assert_eq!(retry, victim, "the victim's retry is replayed");
    let late = send(&front.service, basic(&token, "app", "wrong secret")).await;
    assert_ne!(late.json()["refresh_token"], "refresh-1");
    let late = send(&front.service, form(&token, "&client_id=app")).await;
    assert_ne!(late.json()["refresh_token"], "refresh-1");
    // Each late thief is replayed its own flight's answer (this inner service answers
    // everyone), never the victim's.
    assert_eq!(front.handle.stats().replayed, 3);
    assert_eq!(
        front.calls.get(),
        1 + count,
        "no call for the late requests"
    );
}

#[tokio::test]
async fn a_storm_of_one_client_makes_one_call_for_each_form_of_client_authentication() {
    type MakeRequest = Box<dyn Fn(&str, usize) -> Request<Body>>;
    let forms: Vec<(&str, MakeRequest)> = vec![
        (
            "basic",
            Box::new(|token: &str, _| basic(token, "app", "secret")),
        ),
        (
            "form secret",
            Box::new(|token: &str, _| form(token, "&client_id=app&client_secret=secret")),
        ),
        (
            "json secret",
            Box::new(|token: &str, _| {
                json_body(
                    json!({"refresh_token": token, "client_id": "app", "client_secret": "secret"}),
                )
            }),
        ),
        (
            "client assertion",
            Box::new(|token: &str, _| {
                form(
                    token,
                    "&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=one.signed.assertion",
                )
            }),
        ),
        (
            "dpop with a fresh proof each",
            Box::new(|token: &str, i| with_dpop(&dpop::ES256_A, &format!("jti-{i}"), token)),
        ),
    ];
    for (name, request) in forms {
        let front = front(extract());
        let token = tokens::refresh("bob");
        let storm: Vec<_> = (0..100)
            .map(|i| {
                let service = front.service.clone();
                let request = request(&token, i);
                tokio::spawn(async move { send(&service, request).await })
            })
            .collect();
        until(|| front.calls.get() == 1 && front.handle.stats().joined == 99).await;
        front.gate.open();
        let seen: Vec<Seen> = join_all(storm)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(front.calls.get(), 1, "{name}: one inner call");
        assert!(
            seen.iter()
                .all(|s| *s == seen[0] && s.status == StatusCode::OK),
            "{name}: identical responses"
        );
    }
}

#[tokio::test]
async fn client_assertions_are_keyed_whole_unless_an_identity_is_named() {
    let assertion = |n: usize| {
        format!("&client_assertion_type=jwt-bearer&client_assertion=assertion-{n}&client_id=app")
    };
    let front = front(extract());
    front.gate.open();
    let token = tokens::refresh("carol");
    let a = send(&front.service, form(&token, &assertion(1))).await;
    let b = send(&front.service, form(&token, &assertion(2))).await;
    assert_ne!(a, b, "another assertion is another key");
    assert_eq!(front.calls.get(), 2);

    let front = self::front(extract().client_assertion_identity(|assertion| {
        assertion
            .assertion
            .starts_with("assertion-")
            .then(|| "issuer app".to_owned())
            .ok_or_else(|| {
                Rejected::new(tower_refresh_coalesce::error::Rejection::InvalidToken(
                    "bad client assertion",
                ))
            })
    }));
    front.gate.open();
    let token = tokens::refresh("carol");
    let a = send(&front.service, form(&token, &assertion(1))).await;
    let b = send(&front.service, form(&token, &assertion(2))).await;
    assert_eq!(a, b, "one stable identity: replayed");
    assert_eq!(front.calls.get(), 1);
    let refused = send(
        &front.service,
        form(
            &token,
            "&client_assertion_type=jwt-bearer&client_assertion=forged",
        ),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(front.calls.get(), 1);
}

#[tokio::test]
async fn the_binding_hook_keeps_requests_with_other_certificates_apart() {
    #[derive(Clone)]
    struct Certificate(&'static str);
    let front = front(extract().bind(|parts| {
        parts
            .extensions
            .get::<Certificate>()
            .map(|cert| cert.0.as_bytes().to_vec())
    }));
    front.gate.open();
    let token = tokens::refresh("dave");
    let with_cert = |cert| {
        let mut request = form(&token, "&client_id=app");
        request.extensions_mut().insert(Certificate(cert));
        request
    };
    let a = send(&front.service, with_cert("cert a")).await;
    let again = send(&front.service, with_cert("cert a")).await;
    let b = send(&front.service, with_cert("cert b")).await;
    let none = send(&front.service, form(&token, "&client_id=app")).await;
    assert_eq!(a, again);
    assert_ne!(a, b);
    assert_ne!(a, none);
    assert_eq!(front.calls.get(), 3);
}

#[tokio::test]
async fn the_inner_service_receives_what_the_layer_verified() {
    let front = front(extract());
    front.gate.open();
    let token = tokens::refresh("erin");
    let seen = send(&front.service, with_dpop(&dpop::ES256_A, "grant", &token)).await;
    let body = seen.json();
    assert_eq!(body["client_id"], "app");
    assert_eq!(body["sub"], "erin");
    assert_eq!(body["jkt"], dpop::ES256_A.thumbprint());
}

#[tokio::test]
async fn a_grant_read_without_the_layer_matches_the_layers_reading() {
    let sources = tower_refresh_coalesce::TokenSource::defaults();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "application/x-www-form-urlencoded".parse().unwrap(),
    );
    let grant = RefreshGrant::read(
        &headers,
        b"grant_type=refresh_token&refresh_token=t&client_id=app&client_secret=s",
        &sources,
    )
    .unwrap()
    .expect("a refresh");
    assert_eq!(
        (grant.token(), grant.client_id(), grant.client_secret()),
        ("t", Some("app"), Some("s"))
    );
    // A body that looks like JSON is read by its Content-Type, as the layer reads it.
    let grant = RefreshGrant::read(
        &headers,
        br#"{"refresh_token":"v"}=&grant_type=refresh_token&refresh_token=t"#,
        &sources,
    );
    assert_eq!(grant.unwrap().expect("a refresh").token(), "t");
    let mut json = http::HeaderMap::new();
    json.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    let other = RefreshGrant::read(&headers, b"grant_type=password&username=u", &sources);
    assert!(other.unwrap().is_none(), "another grant type is no refresh");
    assert!(
        RefreshGrant::read(&json, b"grant_type=refresh_token&refresh_token=t", &sources).is_err()
    );
}

// ---------------------------------------------------------------------------------------
// DPoP
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_bad_dpop_proof_is_refused_before_the_inner_service() {
    let front = front(extract());
    front.gate.open();
    let token = tokens::refresh("frank");
    let mut cases = Vec::new();
    let mut garbage = form(&token, "");
    garbage
        .headers_mut()
        .insert("dpop", "not.a.proof".parse().unwrap());
    cases.push(("garbage", garbage));
    let wrong_htu = dpop::proof(
        &dpop::ES256_A,
        "POST",
        "https://elsewhere.example/auth/refresh",
        tokens::now() as u64,
        "htu",
    );
    let mut request = form(&token, "");
    request
        .headers_mut()
        .insert("dpop", wrong_htu.parse().unwrap());
    cases.push(("another htu", request));
    let old = dpop::proof(
        &dpop::ES256_A,
        "POST",
        HTU,
        tokens::now() as u64 - 600,
        "old",
    );
    let mut request = form(&token, "");
    request.headers_mut().insert("dpop", old.parse().unwrap());
    cases.push(("an old iat", request));
    for (name, request) in cases {
        let seen = send(&front.service, request).await;
        assert_eq!(seen.status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(seen.json()["error"], "invalid_dpop_proof", "{name}");
    }
    // A proof is accepted once.
    let proof = dpop::proof(&dpop::ES256_A, "POST", HTU, tokens::now() as u64, "once");
    let once = |proof: &str| {
        let mut request = form(&token, "");
        request.headers_mut().insert("dpop", proof.parse().unwrap());
        request
    };
    assert_eq!(
        send(&front.service, once(&proof)).await.status,
        StatusCode::OK
    );
    let replayed = send(&front.service, once(&proof)).await;
    assert_eq!(replayed.json()["error"], "invalid_dpop_proof");
    assert_eq!(front.calls.get(), 1);
}

#[tokio::test]
async fn a_use_dpop_nonce_error_is_never_replayed() {
    let calls = Calls::default();
    let inner = {
        let calls = calls.clone();
        service_fn(move |_request: Request<RequestBody<Body>>| {
            let n = calls.record();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .header("dpop-nonce", format!("nonce-{n}"))
                        .body(Full::new(Bytes::from(r#"{"error":"use_dpop_nonce"}"#)))
                        .unwrap(),
                )
            }
        })
    };
    // Even a policy that replays everything does not replay a nonce challenge.
    let layer = RefreshCoalesceLayer::http(extract())
        .share(tower_refresh_coalesce::HttpShare::new().replay_if(|_, _, _| true))
        .build();
    let service = layer.layer(inner);
    let token = tokens::refresh("gina");
    for jti in ["n1", "n2"] {
        let seen = send(&service, with_dpop(&dpop::ES256_A, jti, &token)).await;
        assert_eq!(seen.status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(calls.get(), 2, "each proof reaches the inner service");
}

// ---------------------------------------------------------------------------------------
// Subject mode
// ---------------------------------------------------------------------------------------

#[test]
fn matching_by_subject_with_a_verifier_without_subjects_is_refused_at_build() {
    let built = RefreshCoalesceLayer::http(HttpExtract::new(Opaque).match_by_subject()).try_build();
    let error = built.expect_err("refused");
    assert!(error.to_string().contains("subjects"), "{error}");
}

#[test]
fn matching_by_subject_with_a_store_is_refused_at_build() {
    let extract = HttpExtract::new(verifier())
        .secret(b"a fingerprint secret of 32 bytes!")
        .match_by_subject();
    let built = RefreshCoalesceLayer::http(extract)
        .store(MemoryStore::new())
        .try_build();
    assert!(built.is_err());
}

#[tokio::test]
async fn a_token_without_a_subject_never_coalesces_in_subject_mode() {
    // A custom verifier that yields no subject: every token used to share one key.
    let no_subject = |_token: &str| Ok::<_, Rejected>(Verified::new());
    let (calls, gate) = (Calls::default(), Gate::open_now());
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(no_subject).match_by_subject()).build();
    let service = layer.layer(handler(calls.clone(), gate));
    let a = send(&service, form("token-of-user-a", "")).await;
    let b = send(&service, form("token-of-user-b", "")).await;
    assert_ne!(a.json()["refresh_token"], b.json()["refresh_token"]);
    assert_eq!(calls.get(), 2);
    assert_eq!(layer.handle().stats().bypassed, 2);
}

#[tokio::test]
async fn different_subjects_never_share_a_key_in_subject_mode() {
    let front = front(extract().match_by_subject());
    front.gate.open();
    let alice = send(&front.service, form(&tokens::refresh("alice"), "")).await;
    let alice_again = send(&front.service, form(&tokens::refresh("alice"), "")).await;
    let bob = send(&front.service, form(&tokens::refresh("bob"), "")).await;
    assert_eq!(alice, alice_again, "subject mode: one subject, one answer");
    assert_ne!(alice, bob);
    assert_eq!(front.calls.get(), 2);
}

// ---------------------------------------------------------------------------------------
// Secrets and limits
// ---------------------------------------------------------------------------------------

#[test]
fn short_secrets_and_a_store_without_a_secret_are_refused_at_build() {
    let short = RefreshCoalesceLayer::http(
        HttpExtract::new(Opaque).secret(b"31 bytes are not enough, sorry"),
    )
    .try_build();
    assert!(short.is_err());
    let random = RefreshCoalesceLayer::http(HttpExtract::new(Opaque))
        .store(MemoryStore::new())
        .try_build();
    let error = random.expect_err("a store needs an explicit secret");
    assert!(error.to_string().contains("secret"), "{error}");
    assert!(tower_refresh_coalesce::Fingerprinter::new([7u8; 31]).is_err());
}

#[tokio::test]
async fn one_subject_cannot_fill_the_table_for_everyone() {
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = RefreshCoalesceLayer::http(extract())
        .max_entries_per_group(3)
        .build();
    let handle = layer.handle();
    let service = layer.layer(handler(calls.clone(), gate.clone()));
    let flights: Vec<_> = (0..3)
        .map(|_| {
            let service = service.clone();
            let request = form(&tokens::refresh("mallory"), "");
            tokio::spawn(async move { send(&service, request).await })
        })
        .collect();
    until(|| handle.stats().in_flight == 3).await;
    let capped = send(&service, form(&tokens::refresh("mallory"), "")).await;
    assert_eq!(capped.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(capped.headers.iter().any(|(n, _)| n == "retry-after"));
    let other = tokio::spawn({
        let service = service.clone();
        let request = form(&tokens::refresh("trent"), "");
        async move { send(&service, request).await }
    });
    until(|| handle.stats().in_flight == 4).await;
    gate.open();
    assert_eq!(other.await.unwrap().status, StatusCode::OK);
    for flight in join_all(flights).await {
        assert_eq!(flight.unwrap().status, StatusCode::OK);
    }
    assert_eq!(calls.get(), 4);
}

#[tokio::test]
async fn invalidating_a_token_reaches_the_entries_of_every_client_that_presented_it() {
    let front = front(extract());
    front.gate.open();
    let token = tokens::refresh("ivan");
    send(&front.service, basic(&token, "app", "secret")).await;
    send(&front.service, form(&token, "&client_id=other")).await;
    assert_eq!(front.handle.stats().entries, 2);
    assert_eq!(front.handle.invalidate_token(&token), 2);
    assert_eq!(front.handle.stats().entries, 0);
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

/// A refusal sent before the request body was read closes the HTTP/1.1 connection with
/// `Connection: close`, so that a pooled client's next request goes on a new connection.
#[tokio::test]
async fn a_refusal_before_the_body_is_read_closes_the_connection_and_the_next_request_works() {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let layer = RefreshCoalesceLayer::http(HttpExtract::new(verifier()).body_limit(1024)).build();
    let app = axum::Router::new().route(
        "/auth/refresh",
        axum::routing::post(|| async { "refreshed" }).route_layer(layer),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http::<Body>();
    let uri: http::Uri = format!("http://{address}/auth/refresh").parse().unwrap();
    let request = |body: Bytes| {
        Request::post(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap()
    };

    let big = client
        .request(request(Bytes::from(vec![b' '; 4096])))
        .await
        .expect("an answer");
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        big.headers().get(header::CONNECTION).map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    drop(big.into_body().collect().await);

    let token = tokens::refresh("judy");
    let next = client
        .request(request(Bytes::from(
            json!({ "refresh_token": token }).to_string(),
        )))
        .await
        .expect("the next request on the pool works");
    assert_eq!(next.status(), StatusCode::OK);

    // A refusal after the whole body was read keeps the connection.
    let malformed = client
        .request(request(Bytes::from_static(b"{")))
        .await
        .expect("an answer");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert!(malformed.headers().get(header::CONNECTION).is_none());
}
