//! The replay cache: `jti`s of accepted proofs, bounded, until their window is over.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Mutex,
};

use sha2::{Digest, Sha256};

use super::reject;
use crate::error::{Rejected, Rejection};

/// The `jti`s of accepted proofs, until their window is over.
///
/// Keys are SHA-256 of the key's thumbprint and the `jti` (fixed size, whatever the `jti`'s
/// length); `by_expiry` orders them by the last second their proof could be accepted, so
/// that pruning takes only the expired ones, in amortized logarithmic time.
pub(super) struct JtiCache {
    pub(super) max: usize,
    state: Mutex<JtiState>,
}

#[derive(Default)]
struct JtiState {
    live: HashSet<[u8; 32]>,
    by_expiry: BTreeSet<(u64, [u8; 32])>,
}

impl JtiCache {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            state: Mutex::new(JtiState::default()),
        }
    }

    /// Records `jti` of the key `thumbprint` until `expires_at` (inclusive), at `now`.
    pub(super) fn remember(
        &self,
        thumbprint: &[u8; 32],
        jti: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<(), Rejected> {
        let mut hasher = Sha256::new();
        hasher.update(thumbprint);
        hasher.update(jti.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();

        // Nothing below panics between the updates of the two sets, so even a poisoned lock
        // guards consistent sets.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(expiry, expired)) = state.by_expiry.first() {
            if expiry >= now {
                break;
            }
            state.by_expiry.pop_first();
            state.live.remove(&expired);
        }
        if state.live.contains(&key) {
            return Err(reject("replayed jti"));
        }
        if state.live.len() >= self.max {
            return Err(Rejected::new(Rejection::Unavailable(
                "dpop replay cache is full",
            )));
        }
        state.live.insert(key);
        state.by_expiry.insert((expires_at, key));
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .len()
    }
}
