//! [`HttpExtract`]: from an HTTP request to a key, and for a leader to a verified
//! [`RefreshGrant`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use ::http::{Request, Version};
use bytes::Bytes;
use http_body::Body;

use super::{
    DEFAULT_BODY_LIMIT,
    body::{RequestBody, read_body},
    grant::{self, RefreshGrant},
    party::{DPOP, Sender, admission, party},
};
use crate::{
    error::{BoxError, BuildError, Rejected},
    key::{Admission, Extract, Extracted, Fingerprinter},
    token::{
        DEFAULT_MAX_TOKEN_LEN, TokenSource, Verify,
        source::{self, BodyKind, Client, Credential},
    },
};

/// Finds the refresh token of an HTTP request, keys it, and verifies it before it may lead.
///
/// - The [`TokenSource`]s are tried in order (by default Bearer, the cookie
///   `refresh_token`, the JSON field `refresh_token`, and the RFC 6749 form). The body is
///   read only when a body source is configured and the content type is JSON or a form,
///   capped at [`body_limit`](Self::body_limit); the inner service receives the same bytes.
/// - **Two requests share one answer only if the inner service, given each alone, would
///   authenticate both the same way.** The key is a keyed hash of the exact token and of
///   everything else the inner service authenticates: the client id however it is sent
///   (`Authorization: Basic`, form or JSON `client_id`), the client's credential (the Basic
///   or `client_secret` secret, or the whole RFC 7523 `client_assertion` unless
///   [`client_assertion_identity`](Self::client_assertion_identity) names a stable identity),
///   the sender constraint (the RFC 7638 thumbprint of a verified DPoP proof's key), and
///   whatever [`bind`](Self::bind) adds (an mTLS certificate thumbprint, say). A request
///   with another secret, no secret or another DPoP key never meets the entry of the right
///   one.
/// - A request that finds no entry is verified with `V` (for example a
///   [`JwtVerifier`](crate::token::JwtVerifier)) before it may call the inner service, and
///   hands the inner service what was verified as a [`RefreshGrant`] extension. Entries are
///   grouped by the verified subject.
///
/// Cloning is cheap; clones share the configuration.
pub struct HttpExtract<V> {
    inner: Arc<ExtractConfig<V>>,
}

/// Mixes integrator-chosen request parts into the key (see [`HttpExtract::bind`]).
type Bind = Arc<dyn Fn(&::http::request::Parts) -> Option<Vec<u8>> + Send + Sync>;

/// Names the stable identity of a client assertion (see
/// [`HttpExtract::client_assertion_identity`]).
type AssertionIdentity =
    Arc<dyn Fn(&ClientAssertion<'_>) -> Result<String, Rejected> + Send + Sync>;

struct ExtractConfig<V> {
    paths: Option<Vec<String>>,
    sources: Vec<TokenSource>,
    reads_body: bool,
    body_limit: usize,
    max_token_len: usize,
    keys: Fingerprinter,
    secret: SecretKind,
    verifier: V,
    by_subject: bool,
    bind: Option<Bind>,
    assertion_identity: Option<AssertionIdentity>,
    #[cfg(feature = "jwt")]
    dpop: crate::token::DpopVerifier,
}

/// Where the fingerprint secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretKind {
    Random,
    Explicit,
    TooShort,
}

/// A client assertion (RFC 7523 §2.2) as the request presented it, for
/// [`HttpExtract::client_assertion_identity`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClientAssertion<'a> {
    /// The request's `client_id`, if it sent one.
    pub client_id: Option<&'a str>,
    /// `client_assertion_type`.
    pub kind: &'a str,
    /// `client_assertion`.
    pub assertion: &'a str,
}

