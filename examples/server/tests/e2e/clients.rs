//! Confidential clients (`--client ID:SECRET`): login, refresh and logout with and without
//! their credentials, and thieves racing a victim's refresh.

use std::time::{Duration, Instant};

use axum::http::Request;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::task::JoinSet;

use super::*;

/// The confidential client of these tests and its secret (with characters RFC 6749
/// §2.3.1's form-urlencoding must carry through `Authorization: Basic`).
const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "s3cret: with+symbols/%";
/// A second confidential client.
const OTHER_CLIENT: &str = "other";
const OTHER_SECRET: &str = "other-s3cret";
/// A wrong secret for `CLIENT`.
const WRONG_SECRET: &str = "guessed";

/// The default app (with the layer) and two confidential clients.
fn confidential_config() -> Config {
    Config {
        clients: vec![
            format!("{CLIENT}:{CLIENT_SECRET}")
                .parse()
                .expect("a valid --client"),
            format!("{OTHER_CLIENT}:{OTHER_SECRET}")
                .parse()
                .expect("a valid --client"),
        ],
        ..config()
    }
}

/// How a request authenticates its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    /// No client at all.
    None,
    /// `Authorization: Basic` with this id and secret.
    Basic(&'static str, &'static str),
    /// `client_id` and `client_secret` in the form (refresh) or JSON (login) body.
    Body(&'static str, &'static str),
    /// `client_id` and `client_secret` in a JSON body.
    Json(&'static str, &'static str),
    /// `client_id` alone.
    IdOnly(&'static str),
}

/// The requests of a client that authenticates itself, and plain forms.
pub(crate) trait ServerExt {
    /// A request to `path` with `fields` (the token or the user's credentials) and the
    /// client authentication `auth`, as a form unless `auth` is [`ClientAuth::Json`].
    fn client_request(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        auth: ClientAuth,
    ) -> Request<Full<Bytes>>;

    async fn login_as(&self, auth: ClientAuth) -> Reply;

    fn client_refresh_request(&self, token: &str, auth: ClientAuth) -> Request<Full<Bytes>>;

    async fn client_refresh(&self, token: &str, auth: ClientAuth) -> Reply;

    async fn client_logout(&self, token: &str, auth: ClientAuth) -> Reply;

    /// `POST path` with a form `body`, `Accept: application/json`, and `Authorization`
    /// when `basic` is given.
    async fn post_form(&self, path: &str, body: String, basic: Option<&str>) -> Reply;
}

impl ServerExt for TestServer {
    fn client_request(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        auth: ClientAuth,
    ) -> Request<Full<Bytes>> {
        let mut fields: Vec<(&str, &str)> = fields.to_vec();
        let mut builder = self.post(path);
        match auth {
            ClientAuth::None => {}
            ClientAuth::Basic(id, secret) => {
                builder = builder.header(header::AUTHORIZATION, harness::client_basic(id, secret));
            }
            ClientAuth::Body(id, secret) | ClientAuth::Json(id, secret) => {
                fields.extend([("client_id", id), ("client_secret", secret)]);
            }
            ClientAuth::IdOnly(id) => fields.push(("client_id", id)),
        }
        let request = if let ClientAuth::Json(..) = auth {
            let object: serde_json::Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| *k != "grant_type")
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(Value::Object(object).to_string()))
        } else {
            let form: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", harness::form_encode(v)))
                .collect();
            builder
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::from(form.join("&")))
        };
        request.expect("valid request")
    }

    async fn login_as(&self, auth: ClientAuth) -> Reply {
        let fields = [("username", "demo"), ("password", "demo")];
        self.send(self.client_request("/auth/login", &fields, auth))
            .await
    }

    fn client_refresh_request(&self, token: &str, auth: ClientAuth) -> Request<Full<Bytes>> {
        let fields = [("grant_type", "refresh_token"), ("refresh_token", token)];
        self.client_request(app::REFRESH_PATH, &fields, auth)
    }

    async fn client_refresh(&self, token: &str, auth: ClientAuth) -> Reply {
        self.send(self.client_refresh_request(token, auth)).await
    }

    async fn client_logout(&self, token: &str, auth: ClientAuth) -> Reply {
        let fields = [("token", token)];
        self.send(self.client_request("/auth/logout", &fields, auth))
            .await
    }

    async fn post_form(&self, path: &str, body: String, basic: Option<&str>) -> Reply {
        let mut request = self
            .post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(credentials) = basic {
            request = request.header(header::AUTHORIZATION, credentials);
        }
        self.send(request.body(Full::from(body)).expect("valid request"))
            .await
    }
}

/// What these tests check of a refused client, and of a thief's answer.
trait ClientAnswer {
    fn assert_invalid_client(&self);

    /// Whether any part of `tokens` (a whole token, or a JWT's claims or signature)
    /// appears in this reply's body or headers.
    fn leaks(&self, tokens: &Tokens) -> bool;
}

