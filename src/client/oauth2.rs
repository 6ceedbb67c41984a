//! [`OAuth2Refresh`]: the RFC 6749 §6 refresh (`grant_type=refresh_token`) as a refresh
//! service, built on the [`oauth2`] crate and sent through any tower HTTP service.
//!
//! The `oauth2` crate builds the form POST (client authentication by `client_secret_basic`
//! or `client_secret_post`, scopes) and parses the answer (§5.1 success, §5.2 error). This
//! service maps the outcome to what the layer needs:
//!
//! | answer | [`RefreshErrorKind`] |
//! |---|---|
//! | `200` with an access token | success; a missing `refresh_token` keeps the old one (§6), `expires_in` sets the expiry |
//! | `400`/`401` `invalid_grant` | [`InvalidGrant`](RefreshErrorKind::InvalidGrant): the credentials end |
//! | any `5xx` or `429`, `temporarily_unavailable`, `server_error`, a transport error, a body that cannot be read | [`Transient`](RefreshErrorKind::Transient) |
//! | any other error code (`invalid_client`, ...), a malformed answer | [`Rejected`](RefreshErrorKind::Rejected) |
//!
//! The transport is any `Service<http::Request<B>>` with `B: From<Vec<u8>>` (the request
//! body type), answering any `http::Response` body, such as hyper-util's legacy client. The
//! answer is read up to 64 KiB.

use std::{
    fmt,
    marker::PhantomData,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use oauth2::{
    AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
    basic::{BasicClient, BasicErrorResponseType},
};
use tower_service::Service;

use super::{
    error::{RefreshError, RefreshErrorKind},
    refresher::{RefreshFuture, RefreshRequest},
    session::Tokens,
};
use crate::error::{BoxError, BuildError};

/// The largest token endpoint answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// A refresh service for RFC 6749 §6, over the HTTP service `T` whose requests carry `B`
/// bodies.
///
/// ```
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use tower_refresh_coalesce::client::oauth2::OAuth2Refresh;
///
/// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// // `B`, the request body, is inferred where the service is used; named here.
/// let refresh: OAuth2Refresh<_, Full<Bytes>> =
///     OAuth2Refresh::new(http, "https://auth.example.com/oauth/token", "my-client")?
///     .client_secret("s3cret") // client_secret_basic; `.secret_in_body()` for client_secret_post
///     .scopes(["api:read"]);
/// # let _ = refresh;
/// # Ok::<(), tower_refresh_coalesce::error::BuildError>(())
/// ```
pub struct OAuth2Refresh<T, B = Full<Bytes>> {
    transport: T,
    config: Arc<Config>,
    _body: PhantomData<fn() -> B>,
}

struct Config {
    token_url: TokenUrl,
    client_id: ClientId,
    client_secret: Option<ClientSecret>,
    auth_type: AuthType,
    scopes: Vec<Scope>,
}

impl<T, B> OAuth2Refresh<T, B> {
    /// Refreshes at `token_url` (an absolute URL) as the client `client_id`, a public client
    /// until [`client_secret`](Self::client_secret) is set.
    pub fn new(transport: T, token_url: &str, client_id: &str) -> Result<Self, BuildError> {
        let token_url = TokenUrl::new(token_url.to_owned())
            .map_err(|_| BuildError::new("the token endpoint is not an absolute URL"))?;
        if client_id.is_empty() {
            return Err(BuildError::new("the client id is empty"));
        }
        Ok(Self {
            transport,
            config: Arc::new(Config {
                token_url,
                client_id: ClientId::new(client_id.to_owned()),
                client_secret: None,
                auth_type: AuthType::BasicAuth,
                scopes: Vec::new(),
            }),
            _body: PhantomData,
        })
    }

    fn config_mut(&mut self) -> &mut Config {
        // Set while building, before any clone.
        Arc::get_mut(&mut self.config).expect("configured before it is cloned")
    }

    /// Authenticates as a confidential client with `secret`, in `Authorization: Basic`
    /// (`client_secret_basic`, RFC 6749 §2.3.1) unless [`secret_in_body`](Self::secret_in_body).
    #[must_use]
    pub fn client_secret(mut self, secret: &str) -> Self {
        self.config_mut().client_secret = Some(ClientSecret::new(secret.to_owned()));
        self
    }

    /// Sends the client id and secret in the form instead (`client_secret_post`).
    #[must_use]
    pub fn secret_in_body(mut self) -> Self {
        self.config_mut().auth_type = AuthType::RequestBody;
        self
    }

    /// Asks for `scopes` with each refresh (default: none, which keeps the granted ones).
    #[must_use]
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config_mut().scopes = scopes.into_iter().map(|s| Scope::new(s.into())).collect();
        self
    }
}