impl<V: Verify> HttpExtract<V> {
    /// Verifies tokens with `verifier`, looks for them in [`TokenSource::defaults`], and keys
    /// them with a random secret (right for one instance; set [`secret`](Self::secret) when
    /// several instances coordinate).
    pub fn new(verifier: V) -> Self {
        let sources = TokenSource::defaults();
        Self {
            inner: Arc::new(ExtractConfig {
                paths: None,
                reads_body: sources.iter().any(TokenSource::reads_body),
                sources,
                body_limit: DEFAULT_BODY_LIMIT,
                max_token_len: DEFAULT_MAX_TOKEN_LEN,
                keys: Fingerprinter::random(),
                secret: SecretKind::Random,
                verifier,
                by_subject: false,
                bind: None,
                assertion_identity: None,
                #[cfg(feature = "jwt")]
                dpop: crate::token::DpopVerifier::new(),
            }),
        }
    }

    fn config(mut self, change: impl FnOnce(&mut ExtractConfig<V>)) -> Self {
        let config = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        change(config);
        self
    }

    /// Coalesces only requests to these paths; any other request passes through to the
    /// inner service untouched. Default: every request the layer sees.
    ///
    /// Entries are keyed by token and client, not by path: one layer must only ever see
    /// requests of one refresh endpoint. With axum, attach it to that route alone
    /// (`route_layer`); on a tonic server, where `Server::builder().layer(..)` sees every
    /// method, name the refresh method here (`/package.Service/Method`).
    #[must_use]
    pub fn paths(self, paths: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let paths = paths.into_iter().map(Into::into).collect();
        self.config(|c| c.paths = Some(paths))
    }

    /// Where tokens are looked for, in order. Default: [`TokenSource::defaults`].
    ///
    /// Client authentication in a body (`client_id`, `client_secret`, `client_assertion`) is
    /// read only when a body source is configured: with header sources alone, clients
    /// authenticate by `Authorization: Basic` or through [`bind`](Self::bind).
    #[must_use]
    pub fn sources(self, sources: impl IntoIterator<Item = TokenSource>) -> Self {
        self.config(|c| {
            c.sources = sources.into_iter().collect();
            c.reads_body = c.sources.iter().any(TokenSource::reads_body);
        })
    }

    /// The most request-body bytes read to find a token; beyond it the request gets `413`.
    /// Default: 16 KiB.
    #[must_use]
    pub fn body_limit(self, limit: usize) -> Self {
        self.config(|c| c.body_limit = limit)
    }

    /// The longest token accepted, in bytes. Default: 4096.
    #[must_use]
    pub fn max_token_len(self, max: usize) -> Self {
        self.config(|c| c.max_token_len = max)
    }

    /// The per-deployment secret of the keyed fingerprints, at least
    /// [`MIN_SECRET_LEN`](crate::MIN_SECRET_LEN) (32) bytes: a shorter one fails the
    /// layer's build. Default: 32 random bytes, which differ per process; instances that
    /// coordinate through a shared store need the same, and a layer with a store refuses to
    /// build without one.
    #[must_use]
    pub fn secret(self, secret: impl AsRef<[u8]>) -> Self {
        match Fingerprinter::new(secret) {
            Ok(keys) => self.config(|c| {
                c.keys = keys;
                c.secret = SecretKind::Explicit;
            }),
            Err(_) => self.config(|c| c.secret = SecretKind::TooShort),
        }
    }

    /// **Unsafe with rotating tokens; opt in only if you understand why.** Matches requests
    /// by the token's *subject* (and client authentication) instead of the exact token.
    ///
    /// Every request is then verified before it is matched, and any valid token of a user
    /// gets the user's live result: an old, already rotated token (possibly a stolen one)
    /// receives the fresh pair, and the identity server never sees the reuse it would have
    /// detected; two devices of one user receive each other's session. Use it only when
    /// refresh tokens do not rotate and responses carry nothing device-specific.
    ///
    /// Different subjects never share a key, and a request whose token has no subject is
    /// never coalesced (it reaches the inner service after verification). The layer refuses
    /// to build with a verifier that yields no subjects ([`Opaque`](crate::Opaque)) or with
    /// a store: subject entries are sealed under one token each and cannot be opened by
    /// another token of the subject on another instance.
    #[must_use]
    pub fn match_by_subject(self) -> Self {
        self.config(|c| c.by_subject = true)
    }

