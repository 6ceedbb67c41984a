//! HTTP handlers, token extraction and JSON error responses.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tower_refresh_coalesce::error::{Rejected, Rejection};
use tower_refresh_coalesce::{RefreshGrant, TokenSource};

use super::crypto::token_hash;
use super::metrics::METRICS_CONTENT_TYPE;
use super::store::{ClientCheck, Presenter, Revocation, Rotation, StoreError};
use super::tokens::{IssuedPair, TokenError};
use super::{
    AppState, INVALID_CREDENTIALS_STATUS, INVALID_GRANT_STATUS, LogoutEvent, REFRESH_COOKIE,
    REFRESH_COOKIE_PATH, unix_now,
};

/// Longest accepted user name, in bytes.
const MAX_USERNAME_LEN: usize = 256;
/// Longest accepted password, in bytes.
const MAX_PASSWORD_LEN: usize = 1024;
/// Longest accepted client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 256;
/// Longest accepted client secret, in bytes.
pub const MAX_CLIENT_SECRET_LEN: usize = 1024;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// An error answer: `{"error": "...", "error_description": "..."}` with `Cache-Control:
/// no-store`, plus `WWW-Authenticate` / `Retry-After` where HTTP requires them.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    description: Option<Cow<'static, str>>,
    challenge: Option<&'static str>,
    retry_after: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_description: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, description: &'static str) -> Self {
        Self {
            status,
            error,
            description: Some(Cow::Borrowed(description)),
            challenge: None,
            retry_after: None,
        }
    }

    /// The OAuth error code (`invalid_grant`, ...), also the metrics outcome label.
    pub fn code(&self) -> &'static str {
        self.error
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn invalid_request(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: &'static str) -> Self {
        Self::new(INVALID_GRANT_STATUS, "invalid_grant", description)
    }

    /// `401 invalid_client` with a `Basic` challenge (RFC 6749 §5.2).
    fn invalid_client(description: &'static str) -> Self {
        Self {
            challenge: Some("Basic realm=\"auth\""),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
        }
    }

    fn invalid_token(description: &'static str) -> Self {
        Self {
            challenge: Some("Bearer realm=\"api\", error=\"invalid_token\""),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_token", description)
        }
    }

    fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "request body is too large",
        )
    }

    fn server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        )
    }

    fn unavailable() -> Self {
        Self {
            retry_after: Some("1"),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the token store is busy, retry shortly",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            error_description: self.description.as_deref(),
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(challenge) = self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_busy() {
            tracing::warn!(error = %e, "token store busy");
            Self::unavailable()
        } else {
            tracing::error!(error = %e, "token store failure");
            Self::server_error()
        }
    }
}

impl From<jsonwebtoken::errors::Error> for ApiError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        tracing::error!(error = %e, "token signing failed");
        Self::server_error()
    }
}

/// Runs blocking store work on tokio's blocking pool.
impl From<Rejected> for ApiError {
    /// A request refused by the reading the layer shares ([`RefreshGrant::read`]).
    fn from(rejected: Rejected) -> Self {
        match rejected.rejection() {
            Rejection::MissingToken => Self::invalid_request("missing refresh token"),
            Rejection::Malformed(why) => Self::invalid_request(why),
            Rejection::BodyTooLarge => Self::body_too_large(),
            _ => Self::invalid_grant("malformed refresh token"),
        }
    }
}

async fn blocking<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "blocking task failed");
            ApiError::server_error()
        })?
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large()
        } else {
            ApiError::invalid_request("could not read the request body")
        }
    })
}

// ---------------------------------------------------------------------------------------
// Success responses
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    refresh_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
}

const NO_STORE: [(HeaderName, HeaderValue); 2] = [
    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    (header::PRAGMA, HeaderValue::from_static("no-cache")),
];

fn refresh_cookie(value: &str, max_age: u64) -> String {
    format!(
        "{REFRESH_COOKIE}={value}; HttpOnly; Secure; SameSite=Strict; \
         Path={REFRESH_COOKIE_PATH}; Max-Age={max_age}"
    )
}

