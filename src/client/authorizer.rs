//! [`Authorizer`]: the refresh core of a [`BearerAuthLayer`](super::BearerAuthLayer) for
//! clients that are not tower services (reqwest, through `reqwest-middleware`).

use std::{fmt, sync::Arc};

use http::HeaderValue;

use super::{core::Core, future};
use crate::error::BoxError;

/// What the layer does around a request, as two calls: [`authorize`](Self::authorize)
/// before sending, [`rejected`](Self::rejected) after a `401`. Every authorizer and every
/// layer over one [`Credentials`](super::Credentials) cell share its refreshes: one per
/// generation.
///
/// From [`BearerAuthLayer::authorizer`](super::BearerAuthLayer::authorizer); cheap to
/// clone.
///
/// ```
/// use std::convert::Infallible;
/// use tower_refresh_coalesce::client::{BearerAuthLayer, Credentials, RefreshRequest, Tokens, refresh_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_refresh_coalesce::BoxError> {
/// let credentials = Credentials::from_tokens(Tokens::new("old")?.with_refresh_token("r1"));
/// let refresh = refresh_fn(|_: RefreshRequest| async { Ok::<_, Infallible>(Tokens::new("new").unwrap()) });
/// let authorizer = BearerAuthLayer::new(credentials, refresh).authorizer();
///
/// // Any HTTP client: send with the header, and on a 401 ask for the next one.
/// let send = |authorization: &str| {
///     let status = if authorization == "Bearer new" { 200 } else { 401 };
///     async move { status }
/// };
/// let first = authorizer.authorize().await?;
/// let mut status = send(first.header().to_str()?).await;
/// if status == 401 {
///     // `None`: the credentials ended (`invalid_grant`, logout): keep the 401.
///     if let Some(next) = authorizer.rejected(&first).await? {
///         status = send(next.header().to_str()?).await; // once, never in a loop
///     }
/// }
/// assert_eq!(status, 200);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Authorizer {
    core: Arc<Core>,
}

/// The `Authorization` value to send a request with, and the generation of the credentials
/// it came from.
#[derive(Clone)]
pub struct Authorization {
    generation: u64,
    header: HeaderValue,
}

impl Authorization {
    /// `Bearer <access token>`, marked sensitive.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The generation of the credentials it came from.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorization")
            .field("generation", &self.generation)
            .field("header", &"<redacted>")
            .finish()
    }
}

impl Authorizer {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// The authorization to send a request with, refreshed first if the access token
    /// expires within the layer's margin. Fails with
    /// [`NoCredentials`](super::error::NoCredentials), or with
    /// [`RefreshFailed`](super::error::RefreshFailed) when a refresh was needed and failed.
    pub async fn authorize(&self) -> Result<Authorization, BoxError> {
        let (generation, tokens) = future::authorize(&self.core).await?;
        Ok(Authorization {
            generation,
            header: tokens.header().clone(),
        })
    }

    /// After a rejection (`401`) of a request sent with `sent`: the authorization to send it
    /// again with, once (the credentials' newer tokens, or those of the one refresh of
    /// `sent`'s generation); `None` if the credentials ended, when the rejection is the
    /// answer; [`RefreshFailed`](super::error::RefreshFailed) if the refresh failed.
    pub async fn rejected(&self, sent: &Authorization) -> Result<Option<Authorization>, BoxError> {
        match future::after_rejection(&self.core, sent.generation).await {
            Ok(header) => Ok(Some(Authorization {
                generation: self.core.credentials.generation(),
                header,
            })),
            Err(super::attempt::Failure::NoCredentials(_)) => Ok(None),
            Err(failure) => Err(failure.into()),
        }
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("core", &self.core)
            .finish()
    }
}