    /// Mixes request parts the integrator chooses into the key: two requests share an answer
    /// only if `bind` returns the same bytes for both. For example the thumbprint of an mTLS
    /// client certificate (RFC 8705) that the TLS acceptor put in the request's extensions.
    /// Default: nothing.
    ///
    /// ```
    /// use tower_refresh_coalesce::{HttpExtract, Opaque};
    ///
    /// /// What a TLS acceptor stored in the request's extensions.
    /// #[derive(Clone)]
    /// struct CertThumbprint([u8; 32]);
    ///
    /// let extract = HttpExtract::new(Opaque)
    ///     .bind(|parts| parts.extensions.get::<CertThumbprint>().map(|c| c.0.to_vec()));
    /// # let _ = extract;
    /// ```
    #[must_use]
    pub fn bind(
        self,
        bind: impl Fn(&::http::request::Parts) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        self.config(|c| c.bind = Some(Arc::new(bind)))
    }

    /// Keys client assertions (RFC 7523) by the stable identity `identify` returns (for
    /// example the verified `iss` of the assertion) instead of by the whole assertion. It
    /// runs on every request that carries an assertion, before the key is known; an error
    /// refuses the request. Default: the key holds the whole assertion, so requests with
    /// fresh assertions never share an answer.
    #[must_use]
    pub fn client_assertion_identity(
        self,
        identify: impl Fn(&ClientAssertion<'_>) -> Result<String, Rejected> + Send + Sync + 'static,
    ) -> Self {
        self.config(|c| c.assertion_identity = Some(Arc::new(identify)))
    }

    /// How DPoP proofs (RFC 9449) are checked. Default: [`DpopVerifier::new`]; a request
    /// with a `DPoP` header is keyed by the thumbprint of its verified proof's key, so the
    /// same client with fresh proofs from one key still coalesces.
    ///
    /// [`DpopVerifier::new`]: crate::token::DpopVerifier::new
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    #[must_use]
    pub fn dpop(self, verifier: crate::token::DpopVerifier) -> Self {
        self.config(|c| c.dpop = verifier)
    }

    /// The keys of this extractor's fingerprints, for invalidation by token or subject.
    pub(crate) fn keys(&self) -> &Fingerprinter {
        &self.inner.keys
    }

    /// What the layer's build checks of this extractor.
    pub(crate) fn problems(&self, with_store: bool) -> Result<(), BuildError> {
        let config = &*self.inner;
        if config.secret == SecretKind::TooShort {
            return Err(BuildError::new(
                "the fingerprint secret must be at least 32 bytes",
            ));
        }
        if with_store && config.secret == SecretKind::Random {
            return Err(BuildError::new(
                "a layer with a store needs an explicit fingerprint secret (HttpExtract::secret), shared by every instance",
            ));
        }
        if config.by_subject && !config.verifier.yields_subjects() {
            return Err(BuildError::new(
                "match_by_subject needs a verifier that yields subjects (Opaque yields none)",
            ));
        }
        if config.by_subject && with_store {
            return Err(BuildError::new(
                "match_by_subject does not work across instances: build the layer without a store",
            ));
        }
        Ok(())
    }
}

impl<V> Clone for HttpExtract<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V> fmt::Debug for HttpExtract<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpExtract")
            .field("paths", &self.inner.paths)
            .field("sources", &self.inner.sources)
            .field("body_limit", &self.inner.body_limit)
            .field("max_token_len", &self.inner.max_token_len)
            .field("by_subject", &self.inner.by_subject)
            .finish_non_exhaustive()
    }
}

/// A token found in a request, waiting to be verified if the request has to lead.
///
/// Opaque: it never prints the token.
pub struct Candidate {
    inner: CandidateKind,
    /// A refusal leaves the request body unread: close the HTTP/1 connection.
    closes: bool,
}

enum CandidateKind {
    Token(RefreshGrant),
    Admitted(Admission, RefreshGrant),
}

impl fmt::Debug for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Candidate(<redacted>)")
    }
}

impl<B, V> Extract<Request<B>> for HttpExtract<V>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    V: Verify,
{
    type Request = Request<RequestBody<B>>;
    type Token = Candidate;
    type Future = ExtractFuture<B>;