/// The RFC 6749 §5.1 token response, with the refresh token also set as a cookie.
fn token_response(state: &AppState, pair: &IssuedPair) -> Response {
    let keys = state.keys();
    let body = TokenBody {
        access_token: &pair.access_token,
        refresh_token: &pair.refresh_token,
        token_type: "Bearer",
        expires_in: keys.access_ttl(),
    };
    let cookie = refresh_cookie(&pair.refresh_token, keys.refresh_ttl());
    (
        StatusCode::OK,
        NO_STORE,
        AppendHeaders([(header::SET_COOKIE, cookie)]),
        Json(body),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------------------

/// How a non-empty body is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    Form,
}

/// JSON when the content type says so (`application/json` or `+json`), otherwise
/// form-urlencoded: by `Content-Type` alone, as the coalescing layer reads a body, so that
/// the handler never acts on another token than the one the layer verified.
/// `None` for an empty body.
fn body_format(headers: &HeaderMap, body: &[u8]) -> Option<BodyFormat> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if essence == "application/json" || essence.ends_with("+json") {
        Some(BodyFormat::Json)
    } else {
        Some(BodyFormat::Form)
    }
}

/// Parses a form body into pairs, refusing repeated parameters (RFC 6749 §3.2).
fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| ApiError::invalid_request("malformed form body"))?;
    for (i, (key, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(ApiError::invalid_request(
                "a form parameter is included more than once",
            ));
        }
    }
    Ok(pairs)
}

fn take_param(pairs: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let index = pairs.iter().position(|(k, _)| k == name)?;
    Some(pairs.swap_remove(index).1)
}

/// A refresh token as presented, and the client that presented it if it said.
struct Presented {
    token: String,
    client: ClientCredentials,
}

/// The client a request names and the secret it sends, by `Authorization: Basic` or as
/// `client_id` / `client_secret` parameters. Nothing here is authenticated yet.
#[derive(Default)]
struct ClientCredentials {
    id: Option<String>,
    secret: Option<String>,
}

impl ClientCredentials {
    /// Combines the `Authorization: Basic` pair with the body's parameters: one client id
    /// (repeating the same one is fine) and at most one secret, since RFC 6749 §2.3 allows
    /// one authentication method per request.
    fn collect(
        basic: Option<(String, String)>,
        ids: impl IntoIterator<Item = String>,
        secrets: impl IntoIterator<Item = String>,
    ) -> Result<Self, ApiError> {
        let mut all_ids: Vec<String> = Vec::new();
        let mut all_secrets: Vec<String> = Vec::new();
        let (basic_id, basic_secret) = basic.unzip();
        all_ids.extend(basic_id.into_iter().chain(ids).filter(|c| !c.is_empty()));
        all_secrets.extend(
            basic_secret
                .into_iter()
                .chain(secrets)
                .filter(|s| !s.is_empty()),
        );
        let id = all_ids.first().cloned();
        if all_ids.iter().any(|c| Some(c) != id.as_ref()) {
            return Err(ApiError::invalid_request(
                "different client identifiers in one request",
            ));
        }
        if all_secrets.len() > 1 {
            return Err(ApiError::invalid_request(
                "more than one client authentication method in one request",
            ));
        }
        let secret = all_secrets.pop();
        if id.is_none() && secret.is_some() {
            return Err(ApiError::invalid_client("client_secret without client_id"));
        }
        if id.as_ref().is_some_and(|id| id.len() > MAX_CLIENT_ID_LEN)
            || secret
                .as_ref()
                .is_some_and(|s| s.len() > MAX_CLIENT_SECRET_LEN)
        {
            return Err(ApiError::invalid_client("client id or secret is too long"));
        }
        Ok(Self { id, secret })
    }
}

/// What the `Authorization` header carries.
enum Authorization {
    /// `Bearer <token>`: the token itself.
    Bearer(String),
    /// `Basic`: RFC 6749 §2.3.1 client authentication, never a token.
    Basic { client_id: String, secret: String },
}

fn authorization(headers: &HeaderMap) -> Result<Option<Authorization>, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_request(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| ApiError::invalid_request("Authorization header is not visible ASCII"))?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(ApiError::invalid_request("empty Bearer token"));
        }
        Ok(Some(Authorization::Bearer(rest.to_owned())))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let (client_id, secret) = basic_credentials(rest)
            .ok_or_else(|| ApiError::invalid_client("malformed Basic client authentication"))?;
        Ok(Some(Authorization::Basic { client_id, secret }))
    } else {
        Err(ApiError::invalid_request(
            "unsupported Authorization scheme",
        ))
    }
}

/// The client id and secret of `Basic base64(client_id ":" client_secret)`, where both
/// parts are form-urlencoded first (RFC 6749 §2.3.1). Checked later, by
/// [`authenticate_client`].
fn basic_credentials(credentials: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let id = form_decode(id)?;
    let secret = form_decode(secret)?;
    (!id.is_empty()).then_some((id, secret))
}