impl<T: Clone, B> Clone for OAuth2Refresh<T, B> {
    fn clone(&self) -> Self {
        Self {
            transport: self.transport.clone(),
            config: self.config.clone(),
            _body: PhantomData,
        }
    }
}

impl<T, B> fmt::Debug for OAuth2Refresh<T, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Refresh")
            .field("token_url", &self.config.token_url.as_str())
            .field("client_id", &self.config.client_id.as_str())
            .field("confidential", &self.config.client_secret.is_some())
            .finish_non_exhaustive()
    }
}

impl<T, B, R> Service<RefreshRequest> for OAuth2Refresh<T, B>
where
    T: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
    B: From<Vec<u8>> + Send + 'static,
    R: Body + Send + 'static,
    R::Data: Send,
    R::Error: Into<BoxError>,
{
    type Response = Tokens;
    type Error = BoxError;
    type Future = RefreshFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The transport is readied for each call, on a clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RefreshRequest) -> RefreshFuture {
        let transport = self.transport.clone();
        let config = self.config.clone();
        Box::pin(async move { refresh::<T, B, R>(transport, &config, &request).await })
    }
}

/// A transport failure, or an answer that says "later" (`5xx`, `429`): never parsed as a
/// token response.
#[derive(Debug)]
struct Transport {
    status: Option<StatusCode>,
    source: Option<BoxError>,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "the token endpoint answered {status}"),
            None => f.write_str("the token endpoint could not be reached"),
        }
    }
}

impl std::error::Error for Transport {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

async fn refresh<T, B, R>(
    transport: T,
    config: &Config,
    request: &RefreshRequest,
) -> Result<Tokens, BoxError>
where
    T: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
    B: From<Vec<u8>> + Send + 'static,
    R: Body + Send + 'static,
    R::Error: Into<BoxError>,
{
    let Some(refresh_token) = request.refresh_token() else {
        return Err(RefreshError::rejected("the credentials hold no refresh token").into());
    };
    let mut client = BasicClient::new(config.client_id.clone())
        .set_token_uri(config.token_url.clone())
        .set_auth_type(config.auth_type.clone());
    if let Some(secret) = &config.client_secret {
        client = client.set_client_secret(secret.clone());
    }
    // `oauth2` calls the client through a shared reference: the transport sits in a lock,
    // cloned out for the call, so that it need not be `Sync`.
    let transport = Mutex::new(transport);
    let http = |request: HttpRequest| {
        let transport = transport.lock().unwrap_or_else(|p| p.into_inner()).clone();
        send::<T, B, R>(transport, request)
    };
    let refresh_token = RefreshToken::new(refresh_token.to_owned());
    let answer = client
        .exchange_refresh_token(&refresh_token)
        .add_scopes(config.scopes.iter().cloned())
        .request_async(&http)
        .await;
    let response = match answer {
        Ok(response) => response,
        Err(error) => return Err(classify(error).into()),
    };
    let mut tokens = Tokens::new(response.access_token().secret().as_str()).map_err(|e| {
        RefreshError::rejected("the token endpoint sent an unusable access token").with_source(e)
    })?;
    if let Some(refresh) = response.refresh_token() {
        tokens = tokens.with_refresh_token(refresh.secret().as_str());
    }
    if let Some(lifetime) = response.expires_in() {
        tokens = tokens.expires_in(lifetime);
    }
    Ok(tokens)
}

/// Sends one request of `oauth2` through `transport`; answers that say "later" come back
/// as [`Transport`] errors, which `oauth2` passes through unparsed.
async fn send<T, B, R>(mut transport: T, request: HttpRequest) -> Result<HttpResponse, Transport>
where
    T: Service<Request<B>, Response = Response<R>>,
    T::Error: Into<BoxError>,
    B: From<Vec<u8>>,
    R: Body,
    R::Error: Into<BoxError>,
{
    let failed = |source: BoxError| Transport {
        status: None,
        source: Some(source),
    };
    std::future::poll_fn(|cx| transport.poll_ready(cx))
        .await
        .map_err(|e| failed(e.into()))?;
    let response = transport
        .call(request.map(B::from))
        .await
        .map_err(|e| failed(e.into()))?;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(Transport {
            status: Some(status),
            source: None,
        });
    }
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(failed)?
        .to_bytes();
    Ok(Response::from_parts(parts, body.to_vec()))
}

