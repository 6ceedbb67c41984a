//! DPoP (RFC 9449): the sender's key is part of the key, and every proof is checked.

use super::*;

#[tokio::test]
async fn a_bad_dpop_proof_is_refused_before_the_inner_service() {
    let front = front(extract());
    front.inner.open();
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
    assert_eq!(front.inner.calls(), 1);
}

#[tokio::test]
async fn a_use_dpop_nonce_error_is_never_replayed() {
    let inner = Gated::open_now();
    let nonce_challenge = inner.service(|_request: Request<RequestBody<Body>>, n| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("dpop-nonce", format!("nonce-{n}"))
                .body(Full::new(Bytes::from(r#"{"error":"use_dpop_nonce"}"#)))
                .unwrap(),
        )
    });
    // Even a policy that replays everything does not replay a nonce challenge.
    let layer = RefreshCoalesceLayer::http(extract())
        .share(tower_refresh_coalesce::HttpShare::new().replay_if(|_, _, _| true))
        .build();
    let service = layer.layer(nonce_challenge);
    let token = tokens::refresh("gina");
    for jti in ["n1", "n2"] {
        let seen = send(&service, with_dpop(&dpop::ES256_A, jti, &token)).await;
        assert_eq!(seen.status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(inner.calls(), 2, "each proof reaches the inner service");
}