    fn extract(&self, request: Request<B>) -> Self::Future {
        if let Some(paths) = &self.inner.paths
            && !paths.iter().any(|path| path == request.uri().path())
        {
            let request = request.map(RequestBody::streaming);
            return ExtractFuture::ready(Ok(Extracted::Bypass(request)));
        }
        let (parts, body) = request.into_parts();
        // A refusal sent before the body was read leaves the rest of it on an HTTP/1
        // connection: such refusals carry `Connection: close` (HTTP/2 ends only the stream).
        let http1 = parts.version <= Version::HTTP_11;
        if let Err(refused) = grant::one_content_type(&parts.headers) {
            let closes = http1 && !body.is_end_stream();
            return ExtractFuture::ready(Err(refused.closing(closes).into()));
        }
        let kind = source::body_kind(&parts.headers);
        if !(self.inner.reads_body && matches!(kind, Some(BodyKind::Json | BodyKind::Form))) {
            // Header sources only: decided now, and the body streams on untouched.
            let unread = !body.is_end_stream();
            let result =
                self.inner
                    .finish(parts, RequestBody::streaming(body), None, unread, http1);
            return ExtractFuture::ready(result);
        }
        let config = self.inner.clone();
        ExtractFuture::reading(async move {
            let limit = config.body_limit;
            let bytes = read_body(body, &parts.headers, limit)
                .await
                .map_err(|refused| refused.closing(http1))?;
            let kind = kind.unwrap_or(BodyKind::Other);
            let body = RequestBody::buffered(bytes.clone());
            config.finish(parts, body, Some((&bytes, kind)), false, http1)
        })
    }

    fn admit(
        &self,
        candidate: Candidate,
        request: &mut Self::Request,
    ) -> Result<Admission, BoxError> {
        let (admission, grant) = match candidate.inner {
            CandidateKind::Token(grant) => {
                let verified = self
                    .inner
                    .verifier
                    .verify(grant.token())
                    .map_err(|refused| refused.closing(candidate.closes))?;
                let admission = admission(&self.inner.keys, grant.token(), &verified);
                (admission, grant.with_claims(verified))
            }
            CandidateKind::Admitted(admission, grant) => (admission, grant),
        };
        request.extensions_mut().insert(grant);
        Ok(admission)
    }

    fn subject<'r>(&self, request: &'r Self::Request) -> Option<&'r str> {
        let grant = request.extensions().get::<RefreshGrant>()?;
        grant.claims()?.subject.as_deref()
    }
}

type ExtractResult<B> = Result<Extracted<Candidate, Request<RequestBody<B>>>, BoxError>;

impl<V: Verify> ExtractConfig<V> {
    /// Finds the token and keys the request. `unread`: the request has a body that is left
    /// unread, so a refusal on an HTTP/1 connection closes it.
    fn finish<B>(
        &self,
        parts: ::http::request::Parts,
        body: RequestBody<B>,
        read: Option<(&Bytes, BodyKind)>,
        unread: bool,
        http1: bool,
    ) -> ExtractResult<B> {
        let closes = unread && http1;
        let close = |refused: Rejected| refused.closing(closes);
        let presented = grant::presented(
            &self.sources,
            &parts.headers,
            read,
            unread,
            self.max_token_len,
        )
        .map_err(close)?;
        let Some((token, client)) = presented else {
            return Ok(Extracted::Bypass(Request::from_parts(parts, body)));
        };
        let identity = self.assertion_identity(&client).map_err(close)?;
        let binding = self.bind.as_ref().and_then(|bind| bind(&parts));
        let sender = self.sender(&parts).map_err(close)?;
        let grant = RefreshGrant::new(token, client).with_sender(sender.thumbprint());
        let party = party(
            grant.client(),
            identity.as_deref(),
            binding.as_deref(),
            &sender,
        );
        let mut request = Request::from_parts(parts, body);
        if !self.by_subject {
            let key = self.keys.token_key(grant.token(), &party);
            return Ok(Extracted::Coalesce {
                key,
                token: Candidate {
                    inner: CandidateKind::Token(grant),
                    closes,
                },
                request,
            });
        }
        // Verify first: the key depends on what verification learns.
        let verified = self.verifier.verify(grant.token()).map_err(close)?;
        let Some(subject) = verified.subject.as_deref().filter(|s| !s.is_empty()) else {
            // No subject, no key: the request never coalesces.
            request.extensions_mut().insert(grant.with_claims(verified));
            return Ok(Extracted::Bypass(request));
        };
        let key = self.keys.subject_key(subject, &party);
        let admission = admission(&self.keys, grant.token(), &verified);
        Ok(Extracted::Coalesce {
            key,
            token: Candidate {
                inner: CandidateKind::Admitted(admission, grant.with_claims(verified)),
                closes,
            },
            request,
        })
    }

