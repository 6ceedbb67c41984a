//! An OAuth 2.0 client: RFC 6749 §6 requests by hand and the `oauth2` crate.

use http_body_util::Full;
use serde_json::json;

use super::*;
use crate::clients::ServerExt as _;

/// Checks an RFC 6749 §5.1 access token response and returns its refresh token.
fn assert_rfc6749_token_response(reply: &Reply) -> Tokens {
    assert_eq!(reply.status, StatusCode::OK);
    let content_type = reply.header(header::CONTENT_TYPE).expect("content type");
    assert_eq!(content_type.split(';').next(), Some("application/json"));
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(reply.header(header::PRAGMA), Some("no-cache"));
    let body = reply.json();
    let object = body.as_object().expect("a JSON object");
    assert!(
        object["access_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    assert!(
        object["token_type"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    );
    assert!(object["expires_in"].as_u64().is_some_and(|s| s > 0));
    assert!(
        object["refresh_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    reply.assert_tokens()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth2_style_client_with_basic_auth_and_client_id_refreshes() {
    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();

    // RFC 6749 §6, as in its example: a form, client credentials in `Authorization: Basic`
    // (the client id and secret of RFC 6749's examples).
    let reply = server
        .post_form(
            app::REFRESH_PATH,
            format!("grant_type=refresh_token&refresh_token={}", tokens.refresh),
            Some(&harness::basic("s6BhdRkqt3", "gX1fBat3bV")),
        )
        .await;
    let second = assert_rfc6749_token_response(&reply);
    assert_ne!(second.refresh, tokens.refresh);
    let me = server.get("/api/me", Some(&second.access)).await;
    assert_eq!(me.json(), json!({ "sub": "demo" }));

    // A public client: `client_id` in the form, with a `scope` it may send.
    let reply = server
        .post_form(
            app::REFRESH_PATH,
            format!(
                "grant_type=refresh_token&refresh_token={}&client_id=s6BhdRkqt3&scope=profile",
                second.refresh
            ),
            None,
        )
        .await;
    let third = assert_rfc6749_token_response(&reply);
    assert_ne!(third.refresh, second.refresh);

    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 2);
    assert_eq!(metrics.layer("leader"), 2);
    assert_eq!(metrics.reuse_detected(), 0);
}

/// The `oauth2` crate's HTTP client contract, served by the harness's client.
async fn oauth2_http(
    server: &TestServer,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, std::io::Error> {
    let reply = server
        .client()
        .send(request.map(Full::from))
        .await
        .map_err(std::io::Error::other)?;
    let mut response = oauth2::HttpResponse::new(reply.body.to_vec());
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_oauth2_client_refreshes_with_basic_auth_and_with_client_id() {
    use oauth2::{
        AuthType, ClientId, ClientSecret, RefreshToken, TokenResponse, TokenUrl, basic::BasicClient,
    };

    let server = start(config()).await;
    let tokens = server.login_demo().await.assert_tokens();
    let http = |request| oauth2_http(&server, request);
    let token_url = TokenUrl::new(format!("{}{}", server.base(), app::REFRESH_PATH)).unwrap();

    // The client's default: credentials in `Authorization: Basic` (RFC 6749 §2.3.1).
    let confidential = BasicClient::new(ClientId::new("s6BhdRkqt3".into()))
        .set_client_secret(ClientSecret::new("gX1fBat3bV".into()))
        .set_token_uri(token_url.clone());
    let first = confidential
        .exchange_refresh_token(&RefreshToken::new(tokens.refresh.clone()))
        .request_async(&http)
        .await
        .expect("the refresh_token grant succeeds with Basic client authentication");
    let refreshed = first
        .refresh_token()
        .expect("a rotated refresh token")
        .secret()
        .clone();
    assert_ne!(refreshed, tokens.refresh);
    assert!(first.expires_in().is_some());

    // A public client sends `client_id` in the form instead.
    let public = BasicClient::new(ClientId::new("s6BhdRkqt3".into()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(token_url);
    let second = public
        .exchange_refresh_token(&RefreshToken::new(refreshed.clone()))
        .request_async(&http)
        .await
        .expect("the refresh_token grant succeeds with client_id in the form");
    assert_ne!(second.refresh_token().unwrap().secret(), &refreshed);

    // The same client retrying the first token inside the TTL gets the same pair, replayed.
    let retry = confidential
        .exchange_refresh_token(&RefreshToken::new(tokens.refresh.clone()))
        .request_async(&http)
        .await
        .expect("a retry inside the TTL is replayed");
    assert_eq!(retry.refresh_token().unwrap().secret(), &refreshed);

    // A forged token: the layer refuses it, and the library sees a standard error response.
    let forged = public
        .exchange_refresh_token(&RefreshToken::new(format!("{}x", tokens.refresh)))
        .request_async(&http)
        .await
        .expect_err("a forged token is refused");
    match forged {
        oauth2::RequestTokenError::ServerResponse(response) => {
            assert_eq!(
                response.error(),
                &oauth2::basic::BasicErrorResponseType::InvalidGrant
            );
        }
        other => panic!("expected an invalid_grant response, got {other:?}"),
    }
    assert_eq!(server.metrics().await.rotations(), 2);
}
