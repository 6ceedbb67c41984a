//! [`Names`]: the names of the store's keys and channels, all derived from fingerprints.

use crate::{key::Fingerprint, store::Fence};

pub(super) struct Names {
    pub(super) prefix: String,
}

impl Names {
    pub(super) fn key(&self, key: &Fingerprint, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, key.to_hex())
    }

    pub(super) fn outcome(&self, key: &Fingerprint, fence: &Fence) -> String {
        self.key(key, &format!("out:{}", fence.as_str()))
    }

    pub(super) fn done_pattern(&self) -> String {
        format!("{}:{{*}}:done", self.prefix)
    }

    pub(super) fn invalidate_channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }

    /// The fingerprint of a completion channel `{prefix}:{hex}:done`.
    pub(super) fn parse_done(&self, channel: &str) -> Option<Fingerprint> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let hex = rest.strip_suffix("}:done")?;
        Fingerprint::from_hex(hex)
    }
}
