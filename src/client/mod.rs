//! The client side: a layer over outgoing requests that refreshes once and retries.
//!
//! (Overview written below.)

pub mod body;
mod core;
mod credentials;
pub mod error;
pub mod future;
mod layer;
mod metrics;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
mod refresh;
mod remote;
mod service;
pub mod store;

pub use self::{
    body::ClientBody,
    credentials::{Credentials, Session, Snapshot, Tokens},
    layer::{BearerAuthLayer, Builder},
    metrics::ClientStats,
    refresh::{RefreshFn, RefreshRequest, refresh_fn},
    service::BearerAuth,
};

/// An error with its sources, for log lines: "a: b: c".
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}