/// Decodes `application/x-www-form-urlencoded` text (`+` and `%XX`).
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Values of the `refresh_token` cookie (every `Cookie` header, every pair).
fn cookie_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == REFRESH_COOKIE).then(|| value.trim().trim_matches('"').to_owned())
        })
}

#[derive(Deserialize)]
struct JsonTokenRequest {
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
}

/// Finds the token of a logout (RFC 7009) in the body (JSON `{"refresh_token"}`, or a form
/// with `token` or `refresh_token`), the `refresh_token` cookie or `Authorization: Bearer`.
///
/// Several copies of the same token are fine; different tokens in one request are
/// refused with `invalid_request`.
fn presented_token(headers: &HeaderMap, body: &[u8]) -> Result<Presented, ApiError> {
    let mut tokens: Vec<String> = Vec::new();
    let mut client_ids: Vec<String> = Vec::new();
    let mut client_secrets: Vec<String> = Vec::new();
    let mut basic = None;

    match authorization(headers)? {
        Some(Authorization::Bearer(token)) => tokens.push(token),
        Some(Authorization::Basic { client_id, secret }) => basic = Some((client_id, secret)),
        None => {}
    }
    tokens.extend(cookie_tokens(headers));

    match body_format(headers, body) {
        None => {}
        Some(BodyFormat::Json) => {
            let parsed: JsonTokenRequest = serde_json::from_slice(body)
                .map_err(|_| ApiError::invalid_request("malformed JSON body"))?;
            tokens.extend(parsed.refresh_token);
            client_ids.extend(parsed.client_id);
            client_secrets.extend(parsed.client_secret);
        }
        Some(BodyFormat::Form) => {
            let mut pairs = form_pairs(body)?;
            let refresh_token = take_param(&mut pairs, "refresh_token");
            // RFC 7009 names the parameter `token`; accept both.
            tokens.extend(take_param(&mut pairs, "token"));
            tokens.extend(refresh_token);
            client_ids.extend(take_param(&mut pairs, "client_id"));
            client_secrets.extend(take_param(&mut pairs, "client_secret"));
            // `scope` (RFC 6749 §6) is accepted and ignored: tokens here carry no scope.
        }
    }

    tokens.retain(|t| !t.is_empty());
    let Some(token) = tokens.first().cloned() else {
        return Err(ApiError::invalid_request("missing refresh token"));
    };
    if tokens.iter().any(|t| *t != token) {
        return Err(ApiError::invalid_request(
            "different refresh tokens in one request",
        ));
    }
    let client = ClientCredentials::collect(basic, client_ids, client_secrets)?;
    Ok(Presented { token, client })
}

/// Authenticates the client a request names (blocking: the secret check hashes).
///
/// No client named: [`Presenter::Anonymous`]. A client that is not registered: a public
/// client, [`Presenter::Public`] (whatever secret it sends is ignored). A registered
/// (confidential) client must send its secret, else `401 invalid_client`.
fn authenticate_client(
    state: &AppState,
    client: &ClientCredentials,
) -> Result<Presenter, ApiError> {
    let Some(id) = &client.id else {
        return Ok(Presenter::Anonymous);
    };
    match state.store().verify_client(id, client.secret.as_deref())? {
        ClientCheck::Public => Ok(Presenter::Public),
        ClientCheck::Authenticated => Ok(Presenter::Confidential(id.clone())),
        ClientCheck::Refused => {
            // The client id is caller input: logged with `?` (escaped), never with `%`.
            tracing::info!(client = ?id, "client authentication failed");
            Err(ApiError::invalid_client("client authentication failed"))
        }
    }
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
}

