//! The HTTP front: token sources, verification before coalescing, whole-response sharing,
//! refusals, and the token-bound keys that keep one caller's pair from another.

use std::{convert::Infallible, future::Future, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use support::tokens::{self, REFRESH_TYP, RSA_OTHER_PRIVATE, RSA_PUBLIC, SECRET};
use support::{Calls, Gate, until};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_refresh_coalesce::{
    Handle, HttpExtract, HttpShare, JwtVerifier, RefreshCoalesceLayer, TokenSource,
    http::{RequestBody, ResponseBody},
};

type Body = Full<Bytes>;
type Inner = http::request::Parts;

/// A refresh service as the layer sees it, plus its call count and gate.
struct Front<S> {
    service: S,
    handle: Handle,
    calls: Calls,
    gate: Gate,
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
    calls: Calls,
    gate: Gate,
    respond: fn(usize, &Inner, &Bytes) -> Response<Body>,
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
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.expect("buffered body").to_bytes();
            open.await;
            Ok(respond(n, &parts, &body))
        }
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
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = RefreshCoalesceLayer::http(extract).share(share).build();
    let handle = layer.handle();
    let service = layer.layer(refresh_handler(calls.clone(), gate.clone(), respond));
    Front {
        service,
        handle,
        calls,
        gate,
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
    front.gate.open();
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

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// One bad request: what is sent, to which verifier, and the refusal expected.
struct Case {
    name: &'static str,
    reason: &'static str,
    verifier: fn() -> JwtVerifier,
    request: Request<Body>,
    status: StatusCode,
    error: &'static str,
}

fn rs256_verifier() -> JwtVerifier {
    JwtVerifier::rs256_pem(RSA_PUBLIC)
        .expect("public key")
        .typ(REFRESH_TYP)
        .build()
        .expect("verifier")
}

fn issuer_verifier() -> JwtVerifier {
    JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .issuer(["https://id.example"])
        .audience(["refresh-api"])
        .build()
        .expect("verifier")
}

fn bad_inputs() -> Vec<Case> {
    let now = tokens::now();
    let signed = |claims: Value| tokens::hs256(&claims);
    let with = |extra: Value| {
        let mut claims = tokens::claims("alice");
        for (k, v) in extra.as_object().expect("object") {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let rsa = |key: &[u8], claims: &Value| {
        let key = EncodingKey::from_rsa_pem(key).expect("rsa key");
        tokens::encode(Algorithm::RS256, Some(REFRESH_TYP), claims, &key)
    };
    let hs = hs256_verifier as fn() -> JwtVerifier;
    let invalid_grant = StatusCode::UNAUTHORIZED;
    let case = |name, reason, verifier, request, status, error| Case {
        name,
        reason,
        verifier,
        request,
        status,
        error,
    };
    let valid = tokens::refresh("alice");
    let payload = |claims: &Value| claims.to_string();
    vec![
        case(
            "alg none",
            "disallowed algorithm",
            hs,
            bearer(&tokens::raw(
                r#"{"alg":"none","typ":"refresh+jwt"}"#,
                &payload(&with(json!({}))),
                None,
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "alg NONE",
            "disallowed algorithm",
            hs,
            bearer(&tokens::raw(
                r#"{"alg":"NONE","typ":"refresh+jwt"}"#,
                &payload(&with(json!({}))),
                None,
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "hs256 signed with the rsa public key",
            "disallowed algorithm",
            rs256_verifier,
            bearer(&tokens::raw(
                r#"{"alg":"HS256","typ":"refresh+jwt"}"#,
                &payload(&with(json!({}))),
                Some(RSA_PUBLIC),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "rs256 signed with another key",
            "bad signature",
            rs256_verifier,
            bearer(&rsa(RSA_OTHER_PRIVATE, &with(json!({})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "hs256 with the wrong secret",
            "bad signature",
            hs,
            bearer(&tokens::encode(
                Algorithm::HS256,
                Some(REFRESH_TYP),
                &with(json!({})),
                &EncodingKey::from_secret(b"wrong"),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "hs384 while hs256 is pinned",
            "disallowed algorithm",
            hs,
            bearer(&tokens::encode(
                Algorithm::HS384,
                Some(REFRESH_TYP),
                &with(json!({})),
                &EncodingKey::from_secret(SECRET),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "expired beyond the leeway",
            "expired",
            hs,
            bearer(&signed(with(json!({"exp": now - 60})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "nbf in the future",
            "not yet valid",
            hs,
            bearer(&signed(with(json!({"nbf": now + 60})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "missing exp",
            "missing expiry",
            hs,
            bearer(&signed(with(json!({"exp": null})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "exp as a string",
            "invalid expiry",
            hs,
            bearer(&signed(with(json!({"exp": (now + 3600).to_string()})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "missing sub",
            "missing subject",
            hs,
            bearer(&signed(with(json!({"sub": null})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "empty sub",
            "empty subject",
            hs,
            bearer(&signed(with(json!({"sub": ""})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "300-byte sub",
            "subject too long",
            hs,
            bearer(&signed(with(json!({"sub": "s".repeat(300)})))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "wrong iss",
            "wrong issuer",
            issuer_verifier,
            bearer(&signed(with(
                json!({"iss": "https://evil.example", "aud": "refresh-api"}),
            ))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "wrong aud",
            "wrong audience",
            issuer_verifier,
            bearer(&signed(with(
                json!({"iss": "https://id.example", "aud": "other-api"}),
            ))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "an access token as a refresh token",
            "wrong token type",
            hs,
            bearer(&tokens::encode(
                Algorithm::HS256,
                Some("at+jwt"),
                &with(json!({})),
                &EncodingKey::from_secret(SECRET),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "no typ at all",
            "wrong token type",
            hs,
            bearer(&tokens::encode(
                Algorithm::HS256,
                None,
                &with(json!({})),
                &EncodingKey::from_secret(SECRET),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "unknown crit",
            "unsupported critical header",
            hs,
            bearer(&tokens::raw(
                r#"{"alg":"HS256","typ":"refresh+jwt","crit":["exp-ext"],"exp-ext":1}"#,
                &payload(&with(json!({}))),
                Some(SECRET),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "duplicate claims",
            "duplicate claim",
            hs,
            bearer(&tokens::raw(
                r#"{"alg":"HS256","typ":"refresh+jwt"}"#,
                &format!(r#"{{"sub":"alice","sub":"mallory","exp":{}}}"#, now + 3600),
                Some(SECRET),
            )),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "garbage",
            "malformed token",
            hs,
            bearer("not-a-jwt"),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "truncated",
            "malformed token",
            hs,
            bearer(&valid[..valid.len() - 10]),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "a 5 KiB token",
            "token too long",
            hs,
            bearer(&format!("{valid}.{}", "a".repeat(5 * 1024))),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "non-UTF-8 bytes in the header",
            "not visible ASCII",
            hs,
            post()
                .header(
                    header::AUTHORIZATION,
                    HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
                )
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "non-ASCII token in JSON",
            "outside visible ASCII",
            hs,
            json_body("tök€n"),
            invalid_grant,
            "invalid_grant",
        ),
        case(
            "invalid UTF-8 in the JSON body",
            "not UTF-8",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(&b"{\"refresh_token\":\"\xff\"}"[..]))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a 17 KiB body",
            "too large",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    json!({"refresh_token": valid, "pad": "x".repeat(17 * 1024)}).to_string(),
                ))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
        ),
        case(
            "a declared length over the cap",
            "too large",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, "20000")
                .body(Body::from("{}"))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
        ),
        case(
            "wrong content type",
            "unsupported content type",
            hs,
            post()
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from(valid.clone()))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "malformed JSON",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"refresh_token\": "))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a JSON body that is not UTF-8 (in a field the layer does not read)",
            "not UTF-8",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    [
                        format!("{{\"refresh_token\":\"{valid}\",\"device\":\"").as_bytes(),
                        b"\xf8\"}",
                    ]
                    .concat(),
                ))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a lone surrogate escape in a field the layer does not read",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    "{{\"refresh_token\":\"{valid}\",\"device\":[{{\"name\":\"\\ud800\"}}]}}"
                )))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a number out of range in a field the layer does not read",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    "{{\"refresh_token\":\"{valid}\",\"n\":1e999}}"
                )))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a JSON array",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!("[\"{valid}\"]")))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a JSON token that is not a string",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"refresh_token\": 42}"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a repeated JSON token field",
            "not a JSON object",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    "{{\"refresh_token\":\"{valid}\",\"refresh_token\":\"x\"}}"
                )))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a form without grant_type",
            "grant_type is missing",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("refresh_token={valid}")))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a form with a repeated parameter",
            "repeated form parameter",
            hs,
            post()
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!(
                    "grant_type=refresh_token&refresh_token={valid}&refresh_token=x"
                )))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "a token in a Basic header only",
            "no refresh token",
            hs,
            post()
                .header(
                    header::AUTHORIZATION,
                    format!("Basic {}", STANDARD.encode(format!("client:{valid}"))),
                )
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "malformed Basic credentials",
            "malformed basic credentials",
            hs,
            post()
                .header(header::AUTHORIZATION, "Basic !!!")
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "an empty cookie",
            "no refresh token",
            hs,
            post()
                .header(header::COOKIE, "refresh_token=")
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "an empty bearer",
            "malformed bearer credentials",
            hs,
            post()
                .header(header::AUTHORIZATION, "Bearer ")
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "no token at all",
            "no refresh token",
            hs,
            post().body(Body::default()).unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "two different tokens",
            "more than one token",
            hs,
            post()
                .header(header::AUTHORIZATION, format!("Bearer {valid}"))
                .header(
                    header::COOKIE,
                    format!("refresh_token={}", tokens::refresh("alice")),
                )
                .body(Body::default())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "two content types",
            "more than one content type",
            hs,
            post()
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, format!("Bearer {valid}"))
                .body(Body::from(r#"{"refresh_token":"forged"}"#))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "two different client ids",
            "more than one client id",
            hs,
            {
                let mut request = form(&valid, Some("client-a"));
                request.headers_mut().insert(
                    header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("client-b:pw")))
                        .unwrap(),
                );
                request
            },
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ]
}

#[tokio::test]
async fn bad_input_is_refused_with_a_json_error_and_never_reaches_the_inner_service() {
    let cases = bad_inputs();
    assert!(cases.len() >= 25);
    for case in cases {
        let calls = Calls::default();
        let layer = RefreshCoalesceLayer::http(HttpExtract::new((case.verifier)())).build();
        let handle = layer.handle();
        let service = layer.layer(refresh_handler(calls.clone(), Gate::open_now(), new_pair));
        let response = send(&service, case.request).await;
        assert_eq!(response.status, case.status, "{}: status", case.name);
        assert_eq!(
            response.json()["error"],
            case.error,
            "{}: error code",
            case.name
        );
        assert_eq!(
            response.header("cache-control"),
            Some("no-store"),
            "{}",
            case.name
        );
        if response.status == StatusCode::UNAUTHORIZED {
            assert!(
                response.header("www-authenticate").is_some(),
                "{}: challenge",
                case.name
            );
        }
        let description = response.json()["error_description"]
            .as_str()
            .map(str::to_owned);
        assert!(
            description
                .as_deref()
                .is_some_and(|d| d.contains(case.reason)),
            "{}: description {description:?}",
            case.name
        );
        assert_eq!(
            calls.get(),
            0,
            "{}: the inner service was called",
            case.name
        );
        assert_eq!(
            handle.stats().rejected,
            1,
            "{}: counted as rejected",
            case.name
        );
    }
}

#[tokio::test]
async fn refusals_never_echo_the_token() {
    let token = tokens::hs256(&json!({"sub": "alice", "exp": tokens::now() - 3600}));
    let front = front();
    let response = send(&front.service, bearer(&token)).await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    let body = String::from_utf8_lossy(&response.body);
    assert!(
        !body.contains(&token) && !body.contains(&token[..20]),
        "{body}"
    );
}

#[tokio::test]
async fn invalid_grant_status_is_configurable() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new().invalid_grant_status(StatusCode::BAD_REQUEST),
        new_pair,
    );
    let response = send(&front.service, bearer("garbage")).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"], "invalid_grant");
}

// ---------------------------------------------------------------------------------------
// Storms
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_over_every_token_source_makes_one_call_with_byte_identical_responses() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let requests = (0..2_000).map(|i| match i % 4 {
        0 => bearer(&token),
        1 => cookie(&token),
        2 => json_body(&token),
        _ => form(&token, None),
    });
    let tasks: Vec<_> = requests
        .map(|request| tokio::spawn(front.service.clone().oneshot(request)))
        .collect();
    until(|| {
        let stats = front.handle.stats();
        stats.leader + stats.joined == 2_000
    })
    .await;
    front.gate.open();

    let mut responses = Vec::new();
    for task in join_all(tasks).await {
        let response = task.expect("task").unwrap_or_else(|never| match never {});
        responses.push(seen(response).await);
    }
    assert_eq!(front.calls.get(), 1);
    let first = &responses[0];
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["refresh_token"], "refresh-1");
    let cookies: Vec<_> = first
        .headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .collect();
    assert_eq!(cookies.len(), 2, "both Set-Cookie headers survive");
    assert_eq!(first.header("cache-control"), Some("no-store"));
    assert!(
        responses.iter().all(|r| r == first),
        "byte-identical responses"
    );
}

#[tokio::test]
async fn the_inner_service_receives_the_body_unchanged() {
    let front = front();
    let token = tokens::refresh("alice");
    let request = form(&token, Some("app"));
    let response = send(&front.service, request).await;
    assert_eq!(
        response.json()["echo"],
        format!("grant_type=refresh_token&refresh_token={token}&client_id=app")
    );
}

#[tokio::test]
async fn other_grant_types_pass_through_uncoalesced() {
    let front = front();
    let request = || {
        post()
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=authorization_code&code=abc"))
            .unwrap()
    };
    assert_eq!(send(&front.service, request()).await.status, StatusCode::OK);
    assert_eq!(send(&front.service, request()).await.status, StatusCode::OK);
    assert_eq!(front.calls.get(), 2);
    assert_eq!(front.handle.stats().bypassed, 2);
}

// ---------------------------------------------------------------------------------------
// Token-bound keys
// ---------------------------------------------------------------------------------------

/// Rotates like an identity server: `refresh-rotated` was used already and is answered as
/// reuse; any other token gets a pair named after the token's `jti`.
fn rotating(n: usize, parts: &Inner, body: &Bytes) -> Response<Body> {
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let claims: Value = presented
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or(Value::Null);
    if claims["jti"] == "rotated" {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from(r#"{"error":"invalid_grant"}"#)))
            .unwrap();
    }
    let pair = json!({"refresh_token": format!("next-of-{}-{}", claims["jti"].as_str().unwrap_or("?"), n)});
    Response::new(Full::new(Bytes::from(pair.to_string())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_of_the_same_subject_never_receives_the_fresh_pair() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        rotating,
    );
    let mut stale = tokens::claims("alice");
    stale["jti"] = json!("rotated");
    let stale = tokens::hs256(&stale);
    let mut current = tokens::claims("alice");
    current["jti"] = json!("current");
    let current = tokens::hs256(&current);

    // The fresh pair for `current` is in flight...
    let storm: Vec<_> = (0..50)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&current))))
        .collect();
    until(|| front.handle.stats().leader + front.handle.stats().joined == 50).await;
    // ...when the stale token arrives: it is its own flight and reaches the inner service.
    let stale_in_flight = tokio::spawn(front.service.clone().oneshot(bearer(&stale)));
    until(|| front.handle.stats().leader == 2).await;
    assert_eq!(front.handle.stats().reuse_suspected, 1);
    front.gate.open();

    let stale_response = seen(stale_in_flight.await.unwrap().unwrap()).await;
    assert_eq!(stale_response.status, StatusCode::BAD_REQUEST);
    assert_eq!(stale_response.json()["error"], "invalid_grant");
    for task in join_all(storm).await {
        let response = seen(task.unwrap().unwrap()).await;
        assert!(
            response.json()["refresh_token"]
                .as_str()
                .unwrap()
                .starts_with("next-of-current")
        );
    }

    // And once the fresh pair is a replay, the stale token still goes to the inner service.
    let replay = send(&front.service, bearer(&current)).await;
    assert!(
        replay.json()["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("next-of-current")
    );
    let stale_again = send(&front.service, bearer(&stale)).await;
    assert_eq!(stale_again.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        front.calls.get(),
        3,
        "current once, the stale token twice (never replayed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_subject_each_get_their_own_pair() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        rotating,
    );
    let (mut phone, mut laptop) = (tokens::claims("alice"), tokens::claims("alice"));
    phone["jti"] = json!("phone");
    laptop["jti"] = json!("laptop");
    let (phone, laptop) = (tokens::hs256(&phone), tokens::hs256(&laptop));

    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let token = if i % 2 == 0 { &phone } else { &laptop }.clone();
            let service = front.service.clone();
            tokio::spawn(async move {
                let response = service.oneshot(bearer(&token)).await;
                (token, response.unwrap_or_else(|never| match never {}))
            })
        })
        .collect();
    until(|| front.handle.stats().leader + front.handle.stats().joined == 100).await;
    front.gate.open();
    for task in join_all(tasks).await {
        let (token, response) = task.unwrap();
        let device = if token == phone { "phone" } else { "laptop" };
        let pair = seen(response).await.json()["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            pair.starts_with(&format!("next-of-{device}")),
            "{device} got {pair}"
        );
    }
    assert_eq!(front.calls.get(), 2);
}

#[tokio::test]
async fn the_same_token_from_different_clients_is_not_shared() {
    let front = front();
    let token = tokens::refresh("alice");
    let a = {
        let mut request = form(&token, Some("client-a"));
        let body = format!(
            "grant_type=refresh_token&refresh_token={token}&client_id=client-a&client_secret=pw"
        );
        *request.body_mut() = Body::from(body);
        request
    };
    let a = send(&front.service, a).await;
    let b = send(&front.service, form(&token, Some("client-b"))).await;
    let basic_a = {
        let mut request = bearer(&token);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("client-a:pw"))).unwrap(),
        );
        request.headers_mut().insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("refresh_token={token}")).unwrap(),
        );
        request
    };
    let a_again = send(&front.service, basic_a).await;
    assert_ne!(a.json()["refresh_token"], b.json()["refresh_token"]);
    assert_eq!(
        a.json()["refresh_token"],
        a_again.json()["refresh_token"],
        "client-a's secret by Basic meets the same secret in the form"
    );
    assert_eq!(front.calls.get(), 2);
}

#[tokio::test]
async fn invalidation_by_token_and_by_subject_stops_replays_at_once() {
    let front = front();
    let token = tokens::refresh("alice");
    let first = send(&front.service, bearer(&token)).await;
    assert_eq!(
        send(&front.service, bearer(&token)).await,
        first,
        "replayed"
    );
    assert_eq!(front.calls.get(), 1);

    assert_eq!(front.handle.invalidate_token(&token), 1);
    let second = send(&front.service, bearer(&token)).await;
    assert_ne!(second, first);
    assert_eq!(front.calls.get(), 2);

    let other = tokens::refresh("alice");
    send(&front.service, bearer(&other)).await;
    assert_eq!(front.handle.invalidate_subject("alice"), 2);
    assert_eq!(front.handle.invalidate_subject("bob"), 0);
    send(&front.service, bearer(&token)).await;
    send(&front.service, bearer(&other)).await;
    assert_eq!(front.calls.get(), 5);
}

#[tokio::test]
async fn callers_of_a_flight_invalidated_while_it_ran_get_invalid_grant_and_the_next_request_leads()
{
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (service, request) = (front.service.clone(), bearer(&token));
            tokio::spawn(async move { send(&service, request).await })
        })
        .collect();
    until(|| {
        let stats = front.handle.stats();
        stats.leader == 1 && stats.joined == 1
    })
    .await;

    assert_eq!(front.handle.invalidate_subject("alice"), 1);
    front.gate.open();

    for caller in callers {
        let refused = caller.await.unwrap();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.json()["error"], "invalid_grant");
        assert_eq!(
            refused.json()["error_description"],
            "coalesced call was revoked by an invalidation while it ran"
        );
        assert!(refused.header("www-authenticate").is_some());
    }
    let next = send(&front.service, bearer(&token)).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(front.calls.get(), 2, "the next request leads a new call");
    assert_eq!(send(&front.service, bearer(&token)).await, next, "replayed");
}

#[tokio::test]
async fn a_replay_is_refused_once_its_token_has_expired() {
    let verifier = JwtVerifier::hs256(SECRET)
        .typ(REFRESH_TYP)
        .leeway(Duration::ZERO)
        .build()
        .unwrap();
    let front = front_with(HttpExtract::new(verifier), HttpShare::new(), new_pair);
    front.gate.open();
    let mut claims = tokens::claims("alice");
    claims["exp"] = json!(tokens::now() + 2);
    let token = tokens::hs256(&claims);
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );

    // Wall-clock time must pass the token's `exp`; the replay itself would live 30 s more.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let refused = send(&front.service, bearer(&token)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json()["error"], "invalid_grant");
    assert_eq!(front.calls.get(), 1);
}

// ---------------------------------------------------------------------------------------
// What is shared and what is not
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_coalescing_header_reports_leader_joined_and_replayed() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new().report_coalescing(true),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let leader = tokio::spawn(front.service.clone().oneshot(bearer(&token)));
    until(|| front.handle.stats().leader == 1).await;
    let joined = tokio::spawn(front.service.clone().oneshot(bearer(&token)));
    until(|| front.handle.stats().joined == 1).await;
    front.gate.open();
    let header = |seen: &Seen| seen.header("x-refresh-coalesced").map(str::to_owned);
    assert_eq!(
        header(&seen(leader.await.unwrap().unwrap()).await).as_deref(),
        Some("leader")
    );
    assert_eq!(
        header(&seen(joined.await.unwrap().unwrap()).await).as_deref(),
        Some("joined")
    );
    let replayed = send(&front.service, bearer(&token)).await;
    assert_eq!(header(&replayed).as_deref(), Some("replayed"));
}

fn server_error(_n: usize, _parts: &Inner, _body: &Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .body(Full::new(Bytes::from_static(
            b"{\"error\":\"database down\"}",
        )))
        .unwrap()
}

#[tokio::test]
async fn non_2xx_responses_reach_their_flight_and_are_not_replayed() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        server_error,
    );
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&token))))
        .collect();
    until(|| front.handle.stats().joined == 2).await;
    front.gate.open();
    for caller in join_all(callers).await {
        let response = seen(caller.unwrap().unwrap()).await;
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&response.body[..], b"{\"error\":\"database down\"}");
    }
    send(&front.service, bearer(&token)).await;
    assert_eq!(front.calls.get(), 2);
}

fn large(_n: usize, _parts: &Inner, _body: &Bytes) -> Response<Body> {
    Response::new(Full::new(Bytes::from(vec![b'x'; 70 * 1024])))
}

#[tokio::test]
async fn a_response_over_the_cap_is_streamed_to_one_caller_and_not_replayed() {
    let front = front_with(HttpExtract::new(hs256_verifier()), HttpShare::new(), large);
    let token = tokens::refresh("alice");
    let callers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(front.service.clone().oneshot(bearer(&token))))
        .collect();
    until(|| front.handle.stats().joined == 1).await;
    front.gate.open();
    let mut statuses = Vec::new();
    for caller in join_all(callers).await {
        let response = seen(caller.unwrap().unwrap()).await;
        if response.status == StatusCode::OK {
            assert_eq!(response.body.len(), 70 * 1024);
        }
        statuses.push(response.status);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE]);
    assert_eq!(front.handle.stats().entries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_times_out_gets_429_with_retry_after() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()),
        HttpShare::new(),
        new_pair,
    );
    let token = tokens::refresh("alice");
    let response = send(&front.service, bearer(&token)).await;
    assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.json()["error"], "temporarily_unavailable");
    front.gate.open();
    until(|| front.handle.stats().in_flight == 0).await;
    assert_eq!(
        send(&front.service, bearer(&token)).await.status,
        StatusCode::OK
    );
    assert_eq!(front.calls.get(), 1);
}

