//! [`JwtVerifierBuilder`], and the self-test of the crypto backend that `build` runs.

use std::{
    collections::HashSet,
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    time::Duration,
};

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation,
    errors::Error as JwtError,
};
use serde::de::IgnoredAny;

use super::{
    ConfigError, Inner, JwtVerifier, MAX_LEEWAY, RedactedKey, TokenType, strip_application,
};

/// Builds a [`JwtVerifier`]; start with [`JwtVerifier::builder`].
///
/// A token-type rule is required: [`typ`](Self::typ), [`claim`](Self::claim) or, explicitly,
/// [`any_token_type`](Self::any_token_type). When several are called, the last one wins.
#[derive(Clone)]
pub struct JwtVerifierBuilder {
    pub(super) key: DecodingKey,
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) leeway: Duration,
    pub(super) issuer: Option<Vec<String>>,
    pub(super) audience: Option<Vec<String>>,
    pub(super) token_type: Option<TokenType>,
    pub(super) max_len: usize,
    pub(super) max_subject_len: usize,
}

impl fmt::Debug for JwtVerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifierBuilder")
            .field("key", &RedactedKey(self.key.family()))
            .field("algorithms", &self.algorithms)
            .field("leeway", &self.leeway)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("token_type", &self.token_type)
            .field("max_len", &self.max_len)
            .field("max_subject_len", &self.max_subject_len)
            .finish()
    }
}

impl JwtVerifierBuilder {
    /// Clock-skew allowance for `exp` and `nbf`, in whole seconds (fractions are dropped), at
    /// most one hour; also added to the reported expiry. Default: 5 seconds.
    #[must_use]
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Requires an `iss` claim equal to one of `issuers`. Default: `iss` is not checked.
    #[must_use]
    pub fn issuer(mut self, issuers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.issuer = Some(issuers.into_iter().map(Into::into).collect());
        self
    }

    /// Requires an `aud` claim naming one of `audiences`. Default: `aud` is not checked (and
    /// tokens carrying any `aud` are accepted).
    #[must_use]
    pub fn audience(mut self, audiences: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.audience = Some(audiences.into_iter().map(Into::into).collect());
        self
    }

    /// Requires the JOSE header `typ` to be `typ` (for example `refresh+jwt`), compared
    /// case-insensitively and with or without the `application/` prefix, as RFC 8725 §3.11
    /// and RFC 9068 (`at+jwt`) use it. Default: no token-type rule, which `build` refuses.
    #[must_use]
    pub fn typ(mut self, typ: impl Into<String>) -> Self {
        let typ = typ.into();
        self.token_type = Some(TokenType::Header(strip_application(&typ).to_owned()));
        self
    }