    /// The stable identity of a client assertion, where the integrator names one.
    fn assertion_identity(&self, client: &Client) -> Result<Option<String>, Rejected> {
        match (&self.assertion_identity, &client.credential) {
            (Some(identify), Credential::Assertion { kind, assertion }) => {
                identify(&ClientAssertion {
                    client_id: client.id.as_deref(),
                    kind,
                    assertion,
                })
                .map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The request's sender constraint: the thumbprint of its verified DPoP proof's key.
    fn sender(&self, parts: &::http::request::Parts) -> Result<Sender, Rejected> {
        if !parts.headers.contains_key(DPOP) {
            return Ok(Sender::None);
        }
        #[cfg(feature = "jwt")]
        {
            // Refuses a request with more than one proof too.
            let checked = self
                .dpop
                .check_request(parts, std::time::SystemTime::now())?;
            Ok(Sender::Key(*checked.thumbprint(), checked.thumbprint_b64()))
        }
        #[cfg(not(feature = "jwt"))]
        {
            // No checker without `jwt`: key on the whole proof, so that no two proofs share
            // an answer.
            let invalid = |why| Rejected::new(crate::error::Rejection::InvalidDpopProof(why));
            let mut proofs = parts.headers.get_all(DPOP).iter();
            let proof = proofs.next().expect("the header is present");
            if proofs.next().is_some() {
                return Err(invalid("more than one DPoP header"));
            }
            Ok(Sender::Proof(proof.as_bytes().to_vec()))
        }
    }
}

/// The future of [`HttpExtract`]'s `extract`: ready at once when only headers are looked at,
/// otherwise reading the body.
pub struct ExtractFuture<B> {
    state: ExtractState<B>,
}

type ReadFuture<B> = Pin<Box<dyn Future<Output = ExtractResult<B>> + Send>>;

// The ready variant is the common case (header sources); boxing it would allocate on every
// request to save stack space in a future that lives only until the key is known.
#[allow(clippy::large_enum_variant)]
enum ExtractState<B> {
    Ready(Option<ExtractResult<B>>),
    Reading(ReadFuture<B>),
}

impl<B> ExtractFuture<B> {
    fn ready(result: ExtractResult<B>) -> Self {
        Self {
            state: ExtractState::Ready(Some(result)),
        }
    }

    fn reading(future: impl Future<Output = ExtractResult<B>> + Send + 'static) -> Self {
        Self {
            state: ExtractState::Reading(Box::pin(future)),
        }
    }
}

// Nothing in it is pinned structurally: the result is moved out, the reading future is boxed.
impl<B> Unpin for ExtractFuture<B> {}

impl<B> Future for ExtractFuture<B> {
    type Output = ExtractResult<B>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.as_mut().get_mut().state {
            ExtractState::Ready(result) => Poll::Ready(
                result
                    .take()
                    .expect("ExtractFuture polled after completion"),
            ),
            ExtractState::Reading(future) => future.as_mut().poll(cx),
        }
    }
}

impl<B> fmt::Debug for ExtractFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ExtractState::Ready(_) => "ready",
            ExtractState::Reading(_) => "reading body",
        };
        f.debug_struct("ExtractFuture")
            .field("state", &state)
            .finish()
    }
}