impl ClientAnswer for Reply {
    fn assert_invalid_client(&self) {
        assert_eq!(
            self.status,
            StatusCode::UNAUTHORIZED,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.json()["error"], "invalid_client");
        let challenge = self
            .header(header::WWW_AUTHENTICATE)
            .expect("a WWW-Authenticate challenge");
        assert!(
            challenge == "Basic" || challenge.starts_with("Basic "),
            "a Basic challenge: {challenge}"
        );
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
    }

    fn leaks(&self, tokens: &Tokens) -> bool {
        let secrets: Vec<&str> = [&tokens.access, &tokens.refresh]
            .into_iter()
            .flat_map(|token| {
                let segments = token.split('.').skip(1);
                std::iter::once(token.as_str()).chain(segments)
            })
            .collect();
        let body = String::from_utf8_lossy(&self.body);
        let headers = self
            .headers
            .values()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        std::iter::once(body.into_owned())
            .chain(headers)
            .any(|text| secrets.iter().any(|secret| text.contains(secret)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confidential_client_logs_in_with_basic_or_its_secret_in_the_body() {
    let server = start(confidential_config()).await;

    for auth in [
        ClientAuth::Basic(CLIENT, CLIENT_SECRET),
        ClientAuth::Body(CLIENT, CLIENT_SECRET),
        ClientAuth::Json(CLIENT, CLIENT_SECRET),
    ] {
        let tokens = server.login_as(auth).await.assert_tokens();
        // The family is bound to the client: it refreshes with its credentials.
        server
            .client_refresh(&tokens.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
            .await
            .assert_tokens();
    }

    for auth in [
        ClientAuth::Basic(CLIENT, WRONG_SECRET),
        ClientAuth::Body(CLIENT, WRONG_SECRET),
        ClientAuth::Json(CLIENT, WRONG_SECRET),
        ClientAuth::IdOnly(CLIENT),
        ClientAuth::Basic(CLIENT, ""),
        ClientAuth::Basic(OTHER_CLIENT, CLIENT_SECRET),
    ] {
        let reply = server.login_as(auth).await;
        reply.assert_invalid_client();
        assert!(reply.set_cookies().is_empty(), "{auth:?}: no token cookie");
    }

    // Clients not named on the command line are public: no secret, nothing checked.
    server
        .login_as(ClientAuth::IdOnly("a-public-client"))
        .await
        .assert_tokens();
    server.login_as(ClientAuth::None).await.assert_tokens();

    let metrics = server.metrics().await;
    assert_eq!(
        metrics.count(r#"login_requests_total{outcome="invalid_client"}"#),
        6
    );
    assert_eq!(metrics.count(r#"login_requests_total{outcome="ok"}"#), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_without_the_familys_client_credentials_is_refused_and_revokes_nothing() {
    // No replays, so the already-rotated token below reaches the handler: what the layer
    // replays to whom is the subject of the thief race further down.
    let server = start(Config {
        ttl: 0.0,
        ..confidential_config()
    })
    .await;
    let victim = server
        .login_as(ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    let tokens = server
        .client_refresh(&victim.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();

    // The current token and the already-rotated one: neither consumes nor revokes anything
    // in the wrong hands (a used token presented again would otherwise revoke the family).
    for token in [&tokens.refresh, &victim.refresh] {
        for auth in [
            ClientAuth::Basic(CLIENT, WRONG_SECRET),
            ClientAuth::Body(CLIENT, WRONG_SECRET),
            ClientAuth::Json(CLIENT, WRONG_SECRET),
            ClientAuth::IdOnly(CLIENT),
            ClientAuth::None,
        ] {
            let reply = server.client_refresh(token, auth).await;
            reply.assert_invalid_client();
            assert!(!reply.leaks(&tokens), "{auth:?}");
        }
        for auth in [
            ClientAuth::Basic(OTHER_CLIENT, OTHER_SECRET),
            ClientAuth::Body(OTHER_CLIENT, OTHER_SECRET),
            ClientAuth::IdOnly("a-public-client"),
        ] {
            let reply = server.client_refresh(token, auth).await;
            reply.assert_invalid_grant();
            assert!(!reply.leaks(&tokens), "{auth:?}");
        }
        for auth in [ClientAuth::None, ClientAuth::Basic(CLIENT, WRONG_SECRET)] {
            server
                .client_logout(token, auth)
                .await
                .assert_invalid_client();
        }
        server
            .client_logout(token, ClientAuth::Basic(OTHER_CLIENT, OTHER_SECRET))
            .await
            .assert_invalid_grant();
    }
    assert!(!server.family_revoked(&tokens.refresh).await);
    let metrics = server.metrics().await;
    assert_eq!(metrics.reuse_detected(), 0);
    assert_eq!(metrics.rotations(), 1);

    // The victim's session goes on, with its secret in either place.
    let next = server
        .client_refresh(&tokens.refresh, ClientAuth::Body(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    let next = server
        .client_refresh(&next.refresh, ClientAuth::Json(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    assert_eq!(server.metrics().await.rotations(), 3);

    // A public family is not the confidential client's either.
    let public = server.login_as(ClientAuth::None).await.assert_tokens();
    server
        .client_refresh(&public.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_invalid_grant();
    server
        .client_refresh(&public.refresh, ClientAuth::None)
        .await
        .assert_tokens();

    // Its own client logs it out.
    let reply = server
        .client_logout(&next.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(server.family_revoked(&next.refresh).await);
}

/// The thieves of [`thief_race`]: the victim's client id with a wrong secret by Basic, the
/// same in the form body, and no client authentication.
const THIEVES: [ClientAuth; 3] = [
    ClientAuth::Basic(CLIENT, WRONG_SECRET),
    ClientAuth::Body(CLIENT, WRONG_SECRET),
    ClientAuth::None,
];
/// Thief requests of each kind in each wave.
const THIEVES_PER_KIND: usize = 50;

/// One thief request's answer and when it was sent.
struct Theft {
    auth: ClientAuth,
    sent: Instant,
    reply: Reply,
}

/// `THIEVES_PER_KIND` requests of every kind in [`THIEVES`] presenting `token`, at once.
fn send_thieves(server: &Arc<TestServer>, token: &str) -> JoinSet<Theft> {
    let mut thieves = JoinSet::new();
    for i in 0..THIEVES_PER_KIND * THIEVES.len() {
        let auth = THIEVES[i % THIEVES.len()];
        let server = Arc::clone(server);
        let request = server.client_refresh_request(token, auth);
        thieves.spawn(async move {
            let sent = Instant::now();
            let reply = server.send(request).await;
            Theft { auth, sent, reply }
        });
    }
    thieves
}

async fn collect(mut thieves: JoinSet<Theft>) -> Vec<Theft> {
    let mut done = Vec::new();
    while let Some(theft) = thieves.join_next().await {
        done.push(theft.expect("thief task completes"));
    }
    done
}

/// The victim refreshes with its client's secret; while its refresh runs (the simulated
/// upstream takes 200 ms), 150 thieves present the same refresh token, and 150 more
/// within the replay TTL after it answered. No thief may get the victim's new pair.
async fn thief_race(config: Config) {
    let server = start(Config {
        refresh_delay_ms: 200,
        ..config
    })
    .await;
    let victim = server
        .login_as(ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();

    let refresh = {
        let server = Arc::clone(&server);
        let request = server
            .client_refresh_request(&victim.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET));
        tokio::spawn(async move { server.send(request).await })
    };
    if let Some(handle) = server.state().coalesce() {
        // The victim's request leads the flight before any thief arrives, so the thieves
        // meet a running flight (and then its replay), not one of their own.
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.stats().in_flight == 0 {
            assert!(
                Instant::now() < deadline,
                "the victim's flight never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let during = send_thieves(&server, &victim.refresh);
    let reply = refresh.await.expect("the victim's request completes");
    let answered = Instant::now();
    let fresh = reply.assert_tokens();
    let after = send_thieves(&server, &victim.refresh);
    let during = collect(during).await;
    let after = collect(after).await;

    let early = during.iter().filter(|t| t.sent < answered).count();
    assert_eq!(
        early,
        during.len(),
        "every thief of the first wave was sent while the victim's refresh ran"
    );

    let mut report = String::new();
    let mut robbed = 0;
    for (wave, thefts) in [("during the flight", &during), ("after it", &after)] {
        for kind in THIEVES {
            let of_kind = || thefts.iter().filter(move |t| t.auth == kind);
            let ok = of_kind()
                .filter(|t| t.reply.status == StatusCode::OK)
                .count();
            let leaked = of_kind().filter(|t| t.reply.leaks(&fresh)).count();
            robbed += of_kind()
                .filter(|t| t.reply.status == StatusCode::OK || t.reply.leaks(&fresh))
                .count();
            report.push_str(&format!(
                "\n  {wave}, {kind:?}: {ok} of {} got 200, {leaked} saw the new tokens",
                of_kind().count()
            ));
        }
    }
    assert_eq!(
        robbed, 0,
        "thief requests got 200 or saw the victim's new tokens:{report}"
    );
    for theft in during.iter().chain(&after) {
        theft.reply.assert_invalid_client();
    }

    // The victim's session is intact: its new refresh token works.
    assert!(!server.family_revoked(&fresh.refresh).await);
    let next = server
        .client_refresh(&fresh.refresh, ClientAuth::Basic(CLIENT, CLIENT_SECRET))
        .await
        .assert_tokens();
    assert_ne!(next.refresh, fresh.refresh);
    let metrics = server.metrics().await;
    assert_eq!(metrics.rotations(), 2);
    assert_eq!(metrics.reuse_detected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thieves_racing_the_victims_refresh_through_the_layer_get_nothing() {
    thief_race(confidential_config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thieves_racing_the_victims_refresh_without_the_layer_get_nothing() {
    thief_race(Config {
        no_coalesce: true,
        ..confidential_config()
    })
    .await;
}
