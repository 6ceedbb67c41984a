use http::{Method, Request, Uri};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::*;
use support::dpop::{
    ED25519, ES256_A, ES256_B, ES384, RS256, TestKey, claims, encode, header, proof, sign,
    sign_with,
};

const NOW: u64 = 1_800_000_000;
const HTU: &str = "https://auth.example.com/token";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn verifier() -> DpopVerifier {
    DpopVerifier::builder().build().expect("default verifier")
}

fn post(uri: &str) -> (Method, Uri) {
    (Method::POST, uri.parse().expect("a uri"))
}

/// Checks `proof` for `POST https://auth.example.com/token` at `NOW`.
fn check(verifier: &DpopVerifier, proof: &str) -> Result<DpopProof, Rejected> {
    let (method, uri) = post(HTU);
    verifier.check(proof, &method, &uri, at(NOW))
}

/// The reason of a refused proof.
fn reason(result: Result<DpopProof, Rejected>) -> &'static str {
    match result.expect_err("the proof is refused").rejection() {
        Rejection::InvalidDpopProof(reason) => reason,
        other => panic!("refused as {other:?}, not as an invalid proof"),
    }
}

fn valid(key: &TestKey, jti: &str) -> String {
    proof(key, "POST", HTU, NOW, jti)
}

/// A proof by `key` whose header is changed by `edit`.
fn with_header(key: &TestKey, edit: impl FnOnce(&mut Value)) -> String {
    let mut header = header(key);
    edit(&mut header);
    sign(key, &header, &claims("POST", HTU, NOW, "j1"))
}

#[test]
fn a_valid_es256_proof_passes_and_yields_its_rfc_7638_thumbprint() {
    let checked = check(&verifier(), &valid(&ES256_A, "j1")).expect("accepted");
    assert_eq!(checked.thumbprint_b64(), ES256_A.thumbprint());
    assert_eq!(
        URL_SAFE_NO_PAD.decode(ES256_A.thumbprint()).unwrap(),
        checked.thumbprint()
    );
    assert_eq!(checked.algorithm(), Algorithm::ES256);
    assert_eq!(checked.issued_at(), at(NOW));
}

#[test]
fn the_same_key_with_a_fresh_jti_gives_the_same_thumbprint() {
    let verifier = verifier();
    let first = check(&verifier, &valid(&ES256_A, "j1")).expect("accepted");
    let second = check(&verifier, &valid(&ES256_A, "j2")).expect("accepted");
    let other = check(&verifier, &valid(&ES256_B, "j3")).expect("accepted");
    assert_eq!(first.thumbprint(), second.thumbprint());
    assert_ne!(first.thumbprint(), other.thumbprint());
}