type BasicRequestError = RequestTokenError<Transport, oauth2::basic::BasicErrorResponse>;

/// What an `oauth2` error means to the layer (see the module docs).
fn classify(error: BasicRequestError) -> RefreshError {
    match error {
        RequestTokenError::ServerResponse(response) => {
            let description = response
                .error_description()
                .map_or_else(String::new, |d| format!(" ({d})"));
            match response.error() {
                BasicErrorResponseType::InvalidGrant => {
                    RefreshError::invalid_grant(format!("invalid_grant{description}"))
                }
                BasicErrorResponseType::Extension(code)
                    if code == "temporarily_unavailable" || code == "server_error" =>
                {
                    RefreshError::new(RefreshErrorKind::Transient, format!("{code}{description}"))
                }
                other => RefreshError::rejected(format!("{}{description}", other.as_ref())),
            }
        }
        RequestTokenError::Request(transport) => RefreshError::transient(transport),
        RequestTokenError::Parse(error, _) => {
            RefreshError::rejected("the token endpoint's answer is malformed").with_source(error)
        }
        RequestTokenError::Other(text) => RefreshError::rejected(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_response(code: &str) -> BasicRequestError {
        let code = match code {
            "invalid_grant" => BasicErrorResponseType::InvalidGrant,
            "invalid_client" => BasicErrorResponseType::InvalidClient,
            "unauthorized_client" => BasicErrorResponseType::UnauthorizedClient,
            other => BasicErrorResponseType::Extension(other.to_owned()),
        };
        RequestTokenError::ServerResponse(oauth2::StandardErrorResponse::new(
            code,
            Some("why".to_owned()),
            None,
        ))
    }

    #[test]
    fn error_codes_map_to_kinds() {
        for (code, kind) in [
            ("invalid_grant", RefreshErrorKind::InvalidGrant),
            ("temporarily_unavailable", RefreshErrorKind::Transient),
            ("server_error", RefreshErrorKind::Transient),
            ("invalid_client", RefreshErrorKind::Rejected),
            ("unauthorized_client", RefreshErrorKind::Rejected),
        ] {
            assert_eq!(classify(server_response(code)).kind(), kind, "{code}");
        }
        let unreachable = RequestTokenError::Request(Transport {
            status: Some(StatusCode::BAD_GATEWAY),
            source: None,
        });
        assert_eq!(classify(unreachable).kind(), RefreshErrorKind::Transient);
        assert_eq!(
            classify(RequestTokenError::Other("odd".into())).kind(),
            RefreshErrorKind::Rejected
        );
        let text = classify(server_response("invalid_grant")).to_string();
        assert_eq!(
            text,
            "the token server refused the refresh token (invalid_grant): invalid_grant (why)"
        );
    }
}
