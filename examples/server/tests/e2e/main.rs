//! End-to-end tests of the reference server WITH the coalescing layer, over real sockets:
//! every token form, a storm of a thousand refreshes, replays inside and after the TTL,
//! logout, `/metrics`, an RFC 6749 §6 client and confidential clients.
//!
//! `tests/app` tests the inner application with the layer off; the demo's own test is in
//! the demo crate.

mod clients;
mod metrics;
mod oauth_client;
mod reading;
mod replay;
mod storm;

use std::sync::Arc;

use axum::http::{StatusCode, header};
use server::harness::{self, Metrics, Reply, TestServer, TokenForm};
use server::{self as app, Config};

/// The tokens of a token response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tokens {
    access: String,
    refresh: String,
}

/// The app with the layer (the default configuration), on a free port.
fn config() -> Config {
    harness::config()
}

/// The reference server in process on a real socket, stopped on drop, with an HTTP/1.1
/// client that opens a connection per request in flight.
async fn start(config: Config) -> Arc<TestServer> {
    Arc::new(TestServer::start(config).await.expect("the app starts"))
}

/// What these tests check of an answer.
trait Answer {
    fn assert_invalid_grant(&self);

    /// Asserts an RFC 6749 §5.1 token response (and the server's cookie) and returns its
    /// tokens.
    fn assert_tokens(&self) -> Tokens;
}

impl Answer for Reply {
    fn assert_invalid_grant(&self) {
        assert_eq!(
            self.status,
            app::INVALID_GRANT_STATUS,
            "body: {:?}",
            self.text()
        );
        assert_eq!(self.header(header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(self.json()["error"], "invalid_grant");
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
    }

    fn assert_tokens(&self) -> Tokens {
        assert_eq!(self.status, StatusCode::OK, "body: {:?}", self.text());
        assert_eq!(self.header(header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(self.header(header::CACHE_CONTROL), Some("no-store"));
        assert_eq!(self.header(header::PRAGMA), Some("no-cache"));
        let body = self.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 900);
        let tokens = Tokens {
            access: body["access_token"].as_str().expect("access_token").into(),
            refresh: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .into(),
        };
        let cookies = self.set_cookies();
        assert_eq!(cookies.len(), 1, "one Set-Cookie: {cookies:?}");
        assert!(
            cookies[0].starts_with(&format!("refresh_token={};", tokens.refresh)),
            "the cookie carries the new refresh token: {}",
            cookies[0]
        );
        tokens
    }
}

/// The samples these tests read, each of which must exist.
trait Samples {
    /// The value of `series`, which must exist.
    fn count(&self, series: &str) -> u64;

    fn rotations(&self) -> u64 {
        self.count("refresh_rotations_total")
    }

    fn reuse_detected(&self) -> u64 {
        self.count("refresh_reuse_detected_total")
    }

    fn layer(&self, outcome: &str) -> u64 {
        self.count(&format!(
            "refresh_coalesce_requests_total{{outcome=\"{outcome}\"}}"
        ))
    }
}

impl Samples for Metrics {
    fn count(&self, series: &str) -> u64 {
        let value = self
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {:#?}", self.samples()));
        value as u64
    }
}
