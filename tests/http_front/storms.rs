//! Storms through the HTTP front: one inner call, the same response for every caller.

use super::*;

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
    front.inner.open();

    let mut responses = Vec::new();
    for task in join_all(tasks).await {
        let response = task.expect("task").unwrap_or_else(|never| match never {});
        responses.push(seen(response).await);
    }
    assert_eq!(front.inner.calls(), 1);
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
    assert_eq!(front.inner.calls(), 2);
    assert_eq!(front.handle.stats().bypassed, 2);
}