    /// Requires the claim `name` to be a string equal to `value`, for example `token_use` =
    /// `refresh`. Default: no token-type rule, which `build` refuses.
    #[must_use]
    pub fn claim(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.token_type = Some(TokenType::Claim {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Accepts every token the key signed, whatever its type. Default: no token-type rule,
    /// which `build` refuses.
    ///
    /// Unsafe when access and refresh tokens are signed with the same key: an access token
    /// would then be accepted as a refresh token. Use it only when the key signs refresh
    /// tokens alone.
    #[must_use]
    pub fn any_token_type(mut self) -> Self {
        self.token_type = Some(TokenType::Any);
        self
    }

    /// The longest token accepted, in bytes; longer ones are refused before any decoding.
    /// Default: 4096 ([`DEFAULT_MAX_TOKEN_LEN`](crate::token::DEFAULT_MAX_TOKEN_LEN)).
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// The longest `sub` accepted, in bytes. Default: 256.
    #[must_use]
    pub fn max_subject_len(mut self, max_subject_len: usize) -> Self {
        self.max_subject_len = max_subject_len;
        self
    }

    /// Checks the configuration and builds the verifier.
    ///
    /// Fails without a token-type rule, with no algorithms or algorithms outside the key's
    /// family, with an empty HMAC secret, issuer or audience list, `typ` or claim, a zero
    /// limit or a leeway over an hour. It also signs and verifies a throwaway token, so that a
    /// `jsonwebtoken` without a usable crypto backend fails here rather than on the first
    /// request ([`ConfigError::CryptoBackend`]).
    pub fn build(self) -> Result<JwtVerifier, ConfigError> {
        let token_type = self.token_type.ok_or(ConfigError::NoTokenType)?;
        match &token_type {
            TokenType::Header(typ) if typ.is_empty() => {
                return Err(ConfigError::InvalidSetting("typ is empty"));
            }
            TokenType::Claim { name, value } if name.is_empty() || value.is_empty() => {
                return Err(ConfigError::InvalidSetting("token type claim is empty"));
            }
            _ => {}
        }

        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        let family = self.key.family();
        if self.algorithms.iter().any(|alg| alg.family() != family) {
            return Err(ConfigError::AlgorithmMismatch);
        }
        if family == AlgorithmFamily::Hmac
            && self.key.try_get_as_bytes().is_ok_and(<[u8]>::is_empty)
        {
            return Err(ConfigError::InvalidSetting("hmac secret is empty"));
        }

        let issuer = non_empty_set(self.issuer, "issuer list is empty")?;
        let audience = non_empty_set(self.audience, "audience list is empty")?;
        if self.leeway > MAX_LEEWAY {
            return Err(ConfigError::InvalidSetting("leeway is over an hour"));
        }
        if self.max_len == 0 {
            return Err(ConfigError::InvalidSetting("max_len is zero"));
        }
        if self.max_subject_len == 0 {
            return Err(ConfigError::InvalidSetting("max_subject_len is zero"));
        }

        self_test()?;

        let mut required_spec_claims: HashSet<String> =
            ["exp", "sub"].into_iter().map(String::from).collect();
        if issuer.is_some() {
            required_spec_claims.insert("iss".to_owned());
        }
        if audience.is_some() {
            required_spec_claims.insert("aud".to_owned());
        }
        let leeway_secs = self.leeway.as_secs();
        // Every field is set here: `Validation::new`'s defaults (60 s leeway, `nbf` unchecked,
        // only `exp` required) are not ours. A struct literal also fails to compile if a
        // later jsonwebtoken adds a field, so it cannot default silently.
        let validation = Validation {
            required_spec_claims,
            leeway: leeway_secs,
            reject_tokens_expiring_in_less_than: 0,
            validate_exp: true,
            validate_nbf: true,
            // Without a configured audience jsonwebtoken would refuse every token that has
            // an `aud`; with one, `aud` is required and must match.
            validate_aud: audience.is_some(),
            aud: audience,
            iss: issuer,
            sub: None,
            algorithms: self.algorithms,
        };

        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                key: self.key,
                validation,
                token_type,
                leeway_secs,
                max_len: self.max_len,
                max_subject_len: self.max_subject_len,
            }),
        })
    }
}

fn non_empty_set(
    list: Option<Vec<String>>,
    empty: &'static str,
) -> Result<Option<HashSet<String>>, ConfigError> {
    match list {
        Some(list) if list.is_empty() || list.iter().any(String::is_empty) => {
            Err(ConfigError::InvalidSetting(empty))
        }
        list => Ok(list.map(|list| list.into_iter().collect())),
    }
}

/// Signs and verifies a throwaway HS256 token, and checks that a wrong key is refused.
///
/// With no crypto backend, or two unified in one build, jsonwebtoken compiles and panics on
/// first use; the panic is caught here so that it becomes a `ConfigError` at build time.
pub(crate) fn self_test() -> Result<(), ConfigError> {
    const SECRET: &[u8] = b"tower-refresh-coalesce jwt self-test";
    const OTHER: &[u8] = b"tower-refresh-coalesce jwt self-test, other key";

    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, JwtError> {
        let claims = serde_json::json!({ "sub": "self-test" });
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        jsonwebtoken::decode::<IgnoredAny>(&token, &DecodingKey::from_secret(SECRET), &validation)?;
        let other = DecodingKey::from_secret(OTHER);
        Ok(jsonwebtoken::decode::<IgnoredAny>(&token, &other, &validation).is_err())
    }));
    match outcome {
        Ok(Ok(true)) => Ok(()),
        // A backend that accepts a wrong key is no backend.
        Ok(Ok(false)) => Err(ConfigError::CryptoBackend(None)),
        Ok(Err(err)) => Err(ConfigError::CryptoBackend(Some(err))),
        Err(_panic) => Err(ConfigError::CryptoBackend(None)),
    }
}
