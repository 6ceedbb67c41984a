//! [`Core`]: what every service of one [`BearerAuthLayer`](super::BearerAuthLayer) shares.

use std::{fmt, time::Duration};

use super::{backoff::BackoffPolicy, credentials::Credentials, refresher::Refresher};

/// The credentials, the refresh service and the settings of one layer, in an `Arc` that
/// every service, clone and flight task holds.
pub(crate) struct Core {
    pub(crate) credentials: Credentials,
    pub(crate) refresh: Box<dyn Refresher>,
    /// How long before the access token's expiry a request refreshes it first.
    pub(crate) refresh_ahead: Duration,
    /// The largest request body kept for a retry.
    pub(crate) max_body: usize,
    /// The longest a call of the refresh service may take.
    pub(crate) refresh_timeout: Duration,
    /// The wait after failed refreshes.
    pub(crate) backoff: BackoffPolicy,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("credentials", &self.credentials)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("max_body", &self.max_body)
            .field("refresh_timeout", &self.refresh_timeout)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}
