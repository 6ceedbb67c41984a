//! Clients of the reference server's API, and the storm that tells them apart.
//!
//! When an access token expires, every request a client has in flight gets a `401`. Two
//! clients of `GET /api/me`, both starting from an expired access token and a valid refresh
//! token:
//!
//! - [`layered`]: hyper-util's client behind tower-refresh-coalesce's client layer
//!   ([`BearerAuthLayer`](tower_refresh_coalesce::client::BearerAuthLayer)), refreshing
//!   through the `oauth2` crate (RFC 6749 §6 form POST). The storm makes one refresh, and
//!   every request is sent again once with the new token.
//! - [`naive`]: what is often written by hand: on a `401`, refresh with the refresh token the
//!   request was sent with, then send it again. The storm makes one refresh per request;
//!   with rotating refresh tokens the first wins and the others are reuse: the token server
//!   revokes the family and the user is logged out.
//!
//! [`storm`] runs either client against a reference server (with or without the server-side
//! layer) and reads what reached the token server from its `/metrics`. The demo's 2×2 table
//! is four such runs.
//!
//! The binary (`api-client storm`) is one process of a client fleet sharing a credential
//! through Redis: the test `two_processes` starts two.

pub mod layered;
pub mod naive;
pub mod storm;

use std::time::Duration;

use server::harness::{self, Client};
use tower_refresh_coalesce::client::Tokens;

/// Any error of the clients' own machinery (not an answer of the server).
pub type Error = harness::Error;

/// What a login hands a client: a fresh pair, and how long the access token lives.
#[derive(Debug, Clone)]
pub struct Login {
    /// The access token.
    pub access_token: String,
    /// The refresh token (the family's first).
    pub refresh_token: String,
    /// The access token's lifetime.
    pub expires_in: Duration,
}

impl Login {
    /// Logs in at `base` as the demo user.
    pub async fn demo(client: &Client, base: &str) -> Result<Self, Error> {
        let reply = client
            .login(base, server::DEMO_USER, server::DEMO_PASSWORD)
            .await?;
        let json = reply
            .try_json()
            .filter(|_| reply.status.is_success())
            .ok_or_else(|| format!("login at {base} failed: {} {}", reply.status, reply.text()))?;
        let text = |field: &str| {
            json[field]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("the login answer has no {field}"))
        };
        Ok(Self {
            access_token: text("access_token")?,
            refresh_token: text("refresh_token")?,
            expires_in: Duration::from_secs(json["expires_in"].as_u64().unwrap_or(0)),
        })
    }

    /// The tokens, for the client layer's credentials.
    pub fn tokens(&self) -> Result<Tokens, Error> {
        Ok(Tokens::new(self.access_token.as_str())?
            .with_refresh_token(self.refresh_token.as_str())
            .expires_in(self.expires_in))
    }
}

/// An access token of `state`'s server for the demo user that expired an hour ago: what a
/// client holds when its token ran out while it was idle.
pub fn expired_access_token(state: &server::AppState) -> Result<String, Error> {
    let an_hour_ago = server::unix_now().saturating_sub(3600 + state.keys().access_ttl());
    Ok(state
        .keys()
        .issue_pair(server::DEMO_USER, "expired", an_hour_ago)?
        .access_token)
}