#[test]
fn the_thumbprint_of_rfc_7638s_example_key_is_the_published_one() {
    // RFC 7638 §3.1.
    let key = PublicKey::Rsa {
        n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo\
            c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YG\
            jQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt\
            -bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
            .to_owned(),
        e: "AQAB".to_owned(),
    };
    assert_eq!(
        URL_SAFE_NO_PAD.encode(key.thumbprint()),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

#[test]
fn a_replayed_jti_is_refused_but_the_same_jti_of_another_key_is_not() {
    let verifier = verifier();
    let proof = valid(&ES256_A, "j1");
    check(&verifier, &proof).expect("accepted once");
    assert_eq!(reason(check(&verifier, &proof)), "replayed jti");
    let fresh_iat = proof_at(&ES256_A, NOW + 1, "j1");
    assert_eq!(reason(check(&verifier, &fresh_iat)), "replayed jti");
    check(&verifier, &valid(&ES256_B, "j1")).expect("another key's jti is its own");
    // Clones share the cache.
    assert_eq!(reason(check(&verifier.clone(), &proof)), "replayed jti");
}

#[test]
fn a_refused_proof_leaves_its_jti_unused() {
    let verifier = verifier();
    let (method, uri) = post("https://auth.example.com/other");
    let proof = valid(&ES256_A, "j1");
    assert!(verifier.check(&proof, &method, &uri, at(NOW)).is_err());
    check(&verifier, &proof).expect("the jti was not remembered");
}

#[test]
fn a_wrong_typ_is_refused() {
    for typ in [
        json!("JWT"),
        json!("application/dpop+jwt"),
        json!("DPOP+JWT"),
        json!(1),
    ] {
        let proof = with_header(&ES256_A, |h| h["typ"] = typ);
        assert_eq!(reason(check(&verifier(), &proof)), "wrong typ");
    }
    let proof = with_header(&ES256_A, |h| {
        h.as_object_mut().unwrap().remove("typ");
    });
    assert_eq!(reason(check(&verifier(), &proof)), "wrong typ");
}

#[test]
fn an_hs256_proof_is_refused_and_cannot_be_configured() {
    let secret = b"a secret of at least thirty-two bytes";
    let header = json!({
        "typ": "dpop+jwt",
        "alg": "HS256",
        "jwk": {"kty": "oct", "k": URL_SAFE_NO_PAD.encode(secret)},
    });
    let proof = sign_with(
        &header,
        &claims("POST", HTU, NOW, "j1"),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    );
    assert_eq!(reason(check(&verifier(), &proof)), "disallowed algorithm");

    let err = DpopVerifier::builder()
        .algorithms([Algorithm::ES256, Algorithm::HS384])
        .build()
        .unwrap_err();
    assert_eq!(err, DpopConfigError::SymmetricAlgorithm(Algorithm::HS384));
}

#[test]
fn alg_none_is_refused() {
    for alg in ["none", "None", "NONE"] {
        let mut header = header(&ES256_A);
        header["alg"] = json!(alg);
        let proof = format!(
            "{}.{}.",
            encode(&header),
            encode(&claims("POST", HTU, NOW, "j1"))
        );
        assert_eq!(reason(check(&verifier(), &proof)), "disallowed algorithm");
    }
}

#[test]
fn an_algorithm_outside_the_pinned_list_is_refused() {
    let verifier = DpopVerifier::builder()
        .algorithms([Algorithm::EdDSA])
        .build()
        .unwrap();
    assert_eq!(
        reason(check(&verifier, &valid(&ES256_A, "j1"))),
        "disallowed algorithm"
    );
    check(&verifier, &valid(&ED25519, "j1")).expect("EdDSA is pinned");
}

#[test]
fn a_jwk_with_private_members_is_refused() {
    for member in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
        let proof = with_header(&ES256_A, |h| h["jwk"][member] = json!("AAAA"));
        assert_eq!(
            reason(check(&verifier(), &proof)),
            "jwk is not a public key",
            "{member}"
        );
    }
}

#[test]
fn a_missing_or_unusable_jwk_is_refused() {
    let proof = with_header(&ES256_A, |h| {
        h.as_object_mut().unwrap().remove("jwk");
    });
    assert_eq!(reason(check(&verifier(), &proof)), "missing jwk");
    let proof = with_header(&ES256_A, |h| h["jwk"]["x"] = json!("not base64!"));
    assert_eq!(reason(check(&verifier(), &proof)), "unusable jwk");
    let proof = with_header(&ES256_A, |h| h["jwk"]["y"] = json!("AAAA"));
    assert_eq!(reason(check(&verifier(), &proof)), "unusable jwk");
}

#[test]
fn a_jwk_of_another_type_than_the_algorithm_is_refused() {
    // An ES256 header naming a P-384 key, an RS256 header naming an EC key.
    let proof = with_header(&ES256_A, |h| h["jwk"] = ES384.public_jwk());
    assert_eq!(
        reason(check(&verifier(), &proof)),
        "jwk does not fit the algorithm"
    );
    let proof = with_header(&RS256, |h| h["jwk"] = ES256_A.public_jwk());
    assert_eq!(
        reason(check(&verifier(), &proof)),
        "jwk does not fit the algorithm"
    );
}

#[test]
fn a_proof_signed_by_another_key_than_its_jwk_is_refused() {
    let proof = sign(&ES256_B, &header(&ES256_A), &claims("POST", HTU, NOW, "j1"));
    assert_eq!(reason(check(&verifier(), &proof)), "invalid signature");

    let mut tampered = valid(&ES256_A, "j1");
    let claims_start = tampered.find('.').unwrap() + 1;
    let other = encode(&claims("POST", HTU, NOW, "j2"));
    let claims_end = tampered.rfind('.').unwrap();
    tampered.replace_range(claims_start..claims_end, &other);
    assert_eq!(reason(check(&verifier(), &tampered)), "invalid signature");
}

#[test]
fn an_htm_other_than_the_method_is_refused() {
    for htm in ["GET", "post"] {
        let proof = proof(&ES256_A, htm, HTU, NOW, "j1");
        assert_eq!(
            reason(check(&verifier(), &proof)),
            "htm does not match the request"
        );
    }
}

#[test]
fn htu_ignores_query_fragment_case_and_default_port_but_not_the_rest() {
    let verifier = verifier();
    let same = [
        "https://auth.example.com/token?x=1#frag",
        "HTTPS://Auth.Example.COM:443/token",
        "https://auth.example.com/%74oken",
    ];
    for (i, htu) in same.iter().enumerate() {
        let proof = proof(&ES256_A, "POST", htu, NOW, &format!("same-{i}"));
        check(&verifier, &proof).unwrap_or_else(|err| panic!("{htu}: {err}"));
    }
    let (method, uri) = post("https://auth.example.com/token?grant_type=refresh_token");
    let queried = valid(&ES256_A, "query");
    verifier
        .check(&queried, &method, &uri, at(NOW))
        .expect("the request's query is ignored too");

    let different = [
        "https://auth.example.com/token/",
        "https://auth.example.com/Token",
        "http://auth.example.com/token",
        "https://auth.example.com:8443/token",
        "https://other.example.com/token",
        "https://user@auth.example.com/token",
    ];
    for (i, htu) in different.iter().enumerate() {
        let refused = proof(&ES256_A, "POST", htu, NOW, &format!("different-{i}"));
        let got = reason(check(&verifier, &refused));
        assert!(
            got.starts_with("htu") || got == "invalid htu",
            "{htu}: {got}"
        );
    }
    let relative = proof(&ES256_A, "POST", "/token", NOW, "relative");
    assert_eq!(reason(check(&verifier, &relative)), "invalid htu");
}

#[test]
fn a_configured_origin_supplies_and_overrides_the_request_origin() {
    let verifier = DpopVerifier::builder()
        .origin("https://auth.example.com")
        .build()
        .unwrap();
    let (method, path_only) = post("/token");
    verifier
        .check(&valid(&ES256_A, "j1"), &method, &path_only, at(NOW))
        .expect("the origin completes a path-only uri");
    let (_, internal) = post("http://10.0.0.7:8080/token");
    verifier
        .check(&valid(&ES256_A, "j2"), &method, &internal, at(NOW))
        .expect("the origin wins over the internal one");
    let proof = proof(&ES256_A, "POST", "http://10.0.0.7:8080/token", NOW, "j3");
    assert_eq!(
        reason(verifier.check(&proof, &method, &internal, at(NOW))),
        HTU_MISMATCH
    );

    for bad in [
        "auth.example.com",
        "ftp://auth.example.com",
        "https://a.example/path",
    ] {
        let err = DpopVerifier::builder().origin(bad).build().unwrap_err();
        assert!(matches!(err, DpopConfigError::InvalidSetting(_)), "{bad}");
    }
}

#[test]
fn without_an_origin_a_path_only_request_is_judged_by_its_host_header() {
    let verifier = verifier();
    let request = |host: &str, proof: &str| {
        Request::post("/token")
            .header("host", host)
            .header("dpop", proof)
            .body(())
            .unwrap()
            .into_parts()
            .0
    };
    let parts = request("auth.example.com", &valid(&ES256_A, "j1"));
    verifier
        .check_request(&parts, at(NOW))
        .expect("host and path match");
    let parts = request("other.example.com", &valid(&ES256_A, "j2"));
    assert_eq!(
        reason(verifier.check_request(&parts, at(NOW))),
        HTU_MISMATCH
    );

    let (method, path_only) = post("/token");
    assert_eq!(
        reason(verifier.check(&valid(&ES256_A, "j3"), &method, &path_only, at(NOW))),
        "request origin unknown"
    );
}

#[test]
fn check_request_wants_exactly_one_dpop_header() {
    let verifier = verifier();
    let none = Request::post(HTU).body(()).unwrap().into_parts().0;
    assert_eq!(
        reason(verifier.check_request(&none, at(NOW))),
        "not exactly one dpop header"
    );
    let two = Request::post(HTU)
        .header("dpop", valid(&ES256_A, "j1"))
        .header("dpop", valid(&ES256_A, "j2"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    assert_eq!(
        reason(verifier.check_request(&two, at(NOW))),
        "not exactly one dpop header"
    );
    let one = Request::post(HTU)
        .header("DPoP", valid(&ES256_A, "j1"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    verifier.check_request(&one, at(NOW)).expect("accepted");
}

fn proof_at(key: &TestKey, iat: u64, jti: &str) -> String {
    proof(key, "POST", HTU, iat, jti)
}

#[test]
fn an_iat_outside_the_window_is_refused() {
    let verifier = verifier();
    check(&verifier, &proof_at(&ES256_A, NOW - 60, "oldest")).expect("60 s old is in");
    check(&verifier, &proof_at(&ES256_A, NOW + 60, "newest")).expect("60 s ahead is in");
    assert_eq!(
        reason(check(&verifier, &proof_at(&ES256_A, NOW - 61, "old"))),
        "iat too old"
    );
    assert_eq!(
        reason(check(&verifier, &proof_at(&ES256_A, NOW + 61, "new"))),
        "iat in the future"
    );
}

#[test]
fn missing_or_mistyped_claims_are_refused() {
    let cases = [
        (
            json!({"htm": "POST", "htu": HTU, "iat": NOW}),
            "missing jti",
        ),
        (
            json!({"jti": "", "htm": "POST", "htu": HTU, "iat": NOW}),
            "invalid jti",
        ),
        (
            json!({"jti": 7, "htm": "POST", "htu": HTU, "iat": NOW}),
            "invalid jti",
        ),
        (json!({"jti": "j", "htu": HTU, "iat": NOW}), "missing htm"),
        (
            json!({"jti": "j", "htm": "POST", "iat": NOW}),
            "missing htu",
        ),
        (
            json!({"jti": "j", "htm": "POST", "htu": HTU}),
            "missing iat",
        ),
        (
            json!({"jti": "j", "htm": "POST", "htu": HTU, "iat": NOW.to_string()}),
            "invalid iat",
        ),
        (
            json!({"jti": "j", "htm": "POST", "htu": HTU, "iat": -1}),
            "invalid iat",
        ),
    ];
    for (claims, want) in cases {
        let proof = sign(&ES256_A, &header(&ES256_A), &claims);
        assert_eq!(reason(check(&verifier(), &proof)), want, "{claims}");
    }
}

#[test]
fn a_duplicate_claim_is_refused() {
    let payload = format!(r#"{{"jti":"j1","jti":"j2","htm":"POST","htu":"{HTU}","iat":{NOW}}}"#);
    let message = format!(
        "{}.{}",
        encode(&header(&ES256_A)),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &ES256_A.encoding_key(),
        Algorithm::ES256,
    )
    .unwrap();
    let proof = format!("{message}.{signature}");
    assert_eq!(reason(check(&verifier(), &proof)), MALFORMED);
}

#[test]
fn a_duplicate_header_member_is_refused() {
    let jwk = ES256_A.public_jwk();
    let header = format!(r#"{{"typ":"JWT","typ":"dpop+jwt","alg":"ES256","jwk":{jwk}}}"#);
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        encode(&claims("POST", HTU, NOW, "j1"))
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &ES256_A.encoding_key(),
        Algorithm::ES256,
    )
    .unwrap();
    let proof = format!("{message}.{signature}");
    assert_eq!(reason(check(&verifier(), &proof)), MALFORMED);
}

#[test]
fn malformed_or_oversized_proofs_are_refused_before_decoding() {
    let verifier = DpopVerifier::builder().max_proof_len(600).build().unwrap();
    assert_eq!(reason(check(&verifier, "")), "empty proof");
    assert_eq!(reason(check(&verifier, "a.b")), MALFORMED);
    assert_eq!(reason(check(&verifier, "a b.c.d")), MALFORMED);
    assert_eq!(reason(check(&verifier, "%%%.b.c")), MALFORMED);
    let long = proof(&RS256, "POST", HTU, NOW, "j1");
    assert!(long.len() > 600);
    assert_eq!(reason(check(&verifier, &long)), "proof too long");
}

#[test]
fn rsa_ecdsa_p384_and_eddsa_proofs_pass() {
    let verifier = verifier();
    for key in [RS256, RS256.with_alg(Algorithm::PS256), ES384, ED25519] {
        let checked = check(&verifier, &valid(&key, &format!("{:?}", key.alg)))
            .unwrap_or_else(|err| panic!("{:?}: {err}", key.alg));
        assert_eq!(checked.thumbprint_b64(), key.thumbprint(), "{:?}", key.alg);
        assert_eq!(checked.algorithm(), key.alg);
    }
}

#[test]
fn the_jti_cache_stays_bounded_and_frees_expired_entries() {
    let verifier = DpopVerifier::builder()
        .max_jtis(2)
        .iat_window(Duration::from_secs(10))
        .build()
        .unwrap();
    let at_time = |proof: &str, now: u64| {
        let (method, uri) = post(HTU);
        verifier.check(proof, &method, &uri, at(now))
    };
    at_time(&proof_at(&ES256_A, NOW, "a"), NOW).expect("first");
    at_time(&proof_at(&ES256_A, NOW + 5, "b"), NOW + 5).expect("second");
    let full = at_time(&proof_at(&ES256_A, NOW + 5, "c"), NOW + 5).unwrap_err();
    assert_eq!(
        full.rejection(),
        &Rejection::Unavailable("dpop replay cache is full")
    );
    assert_eq!(verifier.inner.jtis.len(), 2);

    // "a" could be accepted until NOW + 10; at NOW + 11 its entry is gone.
    at_time(&proof_at(&ES256_A, NOW + 11, "c"), NOW + 11).expect("a slot was freed");
    assert_eq!(verifier.inner.jtis.len(), 2);
    assert_eq!(
        reason(at_time(&proof_at(&ES256_A, NOW + 5, "b"), NOW + 11)),
        "replayed jti",
        "b is still in its window"
    );
    // Long after, every entry has expired.
    at_time(&proof_at(&ES256_A, NOW + 100, "d"), NOW + 100).expect("accepted");
    assert_eq!(verifier.inner.jtis.len(), 1);
}

#[test]
fn the_builder_refuses_settings_that_cannot_work() {
    let build = |builder: DpopVerifierBuilder| builder.build().unwrap_err();
    assert_eq!(
        build(DpopVerifier::builder().algorithms([])),
        DpopConfigError::NoAlgorithms
    );
    for builder in [
        DpopVerifier::builder().iat_window(Duration::from_millis(500)),
        DpopVerifier::builder().iat_window(Duration::from_secs(3601)),
        DpopVerifier::builder().max_jtis(0),
        DpopVerifier::builder().max_proof_len(0),
    ] {
        assert!(matches!(build(builder), DpopConfigError::InvalidSetting(_)));
    }
}

#[test]
fn rejections_never_echo_the_proof_and_debug_shows_no_cache() {
    let proof = with_header(&ES256_A, |h| h["typ"] = json!("JWT"));
    let err = check(&verifier(), &proof).unwrap_err();
    assert!(!err.to_string().contains(&proof[..20]));
    let debug = format!("{:?}", verifier());
    assert!(debug.contains("DpopVerifier") && debug.contains("ES256"));
}