#[tokio::test]
async fn the_waiter_cap_answers_503_with_retry_after() {
    let (calls, gate) = (Calls::default(), Gate::closed());
    let layer = RefreshCoalesceLayer::http(HttpExtract::new(hs256_verifier()))
        .max_waiters(1)
        .build();
    let handle = layer.handle();
    let service = layer.layer(refresh_handler(calls.clone(), gate.clone(), new_pair));
    let token = tokens::refresh("alice");
    let leader = tokio::spawn(service.clone().oneshot(bearer(&token)));
    until(|| handle.stats().leader == 1).await;
    let refused = send(&service, bearer(&token)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("retry-after"), Some("1"));
    gate.open();
    assert_eq!(leader.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn sources_can_be_restricted_to_headers_and_the_body_then_streams_untouched() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()).sources([TokenSource::bearer()]),
        HttpShare::new(),
        new_pair,
    );
    front.gate.open();
    let token = tokens::refresh("alice");
    // The JSON body holds a token, but only Bearer is configured: nothing is read.
    let response = send(&front.service, json_body(&token)).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    let mut request = json_body("ignored");
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let response = send(&front.service, request).await;
    assert_eq!(response.json()["echo"], "{\"refresh_token\":\"ignored\"}");
}

#[tokio::test]
async fn requests_to_other_paths_pass_through_untouched() {
    let front = front_with(
        HttpExtract::new(hs256_verifier()).paths(["/auth/refresh"]),
        HttpShare::new(),
        new_pair,
    );
    front.gate.open();
    let other = Request::post("/auth/stats")
        .body(Body::from("no token here"))
        .unwrap();
    let response = send(&front.service, other).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "not refused for want of a token"
    );
    assert_eq!(
        response.json()["echo"],
        "no token here",
        "the body streamed through"
    );
    assert_eq!(front.handle.stats().bypassed, 1);

    let token = tokens::refresh("alice");
    let first = send(&front.service, bearer(&token)).await;
    assert_eq!(send(&front.service, bearer(&token)).await, first);
    assert_eq!(
        front.calls.get(),
        2,
        "one call for the other path, one for the refresh"
    );
}

#[tokio::test]
async fn another_grant_type_passes_through_even_with_a_refresh_cookie() {
    let front = front();
    let exchange = |cookie: &str| {
        post()
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("refresh_token={cookie}"))
            .body(Body::from("grant_type=authorization_code&code=abc"))
            .unwrap()
    };
    // A valid refresh cookie does not make the exchange a refresh of it...
    let valid = tokens::refresh("alice");
    let (a, b) = futures_util::join!(
        send(&front.service, exchange(&valid)),
        send(&front.service, exchange(&valid))
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_ne!(
        a.json()["refresh_token"],
        b.json()["refresh_token"],
        "not shared"
    );
    // ...and an expired one does not block the login.
    let expired = tokens::hs256(&json!({"sub": "alice", "exp": tokens::now() - 3600}));
    assert_eq!(
        send(&front.service, exchange(&expired)).await.status,
        StatusCode::OK
    );
    let stats = front.handle.stats();
    assert_eq!((stats.bypassed, stats.leader, stats.rejected), (3, 0, 0));
    assert_eq!(front.calls.get(), 3);
}
