//! Bad input: every malformed or invalid request is refused before the inner service, with
//! the refusal it deserves.

use super::*;

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
        let inner = Gated::open_now();
        let layer = RefreshCoalesceLayer::http(HttpExtract::new((case.verifier)())).build();
        let handle = layer.handle();
        let service = layer.layer(refresh_handler(&inner, new_pair));
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
            inner.calls(),
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
