//! The parts of a key besides the token: everything else the inner service authenticates.

use ::http::HeaderName;

use crate::{
    key::{Admission, Fingerprinter},
    token::{
        Verified,
        source::{Client, Credential},
    },
};

/// The `DPoP` request header (RFC 9449 §4.1).
pub(super) const DPOP: HeaderName = HeaderName::from_static("dpop");

/// What a request's DPoP header binds it to.
pub(super) enum Sender {
    None,
    /// A verified proof: its key's RFC 7638 thumbprint, raw and base64url.
    #[cfg(feature = "jwt")]
    Key([u8; 32], String),
    /// An unchecked proof, whole (without `jwt`, which checks proofs).
    #[cfg(not(feature = "jwt"))]
    Proof(Vec<u8>),
}

impl Sender {
    pub(super) fn thumbprint(&self) -> Option<String> {
        match self {
            #[cfg(feature = "jwt")]
            Self::Key(_, b64) => Some(b64.clone()),
            _ => None,
        }
    }
}

/// The parts of a key besides the token: everything else the inner service authenticates,
/// each kind tagged so that no two kinds collide.
pub(super) fn party<'a>(
    client: &'a Client,
    identity: Option<&'a str>,
    binding: Option<&'a [u8]>,
    sender: &'a Sender,
) -> [&'a [u8]; 9] {
    let flag = |present: bool| if present { &b"1"[..] } else { &b"0"[..] };
    let id = client.id.as_deref().unwrap_or("").as_bytes();
    let (kind, a, b): (&[u8], &[u8], &[u8]) = match (&client.credential, identity) {
        (Credential::Assertion { kind, .. }, Some(identity)) => {
            (b"assertion-identity", kind.as_bytes(), identity.as_bytes())
        }
        (Credential::Assertion { kind, assertion }, None) => {
            (b"assertion", kind.as_bytes(), assertion.as_bytes())
        }
        (Credential::Secret(secret), _) => (b"secret", secret.as_bytes(), b""),
        (Credential::None, _) => (b"none", b"", b""),
    };
    let (sender_kind, sender): (&[u8], &[u8]) = match sender {
        Sender::None => (b"none", b""),
        #[cfg(feature = "jwt")]
        Sender::Key(thumbprint, _) => (b"jkt", thumbprint),
        #[cfg(not(feature = "jwt"))]
        Sender::Proof(proof) => (b"proof", proof),
    };
    [
        flag(client.id.is_some()),
        id,
        kind,
        a,
        b,
        flag(binding.is_some()),
        binding.unwrap_or(b""),
        sender_kind,
        sender,
    ]
}

pub(super) fn admission(keys: &Fingerprinter, token: &str, verified: &Verified) -> Admission {
    let mut admission = Admission::new()
        .seal(keys.token_seal(token))
        .tag(keys.token_tag(token));
    if let Some(subject) = &verified.subject {
        admission = admission.group(keys.subject_group(subject));
    }
    if let Some(expires_at) = verified.expires_at {
        admission = admission.not_after(expires_at);
    }
    admission
}
