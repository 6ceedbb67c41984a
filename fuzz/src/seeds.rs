//! The seed corpus: the bad-input table of `tests/http_front.rs` (`bad_inputs`), case by
//! case, plus a few good paths (storms over every source, replays, bypasses, time-outs),
//! as [`FrontInput`] and [`TokenInput`] values. `make_seeds` encodes them into
//! `fuzz/seeds/<target>/`.
//!
//! Tokens the test table builds by hand (`alg: none`, duplicate claims, RS256 with another
//! key, ...) are minted here at generation time and embedded as raw bytes
//! ([`TokenChoice::Raw`]); valid tokens stay symbolic ([`TokenChoice::Valid`]) and are
//! minted by the fuzz target when it runs, so seeds never expire.

use base64::{Engine, engine::general_purpose::STANDARD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::{
    input::*,
    tokens::{self, REFRESH_TYP, SECRET, now},
};

const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/support/keys/rsa_public.pem");
const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("../../tests/support/keys/rsa_other_private.pem");

fn raw(s: impl AsRef<[u8]>) -> TokenChoice {
    TokenChoice::Raw(Blob::from(s))
}

fn blob(s: impl AsRef<[u8]>) -> Blob {
    Blob::from(s)
}

fn post(headers: Vec<HeaderChoice>, body: BodyChoice) -> Req {
    Req {
        method: MethodChoice::Post,
        path: PathChoice::Refresh,
        headers,
        body,
        client: None,
        dpop: None,
    }
}

fn bearer(token: TokenChoice) -> Req {
    post(
        vec![HeaderChoice::Authorization(AuthChoice::Bearer(token))],
        BodyChoice::Empty,
    )
}

fn ct(choice: ContentTypeChoice) -> HeaderChoice {
    HeaderChoice::ContentType(choice)
}

fn one(req: Req) -> FrontInput {
    batches(Vec::new(), vec![vec![req]])
}

fn batches(inner: Vec<InnerReply>, batches: Vec<Vec<Req>>) -> FrontInput {
    FrontInput {
        config: Config::roomy(),
        inner,
        batches: batches
            .into_iter()
            .map(|requests| Batch {
                advance: 0,
                invalidate: None,
                requests,
            })
            .collect(),
    }
}

/// Valid claims of `alice`, with `extra` members set (or removed when null).
fn with(extra: Value) -> Value {
    let now = now();
    let mut claims = json!({"sub": "alice", "exp": now + 3600, "iat": now, "jti": "seed"});
    for (k, v) in extra.as_object().expect("object") {
        if v.is_null() {
            claims.as_object_mut().expect("object").remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn hs(alg: Algorithm, typ: Option<&str>, claims: &Value, key: &[u8]) -> String {
    let mut header = Header::new(alg);
    header.typ = typ.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(key)).expect("encode")
}

/// `tests/support/tokens.rs`'s `raw`: hand-made header and payload, HMAC-signed with `key`
/// (or unsigned).
fn hand(header: &str, payload: &str, key: Option<&[u8]>) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = key.map_or(String::new(), |key| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key");
        mac.update(input.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    });
    format!("{input}.{signature}")
}

/// A bad token of the test table: its case name, the token, and its header and payload
/// JSON when they were written by hand.
type BadToken = (&'static str, String, Option<(String, String)>);

/// The bad tokens of the test table, by case name.
fn bad_tokens() -> Vec<BadToken> {
    let now = now();
    let signed = |claims: Value| tokens::encode(Some(REFRESH_TYP), &claims);
    let payload = with(json!({})).to_string();
    let rsa_other = {
        let key = EncodingKey::from_rsa_pem(RSA_OTHER_PRIVATE).expect("rsa key");
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some(REFRESH_TYP.into());
        jsonwebtoken::encode(&header, &with(json!({})), &key).expect("encode")
    };
    let dup = format!(r#"{{"sub":"alice","sub":"mallory","exp":{}}}"#, now + 3600);
    let crit = r#"{"alg":"HS256","typ":"refresh+jwt","crit":["exp-ext"],"exp-ext":1}"#;
    let valid = tokens::minted().valid.clone();
    vec![
        (
            "alg-none",
            hand(r#"{"alg":"none","typ":"refresh+jwt"}"#, &payload, None),
            Some((
                r#"{"alg":"none","typ":"refresh+jwt"}"#.into(),
                payload.clone(),
            )),
        ),
        (
            "alg-NONE",
            hand(r#"{"alg":"NONE","typ":"refresh+jwt"}"#, &payload, None),
            None,
        ),
        (
            "hs256-with-rsa-public-key",
            hand(
                r#"{"alg":"HS256","typ":"refresh+jwt"}"#,
                &payload,
                Some(RSA_PUBLIC),
            ),
            None,
        ),
        ("rs256-other-key", rsa_other, None),
        (
            "hs256-wrong-secret",
            hs(
                Algorithm::HS256,
                Some(REFRESH_TYP),
                &with(json!({})),
                b"wrong",
            ),
            None,
        ),
        (
            "hs384-not-pinned",
            hs(
                Algorithm::HS384,
                Some(REFRESH_TYP),
                &with(json!({})),
                SECRET,
            ),
            None,
        ),
        ("expired", signed(with(json!({"exp": now - 60}))), None),
        ("nbf-future", signed(with(json!({"nbf": now + 60}))), None),
        ("missing-exp", signed(with(json!({"exp": null}))), None),
        (
            "exp-string",
            signed(with(json!({"exp": (now + 3600).to_string()}))),
            None,
        ),
        ("missing-sub", signed(with(json!({"sub": null}))), None),
        ("empty-sub", signed(with(json!({"sub": ""}))), None),
        (
            "sub-300-bytes",
            signed(with(json!({"sub": "s".repeat(300)}))),
            None,
        ),
        (
            "wrong-iss",
            signed(with(
                json!({"iss": "https://evil.example", "aud": "refresh-api"}),
            )),
            None,
        ),
        (
            "wrong-aud",
            signed(with(
                json!({"iss": "https://id.example", "aud": "other-api"}),
            )),
            None,
        ),
        (
            "access-token",
            hs(Algorithm::HS256, Some("at+jwt"), &with(json!({})), SECRET),
            None,
        ),
        (
            "no-typ",
            hs(Algorithm::HS256, None, &with(json!({})), SECRET),
            None,
        ),
        (
            "unknown-crit",
            hand(crit, &payload, Some(SECRET)),
            Some((crit.into(), payload.clone())),
        ),
        (
            "duplicate-claims",
            hand(r#"{"alg":"HS256","typ":"refresh+jwt"}"#, &dup, Some(SECRET)),
            Some((r#"{"alg":"HS256","typ":"refresh+jwt"}"#.into(), dup.clone())),
        ),
        ("garbage", "not-a-jwt".into(), None),
        ("truncated", valid[..valid.len() - 10].to_owned(), None),
        (
            "5-KiB-token",
            format!("{valid}.{}", "a".repeat(5 * 1024)),
            None,
        ),
    ]
}

/// Seeds of the `front` target, by file name.
pub fn front_seeds() -> Vec<(String, FrontInput)> {
    let mut seeds: Vec<(String, FrontInput)> = bad_tokens()
        .into_iter()
        .map(|(name, token, _)| (format!("bad-{name}"), one(bearer(raw(token)))))
        .collect();
    let valid = || TokenChoice::Valid;
    let json_ct = || ct(ContentTypeChoice::Json);
    let form_ct = || ct(ContentTypeChoice::Form);
    let json_token = |token: TokenChoice| BodyChoice::Json {
        token: Some(token),
        pad: 0,
        extra: Blob::default(),
    };
    let form =
        |grant, token: Option<TokenChoice>, client: Option<&str>, extra: &str| BodyChoice::Form {
            grant,
            token,
            client: client.map(blob),
            extra: blob(extra),
        };
    let basic = |user: &str, password: &str| {
        HeaderChoice::Authorization(AuthChoice::Basic {
            user: blob(user),
            password: blob(password),
        })
    };
    let bad_requests: Vec<(&str, Req)> = vec![
        (
            "non-utf8-bearer",
            post(
                vec![HeaderChoice::Authorization(AuthChoice::Garbage(blob(
                    b"Bearer \xff\xfe",
                )))],
                BodyChoice::Empty,
            ),
        ),
        (
            "non-ascii-token-in-json",
            post(vec![json_ct()], json_token(raw("tök€n"))),
        ),
        (
            "invalid-utf8-in-json",
            post(
                vec![json_ct()],
                BodyChoice::Raw(blob(b"{\"refresh_token\":\"\xff\"}")),
            ),
        ),
        (
            "17-KiB-body",
            post(
                vec![json_ct()],
                BodyChoice::Json {
                    token: Some(valid()),
                    pad: 17 * 1024,
                    extra: Blob::default(),
                },
            ),
        ),
        (
            "declared-length-over-cap",
            post(
                vec![
                    json_ct(),
                    HeaderChoice::ContentLength(LengthChoice::Number(20_000)),
                ],
                BodyChoice::Raw(blob("{}")),
            ),
        ),
        (
            "wrong-content-type",
            post(
                vec![ct(ContentTypeChoice::Text)],
                BodyChoice::Raw(blob(tokens::minted().valid.as_bytes())),
            ),
        ),
        (
            "malformed-json",
            post(
                vec![json_ct()],
                BodyChoice::Raw(blob("{\"refresh_token\": ")),
            ),
        ),
        (
            "json-not-utf8-in-another-field",
            post(
                vec![json_ct()],
                BodyChoice::Json {
                    token: Some(valid()),
                    pad: 0,
                    extra: blob(&b"\"device\":\"\xf8\""[..]),
                },
            ),
        ),
        (
            "json-lone-surrogate-in-another-field",
            post(
                vec![json_ct()],
                BodyChoice::Json {
                    token: Some(valid()),
                    pad: 0,
                    extra: blob(r#""device":[{"name":"\ud800"}]"#),
                },
            ),
        ),
        (
            "json-number-out-of-range-in-another-field",
            post(
                vec![json_ct()],
                BodyChoice::Json {
                    token: Some(valid()),
                    pad: 0,
                    extra: blob(r#""n":1e999"#),
                },
            ),
        ),
        (
            "json-array",
            post(
                vec![json_ct()],
                BodyChoice::Raw(blob(format!("[\"{}\"]", tokens::minted().valid))),
            ),
        ),
        (
            "json-token-not-a-string",
            post(
                vec![json_ct()],
                BodyChoice::Raw(blob("{\"refresh_token\": 42}")),
            ),
        ),
        (
            "repeated-json-field",
            post(
                vec![json_ct()],
                BodyChoice::Json {
                    token: Some(valid()),
                    pad: 0,
                    extra: blob("\"refresh_token\":\"x\""),
                },
            ),
        ),
        (
            "form-without-grant-type",
            post(
                vec![form_ct()],
                BodyChoice::Raw(blob(format!("refresh_token={}", tokens::minted().valid))),
            ),
        ),
        (
            "form-repeated-parameter",
            post(
                vec![form_ct()],
                form(GrantChoice::Refresh, Some(valid()), None, "refresh_token=x"),
            ),
        ),
        (
            "token-in-basic-only",
            post(
                vec![basic("client", &tokens::minted().valid)],
                BodyChoice::Empty,
            ),
        ),
        (
            "malformed-basic",
            post(
                vec![HeaderChoice::Authorization(AuthChoice::BasicRaw(blob(
                    "!!!",
                )))],
                BodyChoice::Empty,
            ),
        ),
        (
            "empty-cookie",
            post(
                vec![HeaderChoice::Cookie(CookieChoice::Raw(blob(
                    "refresh_token=",
                )))],
                BodyChoice::Empty,
            ),
        ),
        (
            "empty-bearer",
            post(
                vec![HeaderChoice::Authorization(AuthChoice::Garbage(blob(
                    "Bearer ",
                )))],
                BodyChoice::Empty,
            ),
        ),
        ("no-token", post(Vec::new(), BodyChoice::Empty)),
        (
            "two-different-tokens",
            post(
                vec![
                    HeaderChoice::Authorization(AuthChoice::Bearer(valid())),
                    HeaderChoice::Cookie(CookieChoice::Token(TokenChoice::Valid2)),
                ],
                BodyChoice::Empty,
            ),
        ),
        (
            "two-different-client-ids",
            post(
                vec![form_ct(), basic("client-b", "pw")],
                form(GrantChoice::Refresh, Some(valid()), Some("client-a"), ""),
            ),
        ),
    ];
    seeds.extend(
        bad_requests
            .into_iter()
            .map(|(name, req)| (format!("bad-{name}"), one(req))),
    );

    // Good paths: one storm over every source, replays, bypasses, waits and limits.
    let sources = || {
        vec![
            bearer(valid()),
            post(
                vec![HeaderChoice::Cookie(CookieChoice::Among(valid()))],
                BodyChoice::Empty,
            ),
            post(vec![json_ct()], json_token(valid())),
            post(
                vec![form_ct()],
                form(GrantChoice::Refresh, Some(valid()), None, ""),
            ),
            post(
                vec![HeaderChoice::Metadata {
                    bearer: true,
                    token: valid(),
                }],
                BodyChoice::Empty,
            ),
            Req {
                path: PathChoice::Grpc,
                ..bearer(valid())
            },
        ]
    };
    seeds.push((
        "storm-every-source".into(),
        batches(Vec::new(), vec![sources(), sources()]),
    ));
    seeds.push((
        "storm-then-replay-then-ttl".into(),
        FrontInput {
            batches: vec![
                Batch {
                    advance: 0,
                    invalidate: None,
                    requests: sources(),
                },
                Batch {
                    advance: 500,
                    invalidate: None,
                    requests: vec![bearer(valid())],
                },
                Batch {
                    advance: 3000,
                    invalidate: None,
                    requests: vec![bearer(valid())],
                },
                Batch {
                    advance: 0,
                    invalidate: Some(Invalidate::Alice),
                    requests: vec![bearer(valid())],
                },
            ],
            ..batches(Vec::new(), Vec::new())
        },
    ));
    seeds.push((
        "other-grant-and-other-path".into(),
        batches(
            Vec::new(),
            vec![vec![
                post(
                    vec![form_ct()],
                    form(GrantChoice::AuthorizationCode, None, None, "code=x"),
                ),
                Req {
                    path: PathChoice::Other,
                    ..post(Vec::new(), BodyChoice::Empty)
                },
                Req {
                    path: PathChoice::TrailingSlash,
                    ..bearer(raw("garbage"))
                },
            ]],
        ),
    ));
    seeds.push((
        "clients-and-subjects".into(),
        batches(
            Vec::new(),
            vec![vec![
                post(
                    vec![
                        basic("client-a", "pw"),
                        HeaderChoice::Authorization(AuthChoice::Bearer(valid())),
                    ],
                    BodyChoice::Empty,
                ),
                post(
                    vec![form_ct()],
                    form(GrantChoice::Refresh, Some(valid()), Some("client-b"), ""),
                ),
                bearer(TokenChoice::Valid2),
                bearer(TokenChoice::Expired),
                bearer(TokenChoice::Access),
            ]],
        ),
    ));
    let slow = |inner: InnerReply| {
        batches(
            vec![inner],
            vec![vec![bearer(valid()), bearer(valid()), bearer(valid())]],
        )
    };
    seeds.push((
        "slow-inner-times-out".into(),
        slow(InnerReply::Ok { delay: 1500 }),
    ));
    seeds.push(("inner-refuses".into(), slow(InnerReply::Refused)));
    seeds.push(("inner-fails".into(), slow(InnerReply::Fail)));
    seeds.push(("inner-large".into(), slow(InnerReply::Large)));
    seeds.push(("inner-hangs".into(), slow(InnerReply::Hang)));
    let custom = |headers: Vec<(ResponseHeaderName, &str)>,
                  trailers: Option<Vec<(ResponseHeaderName, &str)>>,
                  chunk| {
        let list =
            |l: Vec<(ResponseHeaderName, &str)>| l.into_iter().map(|(n, v)| (n, blob(v))).collect();
        InnerReply::Custom(CustomReply {
            status: StatusChoice::Ok,
            version: 3,
            delay: 0,
            headers: list(headers),
            body: blob("{\"scope\":\"openid\"}"),
            chunk,
            trailers: trailers.map(list),
        })
    };
    let storm_twice = |inner: InnerReply| {
        batches(
            vec![inner],
            vec![
                vec![
                    bearer(valid()),
                    bearer(valid()),
                    post(
                        vec![HeaderChoice::Cookie(CookieChoice::Token(valid()))],
                        BodyChoice::Empty,
                    ),
                ],
                vec![bearer(valid())],
            ],
        )
    };
    seeds.push((
        "inner-grpc-trailers".into(),
        storm_twice(custom(
            vec![
                (ResponseHeaderName::ContentType, "application/grpc"),
                (ResponseHeaderName::SetCookie, "a=1"),
                (ResponseHeaderName::SetCookie, "b=2"),
            ],
            Some(vec![
                (ResponseHeaderName::GrpcStatus, "0"),
                (ResponseHeaderName::Raw(blob("grpc-message")), "ok"),
            ]),
            5,
        )),
    ));
    seeds.push((
        "inner-grpc-error-in-trailers".into(),
        storm_twice(custom(
            Vec::new(),
            Some(vec![(ResponseHeaderName::GrpcStatus, "16")]),
            0,
        )),
    ));
    seeds.push((
        "inner-declares-a-large-length".into(),
        storm_twice(custom(
            vec![
                (ResponseHeaderName::ContentLength, "100000"),
                (ResponseHeaderName::Raw(blob("x-empty")), ""),
            ],
            None,
            0,
        )),
    ));
    let mut limits = batches(
        Vec::new(),
        vec![vec![
            bearer(valid()),
            bearer(TokenChoice::Valid2),
            bearer(valid()),
            bearer(valid()),
        ]],
    );
    limits.config = Config {
        max_entries: 0,
        max_waiters: 0,
        max_replays: Some(1),
        grpc: true,
        report: true,
    };
    seeds.push(("limits-grpc-report".into(), limits));
    seeds.push((
        "chunked-and-failing-bodies".into(),
        batches(
            Vec::new(),
            vec![vec![
                post(
                    vec![json_ct()],
                    BodyChoice::Chunked {
                        chunk: 7,
                        body: Box::new(json_token(valid())),
                    },
                ),
                post(
                    vec![json_ct()],
                    BodyChoice::Failing {
                        body: Box::new(json_token(valid())),
                    },
                ),
                post(
                    vec![
                        ct(ContentTypeChoice::Text),
                        ct(ContentTypeChoice::Json),
                        HeaderChoice::Authorization(AuthChoice::Bearer(valid())),
                    ],
                    json_token(TokenChoice::Valid2),
                ),
            ]],
        ),
    ));
    seeds.push((
        "mutated-tokens".into(),
        batches(
            Vec::new(),
            vec![vec![
                bearer(TokenChoice::Mutated {
                    at: 40,
                    op: Mutation::Overwrite,
                    bytes: blob("A"),
                }),
                bearer(TokenChoice::Mutated {
                    at: 200,
                    op: Mutation::Truncate,
                    bytes: Blob::default(),
                }),
                post(
                    vec![HeaderChoice::Cookie(CookieChoice::Token(
                        TokenChoice::Mutated {
                            at: 0,
                            op: Mutation::Insert,
                            bytes: blob(" "),
                        },
                    ))],
                    BodyChoice::Empty,
                ),
            ]],
        ),
    ));
    seeds.extend(auth_seeds());
    seeds
}

/// Seeds of client authentication (Basic, form and JSON secrets, assertions, two methods)
/// and DPoP (two keys, every kind of invalid proof, replays, with clients, on bypasses).
fn auth_seeds() -> Vec<(String, FrontInput)> {
    use ClientIdChoice::{A as AppA, B as AppB};
    use CredentialChoice::{Assertion, Secret};
    let valid = || TokenChoice::Valid;
    let client = |id: Option<ClientIdChoice>, credential, basic, also| {
        Some(ClientAuth {
            id,
            credential,
            basic,
            also,
        })
    };
    let with = |req: Req, client: Option<ClientAuth>| Req { client, ..req };
    let dpop = |req: Req, choice: DpopChoice| Req {
        dpop: Some(choice),
        ..req
    };
    let cookie = || {
        post(
            vec![HeaderChoice::Cookie(CookieChoice::Token(valid()))],
            BodyChoice::Empty,
        )
    };
    let form_req = || {
        post(
            vec![ct(ContentTypeChoice::Form)],
            BodyChoice::Form {
                grant: GrantChoice::Refresh,
                token: Some(valid()),
                client: None,
                extra: Blob::default(),
            },
        )
    };
    let json_req = || {
        post(
            vec![ct(ContentTypeChoice::Json)],
            BodyChoice::Json {
                token: Some(valid()),
                pad: 0,
                extra: Blob::default(),
            },
        )
    };
    let basic = |id, secret| with(cookie(), client(Some(id), Secret(secret), true, None));
    let in_body = |req: Req, id: Option<ClientIdChoice>, credential| {
        with(req, client(id, credential, false, None))
    };
    let twice = |requests: Vec<Req>| batches(Vec::new(), vec![requests.clone(), requests]);
    let mut seeds = Vec::new();
    seeds.push((
        "client-basic-secrets".into(),
        twice(vec![
            basic(AppA, SecretChoice::One),
            basic(AppA, SecretChoice::One),
            basic(AppA, SecretChoice::Two),
            basic(AppB, SecretChoice::One),
            cookie(),
            basic(AppA, SecretChoice::Empty),
        ]),
    ));
    seeds.push((
        "client-secrets-in-form-and-json".into(),
        twice(vec![
            in_body(form_req(), Some(AppA), Secret(SecretChoice::One)),
            in_body(json_req(), Some(AppA), Secret(SecretChoice::One)),
            in_body(form_req(), Some(AppA), Secret(SecretChoice::Two)),
            in_body(json_req(), None, Secret(SecretChoice::One)),
            in_body(form_req(), Some(AppA), CredentialChoice::None),
            in_body(json_req(), Some(AppB), Secret(SecretChoice::Empty)),
        ]),
    ));
    seeds.push((
        "client-assertions".into(),
        twice(vec![
            in_body(form_req(), Some(AppA), Assertion(AssertionChoice::A)),
            in_body(json_req(), Some(AppA), Assertion(AssertionChoice::A)),
            in_body(form_req(), Some(AppA), Assertion(AssertionChoice::B)),
            in_body(form_req(), None, Assertion(AssertionChoice::A)),
            in_body(
                form_req(),
                Some(AppA),
                Assertion(AssertionChoice::WithoutType),
            ),
            in_body(
                json_req(),
                Some(AppA),
                Assertion(AssertionChoice::Raw {
                    kind: Blob::default(),
                    assertion: blob("x"),
                }),
            ),
        ]),
    ));
    let form_basic =
        |credential, also| with(form_req(), client(Some(AppA), credential, true, also));
    seeds.push((
        "client-two-methods".into(),
        batches(
            Vec::new(),
            vec![vec![
                form_basic(Secret(SecretChoice::One), Some(Secret(SecretChoice::Two))),
                form_basic(Secret(SecretChoice::One), Some(Secret(SecretChoice::One))),
                form_basic(
                    Secret(SecretChoice::One),
                    Some(Assertion(AssertionChoice::A)),
                ),
                form_basic(Assertion(AssertionChoice::A), None),
                with(
                    json_req(),
                    client(
                        Some(AppA),
                        Secret(SecretChoice::One),
                        false,
                        Some(Assertion(AssertionChoice::A)),
                    ),
                ),
                with(
                    form_req(),
                    client(
                        Some(AppA),
                        Secret(SecretChoice::One),
                        false,
                        Some(Secret(SecretChoice::One)),
                    ),
                ),
            ]],
        ),
    ));
    let a = || DpopChoice::Valid(KeyChoice::A);
    let b = || DpopChoice::Valid(KeyChoice::B);
    seeds.push((
        "dpop-two-keys".into(),
        batches(
            Vec::new(),
            vec![
                vec![
                    dpop(cookie(), a()),
                    dpop(cookie(), a()),
                    dpop(cookie(), b()),
                    cookie(),
                    dpop(bearer(valid()), a()),
                    dpop(
                        Req {
                            path: PathChoice::Absolute,
                            ..cookie()
                        },
                        a(),
                    ),
                ],
                vec![dpop(cookie(), a()), dpop(cookie(), b()), cookie()],
            ],
        ),
    ));
    let faults = [
        DpopFault::Signature,
        DpopFault::Method,
        DpopFault::Htu,
        DpopFault::OtherOrigin,
        DpopFault::OldIat,
        DpopFault::FutureIat,
        DpopFault::Typ,
        DpopFault::AlgNone,
        DpopFault::NoJti,
        DpopFault::EmptyJti,
        DpopFault::OtherJwk,
        DpopFault::PrivateJwk,
        DpopFault::NoJwk,
        DpopFault::Truncated,
    ];
    let mut invalid: Vec<Req> = faults
        .iter()
        .enumerate()
        .map(|(i, fault)| {
            let key = if i % 2 == 0 {
                KeyChoice::A
            } else {
                KeyChoice::B
            };
            dpop(
                cookie(),
                DpopChoice::Corrupt {
                    key,
                    fault: fault.clone(),
                },
            )
        })
        .collect();
    invalid.push(dpop(cookie(), DpopChoice::Twice(KeyChoice::A)));
    invalid.push(dpop(cookie(), DpopChoice::Raw(blob("x.y.z"))));
    seeds.push((
        "dpop-invalid-proofs".into(),
        batches(Vec::new(), invalid.chunks(8).map(<[Req]>::to_vec).collect()),
    ));
    seeds.push((
        "dpop-replays".into(),
        batches(
            Vec::new(),
            vec![
                vec![dpop(cookie(), a())],
                vec![
                    dpop(cookie(), DpopChoice::Replay(0)),
                    dpop(bearer(valid()), DpopChoice::Replay(0)),
                ],
                vec![dpop(cookie(), b()), dpop(cookie(), DpopChoice::Replay(0))],
            ],
        ),
    ));
    let basic_dpop = |id, secret, key| dpop(basic(id, secret), key);
    seeds.push((
        "dpop-with-clients".into(),
        twice(vec![
            basic_dpop(AppA, SecretChoice::One, a()),
            basic_dpop(AppA, SecretChoice::One, a()),
            basic_dpop(AppA, SecretChoice::One, b()),
            basic_dpop(AppB, SecretChoice::One, a()),
            dpop(
                in_body(form_req(), Some(AppA), Secret(SecretChoice::One)),
                a(),
            ),
            dpop(
                in_body(json_req(), Some(AppA), Assertion(AssertionChoice::A)),
                b(),
            ),
        ]),
    ));
    let broken = || DpopChoice::Corrupt {
        key: KeyChoice::A,
        fault: DpopFault::Signature,
    };
    seeds.push((
        "dpop-on-bypasses".into(),
        batches(
            Vec::new(),
            vec![vec![
                dpop(
                    Req {
                        path: PathChoice::Other,
                        ..cookie()
                    },
                    broken(),
                ),
                dpop(
                    post(
                        vec![ct(ContentTypeChoice::Form)],
                        BodyChoice::Form {
                            grant: GrantChoice::AuthorizationCode,
                            token: None,
                            client: None,
                            extra: blob("code=x"),
                        },
                    ),
                    broken(),
                ),
                dpop(
                    Req {
                        path: PathChoice::Grpc,
                        ..cookie()
                    },
                    a(),
                ),
                dpop(post(Vec::new(), BodyChoice::Empty), broken()),
            ]],
        ),
    ));
    seeds
}

/// Seeds of the `token` target, by file name.
pub fn token_seeds() -> Vec<(String, TokenInput)> {
    let mut seeds = Vec::new();
    for (name, token, parts) in bad_tokens() {
        seeds.push((format!("verify-{name}"), TokenInput::Verify(blob(&token))));
        if let Some((header, payload)) = parts {
            seeds.push((
                format!("sign-{name}"),
                TokenInput::SignJson {
                    header: blob(header),
                    payload: blob(payload),
                },
            ));
        }
    }
    for (name, input) in front_seeds() {
        if name.starts_with("bad-")
            && input.batches.len() == 1
            && input.batches[0].requests.len() == 1
        {
            let req = input.batches[0].requests[0].clone();
            seeds.push((format!("extract-{}", &name[4..]), TokenInput::Extract(req)));
        }
    }
    seeds.push((
        "choice-valid".into(),
        TokenInput::Choice {
            token: TokenChoice::Valid,
            pad: 0,
        },
    ));
    seeds.push((
        "choice-mutated".into(),
        TokenInput::Choice {
            token: TokenChoice::Mutated {
                at: 10,
                op: Mutation::Delete,
                bytes: blob("xx"),
            },
            pad: 0,
        },
    ));
    seeds.push((
        "verify-basic-lookalike".into(),
        TokenInput::Verify(blob(STANDARD.encode("a:b"))),
    ));
    let spec = |duplicate, typ| ClaimsSpec {
        alg: AlgChoice::Hs256,
        typ,
        crit: None,
        sub: Some(ValueChoice::Str(blob("alice"))),
        exp: Some(ValueChoice::FromNow(3600)),
        nbf: Some(ValueChoice::FromNow(-3600)),
        duplicate,
        extra: vec![
            (blob("jti"), ValueChoice::Str(blob("x"))),
            (blob("scope"), ValueChoice::Array),
        ],
    };
    seeds.push((
        "claims-clean".into(),
        TokenInput::Claims(spec(None, TypChoice::ApplicationRefresh)),
    ));
    seeds.push((
        "claims-escaped-duplicate".into(),
        TokenInput::Claims(spec(Some(DuplicateChoice::Escaped(0)), TypChoice::Upper)),
    ));
    seeds.push((
        "claims-access".into(),
        TokenInput::Claims(spec(None, TypChoice::Access)),
    ));
    seeds.push((
        "segments-padded".into(),
        TokenInput::SignSegments {
            header: blob("eyJhbGciOiJIUzI1NiIsInR5cCI6InJlZnJlc2grand0In0="),
            payload: blob("eyJzdWIiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ"),
        },
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_to_what_was_encoded() {
        for (name, input) in front_seeds() {
            let bytes = input.to_bytes();
            assert_eq!(
                decode::<FrontInput>(&bytes).as_ref(),
                Some(&input),
                "{name}"
            );
        }
        for (name, input) in token_seeds() {
            let bytes = input.to_bytes();
            assert_eq!(
                decode::<TokenInput>(&bytes).as_ref(),
                Some(&input),
                "{name}"
            );
        }
    }

    #[test]
    fn every_bad_input_of_the_test_table_has_a_seed() {
        // tests/http_front.rs `bad_inputs`: 44 cases (its test asserts at least 25).
        let bad = front_seeds()
            .iter()
            .filter(|(n, _)| n.starts_with("bad-"))
            .count();
        assert_eq!(bad, 44);
    }

    #[test]
    fn seeds_run_clean() {
        for (name, input) in front_seeds() {
            eprintln!("front seed {name}");
            crate::front::run_front(&input);
        }
        for (name, input) in token_seeds() {
            eprintln!("token seed {name}");
            crate::token::run_token(&input);
        }
    }

    /// The fuzzer's minimized reproducers of the fixed findings (`findings/`) pass the
    /// harness's checks, which include F1's and F2's.
    #[test]
    fn findings_run_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("findings");
        let mut found = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/findings") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("finding");
            let input = decode::<FrontInput>(&bytes).expect("a front input");
            eprintln!("finding {}", path.display());
            crate::front::run_front(&input);
            found += 1;
        }
        assert_eq!(found, 3);
    }
}