fn credentials(headers: &HeaderMap, body: &[u8]) -> Result<Credentials, ApiError> {
    let credentials: Credentials = match body_format(headers, body) {
        None => return Err(ApiError::invalid_request("missing request body")),
        Some(BodyFormat::Json) => serde_json::from_slice(body).map_err(|_| {
            ApiError::invalid_request("expected a JSON object with username and password")
        })?,
        Some(BodyFormat::Form) => serde_urlencoded::from_bytes(body)
            .map_err(|_| ApiError::invalid_request("expected username and password"))?,
    };
    if credentials.username.is_empty() || credentials.username.len() > MAX_USERNAME_LEN {
        return Err(ApiError::invalid_request("username is empty or too long"));
    }
    if credentials.password.len() > MAX_PASSWORD_LEN {
        return Err(ApiError::invalid_request("password is too long"));
    }
    Ok(credentials)
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

fn outcome(result: &Result<Response, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

/// `POST /auth/login`: `{"username","password"}` -> a new token family.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = login_inner(&state, &headers, body).await;
    state.metrics().login_request(outcome(&result));
    result.into_response()
}

async fn login_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let basic = match authorization(headers)? {
        Some(Authorization::Basic { client_id, secret }) => Some((client_id, secret)),
        Some(Authorization::Bearer(_)) | None => None,
    };
    let Credentials {
        username,
        password,
        client_id,
        client_secret,
    } = credentials(headers, &body)?;
    let client = ClientCredentials::collect(basic, client_id, client_secret)?;
    let issued = blocking(state, move |state| {
        // The client first (RFC 6749 §5.2: `invalid_client` before any grant error).
        let presenter = authenticate_client(state, &client)?;
        if !state.store().verify_password(&username, &password)? {
            return Ok(Err(username));
        }
        let now = unix_now();
        let family = super::crypto::random_id();
        let pair = state.keys().issue_pair(&username, &family, now)?;
        let bound = presenter.bound_client();
        state.store().create_family(
            &family,
            &username,
            bound,
            &pair.refresh_hash,
            pair.refresh_expires_at,
            now,
        )?;
        Ok(Ok((username, family, bound.map(str::to_owned), pair)))
    })
    .await?;
    match issued {
        Ok((subject, family, client, pair)) => {
            tracing::info!(%subject, %family, ?client, "login: new token family");
            Ok(token_response(state, &pair))
        }
        Err(subject) => {
            tracing::info!(subject = ?subject, "login refused: bad credentials");
            Err(ApiError::new(
                INVALID_CREDENTIALS_STATUS,
                "invalid_credentials",
                "unknown user or wrong password",
            ))
        }
    }
}

/// `POST /auth/refresh`: rotates a refresh token (RFC 6749 §6).
///
/// The body is read as raw bytes and parsed here (JSON or form), so this route works for
/// any body type the router is given and a layer in front of it can buffer and replay it.
pub async fn refresh(
    State(state): State<AppState>,
    grant: Option<Extension<RefreshGrant>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = refresh_inner(&state, grant.map(|Extension(grant)| grant), &headers, body).await;
    state.metrics().refresh_request(outcome(&result));
    result.into_response()
}

/// The refresh request: what the coalescing layer verified and keyed, when it runs in
/// front of this route; otherwise read here exactly as the layer reads it.
fn refresh_grant(
    grant: Option<RefreshGrant>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Presented, ApiError> {
    let grant = match grant {
        Some(grant) => grant,
        None => match RefreshGrant::read(headers, body, &TokenSource::defaults()) {
            Ok(Some(grant)) => grant,
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "only grant_type=refresh_token is supported here",
                ));
            }
            Err(rejected) => return Err(ApiError::from(rejected)),
        },
    };
    if grant.client_assertion().is_some() {
        return Err(ApiError::invalid_client(
            "client assertions are not supported here",
        ));
    }
    let client = ClientCredentials::collect(
        None,
        grant.client_id().map(str::to_owned),
        grant.client_secret().map(str::to_owned),
    )?;
    Ok(Presented {
        token: grant.token().to_owned(),
        client,
    })
}

