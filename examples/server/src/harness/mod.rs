//! Driving the reference server: the one harness of its end-to-end tests, the demo and the
//! load tool.
//!
//! - [`TestServer`]: the application in this process, on a real loopback socket.
//! - [`ServerProcess`]: the built `server` binary as a child process, as an operator runs it.
//! - [`Client`] and [`Reply`]: an HTTP/1.1 client (one connection per request in flight),
//!   the requests of the server's contract (login, the four token forms of a refresh) and
//!   fully read answers.
//! - [`Metrics`] and [`Counters`]: `/metrics` parsed strictly as OpenMetrics text, and the
//!   counters a storm is judged by.
//! - [`TempDir`]: a directory removed on drop, for a database file several instances share.
//!
//! ```no_run
//! # async fn storm() -> Result<(), server::harness::Error> {
//! use server::harness::{self, Client, TestServer, TokenForm};
//!
//! let server = TestServer::start(harness::config()).await?;
//! let client = Client::new();
//! let token = client.login_demo(server.base()).await?;
//! let request = harness::refresh_request(server.base(), &token, TokenForm::Json)?;
//! assert_eq!(client.send(request).await?.status, 200);
//! let rotations = client.counters(server.base()).await?.rotations;
//! # let _ = rotations; Ok(()) }
//! ```

mod client;
mod metrics;
mod process;
mod running;
mod temp;

use std::net::SocketAddr;

pub use client::{
    Client, Reply, TokenForm, basic, client_basic, form_encode, refresh_request, refresh_storm,
};
pub use metrics::{Counters, Metrics, MetricsError};
pub use process::ServerProcess;
pub use running::{TestServer, call, family_revoked};
pub use temp::TempDir;

use crate::Config;

/// Any error of the harness (not an answer of the server, which is a [`Reply`]).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The documented defaults (the coalescing layer on, SQLite in memory) on a free loopback
/// port: what [`TestServer::start`] takes unless a test needs something else.
pub fn config() -> Config {
    Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    }
}

/// An error with its sources: "client error (Connect): tcp connect error: ...".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        // Many errors repeat their source's message in their own.
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = e.source();
    }
    text
}
