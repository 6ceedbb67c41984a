//! `refresh.v1.AccountService`: a method that needs a valid access token, checked by an
//! interceptor before the method runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::{Request, Response, Status, service::Interceptor};

use crate::{
    Counter,
    pb::{MeReply, MeRequest, account_service_server::AccountService},
};

/// What the account service counts: calls its interceptor refused, and calls of `Me`.
#[derive(Debug, Clone, Default)]
pub struct AccountCounters {
    /// Calls the interceptor refused with `UNAUTHENTICATED`.
    pub rejected: Counter,
    /// Calls that reached `Me`.
    pub me: Counter,
}

/// The subject the interceptor verified, handed to the method.
#[derive(Debug, Clone)]
struct Subject(String);

#[derive(Deserialize)]
struct AccessClaims {
    sub: String,
}

/// The interceptor: `authorization: Bearer <access token>`, an HS256 JWT of `typ: at+jwt`
/// that has not expired (no leeway), or a trailers-only `UNAUTHENTICATED`.
#[derive(Clone)]
pub struct AccessCheck {
    key: DecodingKey,
    validation: Validation,
    rejected: Counter,
}

impl AccessCheck {
    /// Accepts access tokens signed with `secret`; counts refusals in `rejected`.
    pub fn new(secret: &[u8], rejected: Counter) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
            rejected,
        }
    }

    fn subject(&self, request: &Request<()>) -> Option<String> {
        let header = request.metadata().get("authorization")?.to_str().ok()?;
        let token = header.strip_prefix("Bearer ")?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.key, &self.validation).ok()?;
        (data.header.typ.as_deref() == Some(crate::ACCESS_TYP)).then_some(data.claims.sub)
    }
}

impl Interceptor for AccessCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.subject(&request) {
            Some(subject) => {
                request.extensions_mut().insert(Subject(subject));
                Ok(request)
            }
            None => {
                self.rejected.increment();
                Err(Status::unauthenticated(
                    "missing, invalid or expired access token",
                ))
            }
        }
    }
}

impl std::fmt::Debug for AccessCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessCheck").finish_non_exhaustive()
    }
}

/// The account service: answers the subject the interceptor verified.
#[derive(Debug, Clone, Default)]
pub struct AccountServer {
    calls: Counter,
}

impl AccountServer {
    /// A service that counts its calls in `calls`.
    pub fn new(calls: Counter) -> Self {
        Self { calls }
    }
}

#[tonic::async_trait]
impl AccountService for AccountServer {
    async fn me(&self, request: Request<MeRequest>) -> Result<Response<MeReply>, Status> {
        self.calls.increment();
        let subject = request
            .extensions()
            .get::<Subject>()
            .ok_or_else(|| Status::internal("the interceptor did not run"))?;
        Ok(Response::new(MeReply {
            subject: subject.0.clone(),
        }))
    }
}

/// An access token for `subject`, signed with `secret`, that expired an hour ago: what a
/// client holds after it sat idle.
pub fn mint_expired_access_token(
    secret: &[u8],
    subject: &str,
) -> jsonwebtoken::errors::Result<String> {
    let an_hour_ago = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(3600));
    crate::mint_at(secret, crate::ACCESS_TYP, subject, an_hour_ago)
}
