//! Placeholder for the DPoP proof checker (RFC 9449), replaced by the real module.

use std::{sync::Arc, time::SystemTime};

use crate::error::{Rejected, Rejection};

/// Checks DPoP proofs.
#[derive(Debug, Clone, Default)]
pub struct DpopVerifier {
    _inner: Arc<()>,
}

impl DpopVerifier {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `proof` against the request.
    pub fn check_parts(
        &self,
        _proof: &str,
        _parts: &http::request::Parts,
        _now: SystemTime,
    ) -> Result<DpopProof, Rejected> {
        Err(Rejected::new(Rejection::InvalidDpopProof("not checked")))
    }
}

/// A checked proof.
#[derive(Debug, Clone)]
pub struct DpopProof {
    thumbprint: [u8; 32],
}

impl DpopProof {
    /// The key's thumbprint.
    pub fn thumbprint(&self) -> &[u8; 32] {
        &self.thumbprint
    }

    /// base64url.
    pub fn thumbprint_b64(&self) -> String {
        String::new()
    }
}
