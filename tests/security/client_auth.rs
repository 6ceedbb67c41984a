//! Client authentication is part of the key: a thief with the token but another credential
//! never gets the victim's answer.

use super::*;

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
    until(|| front.inner.calls() == 1 + count).await;
    assert_eq!(front.handle.stats().joined, 0, "no thief joined the flight");
    front.inner.open();
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
        front.inner.calls(),
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
        until(|| front.inner.calls() == 1 && front.handle.stats().joined == 99).await;
        front.inner.open();
        let seen: Vec<Seen> = join_all(storm)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(front.inner.calls(), 1, "{name}: one inner call");
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
    front.inner.open();
    let token = tokens::refresh("carol");
    let a = send(&front.service, form(&token, &assertion(1))).await;
    let b = send(&front.service, form(&token, &assertion(2))).await;
    assert_ne!(a, b, "another assertion is another key");
    assert_eq!(front.inner.calls(), 2);

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
    front.inner.open();
    let token = tokens::refresh("carol");
    let a = send(&front.service, form(&token, &assertion(1))).await;
    let b = send(&front.service, form(&token, &assertion(2))).await;
    assert_eq!(a, b, "one stable identity: replayed");
    assert_eq!(front.inner.calls(), 1);
    let refused = send(
        &front.service,
        form(
            &token,
            "&client_assertion_type=jwt-bearer&client_assertion=forged",
        ),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(front.inner.calls(), 1);
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
    front.inner.open();
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
    assert_eq!(front.inner.calls(), 3);
}

#[tokio::test]
async fn the_inner_service_receives_what_the_layer_verified() {
    let front = front(extract());
    front.inner.open();
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