async fn refresh_inner(
    state: &AppState,
    grant: Option<RefreshGrant>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let Presented { token, client } = refresh_grant(grant, headers, &body)?;
    // Client authentication is decided before anything touches the token: a request with
    // a wrong secret never consumes it and never revokes its family.
    let client_id = client.id.clone();
    let presenter = blocking(state, move |state| authenticate_client(state, &client)).await?;

    let delay = state.config().refresh_delay_ms;
    if delay > 0 {
        // The simulated slow upstream: makes concurrent refreshes overlap.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let now = unix_now();
    let claims = state
        .keys()
        .verify_refresh(&token, now)
        .map_err(token_invalid_grant)?;
    let presented_hash = token_hash(&token);
    drop(token);
    // Counted and logged inside the blocking task, right after the commit, so the counters
    // stay exact even when the caller disconnects while the task runs.
    blocking(state, move |state| {
        let pair = state.keys().issue_pair(&claims.sub, &claims.fam, now)?;
        let rotation = state.store().rotate(
            &presented_hash,
            &claims.fam,
            &claims.sub,
            &presenter,
            &pair.refresh_hash,
            pair.refresh_expires_at,
            now,
        )?;
        let (subject, family) = (&claims.sub, &claims.fam);
        // The client id is caller input: logged with `?` (escaped), never with `%`.
        let client = client_id.as_deref().unwrap_or("-");
        match rotation {
            Rotation::Rotated => {
                state.metrics().rotation();
                tracing::info!(%subject, %family, ?client, "refresh token rotated");
                Ok(token_response(state, &pair))
            }
            Rotation::ReuseDetected => {
                state.metrics().reuse_detected();
                tracing::warn!(
                    %subject, %family, ?client,
                    "refresh token reuse detected: token family revoked"
                );
                Err(ApiError::invalid_grant(
                    "refresh token was already used; its session has been revoked",
                ))
            }
            Rotation::FamilyRevoked => {
                tracing::info!(%subject, %family, "refresh refused: family revoked");
                Err(ApiError::invalid_grant("refresh token has been revoked"))
            }
            Rotation::Expired => Err(ApiError::invalid_grant("refresh token has expired")),
            Rotation::Unknown | Rotation::Conflict => {
                Err(ApiError::invalid_grant("refresh token is not recognised"))
            }
            Rotation::WrongClient => {
                tracing::warn!(%subject, %family, ?client, "refresh refused: another client's token");
                Err(ApiError::invalid_grant(
                    "refresh token was issued to another client",
                ))
            }
            Rotation::ClientRequired => {
                tracing::warn!(%subject, %family, "refresh refused: client authentication required");
                Err(ApiError::invalid_client(
                    "this refresh token's client must authenticate",
                ))
            }
        }
    })
    .await
}

fn token_invalid_grant(e: TokenError) -> ApiError {
    ApiError::invalid_grant(e.description())
}

/// `POST /auth/logout`: revokes the presented token's family and calls the logout hook.
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = logout_inner(&state, &headers, body).await;
    state.metrics().logout_request(outcome(&result));
    result.into_response()
}

async fn logout_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let Presented { token, client } = presented_token(headers, &body)?;
    let client_id = client.id.clone();
    let presenter = blocking(state, move |state| authenticate_client(state, &client)).await?;
    let now = unix_now();
    let claims = state
        .keys()
        .verify_refresh(&token, now)
        .map_err(token_invalid_grant)?;
    let presented_hash = token_hash(&token);
    // The hook runs inside the blocking task, right after the commit, so a layer is
    // invalidated even when the caller disconnects while the task runs.
    blocking(state, move |state| {
        let revocation =
            state
                .store()
                .revoke_family_of(&presented_hash, &claims.fam, &claims.sub, &presenter, now)?;
        match revocation {
            Revocation::Revoked => {
                tracing::info!(subject = %claims.sub, family = %claims.fam, "logout: family revoked");
                let event = LogoutEvent {
                    subject: claims.sub,
                    token,
                    client_id,
                };
                (state.on_logout())(&event);
                Ok(())
            }
            Revocation::Unknown => Err(ApiError::invalid_grant("refresh token is not recognised")),
            Revocation::WrongClient => Err(ApiError::invalid_grant(
                "refresh token was issued to another client",
            )),
            Revocation::ClientRequired => Err(ApiError::invalid_client(
                "this refresh token's client must authenticate",
            )),
        }
    })
    .await?;
    let clear = refresh_cookie("", 0);
    Ok((
        StatusCode::OK,
        NO_STORE,
        AppendHeaders([(header::SET_COOKIE, clear)]),
        Json(serde_json::json!({ "status": "logged_out" })),
    )
        .into_response())
}

/// `GET /api/me`: the subject of a valid access token (refresh tokens are refused).
pub async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = match authorization(&headers) {
        Ok(Some(Authorization::Bearer(token))) => token,
        Ok(_) | Err(_) => return Err(ApiError::invalid_token("missing Bearer access token")),
    };
    let claims = state
        .keys()
        .verify_access(&token, unix_now())
        .map_err(|e| ApiError::invalid_token(e.description()))?;
    Ok(Json(serde_json::json!({ "sub": claims.sub })).into_response())
}

/// `GET /metrics`: the app's registry in the OpenMetrics text format.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state
        .metrics()
        .encode()
        .map_err(|_| ApiError::server_error())?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}

/// `GET /healthz`.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Fallback for unknown paths: `404 {"error":"not_found"}`.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Fallback for known paths with another method: `405 {"error":"method_not_allowed"}`.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_and_percent_escapes() {
        assert_eq!(form_decode("a+b%3Ac").as_deref(), Some("a b:c"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
        assert_eq!(form_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_decode("%FF"), None);
    }
}
